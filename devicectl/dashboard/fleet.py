"""The dashboard's view of every device, aggregated from telemetry: messages in, view model out.

Sans-I/O: :meth:`Fleet.apply` takes a topic, a payload and the receive time (the caller's clock)
and returns the :class:`Update` s to push to browsers; :meth:`Fleet.snapshot` is the whole view a
browser starts from. The view is plain JSON-ready data.

Every message is hostile and on its own: :func:`protocols.intake.read_message` checks its size,
depth, numbers, ids and schema first, and a message it refuses is counted against its device
("N unreadable messages") or, when its site/device ids are not ids at all, against the fleet
("N messages with invalid device ids") — never shown as a device, never able to raise out of
:meth:`Fleet.apply`. :mod:`.contract` reads the fields of the messages that pass.

Rules the view follows:
- ``availability`` is the broker's word: ``offline`` (the daemon's Last Will or its orderly exit)
  greys the device out and keeps its last known state, marked as such.
- ``session`` with an empty payload means no session is open; pulses that arrive late for a
  session that has ended are not counted again.
- Pulse counts and zone energies move between the 1 Hz session summaries by adding up the pulse
  batches of that session; the larger of the two figures wins, since both only grow.
- ``seq``/``boot`` follow :class:`protocols.intake.StreamOrder` (docs/mqtt.md): an exact repeat is
  not applied twice, a late historical ``state``/``session``/``metrics`` of an older run is not
  shown as now, a forward gap is counted as missed; a new boot, a seq that goes back or jumps too
  far is shown as a restart and applied. Alerts are never dropped for their seq, only marked.
- At most ``max_devices`` devices are tracked: a new one evicts the one heard from least recently.
  A device showing an alarm (FAULT, emitting, a critical alert) goes only if every one does.
  Each device keeps bounded lists (alerts, events, chart points, sessions) and alert texts are
  clipped, so no publisher can grow the view without bound.
- On every (re)connection to the broker the retained topics are forgotten, since the broker
  replays them at once: a session that ended while the dashboard was away is not shown as open.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from devicectl.dashboard.contract import (
    INTERLOCKS,
    DeviceStatus,
    Metrics,
    SessionSummary,
    read_alert,
    read_metrics,
    read_pulse_batch,
    read_session,
    read_session_event,
    read_status,
)
from devicectl.dashboard.limits import DisplayLimits
from protocols.bounded import clip
from protocols.intake import Order, Reading, StreamOrder, Unreadable, Verdict, read_message
from protocols.mqtt import Stream

__all__ = ["Fleet", "Update", "json_text"]
_RETAINED = (Stream.AVAILABILITY, Stream.STATE, Stream.SESSION)
_TEXT_MAX = 300  # characters of any alert or event text kept for the page
_LIVE_SESSIONS = 4  # per device: the current session and a few just ended


@dataclass(frozen=True, slots=True)
class Update:
    """One change to push to browsers. ``data["op"]`` says how the page applies it:

    - ``device``: ``{"key", "fields"}``, top-level fields of that device's view to replace;
    - ``remove``: ``{"key"}``, the device is no longer tracked (evicted for a newer one);
    - ``skin_temp``: ``{"key", "point": [t_ms, celsius]}``, a point to append to the chart;
    - ``alert``: ``{"alert"}``, newest first in the device's list and the fleet's;
    - ``event``: ``{"key", "event"}``, a session lifecycle event;
    - ``broker``: ``{"broker"}``, the dashboard's own link to the broker;
    - ``invalid``: ``{"invalid"}``, messages whose topic ids are not ids (count, last).

    ``encoded`` is ``data`` as JSON, made once however many browsers it is sent to.
    """

    data: dict[str, Any]
    encoded: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoded", json_text(self.data))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no inf or nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Compact JSON that never fails on a number: the view is validated, this is the backstop."""
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _text(value: str | None) -> str | None:
    return None if value is None else clip(value, _TEXT_MAX) if len(value) > _TEXT_MAX else value


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
    skin_temp: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=300))
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=12))
    missed: dict[str, int] = field(default_factory=dict)
    pulse_gaps: int = 0
    malformed: int = 0
    last_malformed: str | None = None
    restarts: int = 0
    last_restart: str | None = None
    duplicates: int = 0

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"


class Fleet:
    """Every device seen under ``prefix``, as the page shows it.

    ``limits`` are what the bars and the chart's line are drawn against when the telemetry does not
    carry its own; ``history_s`` is the skin-temperature chart's window; ``max_alerts`` bounds the
    fleet's alert list, ``max_devices`` the devices tracked (the least recently heard is evicted).
    """

    def __init__(
        self,
        prefix: str = "lasers",
        *,
        limits: DisplayLimits | None = None,
        history_s: float = 120.0,
        max_alerts: int = 100,
        max_devices: int = 500,
    ) -> None:
        self.prefix = prefix
        self.limits = limits or DisplayLimits()
        self.history_ms = history_s * 1000.0
        self.max_devices = max_devices
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._alerts: deque[dict[str, Any]] = deque(maxlen=max_alerts)
        self._alert_counter = 0
        self._order = StreamOrder(max_topics=max_devices * 8)
        self._broker: dict[str, Any] = {"connected": False, "since": None, "detail": None}
        self._invalid: dict[str, Any] = {"count": 0, "last": None}
        self.unreadable_total = 0
        self.version = 0  # +1 whenever the view may have changed: snapshots are cached by it
        self._handlers: dict[Stream, Callable[[_Device, Reading, float], _Change]] = {
            Stream.AVAILABILITY: self._on_availability,
            Stream.STATE: self._on_state,
            Stream.SESSION: self._on_session,
            Stream.PULSES: self._on_pulses,
            Stream.METRICS: self._on_metrics,
            Stream.ALERTS: self._on_alert,
            Stream.SESSION_EVENTS: self._on_session_event,
        }

    # ---------------------------------------------------------------------------------- input

    def apply(self, topic: str, payload: bytes, now: float) -> list[Update]:
        """Take one MQTT message received at ``now`` (epoch seconds); return what changed."""
        self.version += 1
        try:
            reading = read_message(self.prefix, topic, payload)
        except Unreadable as exc:
            return self._unreadable(exc, now)
        if reading is None:
            return []
        device, created, updates = self._device(reading.site, reading.device)
        device.last_seen = _iso(now)
        change = self._handlers[reading.stream](device, reading, now)
        if created:
            updates.append(
                Update({"op": "device", "key": device.key, "fields": _view(device, self)})
            )
            return updates + [u for u in change.extra if u.data["op"] == "alert"]
        change.fields["last_seen"] = device.last_seen
        updates = [Update({"op": "device", "key": device.key, "fields": change.fields})]
        return updates + change.extra

    def _device(self, site: str, name: str) -> tuple[_Device, bool, list[Update]]:
        """The device (kept most recent last), whether it is new, and the evictions it caused."""
        key = f"{site}/{name}"
        device = self._devices.get(key)
        if device is not None:
            self._devices.move_to_end(key)
            return device, False, []
        updates: list[Update] = []
        while len(self._devices) >= self.max_devices:
            old_key = self._eviction_candidate()
            del self._devices[old_key]
            for stream in (*_RETAINED, Stream.PULSES, Stream.METRICS, Stream.ALERTS):
                self._order.forget(f"{old_key}/{stream.value}")
            updates.append(Update({"op": "remove", "key": old_key}))
        device = self._devices[key] = _Device(site, name)
        return device, True, updates

    def _eviction_candidate(self) -> str:
        """The least recently heard device that shows no alarm; else the least recently heard.

        A flood of new devices must not take a card in FAULT, emitting, or with a critical alert
        off the screen while a quieter device can go instead.
        """
        for key, device in self._devices.items():
            if not _alarming(device):
                return key
        return next(iter(self._devices))

    def _unreadable(self, exc: Unreadable, now: float) -> list[Update]:
        self.unreadable_total += 1
        if exc.invalid_id or exc.site is None or exc.device is None:
            self._invalid = {"count": self._invalid["count"] + 1, "last": exc.reason}
            return [Update({"op": "invalid", "invalid": dict(self._invalid)})]
        device, created, updates = self._device(exc.site, exc.device)
        device.last_seen = _iso(now)
        device.malformed += 1
        device.last_malformed = exc.reason
        if created:
            updates.append(
                Update({"op": "device", "key": device.key, "fields": _view(device, self)})
            )
            return updates
        fields = {
            "malformed": device.malformed,
            "last_malformed": device.last_malformed,
            "last_seen": device.last_seen,
        }
        return [Update({"op": "device", "key": device.key, "fields": fields})]

    def broker_link(self, connected: bool, now: float, detail: str | None = None) -> list[Update]:
        """The dashboard's own connection to the broker went up or down."""
        self.version += 1
        self._broker = {"connected": connected, "since": _iso(now), "detail": detail}
        updates = [Update({"op": "broker", "broker": dict(self._broker)})]
        if connected:
            # The broker replays every retained message right after we subscribe.
            for device in self._devices.values():
                device.availability, device.availability_at = "unknown", None
                device.status = device.summary = None
                device.live_session_id = None
                for stream in _RETAINED:
                    self._order.forget(f"{device.key}/{stream.value}")
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
            "invalid": dict(self._invalid),
        }

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def knows(self, site: str, device: str) -> bool:
        return f"{site}/{device}" in self._devices

    def device_view(self, site: str, device: str) -> dict[str, Any] | None:
        found = self._devices.get(f"{site}/{device}")
        return None if found is None else _view(found, self)

    # ------------------------------------------------------------------------------- handlers

    def _check_order(self, device: _Device, reading: Reading) -> Verdict:
        """The message's place in its topic's sequence; gaps, restarts, repeats noted."""
        assert reading.envelope is not None
        stream = reading.stream.value
        topic = f"{device.key}/{stream}" + (f"/{reading.session}" if reading.session else "")
        verdict = self._order.check(topic, reading.envelope)
        if verdict.order is Order.GAP:
            name = "events" if reading.stream is Stream.SESSION_EVENTS else stream
            device.missed[name] = device.missed.get(name, 0) + verdict.missed
        elif verdict.order is Order.RESTART:
            device.restarts += 1
            device.last_restart = f"{stream}: {verdict.detail}"
        elif verdict.order is Order.DUPLICATE:
            device.duplicates += 1
        return verdict

    def _sequence_fields(self, device: _Device) -> dict[str, Any]:
        return {
            "missed": dict(device.missed),
            "restarts": device.restarts,
            "last_restart": device.last_restart,
        }

    def _on_availability(self, device: _Device, reading: Reading, now: float) -> _Change:
        device.availability = reading.text or "unknown"
        device.availability_at = _iso(now)
        return _Change(
            {"availability": device.availability, "availability_at": device.availability_at}
        )

    def _on_state(self, device: _Device, reading: Reading, _now: float) -> _Change:
        assert reading.body is not None
        assert reading.envelope is not None
        if not self._check_order(device, reading).applies_to(reading.stream):
            return _Change(self._sequence_fields(device))
        device.status = read_status(reading.body)
        device.status_ts = reading.body["ts"]
        return _Change(
            {
                "state": _status_view(device),
                "skin_temp_limit_c": _skin_limit(device, self.limits),
                **self._sequence_fields(device),
            }
        )

    def _end_session(self, device: _Device) -> None:
        for ended in (
            device.summary.session_id if device.summary else None,
            device.live_session_id,
        ):
            if ended is not None and ended not in device.ended:
                device.ended.append(ended)
                device.live.pop(ended, None)
        device.summary, device.live_session_id = None, None

    def _on_session(self, device: _Device, reading: Reading, _now: float) -> _Change:
        if reading.body is None:
            # The empty retained message: no session is open.
            self._end_session(device)
            return _Change({"session": None})
        if not self._check_order(device, reading).applies_to(reading.stream):
            return _Change(self._sequence_fields(device))
        device.summary = read_session(reading.body)
        if device.summary.session_id is not None:
            device.live_session_id = device.summary.session_id
        return _Change(
            {"session": _session_view(device, self.limits), **self._sequence_fields(device)}
        )

    def _on_pulses(self, device: _Device, reading: Reading, _now: float) -> _Change:
        assert reading.body is not None
        if not self._check_order(device, reading).applies_to(reading.stream):
            return _Change(self._sequence_fields(device))
        batch = read_pulse_batch(reading.body)
        session_id = batch.session_id or device.live_session_id
        if session_id is None or session_id in device.ended:
            return _Change(self._sequence_fields(device))
        live = device.live.get(session_id)
        if live is None:
            live = device.live[session_id] = _LiveSession()
            while len(device.live) > _LIVE_SESSIONS:
                device.live.pop(next(iter(device.live)))
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
            if zone in live.zones or len(live.zones) < 16:
                live.zones[zone] = live.zones.get(zone, 0.0) + batch.energy_sum_j
                live.zone_pulses[zone] = live.zone_pulses.get(zone, 0) + batch.count
        return _Change(
            {
                "session": _session_view(device, self.limits),
                "pulse_gaps": device.pulse_gaps,
                **self._sequence_fields(device),
            }
        )

    def _on_metrics(self, device: _Device, reading: Reading, now: float) -> _Change:
        assert reading.body is not None
        assert reading.envelope is not None
        if not self._check_order(device, reading).applies_to(reading.stream):
            return _Change(self._sequence_fields(device))
        device.metrics, device.metrics_ts = read_metrics(reading.body), reading.body["ts"]
        change = _Change({"metrics": _metrics_view(device), **self._sequence_fields(device)})
        skin = device.metrics.skin_temp_c
        if skin is not None:
            # The receive time, not the payload's ts: a forged clock cannot scroll the chart.
            point = (now * 1000.0, round(skin, 2))
            device.skin_temp.append(point)
            while device.skin_temp and device.skin_temp[0][0] < point[0] - self.history_ms:
                device.skin_temp.popleft()
            change.extra.append(
                Update({"op": "skin_temp", "key": device.key, "point": list(point)})
            )
        return change

    def _on_alert(self, device: _Device, reading: Reading, now: float) -> _Change:
        assert reading.body is not None
        assert reading.envelope is not None
        verdict = self._check_order(device, reading)
        # Never dropped for its seq: a repeat or a restart is shown, marked as such.
        alert = read_alert(reading.body)
        self._alert_counter += 1
        envelope = reading.envelope
        view = {
            "id": f"{device.key}/a{self._alert_counter}",
            "key": device.key,
            "site": device.site,
            "device": device.device,
            "severity": alert.severity,
            "rank": alert.rank,
            "code": _text(alert.code),
            "message": _text(alert.message),
            "value": alert.value,
            "limit": alert.limit,
            "unit": _text(alert.unit),
            "session": alert.session_id,
            "ts": reading.body["ts"],
            "received": _iso(now),
            "boot": envelope.boot,
            "seq": envelope.seq,
            "order": verdict.order.value,
            "historical": envelope.historical is True,
        }
        device.alerts.appendleft(view)
        self._alerts.appendleft(view)
        change = _Change(self._sequence_fields(device))
        change.extra.append(Update({"op": "alert", "alert": view}))
        return change

    def _on_session_event(self, device: _Device, reading: Reading, now: float) -> _Change:
        assert reading.body is not None
        assert reading.session is not None
        verdict = self._check_order(device, reading)
        event = read_session_event(reading.session, reading.body)
        view = {
            "ts": reading.body["ts"],
            "session": event.session_id,
            "event": event.event,
            "zone": _text(event.zone),
            "detail": _text(event.detail),
            "order": verdict.order.value,
        }
        if verdict.order is not Order.DUPLICATE:
            device.events.appendleft(view)
        change = _Change(self._sequence_fields(device))
        current = (device.live_session_id, device.summary and device.summary.session_id)
        if (
            event.event == "ended"
            and event.session_id in current
            and verdict.applies_to(reading.stream)
        ):
            self._end_session(device)
            change.fields["session"] = None
        if verdict.order is not Order.DUPLICATE:
            change.extra.append(Update({"op": "event", "key": device.key, "event": view}))
        return change


@dataclass(slots=True)
class _Change:
    fields: dict[str, Any]
    extra: list[Update] = field(default_factory=list)


# -------------------------------------------------------------------------------------- views


def _alarming(device: _Device) -> bool:
    status = device.status
    if status is not None and (status.state in {"FAULT", "EMITTING"} or status.armed):
        return True
    return any(alert["rank"] >= 2 for alert in device.alerts)


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
        "restarts": device.restarts,
        "last_restart": device.last_restart,
        "duplicates": device.duplicates,
    }
