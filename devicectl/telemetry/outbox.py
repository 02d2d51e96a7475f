"""The durable outbox: QoS 1 telemetry waits here (SQLite, in the data dir) until the broker acks.

A message is written first, with its per-topic ``seq`` assigned in the same transaction, and
deleted once its PUBACK arrives; after a reconnection, or at the next start-up, whatever is left
is delivered again in insertion order (so per-topic order holds; a subscriber may see a repeat of
a message whose PUBACK was lost, never a reordering of new ones). The same file keeps the ``seq``
counters and the daemon's ``boot`` counter, so both survive restarts.

Bounded by payload bytes: past the bound the oldest ``pulses`` batches go first, then superseded
``state``/``session``/``log/checkpoint`` messages (a newer one for the same retained topic is
queued); alerts and session events are never dropped, so the bound may be exceeded by them alone.

A disk that refuses writes (full, read-only, failing) must not silence telemetry while the broker
is there to take it, least of all the alert saying the session log cannot be written: from the
first failed write, messages (and their seqs) are kept in memory, in order after the stored ones,
and delivered like them; the disk is tried again once they are all delivered, and the seq
counters advanced meanwhile are written with the first message stored. What is only in memory
is lost if the daemon stops first (:attr:`Outbox.in_memory` says how much).

Writes are synchronous on the caller's thread: an insert and commit in WAL mode with
``synchronous=NORMAL`` (no fsync per commit) costs 80-150 µs on the reference machine (see
``benchmarks/telemetry.py``); the callers are never the per-pulse path (pulses arrive here in
100 ms batches). Automatic WAL checkpoints, which fsync, are off on this connection:
:meth:`checkpoint` runs from a worker thread (every few seconds, from ``Telemetry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from devicectl.errors import ConfigError, DevicectlError

__all__ = ["Outbox", "OutboxRow", "OverflowReport"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    stream TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    boot INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# Dropped first when the outbox is over its bound, in this order; anything else is kept.
_DROPPABLE = ("pulses",)
# A newer log checkpoint covers everything an older one did (the chain passes through both).
_SUPERSEDABLE = ("state", "session", "log-checkpoint")


class OutboxRow(NamedTuple):
    """One stored message. A named tuple: built once per message sent, from SQLite's own tuple
    (half the cost of a frozen dataclass, whose ``__init__`` sets each field through
    ``object.__setattr__``)."""

    id: int
    topic: str
    stream: str
    payload: bytes
    qos: int
    retain: bool
    boot: int


@dataclass(frozen=True, slots=True)
class OverflowReport:
    """What one enqueue had to drop to honour the bound."""

    dropped_messages: int
    dropped_bytes: int
    still_over: bool


class OutboxBusy(DevicectlError):
    """Another process holds this outbox (an earlier telemetry worker still flushing)."""


class Outbox:
    """SQLite outbox, seq and boot counters. One per data dir, held by one process at a time (an
    exclusive lock on ``<outbox>.lock``: two writers would reuse row ids and seqs); not
    thread-safe (one event loop)."""

    def __init__(self, path: Path, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes < 4096:
            raise ConfigError("telemetry.outbox_max_bytes", max_bytes, "at least 4096 bytes")
        self.path = path
        self.max_bytes = max_bytes
        self._lock_fd = _hold(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # no checkpoint inside a commit on the event loop (it fsyncs: milliseconds on
            # eMMC); :meth:`checkpoint` runs from a worker thread instead
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            os.close(self._lock_fd)
            raise ConfigError(
                "telemetry.data_dir", str(path.parent), f"a writable dir ({exc})"
            ) from exc
        self._counters: dict[str, int] = dict(
            self._db.execute("SELECT name, value FROM counters").fetchall()
        )
        self._count = self._bytes = 0
        self._recount()
        self._acked: list[int] = []
        self._acked_bytes = 0  # the sizes given with the acks in _acked
        self._acked_unsized = False  # some ack came without its size
        self.boot = 0
        # Explicit ids, so that rows kept in memory and rows stored after them stay in order.
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM outbox), 0), "
            "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0))"
        ).fetchone()
        self._next_id = int(row[0]) + 1
        self._memory: deque[OutboxRow] = deque()  # while the disk refuses writes
        self._unpersisted: set[str] = set()  # counters advanced in memory only
        self.unwritable: str | None = None  # why the last write failed, until one succeeds

    # -- counters ---------------------------------------------------------------------------

    def start_boot(self) -> int:
        """Increment and persist the boot counter; returns this run's boot number."""
        self.boot = self._counters.get("boot", 0) + 1
        self._set_counter("boot", self.boot)
        return self.boot

    def next_seq(self, topic: str) -> int:
        """Assign and persist the next seq of a topic not carried by the outbox (metrics);
        kept in memory, and written later, while the disk refuses writes."""
        name = "seq:" + topic
        seq = self._counters.get(name, 0) + 1
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._set_counter(name, seq)
        except sqlite3.Error as exc:
            self._counters[name] = seq
            self._unpersisted.add(name)
            self._refused(exc)
        return seq

    def resume_boot(self, boot: int) -> int:
        """This run's boot, already counted by :meth:`start_boot` (a telemetry worker started
        again within the same daemon run); returns it."""
        if not 1 <= boot <= self._counters.get("boot", 0):
            raise ConfigError("telemetry.resume_boot", boot, "a boot already started")
        self.boot = boot
        return boot

    def peek_seq(self, topic: str) -> int:
        """The last seq assigned on ``topic`` (0 if none)."""
        return self._counters.get("seq:" + topic, 0)

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
        self._counters[name] = value

    # -- messages ---------------------------------------------------------------------------

    def enqueue(
        self,
        topic: str,
        stream: str,
        build: Callable[[int], bytes],
        *,
        qos: int = 1,
        retain: bool = False,
        numbered: bool = True,
    ) -> tuple[int, OverflowReport | None]:
        """Assign the topic's next seq, build the payload with it, store both atomically.

        ``build`` takes the seq and returns the encoded payload; with ``numbered=False`` (the
        empty ``session`` message) no seq is consumed and ``build`` gets 0.
        Returns (seq, what was dropped to stay within the bound, or None).
        """
        name = "seq:" + topic
        seq = self._counters.get(name, 0) + 1 if numbered else 0
        payload: bytes = build(seq)
        row_id = self._next_id
        stored = not self._memory and self._store(
            row_id, topic, stream, payload, qos, retain, name, seq
        )
        if not stored:
            self._memory.append(OutboxRow(row_id, topic, stream, payload, qos, retain, self.boot))
            if numbered:
                self._counters[name] = seq
                self._unpersisted.add(name)
        self._next_id = row_id + 1
        self._count += 1
        self._bytes += len(payload)
        report = self._enforce_bound() if self._bytes > self.max_bytes else None
        return seq, report

    def _store(
        self,
        row_id: int,
        topic: str,
        stream: str,
        payload: bytes,
        qos: int,
        retain: bool,
        name: str,
        seq: int,
    ) -> bool:
        """Write one message (and its counter, and any counter only in memory) in one
        transaction; False, with :attr:`unwritable` set, if the disk refused."""
        counters = {n: self._counters[n] for n in self._unpersisted}
        if seq:
            counters[name] = seq
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO outbox(id, topic, stream, payload, qos, retain, boot) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row_id, topic, stream, payload, qos, int(retain), self.boot),
                )
                for counter, value in counters.items():
                    self._set_counter(counter, value)
        except sqlite3.Error as exc:  # rolled back; the counters stay advanced in memory
            self._refused(exc)
            return False
        self._unpersisted.clear()
        self.unwritable = None
        return True

    def fetch(self, after: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` messages with id > ``after``, oldest first (stored ones, then those
        kept in memory, which all came after them)."""
        rows = self._db.execute(
            "SELECT id, topic, stream, payload, qos, retain, boot FROM outbox "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        out = [OutboxRow(r[0], r[1], r[2], r[3], r[4], r[5] != 0, r[6]) for r in rows]
        if self._memory and len(out) < limit:
            out.extend(r for r in self._memory if r.id > after)
            del out[limit:]
        return out

    def _forget(self, row: OutboxRow) -> None:
        """A row kept in memory is delivered, or dropped by the bound."""
        self._memory.remove(row)
        self._count -= 1
        self._bytes -= len(row.payload)

    def _refused(self, exc: sqlite3.Error) -> None:
        self.unwritable = str(exc) or type(exc).__name__

    @property
    def in_memory(self) -> int:
        """Messages kept in memory because the disk refused them (lost if the daemon stops)."""
        return len(self._memory)

    def ack(self, row_id: int, size: int | None = None) -> None:
        """Mark a message delivered; deleted at the next :meth:`flush_acks` (batched).

        ``size``, the stored payload's length (``len(row.payload)``), saves reading it back
        when the row is deleted; without it the delete returns each row's length.
        """
        memory = self._memory
        if memory and row_id >= memory[0].id:
            row = next((r for r in memory if r.id == row_id), None)
            if row is not None:
                self._forget(row)
            return
        self._acked.append(row_id)
        if size is None:
            self._acked_unsized = True
        else:
            self._acked_bytes += size
        if len(self._acked) >= 256:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Delete every acknowledged message in one transaction.

        Acknowledged ids are deleted as runs of consecutive ids (``BETWEEN``: each id in a run
        was acknowledged, so nothing else can be caught), one statement per run; messages are
        sent and acknowledged in outbox order, so a batch is usually one run.
        """
        if not self._acked:
            return
        try:
            self._delete_acked()
        except sqlite3.Error as exc:  # a full disk: the rows stay, delivered; deleted later
            self._refused(exc)

    def _delete_acked(self) -> None:
        ids = self._acked
        acked_bytes = self._acked_bytes
        unsized = self._acked_unsized
        ids.sort()
        runs: list[tuple[int, int]] = []
        first = last = ids[0]
        for row_id in ids[1:]:
            if row_id == last + 1:
                last = row_id
            elif row_id != last:  # (an id acknowledged twice counts once)
                runs.append((first, last))
                first = last = row_id
        runs.append((first, last))
        deleted = expected = 0
        removed: list[int] = []
        with self._db:
            self._db.execute("BEGIN")
            for lo, hi in runs:
                if unsized:
                    cur = self._db.execute(
                        "DELETE FROM outbox WHERE id BETWEEN ? AND ? RETURNING LENGTH(payload)",
                        (lo, hi),
                    )
                    removed.extend(r[0] for r in cur.fetchall())
                else:
                    deleted += self._db.execute(
                        "DELETE FROM outbox WHERE id BETWEEN ? AND ?", (lo, hi)
                    ).rowcount
                    expected += hi - lo + 1
        # committed: only now forget the acks (a failed commit keeps them for the next flush)
        self._acked, self._acked_bytes, self._acked_unsized = [], 0, False
        if unsized:
            self._count -= len(removed)
            self._bytes -= sum(removed)
            return
        if deleted == expected == len(ids):
            self._count -= deleted
            self._bytes -= acked_bytes
        else:
            # some were gone already (dropped by the bound while in flight) or acked twice:
            # the sizes passed in no longer add up, so count again
            self._recount()

    def _recount(self) -> None:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self._count, self._bytes = row[0], row[1]

    def last_id(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()
        return int(row[0])

    @property
    def depth(self) -> int:
        """Messages waiting (including acked ones not yet flushed)."""
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _enforce_bound(self) -> OverflowReport:
        dropped = dropped_bytes = 0
        for stream in _DROPPABLE:
            while self._bytes > self.max_bytes:
                n, b = self._drop_oldest(
                    "stream = ? AND id = (SELECT MIN(id) FROM outbox WHERE stream = ?)",
                    (stream, stream),
                )
                if n == 0:
                    break
                dropped, dropped_bytes = dropped + n, dropped_bytes + b
            while self._bytes > self.max_bytes:  # then those only in memory, oldest first
                row = next((r for r in self._memory if r.stream == stream), None)
                if row is None:
                    break
                self._forget(row)
                dropped, dropped_bytes = dropped + 1, dropped_bytes + len(row.payload)
        for stream in _SUPERSEDABLE:
            while self._bytes > self.max_bytes:
                # the oldest message of a retained topic that has a newer one queued
                n, b = self._drop_oldest(
                    "id = (SELECT MIN(o.id) FROM outbox o WHERE o.stream = ? AND EXISTS "
                    "(SELECT 1 FROM outbox n WHERE n.topic = o.topic AND n.id > o.id))",
                    (stream,),
                )
                if n == 0:
                    break
                dropped, dropped_bytes = dropped + n, dropped_bytes + b
        return OverflowReport(dropped, dropped_bytes, self._bytes > self.max_bytes)

    def _drop_oldest(self, where: str, args: tuple[object, ...]) -> tuple[int, int]:
        try:
            with self._db:
                self._db.execute("BEGIN")
                sizes = [
                    r[0]
                    for r in self._db.execute(
                        f"DELETE FROM outbox WHERE {where} RETURNING LENGTH(payload)",  # noqa: S608
                        args,
                    ).fetchall()
                ]
        except sqlite3.Error as exc:  # a refusing disk cannot even delete: nothing dropped
            self._refused(exc)
            return 0, 0
        self._count -= len(sizes)
        self._bytes -= sum(sizes)
        return len(sizes), sum(sizes)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without blocking writers (PASSIVE). Thread-safe:
        meant for a worker thread (it uses its own connection)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=1.0)) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Flush and close; messages only in memory (:attr:`in_memory`) are lost."""
        self.flush_acks()
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        os.close(self._lock_fd)  # the lock goes with it


def _hold(path: Path) -> int:
    """Take ``<path>.lock`` exclusively, or raise :class:`OutboxBusy` (or ConfigError: no dir)."""
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            "telemetry.data_dir", str(path.parent), f"a writable dir ({exc})"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutboxBusy(
            f"the telemetry outbox {path} is held by another process (an earlier telemetry "
            "worker still flushing?)"
        ) from None
    return fd
