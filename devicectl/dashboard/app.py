"""The dashboard's ASGI app (Starlette): the page, its Server-Sent Events, and the stop command.

Routes:
    GET  /                                   the page (static, no CDN, no build step)
    GET  /static/...                         its script and style sheet
    GET  /events                             SSE: ``snapshot`` on connect, then ``delta`` lists
    GET  /api/snapshot                       the whole view as JSON
    GET  /healthz                            broker link, device and browser counts
    POST /api/devices/{site}/{device}/stop   ``{"confirm": true}`` → ``cmd/stop`` to that device;
                                             403 unless the dashboard has stop credentials

The MQTT subscriber runs in the app's lifespan, as a named task of a TaskGroup.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from structlog.typing import FilteringBoundLogger

from devicectl.dashboard.fleet import Fleet
from devicectl.dashboard.history import history_mount
from devicectl.dashboard.hub import Resync, UpdateHub
from devicectl.dashboard.limits import DisplayLimits, load_display_limits
from devicectl.dashboard.mqtt import (
    Backoff,
    StopFailed,
    TelemetrySubscriber,
    display_url,
    publish_stop,
)
from devicectl.errors import ConfigError
from devicectl.telemetry.config import BrokerAddress, parse_broker_url, tls_context_for

__all__ = ["Dashboard", "DashboardConfig", "create_app"]

_SECURITY_HEADERS = {
    # Everything the page needs is served from here: no CDN can be pulled in by accident.
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_MAX_UPDATES_PER_EVENT = 500


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """What the dashboard needs. ``stop_username``/``stop_password`` enable the Stop button.

    ``mqtt_url`` may carry the subscriber's credentials (``mqtt://user:pass@host``); ``ca_file``
    (else ``DEVICECTL_MQTT_CA``) verifies an ``mqtts://`` broker.
    """

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    ca_file: Path | None = None
    prefix: str = "lasers"
    stop_username: str | None = None
    stop_password: str | None = field(default=None, repr=False)
    # The bars' limits; by default the packaged policy's (pass the clinic's: load_display_limits).
    limits: DisplayLimits = field(default_factory=load_display_limits)
    title: str = "Clinic lasers"
    keepalive_s: float = 15.0
    backoff: Backoff = field(default_factory=Backoff)
    history_db: str | None = None  # the recorder's database: serves /history (history.py)

    def __post_init__(self) -> None:
        if (self.stop_username is None) != (self.stop_password is None):
            raise ConfigError(
                "--stop-username/--stop-password",
                "only one given",
                "both, to enable the Stop button, or neither",
            )
        if not self.prefix or any(c in self.prefix for c in "#+"):
            raise ConfigError("--prefix", self.prefix, "a topic prefix without # or +")

    @property
    def stop_enabled(self) -> bool:
        return self.stop_username is not None and self.stop_password is not None

    def broker(self) -> tuple[BrokerAddress, ssl.SSLContext | None]:
        """The broker's address and TLS context; raises ConfigError naming the bad value."""
        return parse_broker_url(self.mqtt_url), tls_context_for(self.mqtt_url, self.ca_file)


class Dashboard:
    """The dashboard's live parts: the fleet view, the browser fan-out and the subscriber."""

    def __init__(
        self,
        config: DashboardConfig,
        *,
        clock: Callable[[], float] = time.time,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        # Raises ConfigError on a bad URL or CA file, before anything is served.
        self.address, self.tls = config.broker()
        self.log: FilteringBoundLogger = log or structlog.get_logger("devicectl.dashboard")
        self.fleet = Fleet(config.prefix, limits=config.limits)
        self.hub = UpdateHub(self.snapshot)
        self.subscriber = TelemetrySubscriber(
            self.address,
            self.tls,
            self.fleet,
            self.hub,
            backoff=config.backoff,
            clock=clock,
            log=self.log,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.fleet.snapshot(),
            "title": self.config.title,
            "broker_url": display_url(self.address),
            "stop_enabled": self.config.stop_enabled,
        }


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(dashboard: Dashboard) -> Starlette:
    """The ASGI app serving ``dashboard``; ``app.state.dashboard`` is that object."""
    config, hub, fleet, log = dashboard.config, dashboard.hub, dashboard.fleet, dashboard.log

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as tasks:
            subscriber = tasks.create_task(
                dashboard.subscriber.run(), name="dashboard-mqtt-subscriber"
            )
            try:
                yield
            finally:
                hub.close()
                subscriber.cancel()

    async def index(_request: Request) -> Response:
        page = resources.files("devicectl.dashboard").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"), headers=_SECURITY_HEADERS)

    async def events(_request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            async with hub.subscribe() as subscription:
                yield "retry: 2000\n" + _sse("snapshot", dashboard.snapshot())
                while True:
                    try:
                        item = await asyncio.wait_for(subscription.next(), config.keepalive_s)
                    except TimeoutError:
                        yield ": keepalive\n\n"  # also how a vanished browser is noticed
                        continue
                    batch: list[dict[str, Any]] = []
                    while item is not None and not isinstance(item, Resync):
                        batch.append(item.data)
                        if subscription.queue.empty() or len(batch) >= _MAX_UPDATES_PER_EVENT:
                            break
                        item = subscription.queue.get_nowait()
                    if batch:
                        yield _sse("delta", batch)
                    if item is None:
                        return
                    if isinstance(item, Resync):
                        yield _sse("snapshot", dashboard.snapshot())

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def snapshot(_request: Request) -> Response:
        return JSONResponse(dashboard.snapshot())

    async def healthz(_request: Request) -> Response:
        view = fleet.snapshot()
        return JSONResponse(
            {
                "broker_connected": view["broker"]["connected"],
                "devices": len(view["devices"]),
                "browsers": hub.browsers,
            }
        )

    async def stop(request: Request) -> Response:
        site, device = request.path_params["site"], request.path_params["device"]
        if not config.stop_enabled:
            return JSONResponse(
                {"error": "stop is not enabled on this dashboard: it has no stop credentials"},
                status_code=403,
            )
        # A JSON body cannot be sent cross-site without a CORS preflight, which is never granted.
        if not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": 'send a JSON body {"confirm": true}'}, status_code=415)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("confirm") is not True:
            return JSONResponse(
                {"error": 'stop needs an explicit confirmation: {"confirm": true}'},
                status_code=400,
            )
        if not fleet.knows(site, device):
            return JSONResponse(
                {"error": f"no device {site}/{device} has been seen on the broker"},
                status_code=404,
            )
        topic = f"{config.prefix}/{site}/{device}/cmd/stop"
        client = request.client.host if request.client else "unknown"
        log.warning("stop_requested", device=f"{site}/{device}", client=client)
        try:
            await publish_stop(
                dashboard.address,
                dashboard.tls,
                topic,
                username=config.stop_username or "",
                password=config.stop_password or "",
                requested_by=f"dashboard:{config.stop_username}@{client}",
            )
        except StopFailed as exc:
            log.warning("stop_not_sent", device=f"{site}/{device}", error=exc.reason)
            return JSONResponse({"error": str(exc)}, status_code=502)
        log.warning("stop_sent", device=f"{site}/{device}", topic=topic)
        return JSONResponse({"ok": True, "topic": topic})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/events", events),
            Route("/api/snapshot", snapshot),
            Route("/healthz", healthz),
            Route("/api/devices/{site}/{device}/stop", stop, methods=["POST"]),
            *([history_mount(config.history_db)] if config.history_db else []),
            Mount(
                "/static",
                StaticFiles(packages=[("devicectl.dashboard", "static")]),
                name="static",
            ),
        ],
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    return app
