"""From one MQTT message to the rows the recorder stores, or a one-line reason it refused it.

Sans-I/O and synchronous: :func:`take` gets the topic, the payload bytes, the retain flag and the
MQTT 5 ``boot`` user property, and returns an :class:`Accepted` (the rows for each table), a
:class:`Refused` (why, in one line; the recorder counts it and keeps the message in ``rejects``),
an :class:`Ignored` (a topic that is not telemetry: commands, course replies) or a
:class:`CourseRequest` (a daemon asking for a patient's course, answered, never stored).

Every message is treated as hostile until it has passed the shared intake
(``protocols.intake.read_message``: valid ids, a size bound, the nesting depth measured before
parsing, UTF-8, finite numbers and bounded integers, the closed payload model of its topic, the
topic's device) — ``log/checkpoint`` gets the same bounds and its model here — then what the
database columns take: integers within a BIGINT, no NUL and no lone surrogate in the text.
Nothing here raises on input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from protocols.bounded import BoundedInputError, loads_json
from protocols.intake import MAX_DEPTH, MAX_PAYLOAD_BYTES, Unreadable, read_message
from protocols.mqtt import (
    AlertPayload,
    CheckpointPayload,
    Envelope,
    PulseBatchPayload,
    SessionEventPayload,
    SessionPayload,
    SessionSummary,
    Stream,
    is_valid_id,
)

__all__ = [
    "CHECKPOINT_STREAM",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "Accepted",
    "CourseRequest",
    "Ignored",
    "Refused",
    "take",
    "utc_text",
]

_LONE_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")
# What a BIGINT column holds.
_MAX_INT = 2**63 - 1
# The stream name of ``log/checkpoint`` messages (the signed checkpoints of a device's log).
CHECKPOINT_STREAM = Stream.LOG_CHECKPOINT.value


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


def _json_object(payload: bytes) -> dict[str, Any] | str:
    """The payload as a JSON object within the shared intake's bounds, or why not."""
    try:
        body = loads_json(payload, max_bytes=MAX_PAYLOAD_BYTES, max_depth=MAX_DEPTH)
    except BoundedInputError as exc:
        return exc.reason
    return body if isinstance(body, dict) else "not a JSON object"


def _validation_line(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"[:200]


def _text_problem(payload: bytes) -> str | None:
    """Text no database column takes: a NUL, or a lone UTF-16 surrogate, escaped in a string."""
    if b"\\u0000" in payload:
        return "a NUL character in a JSON string"
    if _LONE_SURROGATE_HINT.search(payload):
        try:
            json.dumps(json.loads(payload), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return "a lone UTF-16 surrogate in a JSON string"
    return None


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
    message: Envelope
    if len(levels) == 5 and levels[3:] == ["log", "checkpoint"]:
        # Not (yet) routed by the shared intake: the same bounds and the contract's model here.
        site, device, stream, session = levels[1], levels[2], CHECKPOINT_STREAM, None
        if not (is_valid_id(site) and is_valid_id(device)):
            return Refused(topic, "invalid site/device id in the topic", payload)
        body = _json_object(payload)
        if isinstance(body, str):
            return Refused(topic, f"{stream}: {body}", payload)
        try:
            message = CheckpointPayload.model_validate(body)
        except ValidationError as exc:
            return Refused(topic, f"{stream}: {_validation_line(exc)}", payload)
        if message.device != device:
            return Refused(topic, f"{stream}: device differs from the topic's", payload)
    elif len(levels) >= 5 and levels[3] == "course":
        if levels[4:] == ["request"]:
            return _course_request(topic, levels[2], payload)
        return Ignored(topic)  # the recorder's own replies
    else:
        try:
            reading = read_message(levels[0], topic, payload)
        except Unreadable as exc:
            return Refused(topic, exc.reason, payload)
        if reading is None:
            if len(levels) >= 4 and levels[3] == "cmd":
                return Ignored(topic)
            return Refused(topic, "not a topic of the telemetry contract", payload)
        site, device, session = reading.site, reading.device, reading.session
        stream = reading.stream.value
        if reading.stream is Stream.AVAILABILITY:
            return _availability(topic, device, reading.text or "", boot_property, recorded)
        if reading.envelope is None:
            return Ignored(topic)  # an empty `session`: no session open, consumes no seq
        message = reading.envelope
    if _over_bounds(message.seq, message.boot):
        return Refused(topic, "seq or boot beyond a 64-bit integer", payload)
    problem = _text_problem(payload)
    if problem is not None:
        return Refused(topic, problem, payload)
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
                message.time,
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
    topic: str, device: str, word: str, boot_property: str | None, recorded: str
) -> Accepted | Refused:
    boot = int(boot_property) if boot_property and boot_property.isdigit() else 0
    if _over_bounds(boot):
        return Refused(topic, "boot property beyond a 64-bit integer", word.encode())
    accepted = Accepted(device, topic, boot, 0)
    accepted.rows["availability"] = (device, boot, word, recorded)
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
