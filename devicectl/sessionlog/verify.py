"""``devicectl log verify``: walk the hash chain and name the first record that breaks it.

The chain (see :mod:`devicectl.sessionlog.chain`) runs through ``pulses`` and ``records`` in one
sequence, 1, 2, 3 ... up to the head kept in ``chain_head``. Walking it in order:

- a row whose hash does not match ``SHA-256(previous hash || its canonical encoding)`` was
  altered (or swapped with another: the sequence number is part of the encoding);
- a second row claiming a sequence number already taken, or one beyond the head, was inserted;
- a sequence number with no row, or a chain that ends before the head, means a deletion;
- a row holding a value the writer never stores (a session_id below 1, an integer stored as text,
  text that is not UTF-8, ...) was altered, whatever its hash: the canonical encoding is
  one-to-one only over what the writer stores (see :mod:`devicectl.sessionlog.chain`).
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
from devicectl.sessionlog.chain import GENESIS, MIN_SESSION_ID, pulse_hash, record_hash

__all__ = ["ChainBreak", "VerifyReport", "verify_log"]

# (seq, table, hash, fields...) — one shape for both tables so they merge by seq.
_Row = tuple[int, str, bytes, tuple[object, ...]]

# The type the writer stores in each chained field, in the order of _Row's fields.
_FIELD_TYPES: dict[str, tuple[tuple[str, type], ...]] = {
    "pulses": (
        ("session_id", int),
        ("pulse_no", int),
        ("t_us", int),
        ("host_ns", int),
        ("energy_uj", int),
        ("zone", str),
    ),
    "records": (("session_id", int), ("at_ns", int), ("kind", str), ("body", str)),
}


class _NotUtf8(bytes):
    """Stored TEXT that does not decode as UTF-8 (the writer never stores such text)."""


def _text(raw: bytes) -> str | _NotUtf8:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return _NotUtf8(raw)


_STORED_AS = {
    int: "an integer",
    float: "a real",
    str: "text",
    bytes: "a blob",
    _NotUtf8: "text that is not UTF-8",
    type(None): "NULL",
}


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


def _malformed(row: _Row) -> str | None:
    """Why the row holds a value the writer never stores, or ``None`` if it holds none."""
    _, table, digest, fields = row
    for (name, expected), value in zip(_FIELD_TYPES[table], fields, strict=True):
        if table == "records" and name == "session_id" and value is None:
            continue  # a record of no session
        if type(value) is not expected:
            return f"its {name} is stored as {_stored_as(value)}, which the log never holds"
    session_id = fields[0]
    if table == "records" and isinstance(session_id, int) and session_id < MIN_SESSION_ID:
        return (
            f"its session_id is {session_id}, which no session has "
            f"(ids start at {MIN_SESSION_ID}; a record of no session holds NULL)"
        )
    if type(digest) is not bytes:
        return f"its hash is stored as {_stored_as(digest)}, which the log never holds"
    return None


def _stored_as(value: object) -> str:
    return _STORED_AS.get(type(value), type(value).__name__)


def _verifies(prev: bytes, row: _Row) -> bool:
    return _malformed(row) is None and _hash(prev, row) == row[2]


def _one_line(value: object) -> str:
    """Text from the file, possibly forged: escaped, so the verdict stays one line."""
    return str(value).encode("unicode_escape").decode("ascii")


def _describe(row: _Row) -> str:
    seq, table, _, fields = row
    if table == "pulses":
        return f"record {seq} (pulse_no {_one_line(fields[1])} of session {_one_line(fields[0])})"
    session = "" if fields[0] is None else f" of session {_one_line(fields[0])}"
    return f"record {seq} ({_one_line(fields[2])}{session})"


def verify_log(path: Path) -> VerifyReport:
    """Verify the log at ``path`` from a consistent snapshot (safe while the daemon writes).
    Raises :class:`LogUnavailable` when the file is missing or cannot be read at all."""
    conn = store.connect(path, readonly=True)
    # Text that is not UTF-8 is an altered value to name, not a file that cannot be read.
    conn.text_factory = _text
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
    if type(head[0]) is not int:
        head_seq = -1
        what = f"its seq is stored as {_stored_as(head[0])}"
        return report(ChainBreak(0, "chain_head", "altered", f"the chain head was altered: {what}"))
    head_seq, head_hash = head
    if type(head_hash) is not bytes:
        what = f"its hash is stored as {_stored_as(head_hash)}"
        return report(
            ChainBreak(
                head_seq,
                "chain_head",
                "altered",
                f"the chain head (record {head_seq}) was altered: {what}",
            )
        )
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
        malformed = _malformed(row)
        computed = _hash(prev, row) if malformed is None else None
        if computed is None or computed != digest:
            if following is not None and following[0] == seq and _verifies(prev, following):
                problem, text = "inserted", "is an inserted row (another row holds its place)"
            elif seq > head_seq:
                problem, text = "inserted", f"is an inserted row beyond the chain head ({head_seq})"
            else:
                why = malformed or "its hash does not match its contents"
                problem, text = "altered", f"was altered: {why}"
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
