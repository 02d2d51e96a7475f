"""``devicectl log verify``: walk the hash chain and name the first record that breaks it.

The chain (see :mod:`devicectl.sessionlog.chain`) runs through ``pulses`` and ``records`` in one
sequence, 1, 2, 3 ... up to the head kept in ``chain_head``. Walking it in order:

- a row whose hash does not match ``SHA-256(previous hash || its canonical encoding)`` was
  altered (or swapped with another: the sequence number is part of the encoding);
- a second row claiming a sequence number already taken, or one beyond the head, was inserted;
- a sequence number with no row, or a chain that ends before the head, means a deletion.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from devicectl.errors import LogUnavailable
from devicectl.sessionlog import store
from devicectl.sessionlog.chain import GENESIS, pulse_hash, record_hash

__all__ = ["ChainBreak", "VerifyReport", "verify_log"]

# (seq, table, hash, fields...) — one shape for both tables so they merge by seq.
_Row = tuple[int, str, bytes, tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class ChainBreak:
    seq: int
    table: str  # "pulses" | "records" | "chain_head" | "unknown" (a deleted row's)
    problem: str  # "altered" | "inserted" | "deleted"
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    path: Path
    records: int  # chained rows that verified, pulses included
    pulses: int
    head_seq: int
    first_break: ChainBreak | None
    head_hash: str = ""  # hex; write it down outside the device to anchor the chain

    @property
    def ok(self) -> bool:
        return self.first_break is None


def _rows(conn: sqlite3.Connection) -> Iterator[_Row]:
    pulses = (
        (seq, "pulses", digest, (session_id, pulse_no, t_us, host_ns, energy_uj, zone))
        for seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone, digest in conn.execute(
            "SELECT seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone, hash "
            "FROM pulses ORDER BY seq"
        )
    )
    records = (
        (seq, "records", digest, (session_id, at_ns, kind, body))
        for seq, session_id, kind, at_ns, body, digest in conn.execute(
            "SELECT seq, session_id, kind, at_ns, body, hash FROM records ORDER BY seq"
        )
    )
    return heapq.merge(pulses, records, key=itemgetter(0))


def _hash(prev: bytes, row: _Row) -> bytes:
    seq, table, _, fields = row
    if table == "pulses":
        session_id, pulse_no, t_us, host_ns, energy_uj, zone = fields
        return pulse_hash(prev, seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone)  # type: ignore[arg-type]
    session_id, at_ns, kind, body = fields
    return record_hash(prev, seq, session_id, at_ns, kind, body)  # type: ignore[arg-type]


def _describe(row: _Row) -> str:
    seq, table, _, fields = row
    if table == "pulses":
        return f"record {seq} (pulse_no {fields[1]} of session {fields[0]})"
    session = "" if fields[0] is None else f" of session {fields[0]}"
    # The kind is text from the file, possibly forged: escaped, so the verdict stays one line.
    kind = str(fields[2]).encode("unicode_escape").decode("ascii")
    return f"record {seq} ({kind}{session})"


def verify_log(path: Path) -> VerifyReport:
    """Verify the log at ``path`` from a consistent snapshot (safe while the daemon writes).
    Raises :class:`LogUnavailable` when the file is missing or cannot be read at all."""
    conn = store.connect(path, readonly=True)
    try:
        conn.execute("BEGIN")  # one read snapshot for the head and every row
        return _walk(path, conn)
    except sqlite3.Error as exc:
        raise LogUnavailable(f"session log {path} cannot be read: {exc}") from exc
    finally:
        conn.close()


def _walk(path: Path, conn: sqlite3.Connection) -> VerifyReport:
    head = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    counted = pulses = 0

    def report(brk: ChainBreak | None) -> VerifyReport:
        return VerifyReport(path, counted, pulses, head_seq, brk, head_hex)

    head_hex = ""
    if head is None:
        head_seq = -1
        return report(ChainBreak(0, "chain_head", "deleted", "the chain head record was deleted"))
    head_seq, head_hash = int(head[0]), bytes(head[1])
    head_hex = head_hash.hex()
    prev, expected = GENESIS, 1
    rows = _rows(conn)
    row = next(rows, None)
    while row is not None:
        following = next(rows, None)
        seq, table, digest, _ = row
        if seq < expected:
            return report(
                ChainBreak(
                    seq,
                    table,
                    "inserted",
                    f"{_describe(row)} is an inserted row: "
                    f"sequence number {seq} is already in the chain",
                )
            )
        if seq > expected:
            return report(
                ChainBreak(
                    expected,
                    "unknown",
                    "deleted",
                    f"record {expected} was deleted: the chain "
                    f"jumps from record {expected - 1} to {seq}",
                )
            )
        computed = _hash(prev, row)
        if computed != digest:
            if (
                following is not None
                and following[0] == seq
                and _hash(prev, following) == following[2]
            ):
                problem, text = "inserted", "is an inserted row (another row holds its place)"
            elif seq > head_seq:
                problem, text = "inserted", f"is an inserted row beyond the chain head ({head_seq})"
            else:
                problem, text = "altered", "was altered: its hash does not match its contents"
            return report(ChainBreak(seq, table, problem, f"{_describe(row)} {text}"))
        if seq > head_seq:
            return report(
                ChainBreak(
                    head_seq,
                    "chain_head",
                    "altered",
                    f"the chain head (record "
                    f"{head_seq}) was altered: valid records continue to {seq}",
                )
            )
        prev, expected = computed, expected + 1
        counted += 1
        if table == "pulses":
            pulses += 1
        row = following
    if counted < head_seq:
        return report(
            ChainBreak(
                counted + 1,
                "unknown",
                "deleted",
                f"record {counted + 1} was deleted: the "
                f"chain ends at record {counted} but its head says {head_seq}",
            )
        )
    if prev != head_hash:
        return report(
            ChainBreak(
                head_seq,
                "chain_head",
                "altered",
                f"the chain head (record {head_seq}) was altered: its hash does not match",
            )
        )
    return report(None)
