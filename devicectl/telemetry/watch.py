"""``devicectl watch``: a live terminal view of every device publishing under a prefix.

:class:`FleetView` is the model (fed topic and payload; never raises on foreign or malformed
messages) and renders a rich table; :func:`watch` connects, subscribes to ``{prefix}/#`` and
refreshes a ``rich.live.Live`` until cancelled, reconnecting with backoff.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from rich.console import Console
from rich.live import Live
from rich.table import Table

from protocols.mqtt import DEFAULT_PREFIX, Stream, parse_topic

__all__ = ["DeviceView", "FleetView", "watch"]


@dataclass(slots=True)
class DeviceView:
    site: str
    device: str
    availability: str = "?"
    state: str = "?"
    armed: bool = False
    session: str | None = None
    zone: str | None = None
    pulses: int = 0
    energy_uj_by_zone: dict[str, int] = field(default_factory=dict)
    alerts: deque[str] = field(default_factory=lambda: deque(maxlen=3))
    boot: int | None = None
    last_ts: str | None = None


class FleetView:
    """Latest known picture of every device under ``prefix``."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.devices: dict[tuple[str, str], DeviceView] = {}
        self.malformed = 0

    def feed(self, topic: str, payload: bytes) -> None:
        """Apply one received message. Anything unexpected is counted, never raised."""
        parsed = parse_topic(topic)
        if parsed is None or parsed[0] != self.prefix or parsed[3] is Stream.CMD:
            return
        _prefix, site, device, stream, _extra = parsed
        view = self.devices.get((site, device))
        if view is None:
            view = self.devices[(site, device)] = DeviceView(site, device)
        if stream is Stream.AVAILABILITY:
            view.availability = payload.decode("utf-8", "replace")[:16] or "?"
            return
        if not payload:
            if stream is Stream.SESSION:
                view.session = view.zone = None
            return
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise TypeError("not an object")  # noqa: TRY301
            self._apply(view, stream, body)
        except (ValueError, TypeError, KeyError, AttributeError):
            self.malformed += 1

    @staticmethod
    def _apply(view: DeviceView, stream: Stream, body: dict[str, Any]) -> None:
        view.boot = body.get("boot", view.boot)
        view.last_ts = body.get("ts", view.last_ts)
        if stream is Stream.STATE:
            view.state = str(body["state"])
            view.armed = bool(body["armed"])
            view.session = body.get("session")
        elif stream is Stream.SESSION:
            summary = body["summary"]
            if summary.get("session") != view.session:
                view.pulses, view.energy_uj_by_zone = 0, {}
            view.session = summary["session"]
            view.zone = summary.get("zone")
            view.pulses = int(summary["pulses"])
            view.energy_uj_by_zone = {
                str(k): int(v) for k, v in summary["energy_uj_by_zone"].items()
            }
        elif stream is Stream.PULSES:
            if body.get("session") != view.session and body.get("session") is not None:
                view.session, view.pulses, view.energy_uj_by_zone = body["session"], 0, {}
            view.pulses += int(body["count"])
            zone = str(body.get("zone"))
            view.zone = body.get("zone")
            view.energy_uj_by_zone[zone] = view.energy_uj_by_zone.get(zone, 0) + int(
                body["energy_uj_sum"]
            )
        elif stream is Stream.ALERTS:
            view.alerts.appendleft(f"{body['severity']}: {body['code']} - {body['message']}")

    def render(self) -> Table:
        table = Table(title=f"devicectl watch - {self.prefix}/#", expand=True)
        for column in ("site/device", "avail.", "state", "session", "pulses", "energy/zone (mJ)"):
            table.add_column(column)
        table.add_column("latest alerts", ratio=2)
        for (site, device), view in sorted(self.devices.items()):
            availability = (
                f"[green]{view.availability}[/]"
                if view.availability == "online"
                else f"[red]{view.availability}[/]"
            )
            state = f"[bold yellow]{view.state} ARMED[/]" if view.armed else view.state
            energy = ", ".join(
                f"{zone} {uj / 1000:.1f}" for zone, uj in sorted(view.energy_uj_by_zone.items())
            )
            table.add_row(
                f"{site}/{device}",
                availability,
                state,
                view.session or "-",
                str(view.pulses),
                energy or "-",
                "\n".join(view.alerts) or "-",
            )
        return table


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
    log: Any = None,
) -> None:
    """Show the fleet until cancelled. Raises ``aiomqtt.MqttError`` if the first connection
    fails; later disconnections are retried with jittered exponential backoff."""
    log = log if log is not None else structlog.get_logger("devicectl.watch")
    view = view if view is not None else FleetView(prefix)
    console = console if console is not None else Console()
    connected_once = False
    attempt = 0
    live = Live(view.render(), console=console, refresh_per_second=4)
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
                    if not connected_once:
                        live.start()  # only once the broker answered: errors print cleanly
                    connected_once, attempt = True, 0
                    await client.subscribe(f"{prefix}/#", qos=1)
                    async for message in client.messages:
                        raw = message.payload
                        payload = raw if isinstance(raw, bytes) else str(raw or "").encode()
                        view.feed(str(message.topic), payload)
                        live.update(view.render())
            except aiomqtt.MqttError as exc:
                if not connected_once:
                    raise
                log.warning("watch_disconnected", error=str(exc))
            attempt += 1
            cap = min(10.0, 0.25 * 2**attempt)
            await asyncio.sleep(random.uniform(cap / 2, cap))  # noqa: S311 - jitter
    finally:
        live.stop()
