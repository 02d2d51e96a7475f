"""Signed checkpoints of the hash chain: what leaves the device so a rewrite can be caught.

A checkpoint says "the chain's hash at record ``log_seq`` was ``hash``", signed with the device's
Ed25519 key (:mod:`devicectl.sessionlog.keys`). The writer appends it to the chain as a
``checkpoint`` record right after the record it covers (so its own row is chained too), and the
daemon publishes it on ``{prefix}/{site}/{device}/log/checkpoint``, in the session's ``ended``
event and in the session report. Anyone holding a copy can later prove that the log still
contains, unchanged, every record up to ``log_seq``
(:func:`devicectl.sessionlog.verify.verify_against`).

The signature is over these exact UTF-8 bytes, six lines each ending in LF:

    devicectl-log-checkpoint/v1
    device=<device id: the MQTT topic's device level, the board's serial in 8 hex digits by default>
    log_seq=<decimal, no sign, no leading zeros>
    hash=<64 lower-case hex digits>
    time=<RFC 3339 UTC as published, e.g. 2026-12-07T12:13:14.123456Z>
    key_id=<32 lower-case hex digits>

No field may hold a line feed (each is checked), so the encoding is one-to-one; the first line
keeps a checkpoint signature from ever being valid for anything else the key might sign.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from devicectl.sessionlog.keys import DeviceKey, key_id_of, signature_valid

__all__ = [
    "CHECKPOINT_KIND",
    "KEY_KIND",
    "Checkpoint",
    "CheckpointMalformed",
    "external_checkpoints",
    "make_checkpoint",
    "signed_bytes",
]

CHECKPOINT_KIND = "checkpoint"  # the chained record holding one
KEY_KIND = "log_key"  # the chained record introducing a signing key
_DOMAIN = "devicectl-log-checkpoint/v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
# The fields a published checkpoint carries besides the envelope (docs/mqtt.md).
WIRE_FIELDS = ("log_seq", "hash", "time", "key_id", "public_key", "signature")


class CheckpointMalformed(ValueError):
    """A checkpoint whose fields are not what a device ever signs (the message says which)."""


def signed_bytes(device: str, log_seq: int, hash_hex: str, time: str, key_id: str) -> bytes:
    """The canonical byte string a checkpoint's signature covers (see the module docstring)."""
    if "\n" in device or not device:
        raise CheckpointMalformed(f"device id {device!r} is empty or holds a line feed")
    return (
        f"{_DOMAIN}\ndevice={device}\nlog_seq={log_seq}\nhash={hash_hex}\n"
        f"time={time}\nkey_id={key_id}\n"
    ).encode()


def rfc3339(ns: int) -> str:
    """Nanoseconds since the epoch as RFC 3339 UTC with microseconds and a ``Z``."""
    moment = datetime.fromtimestamp(ns // 1000 / 1e6, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed checkpoint, as stored in the chain and as published."""

    device: str
    log_seq: int  # the record it covers (the chain's hash there is ``hash``)
    hash: str  # hex
    time: str  # RFC 3339 UTC
    key_id: str
    public_key: str  # base64 of the raw 32 bytes (informational)
    signature: str  # base64
    reason: str = "periodic"  # periodic | session_end | shutdown | key_rotation | requested
    record_seq: int | None = None  # where the chain holds it (log_seq + 1), when known

    def message(self) -> bytes:
        return signed_bytes(self.device, self.log_seq, self.hash, self.time, self.key_id)

    def wire(self) -> dict[str, Any]:
        """The fields published on ``log/checkpoint`` (the envelope adds ``device`` etc.)."""
        return {name: getattr(self, name) for name in WIRE_FIELDS}

    def body(self) -> dict[str, Any]:
        """The chained record's body."""
        return {"device": self.device, **self.wire(), "reason": self.reason}

    def public_raw(self) -> bytes:
        return base64.b64decode(self.public_key, validate=True)

    def signature_valid_with(self, public_raw: bytes) -> bool:
        """Whether the signature verifies under ``public_raw`` (and the key id names it)."""
        if key_id_of(public_raw) != self.key_id:
            return False
        try:
            signature = base64.b64decode(self.signature, validate=True)
            message = self.message()
        except (binascii.Error, ValueError):
            return False
        return signature_valid(public_raw, signature, message)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, record_seq: int | None = None) -> Checkpoint:
        """A checkpoint from a stored body or a published payload; :class:`CheckpointMalformed`
        naming the first field that no device would sign."""
        device = data.get("device")
        log_seq = data.get("log_seq")
        fields = {name: data.get(name) for name in ("hash", "time", "key_id")}
        if not isinstance(device, str) or not device or "\n" in device:
            raise CheckpointMalformed(f"device {device!r} is not a device id")
        if type(log_seq) is not int or log_seq < 0:
            raise CheckpointMalformed(f"log_seq {log_seq!r} is not a record number")
        checks = (("hash", _HEX64), ("time", _RFC3339_UTC), ("key_id", _HEX32))
        for name, pattern in checks:
            value = fields[name]
            if not isinstance(value, str) or not pattern.match(value):
                raise CheckpointMalformed(f"{name} {value!r} is not what a checkpoint holds")
        public_key, signature = data.get("public_key"), data.get("signature")
        for name, value in (("public_key", public_key), ("signature", signature)):
            if not isinstance(value, str):
                raise CheckpointMalformed(f"{name} {value!r} is not base64 text")
        reason = data.get("reason", "witnessed")
        return cls(
            device=device,
            log_seq=log_seq,
            hash=fields["hash"],  # type: ignore[arg-type]
            time=fields["time"],  # type: ignore[arg-type]
            key_id=fields["key_id"],  # type: ignore[arg-type]
            public_key=public_key,  # type: ignore[arg-type]
            signature=signature,  # type: ignore[arg-type]
            reason=reason if isinstance(reason, str) else "witnessed",
            record_seq=record_seq,
        )


def make_checkpoint(
    key: DeviceKey, device: str, log_seq: int, hash_: bytes, time_ns: int, reason: str
) -> Checkpoint:
    """Sign a checkpoint of the chain at ``log_seq`` (hash ``hash_``)."""
    when = rfc3339(time_ns)
    hash_hex = hash_.hex()
    signature = key.sign(signed_bytes(device, log_seq, hash_hex, when, key.key_id))
    return Checkpoint(
        device=device,
        log_seq=log_seq,
        hash=hash_hex,
        time=when,
        key_id=key.key_id,
        public_key=key.public_b64,
        signature=base64.b64encode(signature).decode("ascii"),
        reason=reason,
        record_seq=log_seq + 1,
    )


def _candidates(value: Any, device: str | None) -> Iterator[dict[str, Any]]:
    """Checkpoint mappings found in one parsed JSON value: a ``log/checkpoint`` payload, a
    session ``ended`` event (``checkpoint`` inside, ``device`` in its envelope), a report's JSON
    (``checkpoint``), or a list of any of those."""
    if isinstance(value, list):
        for item in value:
            yield from _candidates(item, device)
        return
    if not isinstance(value, dict):
        return
    own_device = value.get("device") if isinstance(value.get("device"), str) else device
    if "log_seq" in value and "signature" in value:
        yield {**value, "device": own_device} if own_device is not None else dict(value)
        return
    inner = value.get("checkpoint")
    if isinstance(inner, dict):
        yield from _candidates({"device": own_device, **inner} if own_device else inner, None)
    for name in ("checkpoints",):
        if isinstance(value.get(name), list):
            yield from _candidates(value[name], own_device)


def external_checkpoints(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Checkpoint payloads in text as captured off the device: ``mosquitto_sub -v`` lines (topic,
    space, JSON), plain JSON lines, or one JSON document (a session report's JSON export, a list).

    Yields ``(line number, payload)`` or ``(line number, why the line was skipped)`` for a line
    that looks like a checkpoint but does not parse, so the verifier can say what it ignored.
    """
    text_lines = list(lines)
    whole = "".join(text_lines).strip()
    if whole.startswith(("{", "[")):
        document = _parsed(whole)
        if not isinstance(document, _Unreadable):
            found_in = _found_in(document, None)
            if isinstance(found_in, _Unreadable):
                yield 1, f"line 1 {found_in.why}"
            else:
                for found in found_in:
                    yield 1, found
            return
    for number, raw in enumerate(text_lines, start=1):
        line = raw.strip()
        if not line:
            continue
        topic_device: str | None = None
        if not line.startswith(("{", "[")):
            topic, _, line = line.partition(" ")
            levels = topic.split("/")
            if len(levels) >= 4:
                topic_device = levels[2]
            line = line.strip()
            if not line:
                continue  # an empty retained message (a cleared topic)
        value = _parsed(line)
        found_in = value if isinstance(value, _Unreadable) else _found_in(value, topic_device)
        if isinstance(found_in, _Unreadable):
            if "log_seq" in line:
                yield number, f"line {number} {found_in.why}"
            continue
        for found in found_in:
            yield number, found


@dataclass(frozen=True, slots=True)
class _Unreadable:
    why: str


def _parsed(text: str) -> Any:
    """JSON text as a value, or why it cannot be read: not JSON, nested too deeply for the
    parser, an integer too long to convert (a capture is outside input, never trusted)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _Unreadable(f"is not JSON ({exc.msg})")
    except ValueError:  # an integer beyond Python's conversion limit
        return _Unreadable("holds an integer too long to be one a device signs")
    except RecursionError:
        return _Unreadable("is nested too deeply to read")


def _found_in(value: Any, device: str | None) -> list[dict[str, Any]] | _Unreadable:
    try:
        return list(_candidates(value, device))
    except RecursionError:
        return _Unreadable("is nested too deeply to read")
