"""How the dashboard reads the MQTT telemetry contract (docs/mqtt.md) — the one place.

Topics are ``{prefix}/{site}/{device}/{kind}``; payloads are JSON objects carrying the envelope
``v, ts, device, seq, boot`` (and ``historical`` when replayed from the daemon's outbox), except
``availability``, a plain ``online``/``offline`` string, and ``session``, which is an empty payload
when no session is open.

Every payload that reaches these readers has passed :func:`protocols.intake.read_message`: it is
bounded, finite and valid against its topic's published JSON Schema. The readers convert units on
the way in (energies in joules, temperatures in °C, rates in Hz, powers in W); a field that is
missing reads as ``None``, and the page then shows "—" rather than a wrong number. They still
accept a few older spellings, harmlessly: the schema lets only the contract's own through.

Sans-I/O: bytes in, frozen records out; no clock, no logging.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devicectl.errors import DevicectlError
from protocols.messages import INTERLOCK_NAMES, DeviceState, FaultCode

__all__ = [
    "INTERLOCKS",
    "KIND_ALERTS",
    "KIND_AVAILABILITY",
    "KIND_COMMAND",
    "KIND_METRICS",
    "KIND_PULSES",
    "KIND_SESSION",
    "KIND_SESSION_EVENTS",
    "KIND_STATE",
    "Alert",
    "DeviceStatus",
    "Envelope",
    "LaserParams",
    "MalformedPayload",
    "Metrics",
    "PulseBatch",
    "SessionEvent",
    "SessionSummary",
    "TopicRef",
    "ZoneEnergy",
    "parse_topic",
    "read_alert",
    "read_availability",
    "read_envelope",
    "read_json_object",
    "read_metrics",
    "read_pulse_batch",
    "read_session",
    "read_session_event",
    "read_status",
]

# Topic kinds the dashboard understands (the last topic levels under the device's base).
KIND_AVAILABILITY = "availability"
KIND_STATE = "state"
KIND_SESSION = "session"
KIND_PULSES = "pulses"
KIND_METRICS = "metrics"
KIND_ALERTS = "alerts"
KIND_SESSION_EVENTS = "events"  # sessions/{id}/events
KIND_COMMAND = "cmd"  # cmd/...: commands to the daemon, not telemetry

# Unit suffixes → factor to the dashboard's unit.
_ENERGY_J = (("_j", 1.0), ("_mj", 1e-3), ("_uj", 1e-6))
_TEMP_C = (("_c", 1.0), ("_cdeg", 0.01), ("", 1.0))
_RATE_HZ = (("_hz", 1.0), ("_mhz", 1e-3), ("", 1.0))
_POWER_W = (("_w", 1.0), ("_mw", 1e-3))
_WIDTH_MS = (("_ms", 1.0), ("_us", 1e-3))


class MalformedPayload(DevicectlError, ValueError):
    """A payload is not what its topic promises (not JSON, not an object, not a known word)."""


@dataclass(frozen=True, slots=True)
class TopicRef:
    """Where a message belongs: the device ``site/device`` and what kind of message it is."""

    site: str
    device: str
    kind: str
    session_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"


def parse_topic(prefix: str, topic: str) -> TopicRef | None:
    """``lasers/clinic-a/laser-01/state`` → TopicRef; ``None`` for topics not of the contract."""
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return None
    site, device, rest = parts[0], parts[1], parts[2:]
    if len(rest) == 1 and rest[0] in {
        KIND_AVAILABILITY,
        KIND_STATE,
        KIND_SESSION,
        KIND_PULSES,
        KIND_METRICS,
        KIND_ALERTS,
    }:
        return TopicRef(site, device, rest[0])
    if len(rest) == 3 and rest[0] == "sessions" and rest[2] == "events" and rest[1]:
        return TopicRef(site, device, KIND_SESSION_EVENTS, session_id=rest[1])
    if rest[0] == KIND_COMMAND:
        return TopicRef(site, device, KIND_COMMAND)
    return None


# --------------------------------------------------------------------------------------------
# Field readers: tolerant of spelling, strict about types.


def _first(obj: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in obj and obj[name] is not None:
            return obj[name]
    return None


def _text(obj: Mapping[str, Any], *names: str) -> str | None:
    value = _first(obj, *names)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _int(obj: Mapping[str, Any], *names: str) -> int | None:
    value = _first(obj, *names)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _quantity(
    obj: Mapping[str, Any],
    stems: Sequence[str],
    units: Sequence[tuple[str, float]],
    tail: str = "",
) -> float | None:
    """The first present of ``stem[_tail]_unit`` or ``stem_unit[_tail]``, scaled to our unit.

    ``tail`` covers both word orders the contract has used: ``energy_sum_uj``, ``energy_uj_sum``.
    """
    for stem in stems:
        for suffix, factor in units:
            names = (
                (f"{stem}_{tail}{suffix}", f"{stem}{suffix}_{tail}") if tail else (stem + suffix,)
            )
            for name in names:
                value = _as_float(obj.get(name))
                if value is not None:
                    return value * factor
    return None


def _either(first: float | None, second: float | None) -> float | None:
    return first if first is not None else second


def _mapping(obj: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    value = _first(obj, *names)
    return value if isinstance(value, Mapping) else {}


def read_json_object(payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object; raises MalformedPayload naming what is wrong."""
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedPayload(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedPayload(f"a JSON {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields every JSON payload carries."""

    v: int | None
    ts: str | None
    device: str | None
    seq: int | None
    boot: int | None
    historical: bool


def read_envelope(obj: Mapping[str, Any]) -> Envelope:
    return Envelope(
        v=_int(obj, "v"),
        ts=_text(obj, "ts"),
        device=_text(obj, "device"),
        seq=_int(obj, "seq"),
        boot=_int(obj, "boot"),
        historical=obj.get("historical") is True,
    )


def read_availability(payload: bytes) -> str:
    """``online`` / ``offline``; raises MalformedPayload for anything else."""
    word = payload.decode("utf-8", errors="replace").strip().strip('"').lower()
    if word not in {"online", "offline"}:
        raise MalformedPayload(f"availability {word[:40]!r} is neither online nor offline")
    return word


# --------------------------------------------------------------------------------------------
# state


_STATE_NAMES = {s.value: s.name for s in DeviceState}
_INTERLOCK_BITS = tuple((name, int(bit)) for name, bit in INTERLOCK_NAMES.items())
INTERLOCKS: tuple[str, ...] = tuple(INTERLOCK_NAMES)
_FAULT_NAMES = {f.value: f.name for f in FaultCode}


def _state_name(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _STATE_NAMES.get(value, f"STATE_{value}")
    if isinstance(value, str) and value:
        return value.upper()
    return None


def _open_interlocks(value: Any) -> tuple[str, ...] | None:
    """Open (unsafe) interlocks from a bitmask, a list of open names, or a name → open mapping."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return tuple(name for name, bit in _INTERLOCK_BITS if value & bit)
    if isinstance(value, list | tuple):
        return tuple(str(name).lower() for name in value if isinstance(name, str))
    if isinstance(value, Mapping):
        # True / 1 / "open" means open, as a 1 bit does on the wire.
        return tuple(
            str(name).lower()
            for name, flag in value.items()
            if flag is True or flag == 1 or (isinstance(flag, str) and flag.lower() == "open")
        )
    return None


def _fault_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, bool) or value is None:
        return ()
    if isinstance(value, int):
        return tuple(name for code, name in _FAULT_NAMES.items() if value & (1 << (code - 1)))
    if isinstance(value, list | tuple):
        names = []
        for item in value:
            if isinstance(item, str):
                names.append(item.upper())
            elif isinstance(item, int) and not isinstance(item, bool):
                names.append(_FAULT_NAMES.get(item, f"FAULT_{item}"))
            elif isinstance(item, Mapping):
                name = _text(item, "name", "fault", "code")
                if name is not None:
                    names.append(name.upper())
        return tuple(names)
    if isinstance(value, Mapping):
        return tuple(str(name).upper() for name, on in value.items() if on)
    return ()


@dataclass(frozen=True, slots=True)
class LaserParams:
    energy_j: float | None
    width_ms: float | None
    rate_hz: float | None
    spot_um: float | None


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The retained ``state`` message."""

    state: str | None
    armed: bool | None
    interlocks_open: tuple[str, ...] | None
    faults: tuple[str, ...]
    params: LaserParams | None
    session_id: str | None
    version: str | None
    skin_temp_limit_c: float | None


def _read_params(obj: Mapping[str, Any]) -> LaserParams | None:
    params = _mapping(obj, "params", "parameters")
    if not params:
        return None
    return LaserParams(
        energy_j=_quantity(params, ("energy",), _ENERGY_J),
        width_ms=_quantity(params, ("width", "pulse_width"), _WIDTH_MS),
        rate_hz=_quantity(params, ("rate", "frequency"), _RATE_HZ),
        spot_um=_as_float(_first(params, "spot_um", "spot")),
    )


def read_status(obj: Mapping[str, Any]) -> DeviceStatus:
    armed = _first(obj, "armed")
    session = _first(obj, "session_id", "session")
    if isinstance(session, Mapping):
        session = _first(session, "id", "session_id")
    limits = _mapping(obj, "limits")
    return DeviceStatus(
        state=_state_name(_first(obj, "state", "device_state")),
        armed=armed if isinstance(armed, bool) else None,
        interlocks_open=_open_interlocks(_first(obj, "interlocks", "interlocks_open")),
        faults=_fault_names(_first(obj, "faults", "active_faults", "latched_faults")),
        params=_read_params(obj),
        session_id=str(session) if isinstance(session, str | int) and session != "" else None,
        version=_text(obj, "version", "daemon_version"),
        skin_temp_limit_c=_quantity(limits, ("skin_temp", "skin_temp_max"), _TEMP_C),
    )


# --------------------------------------------------------------------------------------------
# session


@dataclass(frozen=True, slots=True)
class ZoneEnergy:
    zone: str
    energy_j: float | None
    limit_j: float | None
    pulses: int | None


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """The retained ``session`` message (absent: the empty payload means no session)."""

    session_id: str | None
    operator: str | None
    patient: str | None
    skin_type: str | None
    zone: str | None
    pulses: int | None
    energy_j: float | None
    energy_limit_j: float | None
    zones: tuple[ZoneEnergy, ...]
    started: str | None


def _zone_entry(name: str | None, value: Any) -> ZoneEnergy | None:
    if isinstance(value, Mapping):
        zone = name or _text(value, "zone", "name")
        if zone is None:
            return None
        return ZoneEnergy(
            zone=zone,
            energy_j=_quantity(value, ("energy", "energy_sum"), _ENERGY_J),
            limit_j=_quantity(value, ("limit", "energy_limit", "limit_energy"), _ENERGY_J),
            pulses=_int(value, "pulses", "count", "pulse_count"),
        )
    number = _as_float(value)
    if name is not None and number is not None:
        return ZoneEnergy(zone=name, energy_j=number * 1e-6, limit_j=None, pulses=None)  # µJ
    return None


def _read_zones(obj: Mapping[str, Any]) -> tuple[ZoneEnergy, ...]:
    # A mapping zone → number is in µJ (``energy_uj_by_zone``); zone → object or a list of objects
    # name their units.
    raw = _first(obj, "zones", "energy_uj_by_zone", "energy_by_zone", "energy_per_zone")
    entries: list[ZoneEnergy | None] = []
    if isinstance(raw, Mapping):
        entries = [_zone_entry(str(name), value) for name, value in raw.items()]
    elif isinstance(raw, list):
        entries = [_zone_entry(None, value) for value in raw]
    return tuple(entry for entry in entries if entry is not None)


def read_session(payload: Mapping[str, Any]) -> SessionSummary:
    """The summary may be the payload itself or nested under ``summary``."""
    nested = _mapping(payload, "summary")
    obj = nested or payload
    zone = _first(obj, "zone", "current_zone")
    if isinstance(zone, Mapping):
        zone = _first(zone, "name", "zone")
    skin = _first(obj, "skin_type", "fitzpatrick", "fitzpatrick_type")
    return SessionSummary(
        session_id=_text(obj, "session", "id", "session_id"),
        operator=_text(obj, "operator", "operator_id"),
        patient=_text(obj, "patient", "patient_ref", "patient_reference"),
        skin_type=str(skin) if isinstance(skin, str | int) and not isinstance(skin, bool) else None,
        zone=zone if isinstance(zone, str) else None,
        pulses=_int(obj, "pulses", "pulse_count", "pulses_total"),
        energy_j=_quantity(obj, ("energy", "energy_total", "total_energy"), _ENERGY_J),
        energy_limit_j=_quantity(obj, ("energy_limit", "session_limit", "limit"), _ENERGY_J),
        zones=_read_zones(obj),
        started=_text(obj, "started", "started_at", "start"),
    )


# --------------------------------------------------------------------------------------------
# pulses, metrics, alerts, session events


@dataclass(frozen=True, slots=True)
class PulseBatch:
    session_id: str | None
    zone: str | None
    first: int | None
    last: int | None
    count: int
    energy_sum_j: float
    energy_min_j: float | None
    energy_max_j: float | None


def read_pulse_batch(obj: Mapping[str, Any]) -> PulseBatch:
    first, last = _int(obj, "first", "first_pulse_no"), _int(obj, "last", "last_pulse_no")
    pulses = _first(obj, "pulses")
    count = _int(obj, "count", "n")
    if count is None:
        if isinstance(pulses, list):
            count = len(pulses)
        elif first is not None and last is not None and last >= first:
            count = last - first + 1
    energy_sum = _quantity(obj, ("energy",), _ENERGY_J, "sum")
    if energy_sum is None and isinstance(pulses, list):
        energy_sum = _sum_pulse_energies(pulses)
    return PulseBatch(
        session_id=_text(obj, "session", "session_id"),
        zone=_text(obj, "zone"),
        first=first,
        last=last,
        count=max(count or 0, 0),
        energy_sum_j=energy_sum or 0.0,
        energy_min_j=_quantity(obj, ("energy",), _ENERGY_J, "min"),
        energy_max_j=_quantity(obj, ("energy",), _ENERGY_J, "max"),
    )


def _sum_pulse_energies(pulses: list[Any]) -> float:
    """Per-pulse entries are ``[pulse_no, t_us, energy_uj]`` or objects with an energy field."""
    total = 0.0
    for pulse in pulses:
        if isinstance(pulse, Mapping):
            total += _quantity(pulse, ("energy",), _ENERGY_J) or 0.0
        elif isinstance(pulse, list | tuple) and len(pulse) >= 3:
            total += (_as_float(pulse[2]) or 0.0) * 1e-6
    return total


@dataclass(frozen=True, slots=True)
class Metrics:
    rate_hz: float | None
    avg_power_w: float | None
    skin_temp_c: float | None
    head_temp_c: float | None
    counters: dict[str, float]


def read_metrics(obj: Mapping[str, Any]) -> Metrics:
    temps = _mapping(obj, "temperatures", "temperature", "temp")
    counters = _mapping(obj, "counters")
    return Metrics(
        rate_hz=_quantity(obj, ("rate", "pulse_rate"), _RATE_HZ),
        avg_power_w=_quantity(obj, ("avg_power", "average_power", "power"), _POWER_W),
        skin_temp_c=_either(
            _quantity(obj, ("skin_temp", "skin_temperature"), _TEMP_C),
            _quantity(temps, ("skin",), _TEMP_C),
        ),
        head_temp_c=_either(
            _quantity(obj, ("head_temp", "head_temperature"), _TEMP_C),
            _quantity(temps, ("head",), _TEMP_C),
        ),
        counters={
            str(name): number
            for name, value in counters.items()
            if (number := _as_float(value)) is not None
        },
    )


# Severity words → rank: 3 critical, 2 error, 1 warning, 0 informational.
_SEVERITY_RANK = {
    "critical": 3,
    "emergency": 3,
    "alarm": 3,
    "fatal": 3,
    "error": 2,
    "high": 2,
    "breach": 2,
    "warning": 1,
    "warn": 1,
    "medium": 1,
}


@dataclass(frozen=True, slots=True)
class Alert:
    severity: str
    rank: int
    code: str | None
    message: str | None
    value: float | str | None
    limit: float | str | None
    unit: str | None
    session_id: str | None


def _scalar(obj: Mapping[str, Any], *names: str) -> float | str | None:
    value = _first(obj, *names)
    if isinstance(value, str):
        return value
    return _as_float(value)


def read_alert(obj: Mapping[str, Any]) -> Alert:
    severity = (_text(obj, "severity", "level") or "warning").lower()
    return Alert(
        severity=severity,
        rank=_SEVERITY_RANK.get(severity, 0),
        code=_text(obj, "code", "rule"),
        message=_text(obj, "message", "text", "detail"),
        value=_scalar(obj, "value"),
        limit=_scalar(obj, "limit", "bound"),
        unit=_text(obj, "unit"),
        session_id=_text(obj, "session", "session_id"),
    )


@dataclass(frozen=True, slots=True)
class SessionEvent:
    session_id: str
    event: str
    zone: str | None
    detail: str | None


def read_session_event(session_id: str, obj: Mapping[str, Any]) -> SessionEvent:
    return SessionEvent(
        session_id=session_id,
        event=(_text(obj, "event", "type", "kind") or "event").lower(),
        zone=_text(obj, "zone"),
        detail=_text(obj, "reason", "message", "detail") or _details_text(obj),
    )


def _details_text(obj: Mapping[str, Any]) -> str | None:
    details = _mapping(obj, "details")
    words = [
        f"{name}={value}"
        for name, value in details.items()
        if isinstance(value, str | int | float) and not isinstance(value, bool)
    ]
    return ", ".join(words[:6]) or None
