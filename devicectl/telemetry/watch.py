"""``devicectl watch``: a live view of every device publishing under a prefix.

:class:`FleetView` is the model: :meth:`FleetView.feed` takes one received message and returns the
lines that describe what happened (for ``--lines``); it never raises. Every message goes through
:func:`protocols.intake.read_message` (ids, size, depth, finite numbers, the published schema) and
:class:`protocols.intake.StreamOrder` (a forged or reset ``seq`` is shown as a restart, never used
to hide later messages); a message that fails is counted against its device ("N unreadable"), or
against the fleet when its ids are not ids.

Everything that came from a payload is shown as plain text, with control and invisible characters
escaped (:func:`protocols.bounded.printable`): an ESC sequence, a window title, rich markup such as
``[/]`` appear as the characters they are and are never interpreted by the terminal or by rich.

:func:`watch` connects, subscribes to ``{prefix}/#`` and either redraws a table (a terminal) or
prints one line per event (``lines=True``: pipes and logs), reconnecting with backoff.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import aiomqtt
import structlog
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from protocols.bounded import printable
from protocols.intake import Order, Reading, StreamOrder, Unreadable, Verdict, read_message
from protocols.mqtt import (
    DEFAULT_PREFIX,
    AlertPayload,
    MetricsPayload,
    PulseBatchPayload,
    SessionEventPayload,
    SessionPayload,
    StatePayload,
    Stream,
)

__all__ = ["DeviceView", "FleetView", "watch"]

_TEXT = 120  # characters of any payload text shown
_METRICS_LINE_EVERY_S = 10.0  # --lines: metrics are measurements, not events; one line per 10 s


def _safe(text: object, limit: int = _TEXT) -> str:
    return printable(str(text), limit)


@dataclass(slots=True)
class DeviceView:
    site: str
    device: str
    availability: str = "?"
    state: str = "?"
    armed: bool = False
    faults: tuple[str, ...] = ()
    session: str | None = None
    zone: str | None = None
    pulses: int = 0
    energy_uj_by_zone: dict[str, int] = field(default_factory=dict)
    rate_hz: float | None = None
    skin_temp_c: float | None = None
    head_temp_c: float | None = None
    alerts: deque[str] = field(default_factory=lambda: deque(maxlen=3))
    boot: int | None = None
    last_ts: str | None = None
    unreadable: int = 0
    last_unreadable: str | None = None
    restarts: int = 0
    ended: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    metrics_line_at: float = -_METRICS_LINE_EVERY_S


class FleetView:
    """Latest known picture of every device under ``prefix`` (at most ``max_devices``, the least
    recently heard forgotten first)."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        *,
        max_devices: int = 500,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.max_devices = max_devices
        self.clock = clock
        self.devices: OrderedDict[tuple[str, str], DeviceView] = OrderedDict()
        self.order = StreamOrder(max_topics=max_devices * 8)
        self.malformed = 0  # every unreadable message, whoever sent it
        self.invalid_ids = 0
        self.last_invalid: str | None = None
        self.failed = 0  # a message whose handling raised: a bug, counted, never fatal
        self.version = 0  # +1 per message: the table is rebuilt only when it may have changed

    def feed(self, topic: str, payload: bytes) -> list[str]:
        """Apply one received message; return the lines saying what happened. Never raises."""
        self.version += 1
        try:
            return self._feed(topic, payload)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the view
            self.failed += 1
            return [f"internal error on a message: {_safe(type(exc).__name__)}"]

    def _feed(self, topic: str, payload: bytes) -> list[str]:
        try:
            reading = read_message(self.prefix, topic, payload)
        except Unreadable as exc:
            self.malformed += 1
            if exc.site is None or exc.device is None:
                self.invalid_ids += 1
                self.last_invalid = exc.reason
                return [f"unreadable ({self.invalid_ids} with invalid ids): {exc.reason}"]
            view = self._device(exc.site, exc.device)
            view.unreadable += 1
            view.last_unreadable = exc.reason
            return [f"{exc.site}/{exc.device} unreadable ({view.unreadable}): {exc.reason}"]
        if reading is None:
            return []
        view = self._device(reading.site, reading.device)
        verdict, lines = self._sequence(view, reading)
        return lines + self._apply(view, reading, verdict)

    def _device(self, site: str, device: str) -> DeviceView:
        key = (site, device)
        view = self.devices.get(key)
        if view is None:
            while len(self.devices) >= self.max_devices:
                self.devices.popitem(last=False)
            view = self.devices[key] = DeviceView(site, device)
        else:
            self.devices.move_to_end(key)
        return view

    def _sequence(self, view: DeviceView, reading: Reading) -> tuple[Verdict, list[str]]:
        envelope = reading.envelope
        if envelope is None:  # availability, the empty session: no seq
            return Verdict(Order.NEXT), []
        view.boot, view.last_ts = envelope.boot, envelope.ts.isoformat()
        topic = f"{reading.key}/{reading.stream.value}/{reading.session or ''}"
        verdict = self.order.check(topic, envelope)
        if verdict.order is Order.RESTART:
            view.restarts += 1
            return verdict, [f"{reading.key} restart ({reading.stream.value}: {verdict.detail})"]
        return verdict, []

    def _apply(self, view: DeviceView, reading: Reading, verdict: Verdict) -> list[str]:
        key, envelope = reading.key, reading.envelope
        if reading.stream is Stream.AVAILABILITY:
            view.availability = reading.text or "?"
            return [f"{key} {view.availability}"]
        if reading.stream is Stream.SESSION and envelope is None:
            ended = view.session
            self._end_session(view)
            return [f"{key} no session open"] if ended else []
        if isinstance(envelope, AlertPayload):
            mark = {Order.DUPLICATE: " (repeated)", Order.RESTART: " (after a restart)"}
            text = (
                f"{envelope.severity.upper()} {_safe(envelope.code, 60)}: "
                f"{_safe(envelope.message)}{mark.get(verdict.order, '')}"
            )
            view.alerts.appendleft(text)
            return [f"{key} ALERT {text}"]
        if not verdict.applies_to(reading.stream):
            return []
        if isinstance(envelope, StatePayload):
            before = (view.state, view.armed, view.faults, view.session)
            view.state, view.armed = _safe(envelope.state, 24), envelope.armed
            view.faults = tuple(_safe(f, 40) for f in envelope.faults[:8])
            view.session = None if envelope.session is None else _safe(envelope.session, 64)
            if before == (view.state, view.armed, view.faults, view.session):
                return []
            faults = f" faults {','.join(view.faults)}" if view.faults else ""
            armed = " ARMED" if view.armed else ""
            return [f"{key} state {view.state}{armed}{faults}"]
        if isinstance(envelope, SessionPayload):
            summary = envelope.summary
            session, zone = _safe(summary.session, 64), summary.zone
            changed = (session, zone) != (view.session, view.zone)
            if session != view.session:
                view.pulses, view.energy_uj_by_zone = 0, {}
            view.session = session
            view.zone = None if zone is None else _safe(zone, 32)
            view.pulses = max(view.pulses, summary.pulses)
            view.energy_uj_by_zone = {
                _safe(k, 32): v for k, v in list(summary.energy_uj_by_zone.items())[:16]
            }
            return [f"{key} session {session} zone {view.zone or '-'}"] if changed else []
        if isinstance(envelope, SessionEventPayload):
            if envelope.event == "ended":
                view.ended.append(_safe(envelope.session, 64))
                if envelope.session == view.session:
                    self._end_session(view)
            return [f"{key} session {_safe(envelope.session, 64)} {envelope.event}"]
        if isinstance(envelope, PulseBatchPayload):
            batch_session = None if envelope.session is None else _safe(envelope.session, 64)
            if batch_session in view.ended:
                return []  # late pulses of an ended session: not counted again
            if batch_session is not None and batch_session != view.session:
                view.session, view.pulses, view.energy_uj_by_zone = batch_session, 0, {}
            view.pulses += envelope.count
            zone = _safe(envelope.zone or "-", 32)
            view.zone = envelope.zone and zone
            if zone in view.energy_uj_by_zone or len(view.energy_uj_by_zone) < 16:
                view.energy_uj_by_zone[zone] = (
                    view.energy_uj_by_zone.get(zone, 0) + envelope.energy_uj_sum
                )
            return []
        if isinstance(envelope, MetricsPayload):
            view.rate_hz, view.skin_temp_c = envelope.rate_hz, envelope.skin_temp_c
            view.head_temp_c = envelope.head_temp_c
            now = self.clock()
            if now - view.metrics_line_at < _METRICS_LINE_EVERY_S:
                return []
            view.metrics_line_at = now
            return [f"{key} metrics {_metrics_text(view)}"]
        return []

    @staticmethod
    def _end_session(view: DeviceView) -> None:
        """No session open: nothing of the last one is shown as current (pulses included)."""
        if view.session is not None and view.session not in view.ended:
            view.ended.append(view.session)
        view.session, view.zone, view.pulses, view.energy_uj_by_zone = None, None, 0, {}

    def render(self) -> Table:
        title = f"devicectl watch - {_safe(self.prefix, 40)}/#"
        if self.malformed:
            title += f" - {self.malformed} unreadable message(s)"
        if self.invalid_ids:
            title += f", {self.invalid_ids} with invalid ids (last: {self.last_invalid})"
        table = Table(title=Text(title), expand=True)
        for column in (
            "site/device",
            "avail.",
            "state",
            "session",
            "pulses",
            "energy/zone (mJ)",
            "rate, skin, head",
        ):
            table.add_column(column)
        table.add_column("latest alerts", ratio=2)
        for (site, device), view in sorted(self.devices.items()):
            energy = ", ".join(
                f"{zone} {uj / 1000:.1f}" for zone, uj in sorted(view.energy_uj_by_zone.items())
            )
            notes = []
            if view.unreadable:
                notes.append(f"{view.unreadable} unreadable: {view.last_unreadable}")
            if view.restarts:
                notes.append(f"{view.restarts} restart(s)")
            state = view.state + (" ARMED" if view.armed else "")
            if view.faults:
                state += " " + ",".join(view.faults)
            table.add_row(
                Text(f"{site}/{device}" + ("\n" + "\n".join(notes) if notes else "")),
                Text(view.availability, style="green" if view.availability == "online" else "red"),
                Text(state, style="bold yellow" if view.armed or view.faults else ""),
                Text(view.session or "-"),
                Text(str(view.pulses)),
                Text(energy or "-"),
                Text(_metrics_text(view)),
                Text("\n".join(view.alerts) or "-", style="bold red" if view.alerts else ""),
            )
        return table


def _metrics_text(view: DeviceView) -> str:
    def number(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.1f} {unit}"

    return (
        f"{number(view.rate_hz, 'Hz')}, {number(view.skin_temp_c, 'C')}, "
        f"{number(view.head_temp_c, 'C')}"
    )


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def watch(
    host: str,
    port: int,
    *,
    prefix: str = DEFAULT_PREFIX,
    console: Console | None = None,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    view: FleetView | None = None,
    lines: bool = False,
    out: TextIO | None = None,
    log: Any = None,
) -> None:
    """Show the fleet until cancelled: a table redrawn 4 times a second on ``console``, or with
    ``lines`` one line per event on ``out`` (stdout). Raises ``aiomqtt.MqttError`` if the first
    connection fails; later disconnections are retried with jittered exponential backoff."""
    log = log if log is not None else structlog.get_logger("devicectl.watch")
    view = view if view is not None else FleetView(prefix)
    stream = out if out is not None else sys.stdout
    live: Live | None = None
    if not lines:
        console = console if console is not None else Console()
        live = Live(view.render(), console=console, refresh_per_second=4)

    def emit(text: str) -> None:
        if lines:
            print(f"{_stamp()} {text}", file=stream, flush=True)

    async def redraw(live: Live) -> None:
        # The table is built here, in the loop that feeds the view, never in rich's refresh
        # thread: that thread only redraws a finished table.
        drawn = -1
        while True:
            if view.version != drawn:
                drawn = view.version
                live.update(view.render())
            await asyncio.sleep(0.2)

    connected_once = False
    attempt = 0
    redrawing: asyncio.Task[None] | None = None
    try:
        while True:
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    username=username,
                    password=password,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=tls,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                ) as client:
                    if not connected_once and live is not None:
                        live.start()  # only once the broker answered: errors print cleanly
                        redrawing = asyncio.create_task(redraw(live), name="watch-redraw")
                    connected_once, attempt = True, 0
                    await client.subscribe(f"{prefix}/#", qos=1)
                    emit(f"watching {_safe(prefix, 40)}/# on {_safe(host, 80)}:{port}")
                    async for message in client.messages:
                        raw = message.payload
                        payload = raw if isinstance(raw, bytes) else str(raw or "").encode()
                        for line in view.feed(str(message.topic), payload):
                            emit(line)
            except aiomqtt.MqttError as exc:
                if not connected_once:
                    raise
                log.warning("watch_disconnected", error=str(exc))
                emit(f"broker connection lost: {_safe(exc)}")
            attempt += 1
            cap = min(10.0, 0.25 * 2**attempt)
            await asyncio.sleep(random.uniform(cap / 2, cap))  # noqa: S311 - jitter
    finally:
        if redrawing is not None:
            redrawing.cancel()
        if live is not None:
            live.stop()
