"""The MQTT telemetry contract (docs/mqtt.md): topics, their flags, and payload models.

Sans-I/O: no network, no clock (``ts`` is passed in). ``devicectl.telemetry`` publishes these;
dashboards read them; ``devicectl schema`` exports :func:`json_schemas`.

    {prefix}/{site}/{device}/availability          retained QoS 1  "online" | "offline" (plain text;
                                                                   MQTT 5: user property boot)
                            /state                 retained QoS 1  StatePayload
                            /session               retained QoS 1  SessionPayload | empty message
                            /sessions/{id}/events           QoS 1  SessionEventPayload
                            /pulses                         QoS 1  PulseBatchPayload
                            /metrics                        QoS 0  MetricsPayload (expiry 10 s)
                            /alerts                         QoS 1  AlertPayload
                            /log/checkpoint        retained QoS 1  CheckpointPayload
                            /cmd/stop              (in)     QoS 1  anything: stop emission

Every JSON payload carries the :class:`Envelope`: ``v`` (1), ``ts`` (RFC 3339 UTC), ``device``,
``seq`` (per topic, survives restarts), ``boot`` (daemon start counter) and, only on messages
replayed from the outbox, ``"historical": true``.

Site, device and session ids are :data:`ID_PATTERN`: ASCII letters, digits, ``-`` and ``_``, 1 to
64 of them, so that two different ids can never look alike on a screen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

__all__ = [
    "AVAILABILITY_OFFLINE",
    "AVAILABILITY_ONLINE",
    "CONTENT_TYPE",
    "DEFAULT_PREFIX",
    "ID_ALLOWED",
    "ID_PATTERN",
    "METRICS_EXPIRY_S",
    "SCHEMA_VERSION",
    "STREAMS",
    "AlertPayload",
    "CheckpointPayload",
    "Envelope",
    "LogCheckpoint",
    "MetricsPayload",
    "ParamsModel",
    "PulseBatchPayload",
    "SessionEventKind",
    "SessionEventPayload",
    "SessionPayload",
    "SessionSummary",
    "Severity",
    "StatePayload",
    "Stream",
    "StreamSpec",
    "TopicBase",
    "dumps_schema",
    "encode_payload",
    "is_valid_id",
    "json_schemas",
    "mark_historical",
    "parse_topic",
    "pulse_batch_fields",
    "schema_id",
]

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "lasers"
CONTENT_TYPE = "application/json"
METRICS_EXPIRY_S = 10
AVAILABILITY_ONLINE = b"online"
AVAILABILITY_OFFLINE = b"offline"

_RFC3339_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$"
# A topic level may not hold MQTT wildcards or separators.
_LEVEL = re.compile(r"^[^/#+\x00]+$")
# Site, device and session ids: nothing that renders like something else (no look-alikes, no
# invisible or control characters), nothing a shell, a URL or a topic would read specially.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_ALLOWED = "1 to 64 ASCII letters, digits, - or _"


def is_valid_id(value: object) -> bool:
    """True for a site, device or session id of :data:`ID_PATTERN`."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


class Stream(StrEnum):
    """The kinds of topic under a device's base; the value is the schema file's stem."""

    AVAILABILITY = "availability"
    STATE = "state"
    SESSION = "session"
    SESSION_EVENTS = "session-events"
    PULSES = "pulses"
    METRICS = "metrics"
    ALERTS = "alerts"
    LOG_CHECKPOINT = "log-checkpoint"
    CMD = "cmd"


Severity = Literal["info", "warning", "critical"]
SessionEventKind = Literal[
    "started", "zone", "params", "armed", "disarmed", "fault", "ack", "ended"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Envelope(_Model):
    """Fields every JSON payload carries."""

    v: Literal[1] = Field(description="Schema version.")
    ts: AwareDatetime = Field(description="When the message was produced, RFC 3339 UTC.")
    device: str = Field(description="Device id (the last level of the base topic).")
    seq: Annotated[int, Field(ge=1)] = Field(
        description="Per-topic counter, +1 per message, kept across daemon restarts."
    )
    boot: Annotated[int, Field(ge=1)] = Field(
        description="Daemon start counter: which run produced this message."
    )
    historical: Literal[True] | None = Field(
        default=None,
        description="Present (true) only on messages delivered late from the durable outbox.",
    )


class ParamsModel(_Model):
    energy_uj: int = Field(ge=0)
    width_us: int = Field(ge=0)
    rate_mhz: int = Field(ge=0)
    spot_um: int = Field(ge=0)


class StatePayload(Envelope):
    """``state`` (retained): the device as the daemon sees it."""

    state: str = Field(description="STANDBY, READY, EMITTING, FAULT, or UNKNOWN (no link).")
    interlocks: list[str] = Field(
        description="Open interlocks: estop, door, key, contact, cooling."
    )
    faults: list[str] = Field(description="Latched device faults, e.g. LEASE_EXPIRED.")
    params: ParamsModel | None = Field(description="Parameters set on the device, if any.")
    armed: bool
    session: str | None = Field(description="Current session id, if one is open.")
    daemon_version: str


class SessionSummary(_Model):
    """A treatment session's running or closing summary."""

    session: str = Field(description="Session id.")
    operator: str | None = None
    patient: str | None = Field(default=None, description="Pseudonymous patient reference.")
    skin_type: str | None = Field(default=None, description="Fitzpatrick I-VI.")
    zone: str | None = Field(default=None, description="Zone being treated now.")
    started: AwareDatetime | None = None
    ended: AwareDatetime | None = None
    pulses: int = Field(ge=0, description="Pulses recorded so far.")
    energy_uj: int = Field(ge=0, description="Total measured energy, µJ.")
    energy_uj_by_zone: dict[str, int] = Field(default_factory=dict)
    peak_fluence_j_cm2: float | None = None
    duration_s: float | None = None
    faults: int = Field(default=0, ge=0, description="Safety breaches latched in the session.")


class SessionPayload(Envelope):
    """``session`` (retained): the current session; an EMPTY message when there is none."""

    summary: SessionSummary


class LogCheckpoint(_Model):
    """A signed checkpoint of the session log's hash chain (docs/session-log.md).

    The signature is Ed25519 over the UTF-8 bytes of six LF-terminated lines:
    ``devicectl-log-checkpoint/v1``, ``device=<device>``, ``log_seq=<decimal>``, ``hash=<hex>``,
    ``time=<time exactly as here>``, ``key_id=<hex>``; ``device`` is the envelope's.
    """

    log_seq: int = Field(ge=0, description="The log record (chain seq) the checkpoint covers.")
    hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="The chain's SHA-256 at log_seq, lower-case hex."
    )
    time: Annotated[str, Field(pattern=_RFC3339_UTC)] = Field(
        description="When it was signed, RFC 3339 UTC; signed as this exact text."
    )
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] = Field(
        description="First 16 bytes of SHA-256 of the raw public key, lower-case hex."
    )
    public_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")] = Field(
        description="Base64 of the raw 32-byte Ed25519 public key. Informational: verification "
        "trusts only an enrolled key or the log's own key history."
    )
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")] = Field(
        description="Base64 of the 64-byte Ed25519 signature over the canonical text above."
    )


class CheckpointPayload(Envelope, LogCheckpoint):
    """``log/checkpoint`` (retained): the newest signed checkpoint of the session log's hash
    chain. ``signature`` is Ed25519 over the UTF-8 bytes of six LF-terminated lines:
    ``devicectl-log-checkpoint/v1``, ``device=<device>``, ``log_seq=<decimal>``,
    ``hash=<hash>``, ``time=<time, as published>``, ``key_id=<key_id>``."""


class SessionEventPayload(Envelope):
    """``sessions/{id}/events``: one lifecycle event; ``ended`` carries the closing summary."""

    session: str
    event: SessionEventKind
    details: dict[str, JsonValue] = Field(default_factory=dict)
    summary: SessionSummary | None = Field(default=None, description="Only on ``ended``.")
    checkpoint: LogCheckpoint | None = Field(
        default=None,
        description="Only on ``ended``: the signed checkpoint covering the session's last record "
        "(device: this message's).",
    )


class PulseBatchPayload(Envelope):
    """``pulses``: the pulses of at most 100 ms, one session and zone per batch."""

    session: str | None
    zone: str | None
    first_pulse_no: int = Field(ge=0)
    last_pulse_no: int = Field(ge=0)
    count: int = Field(ge=1)
    energy_uj_sum: int = Field(ge=0)
    energy_uj_min: int = Field(ge=0)
    energy_uj_max: int = Field(ge=0)
    pulses: list[tuple[int, int, int]] = Field(
        description="One [pulse_no, t_us (device clock), energy_uj (measured)] per pulse."
    )
    dropped: int = Field(
        default=0, ge=0, description="Pulses not handed over because the hand-off was full."
    )


def pulse_batch_fields(
    pulses: Sequence[tuple[int, int, int]],
    *,
    session: str | None,
    zone: str | None,
    dropped: int = 0,
) -> dict[str, Any]:
    """A :class:`PulseBatchPayload`'s fields but the envelope, for consecutive ``pulses`` (at
    least one ``(pulse_no, t_us, energy_uj)``): the first and last numbers, the count and the
    energies' sum, minimum and maximum summarised from the list."""
    energies = [p[2] for p in pulses]
    return {
        "session": session,
        "zone": zone,
        "first_pulse_no": pulses[0][0],
        "last_pulse_no": pulses[-1][0],
        "count": len(pulses),
        "energy_uj_sum": sum(energies),
        "energy_uj_min": min(energies),
        "energy_uj_max": max(energies),
        "pulses": [(p[0], p[1], p[2]) for p in pulses],
        "dropped": dropped,
    }


class MetricsPayload(Envelope):
    """``metrics`` (QoS 0, live only, 1 Hz)."""

    rate_hz: float | None = None
    avg_power_w: float | None = None
    skin_temp_c: float | None = None
    head_temp_c: float | None = None
    counters: dict[str, int] = Field(default_factory=dict)
    log_commits_per_s: Annotated[int, Field(ge=0)] | None = None
    log_commit_p99_ms: Annotated[float, Field(ge=0)] | None = None
    log_fsyncs_per_s: Annotated[float, Field(ge=0)] | None = None


class AlertPayload(Envelope):
    """``alerts``: a safety event or an operational problem worth a human's attention."""

    severity: Severity
    code: str
    message: str
    value: float | None = None
    limit: float | None = None
    session: str | None = None


@dataclass(frozen=True, slots=True)
class StreamSpec:
    stream: Stream
    pattern: str  # under the base; {id} for the session id
    retain: bool
    qos: int
    model: type[Envelope] | None  # None: not JSON (availability, commands)


STREAMS: dict[Stream, StreamSpec] = {
    s.stream: s
    for s in (
        StreamSpec(Stream.AVAILABILITY, "availability", True, 1, None),
        StreamSpec(Stream.STATE, "state", True, 1, StatePayload),
        StreamSpec(Stream.SESSION, "session", True, 1, SessionPayload),
        StreamSpec(
            Stream.SESSION_EVENTS,
            "sessions/{id}/events",
            False,
            1,
            SessionEventPayload,
        ),
        StreamSpec(Stream.PULSES, "pulses", False, 1, PulseBatchPayload),
        StreamSpec(Stream.METRICS, "metrics", False, 0, MetricsPayload),
        StreamSpec(Stream.ALERTS, "alerts", False, 1, AlertPayload),
        StreamSpec(Stream.LOG_CHECKPOINT, "log/checkpoint", True, 1, CheckpointPayload),
        StreamSpec(Stream.CMD, "cmd/{command}", False, 1, None),
    )
}


def schema_id(stream: Stream) -> str:
    """The ``schema`` MQTT 5 user property and the exported schema's ``$id``."""
    return f"urn:devicectl:mqtt:{stream.value}:v{SCHEMA_VERSION}"


@dataclass(frozen=True, slots=True)
class TopicBase:
    """``{prefix}/{site}/{device}``; raises ValueError on a level that MQTT cannot carry."""

    prefix: str
    site: str
    device: str

    def __post_init__(self) -> None:
        if not _LEVEL.match(self.prefix):
            raise ValueError(f"MQTT topic prefix {self.prefix!r} must be non-empty without / # +")
        for name in ("site", "device"):
            if not is_valid_id(getattr(self, name)):
                raise ValueError(f"MQTT {name} id {getattr(self, name)!r} must be {ID_ALLOWED}")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.device}"

    def topic(self, stream: Stream, session: str | None = None) -> str:
        if stream is Stream.SESSION_EVENTS:
            if session is None or not _LEVEL.match(session):
                raise ValueError(f"session id {session!r} cannot be an MQTT topic level")
            return f"{self.base}/sessions/{session}/events"
        if stream is Stream.CMD:
            return f"{self.base}/cmd/#"
        return f"{self.base}/{STREAMS[stream].pattern}"


def parse_topic(topic: str) -> tuple[str, str, str, Stream, str | None] | None:
    """Split a topic into (prefix, site, device, stream, session id or command); None if foreign."""
    levels = topic.split("/")
    if len(levels) < 4:
        return None
    prefix, site, device, rest = levels[0], levels[1], levels[2], levels[3:]
    match rest:
        case ["sessions", session, "events"]:
            return prefix, site, device, Stream.SESSION_EVENTS, session
        case ["cmd", command]:
            return prefix, site, device, Stream.CMD, command
        case ["log", "checkpoint"]:
            return prefix, site, device, Stream.LOG_CHECKPOINT, None
        case [name] if name in {"availability", "state", "session", "pulses", "metrics", "alerts"}:
            return prefix, site, device, Stream(name), None
    return None


def encode_payload(payload: Envelope) -> bytes:
    """The wire form: compact UTF-8 JSON, ``historical`` left out unless true."""
    exclude = {"historical"} if payload.historical is None else None
    return payload.model_dump_json(exclude=exclude).encode()


_HISTORICAL_SUFFIX = b',"historical":true}'


def mark_historical(payload: bytes) -> bytes:
    """Add ``"historical":true`` to an encoded payload (a JSON object), idempotently.

    The common case is not parsed: the flag is appended before the closing brace, and a payload
    ending with that suffix is already marked. Only a payload that mentions ``"historical"``
    elsewhere (a detail value, a nested key, a field encoded by :func:`encode_payload`) is
    parsed, to tell a top-level flag from text that merely contains the word.
    """
    if not payload.endswith(b"}") or payload.endswith(_HISTORICAL_SUFFIX):
        return payload
    if b'"historical"' in payload and _has_top_level_historical(payload):
        return payload
    if payload[:-1].rstrip().endswith(b"{"):
        return payload[:-1] + _HISTORICAL_SUFFIX[1:]  # the empty object
    return payload[:-1] + _HISTORICAL_SUFFIX


def _has_top_level_historical(payload: bytes) -> bool:
    try:
        body = json.loads(payload)
    except ValueError:
        return False
    return isinstance(body, dict) and "historical" in body


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per topic kind, keyed by file stem (``state``, ``session-events``, ...)."""
    schemas: dict[str, dict[str, Any]] = {}
    for spec in STREAMS.values():
        if spec.stream is Stream.CMD:
            continue
        if spec.model is None:
            schema: dict[str, Any] = {
                "title": "Availability",
                "description": (
                    "Plain UTF-8 text, NOT JSON: 'online' (retained, on connect) or 'offline' "
                    "(retained, on clean shutdown and as the Last Will). The payload carries no "
                    "v/ts/seq/boot. Under MQTT 5 every availability message, the Last Will "
                    "included, has the user properties `boot` (the daemon run it belongs to, "
                    "decimal) and `schema` (this schema's $id), and content type text/plain: "
                    "an `offline` whose `boot` is older than the latest `state`'s is a late "
                    "Last Will. Under MQTT 3.1.1 there are no properties: read `boot` from the "
                    "next `state` message to place it."
                ),
                "type": "string",
                "enum": ["online", "offline"],
            }
        else:
            schema = spec.model.model_json_schema()
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": schema_id(spec.stream),
            "x-topic": "{prefix}/{site}/{device}/" + spec.pattern,
            "x-retain": spec.retain,
            "x-qos": spec.qos,
            **schema,
        }
        if spec.stream is Stream.SESSION:
            schema["description"] = (
                "The current session summary, on change and every second. An EMPTY retained "
                "message (zero bytes, not JSON) means no session is open."
            )
        schemas[spec.stream.value] = schema
    return schemas


def dumps_schema(schema: dict[str, Any]) -> str:
    """A schema as the text ``devicectl schema`` writes."""
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
