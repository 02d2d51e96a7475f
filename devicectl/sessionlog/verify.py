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

The chain alone proves only that the file agrees with itself: whoever can write it can delete its
tail and copy the last hash into ``chain_head``, or edit a row and recompute every hash after it.
Signed checkpoints (:mod:`devicectl.sessionlog.checkpoint`) close that gap once a copy of one has
left the device. On the way through the chain the walk also checks every stored checkpoint (its
signature, under the key the log's ``log_key`` records introduced, and that the chain's hash at
the record it covers is the one signed) and the key history (a new key must be introduced by a
checkpoint signed with the old one). :func:`verify_against` then compares checkpoints captured
off the device (MQTT, a report) with the chain: each one either confirms every record up to its
``log_seq``, or is named as contradicting it (truncated, altered, recomputed, key replaced).
:meth:`VerifyReport.cannot_rule_out` says in words what was not proven.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from devicectl.errors import LogUnavailable
from devicectl.sessionlog import store
from devicectl.sessionlog.chain import GENESIS, MIN_SESSION_ID, pulse_hash, record_hash
from devicectl.sessionlog.checkpoint import (
    CHECKPOINT_KIND,
    KEY_KIND,
    Checkpoint,
    CheckpointMalformed,
)
from devicectl.sessionlog.keys import key_id_of, parse_public_key

__all__ = [
    "ChainBreak",
    "Finding",
    "KeyEntry",
    "VerifyReport",
    "Witness",
    "verify_against",
    "verify_log",
]

_SIGNING_KINDS = frozenset({CHECKPOINT_KIND, KEY_KIND})

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
class Finding:
    """Something the checkpoints or the key history contradict.

    ``problem``: ``checkpoint_malformed``, ``checkpoint_signature`` (does not verify),
    ``checkpoint_hash`` (the chain does not pass through it), ``key_unknown`` (signed by a key no
    ``log_key`` record introduced), ``key_unintroduced`` (the key changed without a checkpoint
    signed by the old key), ``key_not_enrolled`` (the enrolled key signed none of the log, or a
    key the enrolled one never introduced signed part of it), ``truncated``, ``altered``
    (against a witnessed checkpoint: altered, deleted or recomputed), ``witness_key_unknown``.
    """

    seq: int  # the record concerned (for a witnessed checkpoint: the record it covers)
    problem: str
    message: str


@dataclass(frozen=True, slots=True)
class Witness:
    """What one checkpoint captured off the device says about the log."""

    source: str  # where it came from ("line 12", "witness 3")
    log_seq: int | None
    time: str | None
    key_id: str | None
    status: str  # "confirmed" | "contradicted" | "ignored"
    message: str
    problem: str | None = None  # a contradiction's Finding.problem
    device: str | None = None  # the device id it was signed for


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One signing key in the log's history."""

    key_id: str
    public_key: str  # base64
    introduced_at: int  # the log_key record
    how: str  # "first" | "rotation" | "replacement"
    signed_by_previous: bool  # a checkpoint signed with the previous key covers its introduction


@dataclass(frozen=True, slots=True)
class VerifyReport:
    path: Path
    records: int  # chained rows that verified, pulses included
    pulses: int
    head_seq: int
    first_break: ChainBreak | None
    head_hash: str = ""  # hex; write it down outside the device to anchor the chain
    checkpoints: int = 0  # stored checkpoints whose signature and chain hash verified
    last_checkpoint: Checkpoint | None = None  # the newest of those
    keys: tuple[KeyEntry, ...] = ()
    findings: tuple[Finding, ...] = ()
    witnesses: tuple[Witness, ...] = ()
    proven_seq: int | None = None  # every record up to it matches a witnessed checkpoint
    proven_by: Witness | None = None
    enrolled_key_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_break is None and not self.findings

    @property
    def witnessed(self) -> int:
        return sum(1 for w in self.witnesses if w.status != "ignored")

    def cannot_rule_out(self) -> list[str]:
        """In plain words, what this verification could not prove."""
        said: list[str] = []
        if self.proven_seq is None:
            said.append(
                "no checkpoint from outside the device confirmed this log, so it proves only that "
                "the file agrees with itself: whoever could write it could have removed its last "
                "records, or edited any record and recomputed the chain"
                + (" and re-signed it with the key on the device" if self.checkpoints else "")
                + "; give --checkpoints FILE (as captured from MQTT by the recorder or "
                "mosquitto_sub, or a session report's JSON) to prove it"
            )
        elif self.proven_seq < self.head_seq:
            said.append(
                f"records {self.proven_seq + 1}..{self.head_seq} come after record "
                f"{self.proven_seq}, the last one a witnessed checkpoint covers: nothing outside "
                "the device vouches for them, so they could have been altered or removed without "
                "a trace"
            )
        if self.enrolled_key_id is None and self.keys:
            ids = ", ".join(k.key_id for k in self.keys)
            said.append(
                f"signatures were checked against the key(s) the log itself names ({ids}); give "
                "the key enrolled for this device (--key) to rule out a log re-signed with "
                "another key"
            )
        if not self.keys and self.records:
            said.append("the log holds no signing key and no checkpoint: nothing in it is signed")
        return said


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
    """Verify the log at ``path`` from a consistent snapshot (safe while the daemon writes):
    the chain, its stored checkpoints and key history. Raises :class:`LogUnavailable` when the
    file is missing or cannot be read at all."""
    return verify_against(path, ())


def _walk_file(path: Path, watch: _Watch) -> VerifyReport:
    conn = store.connect(path, readonly=True)
    # Text that is not UTF-8 is an altered value to name, not a file that cannot be read.
    conn.text_factory = _text
    try:
        conn.execute("BEGIN")  # one read snapshot for the head and every row
        return _walk(path, conn, watch)
    except sqlite3.Error as exc:
        raise LogUnavailable(f"session log {path} cannot be read: {exc}") from exc
    finally:
        conn.close()


@dataclass(slots=True)
class _Watch:
    """What the walk hands over besides the chain's verdict: the hash at each wanted record, and
    every verified checkpoint or key record with the hash of the record before it."""

    wanted: set[int]
    on_signing: Callable[[int, str, str, bytes], None]
    hashes: dict[int, bytes] = field(default_factory=dict)


def _walk(path: Path, conn: sqlite3.Connection, watch: _Watch) -> VerifyReport:
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
    wanted, hashes, on_signing = watch.wanted, watch.hashes, watch.on_signing
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
        if table == "records" and row[3][2] in _SIGNING_KINDS:
            on_signing(seq, row[3][2], row[3][3], prev)  # type: ignore[arg-type]
        if seq in wanted:
            hashes[seq] = computed
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


class _Signatures:
    """The stored checkpoints and key history, checked as the walk meets them (in chain order)."""

    def __init__(self) -> None:
        self.known: dict[str, bytes] = {}  # key id -> raw public key, as log_key records say
        self.entries: list[KeyEntry] = []
        self.current: str | None = None  # the key the history has established
        self.pending: KeyEntry | None = None  # introduced, not yet covered by a signature
        self.findings: list[Finding] = []
        self.verified = 0
        self.last: Checkpoint | None = None
        self.devices: set[str] = set()
        self.stored: dict[int, str] = {}  # log_seq -> signature of the stored checkpoint of it

    def __call__(self, seq: int, kind: str, body: str, prev: bytes) -> None:
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise CheckpointMalformed("its body is not an object")
            if kind == KEY_KIND:
                self._key(seq, data)
            else:
                self._checkpoint(seq, Checkpoint.from_mapping(data, record_seq=seq), prev)
        except RecursionError:
            self.findings.append(
                Finding(
                    seq,
                    "checkpoint_malformed",
                    f"record {seq} ({kind}) is malformed: "
                    "its body is nested too deeply to be one the writer stores",
                )
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            self.findings.append(
                Finding(seq, "checkpoint_malformed", f"record {seq} ({kind}) is malformed: {exc}")
            )

    def _key(self, seq: int, data: dict[str, Any]) -> None:
        raw = base64.b64decode(data["public_key"], validate=True)
        key_id = str(data["key_id"])
        if len(raw) != 32 or key_id_of(raw) != key_id:
            raise CheckpointMalformed(f"its public key does not match key id {key_id}")
        self.known[key_id] = raw
        entry = KeyEntry(key_id, data["public_key"], seq, str(data.get("introduced")), False)
        if self.pending is not None:
            self._unintroduced(self.pending, seq)
        self.pending = entry

    def _unintroduced(self, entry: KeyEntry, seq: int) -> None:
        previous = self.current or "none"
        self.findings.append(
            Finding(
                entry.introduced_at,
                "key_unintroduced",
                f"the signing key changed at record {entry.introduced_at} from {previous} to "
                f"{entry.key_id} ({entry.how}) without a checkpoint signed by the old key "
                "introducing it: whoever holds the new key is not shown to be the device",
            )
        )
        self.entries.append(entry)
        self.current, self.pending = entry.key_id, None

    def _checkpoint(self, seq: int, checkpoint: Checkpoint, prev: bytes) -> None:
        where = f"checkpoint at record {seq}"
        self.devices.add(checkpoint.device)
        if checkpoint.log_seq != seq - 1 or checkpoint.hash != prev.hex():
            self.findings.append(
                Finding(
                    seq,
                    "checkpoint_hash",
                    f"{where} signed record {checkpoint.log_seq} with hash "
                    f"{checkpoint.hash[:16]}…, but the chain there is {prev.hex()[:16]}… at "
                    f"record {seq - 1}: the records it covered were rewritten",
                )
            )
            return
        raw = self.known.get(checkpoint.key_id)
        if raw is None:
            self.findings.append(
                Finding(
                    seq,
                    "key_unknown",
                    f"{where} is signed by key {checkpoint.key_id}, which no log_key record "
                    "introduced",
                )
            )
            return
        if not checkpoint.signature_valid_with(raw):
            self.findings.append(
                Finding(
                    seq,
                    "checkpoint_signature",
                    f"{where} has a signature that does not verify under key {checkpoint.key_id}",
                )
            )
            return
        pending = self.pending
        if pending is not None and self.current is None and checkpoint.key_id == pending.key_id:
            self.entries.append(pending)  # the log's first key: trusted as the log names it
            self.current, self.pending = pending.key_id, None
        elif pending is not None and checkpoint.key_id == self.current:
            # signed by the old key, covering the new key's introduction: a proper rotation
            self.entries.append(
                KeyEntry(
                    pending.key_id, pending.public_key, pending.introduced_at, pending.how, True
                )
            )
            self.current, self.pending = pending.key_id, None
        elif pending is not None and checkpoint.key_id == pending.key_id:
            self._unintroduced(pending, seq)
        elif checkpoint.key_id != self.current:
            self.findings.append(
                Finding(
                    seq,
                    "key_unintroduced",
                    f"{where} is signed by key {checkpoint.key_id}, not the log's current key "
                    f"{self.current}",
                )
            )
            return
        self.verified += 1
        self.last = checkpoint
        self.stored[checkpoint.log_seq] = checkpoint.signature

    def finish(self) -> None:
        if self.pending is not None:
            # introduced but no checkpoint covers it (the log ends first): nothing was signed
            # with it yet, so nothing to flag; it stays in the history, unconfirmed
            self.entries.append(self.pending)

    def trusted_by(self, enrolled_id: str) -> set[str]:
        """The keys the enrolled one vouches for: itself, and the run of keys around it that each
        introduced the next with a signature."""
        ids = [e.key_id for e in self.entries]
        if enrolled_id not in ids:
            return set()
        i = ids.index(enrolled_id)
        lo = i
        while lo > 0 and self.entries[lo].signed_by_previous:
            lo -= 1
        hi = i
        while hi + 1 < len(self.entries) and self.entries[hi + 1].signed_by_previous:
            hi += 1
        return set(ids[lo : hi + 1])


def verify_against(
    db_path: Path,
    checkpoints: Iterable[Mapping[str, Any] | str],
    key: bytes | str | None = None,
    *,
    device: str | None = None,
) -> VerifyReport:
    """Verify the log at ``db_path`` and prove it against checkpoints captured off the device.

    ``checkpoints`` are payloads as published on ``log/checkpoint`` (the envelope's ``device``
    and the flat ``log_seq``, ``hash``, ``time``, ``key_id``, ``public_key``, ``signature``), in
    any order (extra keys such as ``historical`` are ignored; ``_source``, if given, names where
    one came from in the messages); a string in their place is a note that an input could not be
    read, reported as ignored.

    ``key`` is the public key enrolled for the device, if any: the raw 32 bytes, or text as
    :func:`~devicectl.sessionlog.keys.parse_public_key` reads it (base64, hex, PEM; ValueError if
    it is none of those). Without it, signatures are checked against the keys the log names
    itself. ``device`` (the id the device publishes under) picks this device's checkpoints from a
    capture of many; by default, the devices the log's own checkpoints name (all, if it holds
    none or if no witness names one of them). Raises :class:`LogUnavailable` if the file cannot
    be read.
    """
    if isinstance(key, str):
        key = parse_public_key(key)
    witnesses_in = list(enumerate(checkpoints, start=1))
    parsed: list[tuple[str, Checkpoint | str]] = []
    for number, item in witnesses_in:
        source = f"witness {number}"
        if isinstance(item, str):
            parsed.append((source, item))
            continue
        if isinstance(item, Mapping) and isinstance(item.get("_source"), str):
            source = item["_source"]
        try:
            parsed.append((source, Checkpoint.from_mapping(item)))
        except CheckpointMalformed as exc:
            parsed.append((source, f"not a checkpoint a device signs: {exc}"))
    signatures = _Signatures()
    wanted = {c.log_seq for _, c in parsed if isinstance(c, Checkpoint)}
    watch = _Watch(wanted, signatures)
    base = _walk_file(Path(db_path), watch)
    signatures.finish()
    findings = list(signatures.findings)
    enrolled_id = None if key is None else key_id_of(key)
    trusted: set[str] | None = None
    if key is not None and enrolled_id is not None:
        trusted = signatures.trusted_by(enrolled_id)
        signers = [e.key_id for e in signatures.entries]
        if not trusted:
            findings.append(
                Finding(
                    0,
                    "key_not_enrolled",
                    f"the enrolled key {enrolled_id} is not in this log's key history "
                    f"({', '.join(signers) or 'none'}): the log was signed by another key "
                    "(replaced), or it is not this device's log",
                )
            )
        else:
            findings.extend(
                Finding(
                    entry.introduced_at,
                    "key_not_enrolled",
                    f"key {entry.key_id} (introduced at record {entry.introduced_at}) is "
                    f"not vouched for by the enrolled key {enrolled_id}",
                )
                for entry in signatures.entries
                if entry.key_id not in trusted
            )
    devices = {device} if device is not None else signatures.devices
    if device is None and not any(
        isinstance(c, Checkpoint) and c.device in devices for _, c in parsed
    ):
        # None of the witnesses is of a device the log names. The log's device ids are its own
        # word: whoever re-signed it with a key of their own could name a device no capture
        # holds, so every witness is judged (a foreign one is then witness_key_unknown).
        devices = set()
    end = base.records if base.first_break is not None else base.head_seq
    results: list[Witness] = []
    confirmed: list[Witness] = []
    for source, found in parsed:
        if isinstance(found, str):
            results.append(Witness(source, None, None, None, "ignored", found))
            continue
        results.append(
            _judge(source, found, devices, signatures, key, trusted, watch.hashes, base, end)
        )
        if results[-1].status == "confirmed":
            confirmed.append(results[-1])
    proven_by = max(confirmed, key=lambda w: w.log_seq or 0, default=None)
    # Not the witnessed checkpoint's own record after it: when it was written, why, and for which
    # session are not signed, so nothing outside the device vouches for that record either.
    proven_seq = None if proven_by is None else proven_by.log_seq
    contradicted = sorted(
        (w for w in results if w.status == "contradicted"), key=lambda w: w.log_seq or 0
    )
    said: set[tuple[int, str, str | None]] = set()  # the same checkpoint, witnessed twice
    for w in contradicted:
        if (w.log_seq or 0, w.problem or "altered", w.time) not in said:
            said.add((w.log_seq or 0, w.problem or "altered", w.time))
            findings.append(Finding(w.log_seq or 0, w.problem or "altered", w.message))
    return VerifyReport(
        path=base.path,
        records=base.records,
        pulses=base.pulses,
        head_seq=base.head_seq,
        first_break=base.first_break,
        head_hash=base.head_hash,
        checkpoints=signatures.verified,
        last_checkpoint=signatures.last,
        keys=tuple(signatures.entries),
        findings=tuple(findings),
        witnesses=tuple(results),
        proven_seq=proven_seq,
        proven_by=proven_by,
        enrolled_key_id=enrolled_id,
    )


def _judge(
    source: str,
    witness: Checkpoint,
    devices: set[str],
    signatures: _Signatures,
    enrolled: bytes | None,
    trusted: set[str] | None,
    hashes: Mapping[int, bytes],
    base: VerifyReport,
    end: int,
) -> Witness:
    """One witnessed checkpoint against the log."""

    def result(status: str, message: str, problem: str | None = None) -> Witness:
        return Witness(
            source,
            witness.log_seq,
            witness.time,
            witness.key_id,
            status,
            message,
            problem,
            witness.device,
        )

    name = f"the checkpoint witnessed at {witness.time} (record {witness.log_seq}, {source})"
    if devices and witness.device not in devices:
        ours = ", ".join(sorted(devices))
        return result("ignored", f"{name} is device {witness.device}'s, not this log's ({ours})")
    raw = signatures.known.get(witness.key_id)
    if enrolled is not None and key_id_of(enrolled) == witness.key_id:
        raw = enrolled
    # A key of the log's history the enrolled key never vouched for proves nothing. A key the log
    # does not contain at all is still a contradiction with the enrolled key: it may be the
    # device's own later key, introduced by a rotation the log no longer holds (cut before it).
    outside_trust = trusted is not None and witness.key_id not in trusted
    if outside_trust and raw is not None and raw is not enrolled:
        return result(
            "ignored", f"{name} is signed by key {witness.key_id}, not the enrolled key's: not used"
        )
    if raw is None:
        try:
            own = witness.public_raw()
        except (binascii.Error, ValueError):
            own = b""
        if not witness.signature_valid_with(own):
            return result("ignored", f"{name} has a signature that does not verify: not evidence")
        known = ", ".join(signatures.known) or "none"
        tell = (
            "if it is a key this device rotated to, the log was cut before the rotation that "
            "introduced it"
            if enrolled is not None
            else "give --key to tell"
        )
        return result(
            "contradicted",
            f"{name} was signed by key {witness.key_id}, which this log's key history ({known}) "
            "does not contain: the log's key was replaced and its checkpoints re-signed, or the "
            f"checkpoint is not this device's ({tell})",
            "witness_key_unknown",
        )
    if not witness.signature_valid_with(raw):
        return result("ignored", f"{name} has a signature that does not verify: not evidence")
    if witness.log_seq > end:
        if base.first_break is not None:
            brk = base.first_break
            return result(
                "contradicted",
                f"{name} covers record {witness.log_seq}, but the chain breaks before it, at "
                f"record {brk.seq} ({brk.problem})",
                brk.problem,
            )
        return result(
            "contradicted",
            f"{name} covers record {witness.log_seq}, but the log now ends at record "
            f"{base.head_seq}: records {base.head_seq + 1}..{witness.log_seq} (at least) were "
            "removed",
            "truncated",
        )
    have = hashes.get(witness.log_seq)
    if have is None or have.hex() != witness.hash:
        ours = "missing" if have is None else have.hex()[:16] + "…"
        return result(
            "contradicted",
            f"{name} says the chain's hash at record {witness.log_seq} was {witness.hash[:16]}…, "
            f"the log's is {ours}: records up to it were altered, deleted or the chain recomputed",
            "altered",
        )
    return result("confirmed", f"{name} matches: records 1..{witness.log_seq} are as signed")
