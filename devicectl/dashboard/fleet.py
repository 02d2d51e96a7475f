"""The dashboard's view of every device, aggregated from telemetry: messages in, view model out.

Sans-I/O: :meth:`Fleet.apply` takes a topic, a payload and the receive time (the caller's clock)
and returns the :class:`Update` s to push to browsers; :meth:`Fleet.snapshot` is the whole view a
browser starts from. The view is plain JSON-ready data; :mod:`.contract` is where payload fields
are read.

Rules the view follows:
- ``availability`` is the broker's word: ``offline`` (the daemon's Last Will or its orderly exit)
  greys the device out and keeps its last known state, marked as such.
- ``session`` with an empty payload means no session is open; pulses that arrive late for a
  session that has ended are not counted again.
- Pulse counts and zone energies move between the 1 Hz session summaries by adding up the pulse
  batches of that session; the larger of the two figures wins, since both only grow.
- Every JSON topic of a device is a stream with a ``seq``: a forward jump counts the missed
  messages; a repeated or older ``seq`` is a duplicate or a replay and is not applied twice (a
  lower ``seq`` under a higher ``boot`` is a daemon whose counters were reset, and is applied).
- On every (re)connection to the broker the retained topics are forgotten, since the broker
  replays them at once: a session that ended while the dashboard was away is not shown as open.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from devicectl.dashboard.contract import (
    INTERLOCKS,
    KIND_ALERTS,
    KIND_AVAILABILITY,
    KIND_COMMAND,
    KIND_METRICS,
    KIND_PULSES,
    KIND_SESSION,
    KIND_SESSION_EVENTS,
    KIND_STATE,
    DeviceStatus,
    Envelope,
    MalformedPayload,
    Metrics,
    SessionSummary,
    TopicRef,
    parse_topic,
    read_alert,
    read_availability,
    read_envelope,
    read_json_object,
    read_metrics,
    read_pulse_batch,
    read_session,
    read_session_event,
    read_status,
)
from devicectl.dashboard.limits import DisplayLimits

__all__ = ["Fleet", "Update"]
_RETAINED = frozenset({KIND_AVAILABILITY, KIND_STATE, KIND_SESSION})


@dataclass(frozen=True, slots=True)
class Update:
    """One change to push to browsers. ``data["op"]`` says how the page applies it:

    - ``device``: ``{"key", "fields"}``, top-level fields of that device's view to replace;
    - ``skin_temp``: ``{"key", "point": [t_ms, celsius]}``, a point to append to the chart;
    - ``alert``: ``{"alert"}``, newest first in the device's list and the fleet's;
    - ``event``: ``{"key", "event"}``, a session lifecycle event;
    - ``broker``: ``{"broker"}``, the dashboard's own link to the broker.
    """

    data: dict[str, Any]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _epoch_ms(ts: str | None, fallback_s: float) -> float:
    if ts is not None:
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp() * 1000.0
    return fallback_s * 1000.0


@dataclass(slots=True)
class _SeqMark:
    boot: int | None
    seq: int


@dataclass(slots=True)
class _LiveSession:
    """What the pulse batches of one session add up to."""

    pulses: int = 0
    energy_j: float = 0.0
    zones: dict[str, float] = field(default_factory=dict)
    zone_pulses: dict[str, int] = field(default_factory=dict)
    zone: str | None = None
    last_pulse_no: int | None = None


@dataclass(slots=True)
class _Device:
    site: str
    device: str
    availability: str = "unknown"
    availability_at: str | None = None
    last_seen: str | None = None
    status: DeviceStatus | None = None
    status_ts: str | None = None
    summary: SessionSummary | None = None
    live_session_id: str | None = None
    live: dict[str, _LiveSession] = field(default_factory=dict)
    ended: deque[str] = field(default_factory=lambda: deque(maxlen=32))
    metrics: Metrics | None = None
    metrics_ts: str | None = None
    skin_temp: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=600))
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=12))
    seqs: dict[str, _SeqMark] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    pulse_gaps: int = 0
    malformed: int = 0
    last_malformed: str | None = None

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"


class Fleet:
    """Every device seen under ``prefix``, as the page shows it.

    ``limits`` are what the bars and the chart's line are drawn against when the telemetry does not
    carry its own; ``history_s`` is the skin-temperature chart's window; ``max_alerts`` bounds the
    fleet's alert list.
    """

    def __init__(
        self,
        prefix: str = "lasers",
        *,
        limits: DisplayLimits | None = None,
        history_s: float = 120.0,
        max_alerts: int = 100,
    ) -> None:
        self.prefix = prefix
        self.limits = limits or DisplayLimits()
        self.history_ms = history_s * 1000.0
        self._devices: dict[str, _Device] = {}
        self._alerts: deque[dict[str, Any]] = deque(maxlen=max_alerts)
        self._alert_counter = 0
        self._broker: dict[str, Any] = {"connected": False, "since": None, "detail": None}
        self._handlers: dict[str, Callable[[_Device, TopicRef, bytes, float], _Change]] = {
            KIND_AVAILABILITY: self._on_availability,
            KIND_STATE: self._on_state,
            KIND_SESSION: self._on_session,
            KIND_PULSES: self._on_pulses,
            KIND_METRICS: self._on_metrics,
            KIND_ALERTS: self._on_alert,
            KIND_SESSION_EVENTS: self._on_session_event,
        }

    # ---------------------------------------------------------------------------------- input

    def apply(self, topic: str, payload: bytes, now: float) -> list[Update]:
        """Take one MQTT message received at ``now`` (epoch seconds); return what changed."""
        ref = parse_topic(self.prefix, topic)
        if ref is None or ref.kind == KIND_COMMAND:
            return []
        device = self._devices.get(ref.key)
        created = device is None
        if device is None:
            device = self._devices[ref.key] = _Device(ref.site, ref.device)
        device.last_seen = _iso(now)
        try:
            change = self._handlers[ref.kind](device, ref, payload, now)
        except MalformedPayload as exc:
            device.malformed += 1
            device.last_malformed = f"{ref.kind}: {exc}"
            change = _Change({"malformed": device.malformed, "last_malformed": str(exc)})
        if created:
            return [Update({"op": "device", "key": device.key, "fields": _view(device, self)})] + [
                update for update in change.extra if update.data["op"] == "alert"
            ]
        change.fields["last_seen"] = device.last_seen
        updates = [Update({"op": "device", "key": device.key, "fields": change.fields})]
        return updates + change.extra

    def broker_link(self, connected: bool, now: float, detail: str | None = None) -> list[Update]:
        """The dashboard's own connection to the broker went up or down."""
        self._broker = {"connected": connected, "since": _iso(now), "detail": detail}
        updates = [Update({"op": "broker", "broker": dict(self._broker)})]
        if connected:
            # The broker replays every retained message right after we subscribe.
            for device in self._devices.values():
                device.availability, device.availability_at = "unknown", None
                device.status = device.summary = None
                device.live_session_id = None
                for kind in _RETAINED:
                    device.seqs.pop(kind, None)
                updates.append(
                    Update({"op": "device", "key": device.key, "fields": _view(device, self)})
                )
        return updates

    # ---------------------------------------------------------------------------------- output

    def snapshot(self) -> dict[str, Any]:
        return {
            "broker": dict(self._broker),
            "devices": [_view(self._devices[key], self) for key in sorted(self._devices)],
            "alerts": list(self._alerts),
        }

    def knows(self, site: str, device: str) -> bool:
        return f"{site}/{device}" in self._devices

    def device_view(self, site: str, device: str) -> dict[str, Any] | None:
        found = self._devices.get(f"{site}/{device}")
        return None if found is None else _view(found, self)

    # ------------------------------------------------------------------------------- handlers

    def _fresh(self, device: _Device, stream: str, envelope: Envelope) -> bool:
        """Track ``seq`` on one stream; False for a duplicate or replayed older message."""
        if envelope.seq is None:
            return True
        mark = device.seqs.get(stream)
        if mark is None:
            device.seqs[stream] = _SeqMark(envelope.boot, envelope.seq)
            return True
        if envelope.seq <= mark.seq:
            reset = (
                envelope.boot is not None and mark.boot is not None and envelope.boot > mark.boot
            )
            if not reset:
                return False
        elif envelope.seq > mark.seq + 1:
            device.missed[stream] = device.missed.get(stream, 0) + envelope.seq - mark.seq - 1
        mark.boot, mark.seq = envelope.boot, envelope.seq
        return True

    def _on_availability(
        self, device: _Device, _ref: TopicRef, payload: bytes, now: float
    ) -> _Change:
        device.availability = read_availability(payload)
        device.availability_at = _iso(now)
        return _Change(
            {"availability": device.availability, "availability_at": device.availability_at}
        )

    def _on_state(self, device: _Device, ref: TopicRef, payload: bytes, _now: float) -> _Change:
        obj = read_json_object(payload)
        envelope = read_envelope(obj)
        if not self._fresh(device, ref.kind, envelope):
            return _Change({})
        device.status, device.status_ts = read_status(obj), envelope.ts
        return _Change(
            {
                "state": _status_view(device),
                "missed": dict(device.missed),
                "skin_temp_limit_c": _skin_limit(device, self.limits),
            }
        )

    def _on_session(self, device: _Device, ref: TopicRef, payload: bytes, _now: float) -> _Change:
        if not payload.strip():
            # The empty retained message: no session is open.
            for ended in (
                device.summary.session_id if device.summary else None,
                device.live_session_id,
            ):
                if ended is not None and ended not in device.ended:
                    device.ended.append(ended)
                    device.live.pop(ended, None)
            device.summary, device.live_session_id = None, None
            return _Change({"session": None})
        obj = read_json_object(payload)
        envelope = read_envelope(obj)
        if not self._fresh(device, ref.kind, envelope):
            return _Change({})
        device.summary = read_session(obj)
        if device.summary.session_id is not None:
            device.live_session_id = device.summary.session_id
        return _Change(
            {"session": _session_view(device, self.limits), "missed": dict(device.missed)}
        )

    def _on_pulses(self, device: _Device, ref: TopicRef, payload: bytes, _now: float) -> _Change:
        obj = read_json_object(payload)
        if not self._fresh(device, ref.kind, read_envelope(obj)):
            return _Change({})
        batch = read_pulse_batch(obj)
        session_id = batch.session_id or device.live_session_id
        if session_id is None or session_id in device.ended:
            return _Change({"missed": dict(device.missed)})
        live = device.live.setdefault(session_id, _LiveSession())
        if device.live_session_id is None:
            device.live_session_id = session_id
        if (
            batch.first is not None
            and live.last_pulse_no is not None
            and batch.first > live.last_pulse_no + 1
        ):
            device.pulse_gaps += batch.first - live.last_pulse_no - 1
        if batch.last is not None:
            live.last_pulse_no = max(batch.last, live.last_pulse_no or 0)
        live.pulses += batch.count
        live.energy_j += batch.energy_sum_j
        zone = batch.zone or live.zone
        if zone is not None:
            live.zone = zone
            live.zones[zone] = live.zones.get(zone, 0.0) + batch.energy_sum_j
            live.zone_pulses[zone] = live.zone_pulses.get(zone, 0) + batch.count
        return _Change(
            {
                "session": _session_view(device, self.limits),
                "pulse_gaps": device.pulse_gaps,
                "missed": dict(device.missed),
            }
        )

    def _on_metrics(self, device: _Device, ref: TopicRef, payload: bytes, now: float) -> _Change:
        obj = read_json_object(payload)
        envelope = read_envelope(obj)
        if not self._fresh(device, ref.kind, envelope):
            return _Change({})
        device.metrics, device.metrics_ts = read_metrics(obj), envelope.ts
        change = _Change({"metrics": _metrics_view(device), "missed": dict(device.missed)})
        skin = device.metrics.skin_temp_c
        if skin is not None:
            point = (_epoch_ms(envelope.ts, now), round(skin, 2))
            device.skin_temp.append(point)
            while device.skin_temp and device.skin_temp[0][0] < point[0] - self.history_ms:
                device.skin_temp.popleft()
            change.extra.append(
                Update({"op": "skin_temp", "key": device.key, "point": list(point)})
            )
        return change

    def _on_alert(self, device: _Device, ref: TopicRef, payload: bytes, now: float) -> _Change:
        obj = read_json_object(payload)
        envelope = read_envelope(obj)
        if not self._fresh(device, ref.kind, envelope):
            return _Change({})
        alert = read_alert(obj)
        self._alert_counter += 1
        ident = (
            f"{device.key}/{envelope.boot}/{envelope.seq}"
            if envelope.seq is not None
            else f"{device.key}/n{self._alert_counter}"
        )
        view = {
            "id": ident,
            "key": device.key,
            "site": device.site,
            "device": device.device,
            "severity": alert.severity,
            "rank": alert.rank,
            "code": alert.code,
            "message": alert.message,
            "value": alert.value,
            "limit": alert.limit,
            "unit": alert.unit,
            "session": alert.session_id,
            "ts": envelope.ts or _iso(now),
            "historical": envelope.historical,
        }
        device.alerts.appendleft(view)
        self._alerts.appendleft(view)
        change = _Change({"missed": dict(device.missed)})
        change.extra.append(Update({"op": "alert", "alert": view}))
        return change

    def _on_session_event(
        self, device: _Device, ref: TopicRef, payload: bytes, now: float
    ) -> _Change:
        obj = read_json_object(payload)
        envelope = read_envelope(obj)
        if not self._fresh(device, f"sessions/{ref.session_id}/events", envelope):
            return _Change({})
        event = read_session_event(ref.session_id or "", obj)
        view = {
            "ts": envelope.ts or _iso(now),
            "session": event.session_id,
            "event": event.event,
            "zone": event.zone,
            "detail": event.detail,
        }
        device.events.appendleft(view)
        change = _Change({"missed": dict(device.missed)})
        change.extra.append(Update({"op": "event", "key": device.key, "event": view}))
        return change


@dataclass(slots=True)
class _Change:
    fields: dict[str, Any]
    extra: list[Update] = field(default_factory=list)


# -------------------------------------------------------------------------------------- views


def _skin_limit(device: _Device, limits: DisplayLimits) -> float:
    limit = device.status.skin_temp_limit_c if device.status else None
    return limit if limit is not None else limits.skin_temp_max_c


def _status_view(device: _Device) -> dict[str, Any] | None:
    status = device.status
    if status is None:
        return None
    params = status.params
    return {
        "state": status.state,
        "armed": status.armed,
        "interlocks": INTERLOCKS,
        "interlocks_open": list(status.interlocks_open)
        if status.interlocks_open is not None
        else None,
        "faults": list(status.faults),
        "params": None
        if params is None
        else {
            "energy_mj": None if params.energy_j is None else round(params.energy_j * 1e3, 3),
            "width_ms": params.width_ms,
            "rate_hz": params.rate_hz,
            "spot_um": params.spot_um,
        },
        "session_id": status.session_id,
        "version": status.version,
        "ts": device.status_ts,
    }


def _session_view(device: _Device, limits: DisplayLimits) -> dict[str, Any] | None:
    summary = device.summary
    session_id = summary.session_id if summary else device.live_session_id
    if summary is None and session_id is None:
        return None
    live = device.live.get(session_id) if session_id is not None else None
    live = live or _LiveSession()
    zones: dict[str, dict[str, Any]] = {}
    for zone in summary.zones if summary else ():
        zones[zone.zone] = {
            "zone": zone.zone,
            "energy_j": max(zone.energy_j or 0.0, live.zones.get(zone.zone, 0.0)),
            "limit_j": zone.limit_j or limits.zone_energy_j.get(zone.zone),
            "pulses": max(zone.pulses or 0, live.zone_pulses.get(zone.zone, 0)),
        }
    for name, energy in live.zones.items():
        zones.setdefault(
            name,
            {
                "zone": name,
                "energy_j": energy,
                "limit_j": limits.zone_energy_j.get(name),
                "pulses": live.zone_pulses.get(name, 0),
            },
        )
    current = (summary.zone if summary else None) or live.zone
    if current is not None:
        zones.setdefault(
            current,
            {
                "zone": current,
                "energy_j": 0.0,
                "limit_j": limits.zone_energy_j.get(current),
                "pulses": 0,
            },
        )
    return {
        "id": session_id,
        "operator": summary.operator if summary else None,
        "patient": summary.patient if summary else None,
        "skin_type": summary.skin_type if summary else None,
        "started": summary.started if summary else None,
        "zone": current,
        "pulses": max((summary.pulses or 0) if summary else 0, live.pulses),
        "energy_j": max((summary.energy_j or 0.0) if summary else 0.0, live.energy_j),
        "energy_limit_j": (summary.energy_limit_j if summary else None) or limits.session_energy_j,
        "last_pulse_no": live.last_pulse_no,
        "zones": [dict(z, current=z["zone"] == current) for z in zones.values()],
        "from_summary": summary is not None,
    }


def _metrics_view(device: _Device) -> dict[str, Any] | None:
    metrics = device.metrics
    if metrics is None:
        return None
    return {
        "rate_hz": metrics.rate_hz,
        "avg_power_w": metrics.avg_power_w,
        "skin_temp_c": metrics.skin_temp_c,
        "head_temp_c": metrics.head_temp_c,
        "counters": dict(metrics.counters),
        "ts": device.metrics_ts,
    }


def _view(device: _Device, fleet: Fleet) -> dict[str, Any]:
    return {
        "key": device.key,
        "site": device.site,
        "device": device.device,
        "availability": device.availability,
        "availability_at": device.availability_at,
        "last_seen": device.last_seen,
        "state": _status_view(device),
        "session": _session_view(device, fleet.limits),
        "metrics": _metrics_view(device),
        "skin_temp": [list(point) for point in device.skin_temp],
        "skin_temp_limit_c": _skin_limit(device, fleet.limits),
        "history_ms": fleet.history_ms,
        "alerts": list(device.alerts),
        "events": list(device.events),
        "missed": dict(device.missed),
        "pulse_gaps": device.pulse_gaps,
        "malformed": device.malformed,
        "last_malformed": device.last_malformed,
    }
