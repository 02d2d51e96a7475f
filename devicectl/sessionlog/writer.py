"""The session log as the daemon uses it: cheap calls in, group commits on a writer thread.

    daemon's event loop                      writer thread (own SQLite connection)
    ───────────────────                      ─────────────────────────────────────
    record_pulse(...)  ─ tuple ─▶ SimpleQueue ─▶ drain everything queued ─▶ seq, SHA-256 chain
    record_event(...)  ─ JSON  ─▶            ─▶ executemany + chain_head ─▶ COMMIT (one per drain)
    healthy / check()  ◀── failure flag ──────── any error: LogUnavailable, on_unavailable(exc)

No call made on the daemon's thread touches the disk or hashes anything, except :meth:`open`,
:meth:`flush` and :meth:`close` (start-up and shut-down; use :meth:`flush_async` / :meth:`aclose`
from a running loop). The writer commits whatever has queued up, at most once per
``commit_interval_s`` (group commit: each commit is still durable, ``synchronous=FULL``; the
interval bounds the ``fdatasync`` calls per second to ~1/``commit_interval_s`` whatever the pulse
rate, the WAL checkpoints the writer runs itself included), so the delay from a pulse's arrival
to its commit is at most the interval plus one commit's time (well under 50 ms with the default
10 ms). :attr:`commits`, :attr:`syncs` and :meth:`commit_stats` count them.

No log, no laser: the daemon learns that the log cannot be written from
- ``on_unavailable(exc)``, called once, *on the writer thread* (hand it to the loop with
  ``loop.call_soon_threadsafe``), and
- :attr:`healthy` / :attr:`failure` (attribute reads, safe to poll from the loop; a record the
  writer has held uncommitted for more than ``stall_timeout_s`` also counts — the group-commit
  wait included, so the deadline is per pulse, not per commit), or :meth:`check`, which raises the
  :class:`~devicectl.errors.LogUnavailable` with its one-line cause.
A failure latches for the life of the object: reopen the log, then :meth:`recover_interrupted`
reconciles with the device's pulse counter, so pulses fired meanwhile are charged, not lost.
:meth:`start_session` refuses (raises) while the log is unhealthy; the per-pulse calls never raise.

Signed checkpoints (:mod:`devicectl.sessionlog.checkpoint`), given a signing key and a device id:
the writer thread appends one to the chain, in the commit that reaches it, at the first commit
after ``checkpoint_every`` records, ``checkpoint_interval_s`` after the first unwitnessed record
(``idle_checkpoint_interval_s`` outside a session; the thread wakes for it), after every
``session_ended`` record and every reconciliation after a crash, on :meth:`checkpoint_async` and
at :meth:`close`. One signature per
checkpoint, never per record. ``on_checkpoint(checkpoint)`` runs on the writer thread after the
commit that holds it (hand it to the loop, like ``on_unavailable``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from pydantic import ValidationError

from devicectl.errors import LogUnavailable
from devicectl.sessionlog import keys, reader, store
from devicectl.sessionlog.chain import MIN_SESSION_ID, pulse_hash, record_hash
from devicectl.sessionlog.checkpoint import (
    CHECKPOINT_KIND,
    KEY_KIND,
    Checkpoint,
    make_checkpoint,
)
from devicectl.sessionlog.model import (
    DEFAULT_PATIENT_REF_PATTERN,
    FAULT_EVENT_KINDS,
    MAX_DAYS_BETWEEN_SESSIONS,
    MIN_DAYS_BETWEEN_SESSIONS,
    CoursePosition,
    CourseWarning,
    InvalidSessionInfo,
    LimitsInForce,
    PostCare,
    Provenance,
    SessionInfo,
    SessionOpened,
    SessionRefused,
    Summary,
    Zone,
    check_patient_ref,
    checklist_problems,
    parse_session_info,
    spot_area_cm2,
)

__all__ = ["DEFAULT_COMMIT_INTERVAL_S", "Recovery", "SessionLog"]

# Group commit: at most one fdatasync per this many seconds, on average over each WAL checkpoint
# cycle. benchmarks/cpu.py: 10 ms takes the writer from ~1,000 commits/s to <= 100 at any rate.
DEFAULT_COMMIT_INTERVAL_S = 0.010
# The writer checkpoints the WAL itself (SQLite's automatic checkpoint is off on its connection),
# after this many commits, so that the checkpoint's own syncs are counted and paid for: with
# synchronous=FULL a checkpoint syncs the WAL and the database, and the next commit syncs the
# restarted WAL's header, at most three more fdatasync calls. The commit period is stretched by
# that share (10 ms -> 10.3 ms) so that commits and checkpoints together stay within one
# fdatasync per interval. 100 commits is ~600-700 WAL pages at 500-10,000 pulses/s. Sooner after
# _WAL_CHECKPOINT_ROWS (~4 MB of WAL, SQLite's own default): the checkpoint runs against the stall
# deadline, and 100 commits of a long interval at a high rate (1 s at 9,900/s) would be ~100 MB to
# copy. Only intervals beyond ~40 ms at the highest rates reach it first, with a few % more syncs.
_WAL_CHECKPOINT_EVERY = 100
_WAL_CHECKPOINT_ROWS = 40_000
_SYNCS_PER_WAL_CHECKPOINT = 3
_PERIOD_STRETCH = 1 + _SYNCS_PER_WAL_CHECKPOINT / _WAL_CHECKPOINT_EVERY
_PULSE_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
_PULSE_INSERT = (
    "INSERT INTO pulses (seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone, hash) "
)
_INSERT_PULSE = _PULSE_INSERT + "VALUES " + _PULSE_ROW
_ROWS_PER_INSERT = 16  # pulses per multi-row INSERT (128 parameters, below every SQLite limit)
_INSERT_PULSES = _PULSE_INSERT + "VALUES " + ", ".join([_PULSE_ROW] * _ROWS_PER_INSERT)
_DELAYS_KEPT = 1024  # per-commit delays kept for commit_stats() (a ring, newest overwrites)

_NS_PER_DAY = 86_400 * 10**9
_EVENT_KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.")
# Clinical entries appended to a session at or after its end, each a record of its own.
CLINICAL_KINDS = frozenset({"note", "reaction", "adverse_event"})


class _Rate:
    """Events per second over the last whole window of ``width_s`` seconds (monotonic clock), and
    in all. One thread adds, any thread reads: each window's count is replaced whole."""

    __slots__ = ("_current", "_last", "_started", "_width", "total")

    def __init__(self, width_s: int) -> None:
        self.total = 0
        self._width = width_s
        self._started = time.monotonic()
        self._current = (0, 0)  # (window number, events in it)
        self._last = (0, 0)  # the previous such pair

    def add(self, n: int) -> None:
        self.total += n
        window = int(time.monotonic()) // self._width
        current = self._current
        if current[0] == window:
            self._current = (window, current[1] + n)
        else:
            self._last, self._current = current, (window, n)

    def per_s(self) -> float:
        """Over the last whole window; before one has passed, over the time since start."""
        now = time.monotonic()
        window = int(now) // self._width
        pairs = (self._current, self._last)
        if (window - 1) * self._width >= self._started:  # the previous window was whole
            for number, count in pairs:
                if number == window - 1:
                    return count / self._width
            return 0.0
        since_start = sum(count for number, count in pairs if number >= window - 1)
        return since_start / max(1.0, now - self._started)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`SessionLog.recover_interrupted` found and recorded."""

    interrupted_session: int | None
    last_pulse_no: int | None  # the last pulse_no the log accounted for before reconciling
    device_pulse_count: int
    unlogged_pulses: int  # charged at max energy
    charged_energy_uj: int
    summary: Summary | None  # of the interrupted session
    counter_mismatch: bool  # the device reports fewer pulses than the log holds (board replaced?)


@dataclass(frozen=True, slots=True)
class _Record:
    session_id: int | None
    kind: str
    at_ns: int
    body: str


@dataclass(frozen=True, slots=True)
class _Marker:
    """Queued behind the records it waits for; ``done`` runs on the writer thread."""

    done: Callable[[], None]
    stop: bool = False
    checkpoint: str | None = None  # a checkpoint is due at this place in the queue (its reason)


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class _SigningState:
    """What the chain says of its signing keys and device, read at open."""

    key_id: str | None  # the key the chain's last log_key record introduced
    device: str | None  # of the last checkpoint
    last_checkpoint_seq: int


class _BrokenRecord(ValueError):
    """A stored record the writer never wrote (its body is not what it stores)."""


def _last_field(conn: sqlite3.Connection, kind: str, name: str) -> tuple[int, str] | None:
    """(seq, the text field ``name``) of the last record of ``kind``; :class:`_BrokenRecord` when
    its body is not a JSON object holding that text (anyone who can write the file can append
    such a record; the writer never stores one)."""
    row = conn.execute(
        "SELECT seq, body FROM records WHERE kind = ? ORDER BY seq DESC LIMIT 1", (kind,)
    ).fetchone()
    if row is None:
        return None
    try:
        body = json.loads(row[1])
    except (ValueError, TypeError, RecursionError):
        body = None
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str):
        raise _BrokenRecord(f"record {row[0]} ({kind}) is malformed: no {name} in its body")
    return int(row[0]), value


def _signing_state(conn: sqlite3.Connection) -> _SigningState:
    key = _last_field(conn, KEY_KIND, "key_id")
    last = _last_field(conn, CHECKPOINT_KIND, "device")
    return _SigningState(
        key_id=None if key is None else key[1],
        device=None if last is None else last[1],
        last_checkpoint_seq=0 if last is None else last[0],
    )


@dataclass(slots=True)
class _LiveSession:
    session_id: int
    started_ns: int
    pulses: int = 0
    zone_energy: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_fluence: float = 0.0
    fluence_per_uj: float = 0.0  # J/cm² per µJ at the current spot
    unlogged: int = 0
    unlogged_energy: int = 0
    faults: int = 0


def _parse_limits(data: Mapping[str, Any]) -> LimitsInForce:
    try:
        return LimitsInForce.model_validate(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["limits", *(str(part) for part in first["loc"])])
        raise InvalidSessionInfo(where, first.get("input"), first["msg"]) from None


def _canonical_json(body: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the exact text stored and hashed. Refused here, on the
    caller's thread, rather than failing the writer: values JSON cannot hold, lone surrogates."""
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        text.encode()
    except (TypeError, ValueError) as exc:
        raise InvalidSessionInfo("detail", body, f"JSON-serialisable values only ({exc})") from None
    return text


class SessionLog:
    """The tamper-evident session log, open for writing. Build it with :meth:`open`.

    All ``record_*`` calls come from one thread (the daemon's event loop). Host times are
    nanoseconds since the epoch (``time.time_ns()``); ``clock`` supplies them when not given.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        state: reader.LogState,
        stale_summary: Summary | None,
        stale_zone: str,
        *,
        log: Any,
        patient_ref_pattern: str,
        clock: Callable[[], int],
        on_unavailable: Callable[[LogUnavailable], None] | None,
        on_commit: Callable[[int, int | None], None] | None,
        status_interval_ns: int,
        idle_status_interval_ns: int,
        stall_timeout_s: float,
        commit_interval_s: float,
        signing: _SigningState,
        on_checkpoint: Callable[[Checkpoint], object] | None,
        checkpoint_every: int,
        checkpoint_interval_s: float,
        idle_checkpoint_interval_s: float,
    ) -> None:
        self.path = path
        self._conn = conn
        self._log = log
        self._pattern = patient_ref_pattern
        self._clock = clock
        self._on_unavailable = on_unavailable
        self._on_commit = on_commit
        self._status_interval_ns = status_interval_ns
        self._idle_status_interval_ns = idle_status_interval_ns
        self._stall_timeout_s = stall_timeout_s
        self._commit_interval_s = commit_interval_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._put = self._queue.put
        self._held: list[tuple[int, int, int, int, int, str]] = []  # record_pulse_held's, in order
        # Caller-side state (the daemon's thread only).
        self._courses = state.courses
        self._next_session_id = state.next_session_id
        self._last_pulse_no = state.last_pulse_no
        self._live: _LiveSession | None = None
        self._stale_session = state.open_session
        self._stale_summary = stale_summary
        self._stale_zone = stale_zone
        self.unacknowledged_breach = state.unacknowledged_breach  # as the log was opened
        # Where the unacknowledged breach was recorded (None: outside a session), if there is one.
        self._breach: tuple[int | None] | None = (
            None if state.unacknowledged_breach is None else (state.unacknowledged_breach_session,)
        )
        self._last_status_ns: int | None = None
        self._closed = False
        # Writer-side state (the writer thread only, read elsewhere as plain attributes).
        self._seq = state.head_seq
        self._prev = state.head_hash
        self._failure: LogUnavailable | None = None
        self._busy_since: float | None = None
        self._busy_with = "a commit"  # or "a WAL checkpoint": what a stall is stuck in
        self._checkpoint_blocked = False  # another connection holds the checkpoint (told once)
        self.committed_pulse_no = state.last_pulse_no
        self.dropped = 0  # items discarded after a failure
        self.wal_checkpoints = 0  # WAL checkpoints that copied pages into the database
        self._checkpointed_at = 0  # self.commits at the last WAL checkpoint
        self._rows_since_checkpoint = 0  # rows committed since then
        self._wal_backfilled = -1  # the pages it left copied since the WAL began (SQLite's count)
        self._commit_rate = _Rate(1)  # commits: in all, and in the last whole second
        # fdatasync calls: a commit's one, three per WAL checkpoint; over ten seconds (a cycle ~1 s)
        self._sync_rate = _Rate(10)
        self._delays_ms = [0.0] * _DELAYS_KEPT  # oldest pulse of a commit: host stamp to durable
        self._delays_n = 0
        # Checkpoints (writer thread; set_device assigns a whole attribute from the loop).
        self._key: keys.DeviceKey | None = None
        self._next_key: keys.DeviceKey | None = None
        self._key_source: keys.KeySource | None = None
        self._chain_key_id = signing.key_id
        self._device = signing.device
        self._on_checkpoint = on_checkpoint
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval_s = checkpoint_interval_s
        self._idle_checkpoint_interval_s = idle_checkpoint_interval_s
        self._last_checkpoint_seq = signing.last_checkpoint_seq
        self._covered_seq = signing.last_checkpoint_seq  # within the commit being built
        self._checkpoint_due: float | None = None  # monotonic; unwitnessed records wait till then
        self._unwitnessed_since: float | None = None  # when the first of them was committed
        self._no_device_reported = False
        self.last_checkpoint: Checkpoint | None = None
        self._thread = threading.Thread(
            target=self._run, name="devicectl-sessionlog-writer", daemon=True
        )

    # ── lifecycle ────────────────────────────────────────────────────────────────────────────

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        log: Any = None,
        patient_ref_pattern: str = DEFAULT_PATIENT_REF_PATTERN,
        synchronous: str = "FULL",
        clock: Callable[[], int] = time.time_ns,
        on_unavailable: Callable[[LogUnavailable], None] | None = None,
        on_commit: Callable[[int, int | None], None] | None = None,
        status_interval_s: float = 1.0,
        idle_status_interval_s: float = 60.0,
        stall_timeout_s: float = 2.0,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
        signing_key: keys.DeviceKey | keys.KeySource | None = None,
        device: str | None = None,
        on_checkpoint: Callable[[Checkpoint], object] | None = None,
        checkpoint_every: int = 10_000,
        checkpoint_interval_s: float = 2.0,
        idle_checkpoint_interval_s: float = 300.0,
    ) -> SessionLog:
        """Open (create, migrate) the log at ``path`` and start the writer thread.

        Raises :class:`LogUnavailable` naming the cause when the file cannot be opened or written.
        ``on_commit(pulses, last_pulse_no)`` runs on the writer thread after each commit.
        ``synchronous`` is SQLite's: FULL (default) makes every commit durable at power loss.
        ``commit_interval_s`` is the group-commit interval: commits start at least that far apart
        (0: as fast as the disk allows); it must be below ``stall_timeout_s``, the deadline (its
        3 % stretch for the WAL checkpoints included).

        ``signing_key`` (a key, or where to find or create one; see
        :mod:`devicectl.sessionlog.keys`) turns checkpoints on; they are signed for ``device``
        (the id telemetry publishes under; default: the device of the log's last checkpoint;
        :meth:`set_device` once it is known). Raises
        :class:`~devicectl.sessionlog.keys.SigningKeyError` when the key cannot be read or made.
        """
        # the group wait counts against the deadline, and the period is the interval stretched
        if not 0 <= commit_interval_s * _PERIOD_STRETCH < stall_timeout_s:
            raise ValueError(
                f"commit interval {commit_interval_s:g} s must be at least 0 and below the stall "
                f"timeout ({stall_timeout_s:g} s), with the {_PERIOD_STRETCH - 1:.0%} the WAL "
                "checkpoints add to it"
            )
        key: keys.DeviceKey | None = None
        pending: keys.DeviceKey | None = None
        source: keys.KeySource | None = None
        if isinstance(signing_key, keys.KeySource):
            source = signing_key
            key, created = keys.load_or_create(source)
            pending = keys.load_pending(source)
            if not created and keys.loosely_protected(source.path):
                (log or structlog.get_logger("devicectl.sessionlog")).warning(
                    "signing_key_readable_by_others", path=str(source.path)
                )
        elif signing_key is not None:
            key = signing_key
        path = Path(path)
        log = log if log is not None else structlog.get_logger("devicectl.sessionlog")
        conn = store.connect(path, synchronous=synchronous)
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer's own, counted (_run)
            state = reader.log_state(conn)
            stale_summary, stale_zone = None, "unknown"
            if state.open_session is not None:
                stale_summary = reader.summarize(conn, state.open_session, outcome="interrupted")
                row = conn.execute(
                    "SELECT zone FROM pulses WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
                    (state.open_session,),
                ).fetchone()
                stale_zone = row[0] if row else "unknown"
            signing = _signing_state(conn)
            # Fail now, not at the first pulse, when the file is read-only or the disk is full.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE chain_head SET seq = seq WHERE id = 1")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise LogUnavailable(f"session log {path} cannot be written: {exc}") from exc
        except _BrokenRecord as exc:
            conn.close()
            raise LogUnavailable(
                f"session log {path} cannot be used: {exc} (see devicectl log verify)"
            ) from None
        self = cls(
            path,
            conn,
            state,
            stale_summary,
            stale_zone,
            log=log,
            patient_ref_pattern=patient_ref_pattern,
            clock=clock,
            on_unavailable=on_unavailable,
            on_commit=on_commit,
            status_interval_ns=int(status_interval_s * 1e9),
            idle_status_interval_ns=int(idle_status_interval_s * 1e9),
            stall_timeout_s=stall_timeout_s,
            commit_interval_s=commit_interval_s,
            signing=signing,
            on_checkpoint=on_checkpoint,
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
            idle_checkpoint_interval_s=idle_checkpoint_interval_s,
        )
        if device is not None:
            self._device = device
        if key is not None:
            self._adopt_key(key, pending, source)
        self._thread.start()
        log.info(
            "session_log_opened",
            path=str(path),
            records=state.head_seq,
            last_pulse_no=state.last_pulse_no,
            open_session=state.open_session,
        )
        return self

    def close(self) -> None:
        """Commit everything queued, stop the writer and close the file. Idempotent; never
        raises (a failure was reported already through :attr:`failure`)."""
        if self._closed:
            return
        self._closed = True
        self._put_in_order(_Marker(done=_nothing, checkpoint="shutdown"))
        self._put_in_order(_Marker(done=lambda: None, stop=True))
        self._thread.join()
        self._log.info("session_log_closed", path=str(self.path), records=self._seq)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def flush(self, timeout: float = 5.0) -> None:
        """Block until everything recorded so far is committed; raise :class:`LogUnavailable`
        if it cannot be. For shut-down and tests; from a running loop use :meth:`flush_async`."""
        done = threading.Event()
        self._enqueue_marker(_Marker(done=done.set))
        if not done.wait(timeout):
            raise LogUnavailable(f"session log {self.path}: nothing committed for {timeout:g} s")
        self.check()

    async def flush_async(self) -> None:
        """:meth:`flush` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(resolve)

        self._enqueue_marker(_Marker(done=wake))
        await future
        self.check()

    def _enqueue_marker(self, marker: _Marker) -> None:
        if self._closed or not self._thread.is_alive():
            self.check()
            raise LogUnavailable(f"session log {self.path} is closed")
        self._put_in_order(marker)

    # ── signed checkpoints ───────────────────────────────────────────────────────────────────

    def _adopt_key(
        self,
        key: keys.DeviceKey,
        pending: keys.DeviceKey | None,
        source: keys.KeySource | None,
    ) -> None:
        """Before the writer starts: sign with ``key``, and record in the chain how it relates to
        the key the chain knows (first key; a staged rotation; a replacement nobody signed)."""
        self._key, self._key_source = key, source
        chain_key = self._chain_key_id
        if pending is not None and chain_key == pending.key_id:
            # The rotation was committed but the new key not yet moved into place (a crash).
            self._key = pending
            self._finish_rotation()
            return
        if chain_key is None:
            self._introduce(key, "first", None)
        elif chain_key != key.key_id:
            # The key the chain names is gone; nothing it signed can vouch for this one, and
            # `log verify` says so. Recorded, not hidden.
            self._introduce(key, "replacement", chain_key)
            self._log.warning("signing_key_replaced", previous_key_id=chain_key, key_id=key.key_id)
        if pending is not None:
            # introduced at the first checkpoint, asked for now, signed by ``key`` (deferred,
            # like any checkpoint, until the device id is known)
            self._next_key = pending
            self._put_in_order(_Marker(done=_nothing, checkpoint="key_rotation"))

    def _introduce(self, key: keys.DeviceKey, how: str, previous: str | None) -> None:
        body = {
            "key_id": key.key_id,
            "public_key": key.public_b64,
            "introduced": how,
            "previous_key_id": previous,
        }
        self._record(None, KEY_KIND, body, None)
        self._chain_key_id = key.key_id

    def set_device(self, device: str) -> None:
        """The device id checkpoints are signed for: the one telemetry publishes under."""
        if not device or "\n" in device:
            raise ValueError(f"device id {device!r} is empty or holds a line feed")
        self._device = device

    @property
    def key_id(self) -> str | None:
        """The id of the key checkpoints are signed with now, or ``None`` (not signing)."""
        return None if self._key is None else self._key.key_id

    async def checkpoint_async(self, reason: str = "requested") -> Checkpoint | None:
        """Append a checkpoint covering everything recorded so far (none if nothing is new since
        the last one) and return the newest checkpoint once committed; ``None`` when not signing.
        Raises :class:`LogUnavailable` if the log cannot be written."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(resolve)

        self._enqueue_marker(_Marker(done=wake, checkpoint=reason))
        await future
        self.check()
        return self.last_checkpoint

    def _finish_rotation(self) -> None:
        if self._key_source is None:
            return
        try:
            keys.finish_rotation(self._key_source)
        except keys.SigningKeyError as exc:
            self._log.error("signing_key_rotation_unfinished", cause=str(exc))

    def _append_checkpoint(
        self,
        seq: int,
        prev: bytes,
        reason: str,
        records: list[tuple[int, int | None, str, int, str, bytes]],
        made: list[tuple[Checkpoint, keys.DeviceKey | None]],
    ) -> tuple[int, bytes]:
        """Append (to this commit's rows) a checkpoint of the chain at ``seq``; writer thread."""
        key, device = self._key, self._device
        if key is None or (seq == self._covered_seq and self._next_key is None):
            return seq, prev
        if device is None:
            if not self._no_device_reported:
                self._no_device_reported = True
                self._log.warning("checkpoint_deferred", why="the device id is not known yet")
            return seq, prev
        now = self._clock()
        rotating = self._next_key
        if rotating is not None:
            body = {
                "key_id": rotating.key_id,
                "public_key": rotating.public_b64,
                "introduced": "rotation",
                "previous_key_id": key.key_id,
            }
            text = _canonical_json(body)
            seq += 1
            prev = record_hash(prev, seq, None, now, KEY_KIND, text)
            records.append((seq, None, KEY_KIND, now, text, prev))
            reason = "key_rotation"
        checkpoint = make_checkpoint(key, device, seq, prev, now, reason)
        text = _canonical_json(checkpoint.body())
        seq += 1
        prev = record_hash(prev, seq, None, now, CHECKPOINT_KIND, text)
        records.append((seq, None, CHECKPOINT_KIND, now, text, prev))
        made.append((checkpoint, rotating))
        self._covered_seq = seq
        return seq, prev

    def _checkpoint_interval(self) -> float:
        live = self._live is not None  # a plain read of the caller's attribute; a hint only
        return self._checkpoint_interval_s if live else self._idle_checkpoint_interval_s

    # ── health: how the daemon learns that it must not arm ───────────────────────────────────

    @property
    def failure(self) -> LogUnavailable | None:
        """Why the log cannot be written, or ``None``. Cheap; poll it from the loop."""
        if self._failure is not None:
            return self._failure
        busy = self._busy_since  # the oldest record the writer holds uncommitted, since then
        if busy is not None and time.monotonic() - busy > self._stall_timeout_s:
            return LogUnavailable(
                f"session log {self.path}: {self._busy_with} has been stuck for more than "
                f"{self._stall_timeout_s:g} s (disk stalled?)"
            )
        if self._closed or not self._thread.is_alive():
            return LogUnavailable(f"session log {self.path} is closed")
        return None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def check(self) -> None:
        """Raise :class:`LogUnavailable` (one-line cause) unless the log can be written."""
        failure = self.failure
        if failure is not None:
            raise failure

    # ── sessions ─────────────────────────────────────────────────────────────────────────────

    def open_session(self) -> int | None:
        """The session being recorded, or one left open by a crash (until recovered)."""
        if self._live is not None:
            return self._live.session_id
        return self._stale_session

    def last_pulse_no(self) -> int | None:
        """The last pulse_no accounted for (recorded, or charged as a gap); ``None`` if never."""
        return self._last_pulse_no

    def start_session(
        self,
        info: SessionInfo | Mapping[str, Any],
        *,
        device_pulse_count: int | None = None,
        limits: LimitsInForce | Mapping[str, Any] | None = None,
        provenance: Provenance | None = None,
        host_time_ns: int | None = None,
    ) -> SessionOpened:
        """Validate ``info``, enforce the checklist, apply the course rules and open a session.

        Raises :class:`InvalidSessionInfo` (a malformed field, a patient reference that is not
        pseudonymous), :class:`SessionRefused` (checklist incomplete, contraindication present,
        a session already open, a course of another patient) or :class:`LogUnavailable`.
        ``device_pulse_count`` (the board's counter now) lets a crash in the very first session
        be reconciled. ``limits`` are the supervisor's limits for this session
        (``LimitsInForce.from_policy(policy)``), recorded for its report; without them the report
        shows the defaults, labelled as such. ``provenance`` names the software, firmware and
        policy (name, SHA-256) in force. The course position comes from the log's history
        (:class:`CoursePosition`); course warnings (interval under 7 or over 14 days, a typed
        session number that disagrees, maintenance) are returned and recorded, never blocking.
        A contraindication answered yes is refused unless ``info.override`` carries a
        supervisor's sign-off.
        """
        self.check()
        if isinstance(info, SessionInfo):
            check_patient_ref(info.patient_ref, self._pattern)
        else:
            info = parse_session_info(info, patient_ref_pattern=self._pattern)
        if limits is not None and not isinstance(limits, LimitsInForce):
            limits = _parse_limits(limits)
        open_id = self.open_session()
        if open_id is not None:
            hint = "end it first" if self._live is not None else "recover_interrupted() first"
            raise SessionRefused("session.open", f"session {open_id} is still open; {hint}")
        problems = checklist_problems(info.checklist)
        answers = info.checklist.contraindications.model_dump()
        # A contraindication answered yes may be overridden with a supervisor's sign-off;
        # nothing else may.
        present = [
            rule
            for rule, _ in problems
            if rule.startswith("contraindication.") and answers[rule.partition(".")[2]] is True
        ]
        override = info.override
        if present and override is not None and override.role != "supervisor":
            raise SessionRefused(
                "override.signoff",
                f"{override.signed_off_by} is not a supervisor: a contraindication override "
                "needs a supervisor's sign-off",
            )
        overridden = set(present) if override is not None else set()
        blocking = [(rule, detail) for rule, detail in problems if rule not in overridden]
        if blocking:
            hint = (
                "; a supervisor may sign off an override if treating anyway"
                if present and not overridden
                else ""
            )
            raise SessionRefused(blocking[0][0], "; ".join(detail for _, detail in blocking) + hint)
        now = self._clock() if host_time_ns is None else host_time_ns
        position, warnings = self._course_position(info, now)
        session_id = self._next_session_id
        body = {
            "info": info.model_dump(mode="json"),
            "warnings": [{"code": w.code, "message": w.message} for w in warnings],
            "course_position": position.to_dict(),
            "device_pulse_count": device_pulse_count,
            "limits": None if limits is None else limits.model_dump(mode="json"),
            "provenance": None if provenance is None else provenance.model_dump(mode="json"),
        }
        self._record(session_id, "session_started", body, now)
        self._next_session_id += 1
        self._courses.setdefault(info.course.course_id, []).append(
            reader.CourseEntry(session_id, position.number, info.patient_ref, now, None)
        )
        self._live = _LiveSession(session_id, now)
        if overridden:
            assert override is not None
            self.record_event(
                session_id,
                "override",
                info.operator,
                {
                    "contraindications": sorted(r.partition(".")[2] for r in overridden),
                    "signed_off_by": override.signed_off_by,
                    "signed_off_role": override.role,
                    "reason_code": override.reason_code,
                },
                override.reason,
                role=info.operator_role,
                host_time_ns=now,
            )
        if device_pulse_count is not None:
            self._last_pulse_no = device_pulse_count
        self._log.info(
            "session_started",
            session_id=session_id,
            course=info.course.course_id,
            warnings=[w.code for w in warnings],
        )
        return SessionOpened(session_id, tuple(warnings), position)

    def _course_position(
        self, info: SessionInfo, now_ns: int
    ) -> tuple[CoursePosition, list[CourseWarning]]:
        """The session's place in its course from the history: only earlier sessions that
        delivered pulses count; after ``planned_sessions`` of them, it is maintenance."""
        course = info.course
        history = self._courses.get(course.course_id, [])
        if history and history[0].patient_ref != info.patient_ref:
            raise SessionRefused(
                "course.patient_ref",
                f"course {course.course_id} belongs to patient {history[0].patient_ref}, "
                f"not {info.patient_ref}",
            )
        counted = [entry for entry in history if entry.delivered]
        planned = course.planned_sessions
        days = (now_ns - counted[-1].started_ns) / _NS_PER_DAY if counted else None
        if len(counted) < planned:
            position = CoursePosition(
                "course", len(counted) + 1, planned, len(counted), days, course.session_number
            )
        else:
            position = CoursePosition(
                "maintenance", len(counted) - planned + 1, planned, len(counted), days,
                course.session_number,
            )  # fmt: skip
        warnings: list[CourseWarning] = []
        where = f"course {course.course_id}"
        # The recovery interval is the patient's: their last session that delivered pulses, in
        # this course or another one typed for them.
        last = max(
            (
                (entry.started_ns, entry.session_id, course_id)
                for course_id, entries in self._courses.items()
                for entry in entries
                if entry.delivered and entry.patient_ref == info.patient_ref
            ),
            default=None,
        )
        clock_behind = last is not None and last[0] > now_ns
        if clock_behind:
            assert last is not None
            warnings.append(
                CourseWarning(
                    "clock_behind",
                    f"this session starts {(last[0] - now_ns) / _NS_PER_DAY:.1f} days before "
                    f"session {last[1]} (course {last[2]}) of the same patient: the host "
                    "clock is wrong or was set back; the interval cannot be checked",
                )
            )
        elif last is not None and last[2] != course.course_id:
            gap = (now_ns - last[0]) / _NS_PER_DAY
            if gap < MIN_DAYS_BETWEEN_SESSIONS:
                warnings.append(
                    CourseWarning(
                        "interval_short",
                        f"only {gap:.1f} days since session {last[1]} (course {last[2]}) of the "
                        f"same patient (at least {MIN_DAYS_BETWEEN_SESSIONS} advised)",
                    )
                )
        if position.kind == "maintenance":
            warnings.append(
                CourseWarning(
                    "maintenance",
                    f"{where} is complete ({len(counted)} of {planned} planned sessions given): "
                    f"this is maintenance session {position.number}",
                )
            )
        elif clock_behind:
            pass  # said above: an interval from a clock set back means nothing
        elif days is not None and days < MIN_DAYS_BETWEEN_SESSIONS:
            warnings.append(
                CourseWarning(
                    "interval_short",
                    f"only {days:.1f} days since session {len(counted)} of {where} "
                    f"(at least {MIN_DAYS_BETWEEN_SESSIONS} advised)",
                )
            )
        elif days is not None and days > MAX_DAYS_BETWEEN_SESSIONS:
            warnings.append(
                CourseWarning(
                    "interval_long",
                    f"{days:.1f} days since session {len(counted)} of {where} "
                    f"(at most {MAX_DAYS_BETWEEN_SESSIONS} advised)",
                )
            )
        typed = course.session_number
        if typed is not None and (position.kind == "maintenance" or typed != position.number):
            actual = (
                f"maintenance session {position.number}"
                if position.kind == "maintenance"
                else f"session {position.number} of {planned}"
            )
            warnings.append(
                CourseWarning(
                    "session_number",
                    f"typed as session {typed} but the log makes it {actual} of {where} "
                    f"({len(counted)} earlier session(s) delivered pulses)",
                )
            )
        return position, warnings

    def end_session(
        self,
        session_id: int,
        *,
        actor: str,
        role: str | None = None,
        post_care: Iterable[PostCare | str] = (),
        post_care_declined: str | None = None,
        note: str | None = None,
        host_time_ns: int | None = None,
    ) -> Summary:
        """Close the session with its post-care (the advice given, or why it was declined) and
        return the closing summary (computed from live totals: no disk read). Raises
        :class:`SessionRefused` if it is not the open one."""
        live = self._live
        if live is None or live.session_id != session_id:
            raise SessionRefused("session.open", f"session {session_id} is not the open session")
        try:
            care = sorted({PostCare(item).value for item in post_care})
        except ValueError as exc:
            allowed = ", ".join(p.value for p in PostCare)
            raise InvalidSessionInfo("post_care", list(post_care), f"one of {allowed}") from exc
        now = self._clock() if host_time_ns is None else host_time_ns
        summary = self._summary(live, "completed", now)
        body = {
            "summary": summary.to_dict(),
            "post_care": care,
            "post_care_declined": post_care_declined,
            "actor": actor,
            "role": role,
            "note": note,
        }
        self._record(session_id, "session_ended", body, now)
        self._put_in_order(_Marker(done=_nothing, checkpoint="session_end"))
        self._live = None
        self._mark_delivered(session_id, summary)
        self._log.info("session_ended", session_id=session_id, pulses=live.pulses)
        return summary

    def _mark_delivered(self, session_id: int, summary: Summary) -> None:
        """A closed session counts in its course when it delivered pulses."""
        for entries in self._courses.values():
            for i, entry in enumerate(entries):
                if entry.session_id == session_id:
                    entries[i] = dataclasses.replace(
                        entry, delivered=summary.pulses + summary.unlogged_pulses > 0
                    )
                    return

    def record_clinical(
        self,
        session_id: int,
        kind: str,
        *,
        actor: str,
        role: str | None,
        entry: Mapping[str, Any],
        host_time_ns: int | None = None,
    ) -> None:
        """A clinician's ``note``, the immediate skin ``reaction`` or an ``adverse_event``,
        appended to session ``session_id`` (open or ended) as a chained record of its own:
        nothing recorded before is ever edited."""
        if kind not in CLINICAL_KINDS:
            raise InvalidSessionInfo("kind", kind, "one of " + ", ".join(sorted(CLINICAL_KINDS)))
        if not MIN_SESSION_ID <= session_id < self._next_session_id:
            raise SessionRefused("session.unknown", f"no session {session_id} in the log")
        body = {"actor": actor, "role": role, **entry}
        self._record(session_id, kind, body, host_time_ns)

    def current_summary(self, *, host_time_ns: int | None = None) -> Summary | None:
        """The open session's running summary (outcome ``"open"``), e.g. for the retained
        ``session`` telemetry topic every second; ``None`` without a session. No disk access."""
        live = self._live
        if live is None:
            return None
        return self._summary(live, "open", self._clock() if host_time_ns is None else host_time_ns)

    @staticmethod
    def _summary(live: _LiveSession, outcome: str, now_ns: int) -> Summary:
        return Summary(
            session_id=live.session_id,
            outcome=outcome,
            started_ns=live.started_ns,
            ended_ns=now_ns,
            pulses=live.pulses,
            unlogged_pulses=live.unlogged,
            unlogged_energy_uj=live.unlogged_energy,
            energy_per_zone_uj=dict(live.zone_energy),
            peak_fluence_j_cm2=live.peak_fluence,
            faults=live.faults,
        )

    # ── records ──────────────────────────────────────────────────────────────────────────────

    def record_zone(
        self,
        session_id: int,
        zone: Zone | str,
        *,
        actor: str,
        role: str | None = None,
        energy_limit_uj: int | None = None,
        host_time_ns: int | None = None,
    ) -> None:
        """The operator moved to ``zone``; ``energy_limit_uj`` is its cumulative energy limit."""
        try:
            zone = Zone(zone)
        except ValueError:
            allowed = ", ".join(z.value for z in Zone)
            raise InvalidSessionInfo("zone", zone, f"one of {allowed}") from None
        body = {
            "zone": zone.value,
            "energy_limit_uj": energy_limit_uj,
            "actor": actor,
            "role": role,
        }
        self._record(session_id, "zone", body, host_time_ns)

    def record_params(
        self,
        session_id: int,
        *,
        energy_uj: int,
        width_us: int,
        rate_mhz: int,
        spot_um: int,
        actor: str,
        role: str | None = None,
        fluence_limit: Mapping[str, Any] | None = None,
        host_time_ns: int | None = None,
    ) -> None:
        """Parameters sent to the device (ICD units). Later pulses' fluence uses this spot.
        ``fluence_limit`` is the cap these were checked against: ``fluence_j_cm2``,
        ``max_fluence_j_cm2``, ``rule`` (skin type or zone), ``skin_type``, ``zone``, ``preset``."""
        body = {
            "energy_uj": energy_uj,
            "width_us": width_us,
            "rate_mhz": rate_mhz,
            "spot_um": spot_um,
            "actor": actor,
            "role": role,
            "fluence_limit": None if fluence_limit is None else dict(fluence_limit),
        }
        self._record(session_id, "params", body, host_time_ns)
        live = self._live
        if live is not None and live.session_id == session_id and spot_um > 0:
            live.fluence_per_uj = 1e-6 / spot_area_cm2(spot_um)

    def record_pulse(
        self,
        session_id: int,
        pulse_no: int,
        t_us: int,
        host_time_ns: int,
        energy_uj: int,
        zone: str,
    ) -> None:
        """One PULSE event. Constant time, no I/O, no hashing, never raises: a queue append and
        the live totals. Committed within one group commit."""
        self._put_in_order((session_id, pulse_no, t_us, host_time_ns, energy_uj, zone))
        self._count_pulse(session_id, pulse_no, energy_uj, zone)

    def record_pulse_held(
        self,
        session_id: int,
        pulse_no: int,
        t_us: int,
        host_time_ns: int,
        energy_uj: int,
        zone: str,
    ) -> None:
        """:meth:`record_pulse`, held back with the others of the same received chunk until
        :meth:`release_pulses` hands them to the writer in one piece (one queue hand-off per chunk,
        not per pulse). Anything else recorded meanwhile releases them first: the chain's order
        is the order of the calls. The caller must call :meth:`release_pulses` at the chunk's end
        (the stall deadline starts once the writer holds them)."""
        self._held.append((session_id, pulse_no, t_us, host_time_ns, energy_uj, zone))
        self._count_pulse(session_id, pulse_no, energy_uj, zone)

    def release_pulses(self) -> None:
        """Hand the pulses held by :meth:`record_pulse_held` to the writer. Cheap when none are."""
        held = self._held
        if held:
            self._held = []
            self._put(held)

    def _put_in_order(self, item: object) -> None:
        if self._held:
            self.release_pulses()
        self._put(item)

    def _count_pulse(self, session_id: int, pulse_no: int, energy_uj: int, zone: str) -> None:
        self._last_pulse_no = pulse_no
        live = self._live
        if live is not None and live.session_id == session_id:
            live.pulses += 1
            energy = live.zone_energy
            energy[zone] = energy.get(zone, 0) + energy_uj
            fluence = energy_uj * live.fluence_per_uj
            if fluence > live.peak_fluence:  # noqa: PLR1730 - cheaper than max() per pulse
                live.peak_fluence = fluence

    def record_pulse_gap(
        self,
        session_id: int | None,
        first_pulse_no: int,
        last_pulse_no: int,
        *,
        charged_energy_uj: int,
        zone: str,
        cause: str,
        host_time_ns: int | None = None,
    ) -> None:
        """Pulses ``first..last`` were fired but not seen (a gap in pulse_no, a crash): each is
        charged at ``charged_energy_uj`` (the device's maximum) to ``zone``; counts as a fault."""
        if last_pulse_no < first_pulse_no:
            raise ValueError(f"pulse gap {first_pulse_no}..{last_pulse_no} is empty")
        count = last_pulse_no - first_pulse_no + 1
        body = {
            "first": first_pulse_no,
            "last": last_pulse_no,
            "count": count,
            "charged_energy_uj": charged_energy_uj,
            "zone": zone,
            "cause": cause,
        }
        self._record(session_id, "pulse_gap", body, host_time_ns)
        if self._last_pulse_no is None or last_pulse_no > self._last_pulse_no:
            self._last_pulse_no = last_pulse_no
        live = self._live
        if live is not None and live.session_id == session_id:
            live.unlogged += count
            live.unlogged_energy += count * charged_energy_uj
            live.zone_energy[zone] = live.zone_energy.get(zone, 0) + count * charged_energy_uj
            live.faults += 1

    def record_status(
        self,
        session_id: int | None,
        *,
        state: int,
        interlocks: int,
        head_temp_cdeg: int,
        skin_temp_cdeg: int,
        pulse_count: int,
        host_time_ns: int | None = None,
    ) -> bool:
        """A device STATUS sample. Call it on every STATUS: one per ``status_interval_s`` is kept
        during a session (one per ``idle_status_interval_s`` outside). Returns whether it was."""
        now = self._clock() if host_time_ns is None else host_time_ns
        interval = (
            self._status_interval_ns if session_id is not None else self._idle_status_interval_ns
        )
        if self._last_status_ns is not None and now - self._last_status_ns < interval:
            return False
        self._last_status_ns = now
        body = {
            "state": state,
            "interlocks": interlocks,
            "head_temp_cdeg": head_temp_cdeg,
            "skin_temp_cdeg": skin_temp_cdeg,
            "pulse_count": pulse_count,
        }
        self._record(session_id, "status", body, now)
        return True

    def record_event(
        self,
        session_id: int | None,
        kind: str,
        actor: str,
        detail: Mapping[str, Any],
        reason: str | None = None,
        *,
        role: str | None = None,
        host_time_ns: int | None = None,
    ) -> None:
        """A safety event or an operator action: ``kind`` is a short lower-case name (``breach``,
        ``device_fault``, ``link_lost`` count as faults; ``fault_ack``, ``override``, ``armed``,
        ``disarmed``, ``stop`` ...), ``actor`` who (a user id, or ``supervisor``, ``device``,
        ``mqtt`` for the system), ``role`` the user's role (None for the system), ``detail`` the
        facts (JSON values), ``reason`` the operator's why."""
        if not kind or not set(kind) <= _EVENT_KIND_CHARS or len(kind) > 64:
            raise InvalidSessionInfo("event kind", kind, "lower-case letters, digits, '_' or '.'")
        detail = dict(detail)
        if kind == "breach":
            if self._breach is None:  # the first since the last acknowledgement is the latched one
                self._breach = (session_id,)
        elif kind == "fault_ack":
            # A latch outlives its session: acknowledged while another session is open (or
            # none), the acknowledgement is still the breach's, recorded in the breach's session
            # (or outside any, as the breach was) and naming where it was signed. Never in
            # another patient's record.
            breach, self._breach = self._breach, None
            if breach is not None and breach[0] != session_id:
                detail["during_session"] = session_id
                session_id = breach[0]
        body = {
            "event": kind,
            "actor": actor,
            "role": role,
            "detail": detail,
            "reason": reason,
        }
        self._record(session_id, "event", body, host_time_ns)
        live = self._live
        if kind in FAULT_EVENT_KINDS and live is not None and live.session_id == session_id:
            live.faults += 1

    def recover_interrupted(
        self, device_pulse_count: int, max_energy_uj: int, *, host_time_ns: int | None = None
    ) -> Recovery:
        """Reconcile with the device after a start: a session left open is closed as interrupted,
        and pulses the device counted beyond the last one accounted for are recorded as unlogged,
        charged at ``max_energy_uj`` each. Call once after connecting, before any session starts.
        Non-blocking (the interrupted session's totals were read by :meth:`open`)."""
        now = self._clock() if host_time_ns is None else host_time_ns
        last = self._last_pulse_no
        mismatch = last is not None and device_pulse_count < last
        unlogged = 0 if last is None or mismatch else device_pulse_count - last
        stale = self._stale_session
        charged = unlogged * max_energy_uj
        if unlogged:
            assert last is not None
            zone = self._stale_zone if stale is not None else "unknown"
            self.record_pulse_gap(
                stale,
                last + 1,
                device_pulse_count,
                charged_energy_uj=max_energy_uj,
                zone=zone,
                cause="unlogged after an interruption (reconciled with the device's counter)",
                host_time_ns=now,
            )
        summary = None
        if stale is not None and self._stale_summary is not None:
            base = self._stale_summary
            energy = dict(base.energy_per_zone_uj)
            if unlogged:
                energy[self._stale_zone] = energy.get(self._stale_zone, 0) + charged
            summary = dataclasses.replace(
                base,
                unlogged_pulses=base.unlogged_pulses + unlogged,
                unlogged_energy_uj=base.unlogged_energy_uj + charged,
                energy_per_zone_uj=energy,
                faults=base.faults + (1 if unlogged else 0),
            )
            cause = "the daemon stopped without closing the session"
            self._record(
                stale, "session_interrupted", {"summary": summary.to_dict(), "cause": cause}, now
            )
            self._mark_delivered(stale, summary)
        if stale is not None or unlogged or mismatch:
            body: dict[str, Any] = {
                "device_pulse_count": device_pulse_count,
                "last_pulse_no": last,
                "unlogged": unlogged,
                "charged_energy_uj": charged,
                "counter_mismatch": mismatch,
            }
            self._record(stale, "recovery", body, now)
            self._put_in_order(
                _Marker(done=_nothing, checkpoint="session_end")
            )  # witnessed at once
        self._last_pulse_no = device_pulse_count
        self._stale_session = self._stale_summary = None
        if stale is not None or unlogged or mismatch:
            self._log.warning(
                "session_log_reconciled",
                interrupted_session=stale,
                unlogged=unlogged,
                counter_mismatch=mismatch,
            )
        return Recovery(stale, last, device_pulse_count, unlogged, charged, summary, mismatch)

    def _record(
        self, session_id: int | None, kind: str, body: Mapping[str, Any], at_ns: int | None
    ) -> None:
        # The chain encodes "no session" as -1 (chain.py): an id below 1 would read as tampering.
        if session_id is not None and (type(session_id) is not int or session_id < MIN_SESSION_ID):
            raise InvalidSessionInfo(
                "session_id", session_id, f"a session id (from {MIN_SESSION_ID}) or None"
            )
        at = self._clock() if at_ns is None else at_ns
        self._put_in_order(_Record(session_id, kind, at, _canonical_json(body)))

    # ── the writer thread ────────────────────────────────────────────────────────────────────

    def _run(self) -> None:
        """Take what has queued up, commit it, wait out the interval; block only when idle.

        While records keep coming the thread sleeps once per interval and then takes everything
        queued without blocking: the daemon's puts never find it waiting on the queue, so they
        never have to wake it (one wake-up per commit, not one per hand-off plus the sleep). Only
        when an interval brought nothing does it block on the queue (a checkpoint falling due
        ends that wait); the first record after a quiet spell commits at once.
        """
        get, get_nowait = self._queue.get, self._queue.get_nowait
        # the checkpoints' syncs paid for by a longer period: commits and checkpoints together make
        # at most one fdatasync per interval (on average over each checkpoint cycle)
        period = self._commit_interval_s * _PERIOD_STRETCH
        next_commit = 0.0  # monotonic: no commit starts before it (group commit)
        stopping = False
        try:
            while not stopping:
                now = time.monotonic()
                if now < next_commit:
                    # The group wait counts against the deadline of what arrives meanwhile.
                    self._busy_since = now
                    time.sleep(next_commit - now)
                batch: list[object] = []
                try:
                    while len(batch) < 100_000:
                        batch.append(get_nowait())
                except queue.Empty:
                    pass
                if not batch:
                    self._busy_since = None
                    due = self._checkpoint_due
                    if due is None:
                        batch.append(get())
                    else:
                        try:
                            batch.append(get(timeout=max(0.0, due - time.monotonic())))
                        except queue.Empty:
                            batch.append(_Marker(done=_nothing, checkpoint="periodic"))
                            # next try then, if it cannot be made now (no device id yet): no spin
                            self._checkpoint_due = time.monotonic() + self._checkpoint_interval()
                    try:  # whatever came with it
                        while len(batch) < 100_000:
                            batch.append(get_nowait())
                    except queue.Empty:
                        pass
                start = time.monotonic()
                if self._busy_since is None:
                    self._busy_since = start
                next_commit = start + period
                committed = False
                if self._failure is None:
                    try:
                        self._commit(batch)
                        committed = True  # a WAL checkpoint failing after it latches, drops nothing
                        if (
                            self.commits - self._checkpointed_at >= _WAL_CHECKPOINT_EVERY
                            or self._rows_since_checkpoint >= _WAL_CHECKPOINT_ROWS
                        ):
                            # still busy: what queues up meanwhile waits, against its deadline
                            self._busy_with = "a WAL checkpoint"
                            self._checkpoint_wal()
                            self._busy_with = "a commit"
                    except Exception as exc:  # noqa: BLE001 - any failure means no log
                        self._fail(exc)
                self._busy_since = None
                if not committed:
                    self.dropped += sum(
                        len(item) if type(item) is list else 1
                        for item in batch
                        if type(item) is not _Marker
                    )
                for item in batch:
                    if type(item) is _Marker:
                        stopping = stopping or item.stop
                        item.done()
        finally:
            self._conn.close()

    def _commit(self, batch: list[object]) -> None:
        seq, prev = self._seq, self._prev
        pulses: list[tuple[int, int, int, int, int, int, str, bytes]] = []
        records: list[tuple[int, int | None, str, int, str, bytes]] = []
        made: list[tuple[Checkpoint, keys.DeviceKey | None]] = []
        self._covered_seq = self._last_checkpoint_seq
        last_pulse_no: int | None = None
        for item in batch:
            if type(item) is tuple:
                session_id, pulse_no, t_us, host_ns, energy_uj, zone = item
                seq += 1
                prev = pulse_hash(prev, seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone)
                pulses.append((seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone, prev))
                last_pulse_no = pulse_no
            elif type(item) is list:  # one received chunk's pulses (record_pulse_held)
                for session_id, pulse_no, t_us, host_ns, energy_uj, zone in item:
                    seq += 1
                    prev = pulse_hash(
                        prev, seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone
                    )
                    pulses.append((seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone, prev))
                    last_pulse_no = pulse_no
            elif type(item) is _Record:
                seq += 1
                prev = record_hash(prev, seq, item.session_id, item.at_ns, item.kind, item.body)
                records.append((seq, item.session_id, item.kind, item.at_ns, item.body, prev))
            elif type(item) is _Marker and item.checkpoint is not None:
                seq, prev = self._append_checkpoint(seq, prev, item.checkpoint, records, made)
        if self._key is not None and seq != self._covered_seq:
            due = self._checkpoint_due
            if seq - self._covered_seq >= self._checkpoint_every or (
                due is not None and time.monotonic() >= due
            ):
                seq, prev = self._append_checkpoint(seq, prev, "periodic", records, made)
        if not (pulses or records):
            return
        conn = self._conn
        conn.execute("BEGIN")
        try:
            if pulses:
                # Whole groups of rows per statement, then the rest one by one: each step of a
                # statement gives up the GIL and takes it back (a switch when the event loop wants
                # it meanwhile), so 50 pulses cost 5 steps rather than 50.
                whole = len(pulses) - len(pulses) % _ROWS_PER_INSERT
                if whole:
                    conn.executemany(
                        _INSERT_PULSES,
                        [
                            tuple(chain.from_iterable(pulses[i : i + _ROWS_PER_INSERT]))
                            for i in range(0, whole, _ROWS_PER_INSERT)
                        ],
                    )
                if whole < len(pulses):
                    conn.executemany(_INSERT_PULSE, pulses[whole:])
            if records:
                conn.executemany(
                    "INSERT INTO records (seq, session_id, kind, at_ns, body, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    records,
                )
            conn.execute("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._counted(pulses[0][4] if pulses else None)
        self._rows_since_checkpoint += len(pulses) + len(records)
        self._seq, self._prev = seq, prev
        if last_pulse_no is not None:
            self.committed_pulse_no = last_pulse_no
        if made:
            self._checkpoints_committed(made)
        if self._key is not None and seq != self._last_checkpoint_seq:
            if self._unwitnessed_since is None:
                self._unwitnessed_since = time.monotonic()
            # recomputed at every commit: a session starting shortens the idle interval
            self._checkpoint_due = self._unwitnessed_since + self._checkpoint_interval()
        else:
            self._unwitnessed_since = self._checkpoint_due = None
        if self._on_commit is not None:
            try:
                self._on_commit(len(pulses), last_pulse_no)
            except Exception:  # noqa: BLE001 - committed is committed; a broken hook is not a failure
                self._log.exception("session_log_commit_hook_failed")
        self._log.debug("session_log_committed", pulses=len(pulses), records=len(records), seq=seq)

    def _checkpoint_wal(self) -> None:
        """Copy the WAL into the database (PASSIVE: a reader's snapshot is never waited for; what
        it still needs stays in the WAL for the next time). Writer thread."""
        self._checkpointed_at, self._rows_since_checkpoint = self.commits, 0
        blocked, _frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if blocked and not self._checkpoint_blocked:  # the WAL grows until the other lets go
            self._log.warning("session_log_wal_checkpoint_blocked", path=str(self.path))
        elif not blocked and self._checkpoint_blocked:
            self._log.info("session_log_wal_checkpoint_resumed", path=str(self.path))
        self._checkpoint_blocked = bool(blocked)
        # ``copied`` counts from the WAL's start, not this checkpoint's: unchanged, a reader held
        # back all that came since the last one (so the WAL did not restart), nothing was synced
        last = self._wal_backfilled
        if copied >= 0:  # -1: busy (another connection's checkpoint held the lock)
            self._wal_backfilled = copied
        if copied > 0 and copied != last:
            self.wal_checkpoints += 1
            self._sync_rate.add(_SYNCS_PER_WAL_CHECKPOINT)

    def _counted(self, oldest_host_ns: int | None) -> None:
        """A commit is durable: count it, and how long its oldest pulse waited (writer thread)."""
        self._commit_rate.add(1)
        self._sync_rate.add(1)
        if oldest_host_ns is not None:
            n = self._delays_n
            self._delays_ms[n % _DELAYS_KEPT] = (time.time_ns() - oldest_host_ns) / 1e6
            self._delays_n = n + 1

    @property
    def commits(self) -> int:
        """Transactions committed since the log opened (each one fdatasync, synchronous=FULL)."""
        return self._commit_rate.total

    @property
    def commits_per_s(self) -> int:
        """Commits in the last whole second. Cheap; any thread."""
        return round(self._commit_rate.per_s())

    @property
    def syncs(self) -> int:
        """``fdatasync`` calls of the log since it opened: one per commit, three counted per WAL
        checkpoint (at most what SQLite makes)."""
        return self._sync_rate.total

    @property
    def syncs_per_s(self) -> float:
        """``fdatasync`` calls per second over the last whole ten seconds: one per commit, three
        counted per WAL checkpoint (at most what SQLite makes). Cheap; any thread."""
        return self._sync_rate.per_s()

    def commit_stats(self) -> dict[str, Any]:
        """The group commit, for ``status`` and metrics: the interval, commits in all and in the
        last second, and over the last commits (up to 1,024) the p50/p99 of how long the oldest
        pulse of each waited from its host time stamp until it was durable."""
        n = min(self._delays_n, _DELAYS_KEPT)
        delays = sorted(self._delays_ms[:n])  # a slice is one atomic copy
        return {
            "commit_interval_ms": round(self._commit_interval_s * 1000, 3),
            "commits": self.commits,
            "commits_per_s": self.commits_per_s,
            "fsyncs_per_s": round(self.syncs_per_s, 1),
            "wal_checkpoints": self.wal_checkpoints,
            "commit_delay_p50_ms": round(delays[n // 2], 2) if n else None,
            "commit_delay_p99_ms": round(delays[min(n - 1, n * 99 // 100)], 2) if n else None,
        }

    def _checkpoints_committed(self, made: list[tuple[Checkpoint, keys.DeviceKey | None]]) -> None:
        for checkpoint, introduced in made:
            assert checkpoint.record_seq is not None
            self._last_checkpoint_seq = checkpoint.record_seq
            self.last_checkpoint = checkpoint
            if introduced is not None:
                self._key, self._next_key = introduced, None
                self._chain_key_id = introduced.key_id
                self._finish_rotation()
                self._log.info("signing_key_rotated", key_id=introduced.key_id)
            if self._on_checkpoint is not None:
                try:
                    self._on_checkpoint(checkpoint)
                except Exception:  # noqa: BLE001 - committed is committed
                    self._log.exception("session_log_checkpoint_hook_failed")
        self._log.debug("session_log_checkpoint", seq=self._last_checkpoint_seq)

    def _fail(self, exc: Exception) -> None:
        cause = str(exc) or type(exc).__name__
        code = getattr(exc, "sqlite_errorname", None)
        if code:
            cause += f" ({code})"
        try:
            if shutil.disk_usage(self.path.parent).free < 1 << 20:
                cause += "; the disk is full"
        except OSError:
            pass
        failure = LogUnavailable(f"session log {self.path} cannot be written: {cause}")
        failure.__cause__ = exc
        self._failure = failure
        self._log.error("session_log_unavailable", path=str(self.path), cause=cause)
        if self._on_unavailable is not None:
            try:
                self._on_unavailable(failure)
            except Exception:  # noqa: BLE001 - the flag is set; a broken callback must not hide it
                self._log.exception("session_log_callback_failed")
