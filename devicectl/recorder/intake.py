"""From one MQTT message to the rows the recorder stores, or a one-line reason it refused it.

Sans-I/O and synchronous: :func:`take` gets the topic, the payload bytes, the retain flag and the
MQTT 5 ``boot`` user property, and returns an :class:`Accepted` (the rows for each table), a
:class:`Refused` (why, in one line; the recorder counts it and keeps the message in ``rejects``),
an :class:`Ignored` (a topic that is not telemetry: commands, course replies) or a
:class:`CourseRequest` (a daemon asking for a patient's course, answered, never stored).

Every message is treated as hostile until it has passed, in this order: a size bound, a JSON
nesting-depth bound taken on the raw bytes before anything parses them, strict JSON (no
``NaN``/``Infinity``, no lone surrogates, no NUL), the payload model of its topic from
``protocols/mqtt.py`` (closed schemas: the same rules as the JSON Schemas ``devicectl schema``
exports), and integer bounds that the database columns can hold. Nothing here raises on input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field, ValidationError

from protocols.mqtt import (
    AVAILABILITY_OFFLINE,
    AVAILABILITY_ONLINE,
    AlertPayload,
    Envelope,
    MetricsPayload,
    PulseBatchPayload,
    SessionEventPayload,
    SessionPayload,
    SessionSummary,
    StatePayload,
    Stream,
    parse_topic,
)

__all__ = [
    "CHECKPOINT_STREAM",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "Accepted",
    "CheckpointPayload",
    "CourseRequest",
    "Ignored",
    "Refused",
    "json_depth",
    "take",
    "utc_text",
]

# A pulse batch at the board's 5,000 Hz ceiling is ~500 pulses (~15 KiB): 256 KiB is generous.
MAX_PAYLOAD_BYTES = 256 * 1024
# The deepest contract payload nests 4 levels; session event details may carry a little more.
MAX_DEPTH = 16
# What a BIGINT column holds.
_MAX_INT = 2**63 - 1
# The stream name of ``log/checkpoint`` messages (the signed checkpoints of a device's log).
CHECKPOINT_STREAM = "log-checkpoint"

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: no per-byte branch
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_LONE_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")
_HEX64 = r"^[0-9a-f]{64}$"
_BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"


class CheckpointPayload(Envelope):
    """``log/checkpoint`` (retained, QoS 1): a signed checkpoint of a device's session log chain.

    The envelope plus flat fields; kept here until the contract module carries the stream.
    """

    log_seq: Annotated[int, Field(ge=0, le=_MAX_INT)]
    hash: Annotated[str, Field(pattern=_HEX64)]
    time: datetime
    key_id: Annotated[str, Field(min_length=2, max_length=128, pattern=r"^[0-9a-f]+$")]
    public_key: Annotated[str, Field(min_length=4, max_length=512, pattern=_BASE64)]
    signature: Annotated[str, Field(min_length=4, max_length=1024, pattern=_BASE64)]


_MODELS: dict[str, type[Envelope]] = {
    Stream.STATE.value: StatePayload,
    Stream.SESSION.value: SessionPayload,
    Stream.SESSION_EVENTS.value: SessionEventPayload,
    Stream.PULSES.value: PulseBatchPayload,
    Stream.METRICS.value: MetricsPayload,
    Stream.ALERTS.value: AlertPayload,
    CHECKPOINT_STREAM: CheckpointPayload,
}


@dataclass(frozen=True, slots=True)
class Refused:
    topic: str
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    topic: str


@dataclass(frozen=True, slots=True)
class CourseRequest:
    """``{prefix}/{site}/{device}/course/request``: a daemon asks for a patient's course."""

    device: str
    patient: str
    planned: int


@dataclass(slots=True)
class Accepted:
    """The rows one message adds, per table (tuples in the column order of ``store.TABLES``)."""

    device: str
    topic: str
    boot: int
    seq: int
    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)


def utc_text(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, so that text order is time order in every engine."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def json_depth(payload: bytes, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of ``[``/``{`` in ``payload``, strings left out, without parsing it;
    counting stops past ``limit`` (``limit + 1`` means deeper than that). Each pass removes the
    innermost pairs in C, so a flat list of pulses costs three passes, not a loop per byte."""
    brackets = _STRING.sub(b"", payload).translate(None, _NOT_BRACKET)
    depth = 0
    while brackets:
        if depth > limit:
            return depth
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return depth  # unbalanced: the JSON parser will refuse it
        brackets = shorter
        depth += 1
    return depth


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _json_object(payload: bytes) -> dict[str, Any] | str:
    """The payload as a JSON object, or why not."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte bound"
    if json_depth(payload) > MAX_DEPTH:
        return f"JSON nested deeper than {MAX_DEPTH} levels"
    if b"\\u0000" in payload:
        return "a NUL character in a JSON string"
    try:
        body = _DECODER.decode(payload.decode())
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:120]}"
    if not isinstance(body, dict):
        return "not a JSON object"
    if _LONE_SURROGATE_HINT.search(payload):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return "a lone UTF-16 surrogate in a JSON string"
    return body


def _validation_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"[:200]


def _over_bounds(*values: int) -> bool:
    return any(value > _MAX_INT for value in values)


def take(
    topic: str,
    payload: bytes,
    *,
    retained: bool,
    boot_property: str | None,
    recorded: str,
) -> Accepted | Refused | Ignored | CourseRequest:
    """What to do with one message. ``recorded`` is the recorder's own time (``utc_text``)."""
    levels = topic.split("/")
    if len(levels) == 5 and levels[3:] == ["log", "checkpoint"]:
        site, device, stream, session = levels[1], levels[2], CHECKPOINT_STREAM, None
    elif len(levels) >= 5 and levels[3] == "course":
        if levels[4:] == ["request"]:
            return _course_request(topic, levels[2], payload)
        return Ignored(topic)  # the recorder's own replies
    else:
        parsed = parse_topic(topic)
        if parsed is None:
            return Refused(topic, "not a topic of the telemetry contract", payload)
        _prefix, site, device, kind, session = parsed
        if kind is Stream.CMD:
            return Ignored(topic)
        if kind is Stream.AVAILABILITY:
            return _availability(topic, device, payload, boot_property, recorded)
        if kind is Stream.SESSION and not payload:
            return Ignored(topic)  # "no session open": consumes no seq, nothing to keep
        stream = kind.value
    body = _json_object(payload)
    if isinstance(body, str):
        return Refused(topic, body, payload)
    try:
        message = _MODELS[stream].model_validate(body)
    except ValidationError as exc:
        return Refused(topic, _validation_line(exc), payload)
    if message.device != device:
        return Refused(topic, f"device {message.device!r} published under {device!r}", payload)
    if _over_bounds(message.seq, message.boot):
        return Refused(topic, "seq or boot beyond a 64-bit integer", payload)
    ts = utc_text(message.ts)
    accepted = Accepted(device, topic, message.boot, message.seq)
    session_of = session
    rows = accepted.rows
    keep_payload: str | None = payload.decode()
    match message:
        case PulseBatchPayload():
            # Only what goes into integer columns is bounded: the pulses stay JSON text.
            if _over_bounds(
                message.first_pulse_no,
                message.last_pulse_no,
                message.energy_uj_sum,
                message.energy_uj_max,
            ):
                return Refused(topic, "a pulse number or energy beyond a 64-bit integer", payload)
            session_of = message.session
            rows["pulse_batches"] = (
                device,
                topic,
                message.boot,
                message.seq,
                message.session,
                message.zone,
                message.first_pulse_no,
                message.last_pulse_no,
                message.count,
                message.energy_uj_sum,
                message.energy_uj_min,
                message.energy_uj_max,
                message.dropped,
                ts,
                keep_payload,
            )
            keep_payload = None  # the batch is kept once, as sent, in pulse_batches
        case SessionEventPayload():
            session_of = message.session
            if message.event == "started":
                details = message.details
                rows["sessions"] = (
                    device,
                    message.session,
                    site,
                    _text_or_none(details.get("patient")),
                    _text_or_none(details.get("operator")),
                    _text_or_none(details.get("skin_type")),
                    ts,
                )
            elif message.event == "ended" and message.summary is not None:
                rows["session_ends"] = _session_end(device, message.summary, ts)
                rows["sessions"] = _session_row(device, site, message.summary, ts)
        case SessionPayload():
            session_of = message.summary.session
            rows["sessions"] = _session_row(device, site, message.summary, ts)
        case AlertPayload():
            session_of = message.session
        case CheckpointPayload():
            if _over_bounds(message.log_seq):
                return Refused(topic, "log_seq beyond a 64-bit integer", payload)
            rows["checkpoints"] = (
                device,
                message.key_id,
                message.log_seq,
                message.hash,
                utc_text(message.time),
                message.public_key,
                message.signature,
                message.boot,
                message.seq,
                ts,
                keep_payload,
            )
        case _:
            pass
    rows["messages"] = (
        device,
        topic,
        message.boot,
        message.seq,
        site,
        stream,
        session_of,
        ts,
        recorded,
        1 if message.historical else 0,
        1 if retained else 0,
        keep_payload,
    )
    rows["boots"] = (device, message.boot, ts)
    return accepted


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _session_row(device: str, site: str, summary: SessionSummary, ts: str) -> tuple[Any, ...]:
    started = utc_text(summary.started) if summary.started is not None else ts
    return (
        device,
        summary.session,
        site,
        summary.patient,
        summary.operator,
        summary.skin_type,
        started,
    )


def _session_end(device: str, summary: SessionSummary, ts: str) -> tuple[Any, ...]:
    ended = utc_text(summary.ended) if summary.ended is not None else ts
    return (
        device,
        summary.session,
        ended,
        min(summary.pulses, _MAX_INT),
        min(summary.energy_uj, _MAX_INT),
        min(summary.faults, 2**31 - 1),
        summary.model_dump_json(),
    )


def _availability(
    topic: str, device: str, payload: bytes, boot_property: str | None, recorded: str
) -> Accepted | Refused:
    if payload not in (AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE):
        return Refused(topic, "availability is neither 'online' nor 'offline'", payload)
    boot = int(boot_property) if boot_property and boot_property.isdigit() else 0
    if _over_bounds(boot):
        return Refused(topic, "boot property beyond a 64-bit integer", payload)
    accepted = Accepted(device, topic, boot, 0)
    accepted.rows["availability"] = (device, boot, payload.decode(), recorded)
    return accepted


def _course_request(topic: str, device: str, payload: bytes) -> CourseRequest | Refused:
    body = _json_object(payload)
    if isinstance(body, str):
        return Refused(topic, body, payload)
    patient, planned = body.get("patient"), body.get("planned", 6)
    if not isinstance(patient, str) or not 1 <= len(patient) <= 128:
        return Refused(topic, "a course request names no patient", payload)
    if type(planned) is not int or not 4 <= planned <= 6:
        return Refused(topic, "a course request's planned sessions must be 4 to 6", payload)
    return CourseRequest(device, patient, planned)
