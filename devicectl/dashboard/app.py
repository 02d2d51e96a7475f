"""The dashboard's ASGI app (Starlette): the page, its Server-Sent Events, and the stop command.

Routes:
    GET  /                                   the page (static, no CDN, no build step)
    GET  /static/...                         its script and style sheet
    GET  /events                             SSE: ``snapshot`` on connect, then ``delta`` lists;
                                             a ``ping`` token the page must answer, a ``bye``
                                             with the reason when the stream is ended
    POST /events/ack                         ``{"token": ...}``: the page read that ping
    GET  /api/snapshot                       the whole view as JSON
    GET  /healthz                            the telemetry reader's liveness, the broker link,
                                             device, page and connection counts; 503 unless
                                             reading, or while the page cap is full
                                             (``pages.saturated``) or the server's connections
                                             are (``connections.saturated``)
    POST /api/devices/{site}/{device}/stop   ``{"confirm": true, "site": ..., "device": ...}`` →
                                             ``cmd/stop`` to that device; 403 unless the
                                             dashboard has stop credentials

Every request passes :class:`_Guard` first: its ``Host`` must be one the dashboard serves (default
the bound address; ``allowed_hosts`` to add the names tablets use), and an ``Origin``, when a
browser sends one, must be one of those too — a page of another site, or one reached through DNS
rebinding, can neither stop a laser nor read the view. Every response is ``Cache-Control:
no-store``, ``X-Frame-Options: DENY`` and under a strict content security policy.

Resources are capped so that no number of clients or devices can keep an alarm off the screen:
``max_browsers`` event streams, at most ``max_browsers_per_address`` from one client address, each
of which must prove that it reads by answering a ping within ``ack_timeout_s`` (else it is
dropped) and, when a new page needs room, the stream not proven to read is evicted rather than the
new page refused (:mod:`~devicectl.dashboard.pages`). Each stream has a bounded queue and a send
timeout, and a fixed, small kernel send buffer (:mod:`~devicectl.dashboard.server`); the view
itself is bounded (:class:`~devicectl.dashboard.fleet.Fleet`).

The MQTT subscriber runs in the app's lifespan, as a named task of a TaskGroup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from devicectl.dashboard.connections import ConnectionGuard, client_key
from devicectl.dashboard.fleet import Fleet, Update, json_text
from devicectl.dashboard.history import history_mount
from devicectl.dashboard.hub import Goodbye, Resync, Subscription, UpdateHub
from devicectl.dashboard.limits import DisplayLimits, load_display_limits
from devicectl.dashboard.mqtt import (
    Backoff,
    StopFailed,
    TelemetrySubscriber,
    display_url,
    publish_stop,
)
from devicectl.dashboard.pages import PageSlots, Refused, Slot
from devicectl.errors import ConfigError
from devicectl.telemetry.config import BrokerAddress, parse_broker_url, tls_context_for
from protocols.bounded import BoundedInputError, loads_json
from protocols.mqtt import ID_ALLOWED, is_valid_id

__all__ = ["Dashboard", "DashboardConfig", "allowed_hosts_for", "create_app"]

_SECURITY_HEADERS = [
    # Everything the page needs is served from here: no CDN can be pulled in by accident.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_REPLACED_HEADERS = frozenset(name for name, _ in _SECURITY_HEADERS)
_MAX_UPDATES_PER_EVENT = 500
_SSE_CHUNK = 16 * 1024  # a large event goes out in pieces, each awaited under the send timeout
_MAX_STOP_BODY = 1024


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """What the dashboard needs. ``stop_username``/``stop_password`` enable the Stop button.

    ``mqtt_url`` may carry the subscriber's credentials (``mqtt://user:pass@host``); ``ca_file``
    (else ``DEVICECTL_MQTT__CA_FILE``) verifies an ``mqtts://`` broker. ``allowed_hosts`` are
    the host names (``name`` or ``name:port``) browsers may use to reach the page, besides the
    address it is bound to.
    """

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    ca_file: Path | None = None
    prefix: str = "lasers"
    stop_username: str | None = None
    stop_password: str | None = field(default=None, repr=False)
    # The bars' limits; by default the packaged policy's (pass the clinic's: load_display_limits).
    limits: DisplayLimits = field(default_factory=load_display_limits)
    title: str = "Clinic lasers"
    keepalive_s: float = 5.0  # a ping to every page this often; it must answer it
    backoff: Backoff = field(default_factory=Backoff)
    allowed_hosts: tuple[str, ...] = ()
    max_browsers: int = 100
    max_browsers_per_address: int = 20
    max_devices: int = 500
    browser_queue: int = 1000
    send_timeout_s: float = 10.0
    ack_timeout_s: float = 20.0  # a page that leaves a ping unanswered this long is dropped
    # A connection written nothing this long is closed (an unfinished request: slowloris); a
    # page's stream is written at least every keepalive_s, so this must be longer.
    quiet_timeout_s: float = 15.0
    coalesce_s: float = 0.05  # updates to a page are sent at most this often (an alarm included)
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
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/ ,@") or not host.isascii():
                raise ConfigError("--allow-host", host, "a host name or address, HOST[:PORT]")
        for name, value in (
            ("max_browsers", self.max_browsers),
            ("max_browsers_per_address", self.max_browsers_per_address),
            ("max_devices", self.max_devices),
            ("browser_queue", self.browser_queue),
        ):
            if not 1 <= value <= 1_000_000:
                raise ConfigError(name, value, "an integer from 1 to 1000000")
        for name, seconds in (
            ("send_timeout_s", self.send_timeout_s),
            ("keepalive_s", self.keepalive_s),
            ("ack_timeout_s", self.ack_timeout_s),
            ("quiet_timeout_s", self.quiet_timeout_s),
        ):
            if not (math.isfinite(seconds) and seconds > 0):
                raise ConfigError(name, seconds, "a positive number (s)")
        if self.quiet_timeout_s <= 2 * self.keepalive_s:
            raise ConfigError(
                "quiet_timeout_s", self.quiet_timeout_s, "more than twice keepalive_s (s)"
            )
        if not (math.isfinite(self.coalesce_s) and 0 <= self.coalesce_s <= 0.5):
            raise ConfigError("coalesce_s", self.coalesce_s, "from 0 to 0.5 (s)")

    @property
    def stop_enabled(self) -> bool:
        return self.stop_username is not None and self.stop_password is not None

    def broker(self) -> tuple[BrokerAddress, ssl.SSLContext | None]:
        """The broker's address and TLS context; raises ConfigError naming the bad value."""
        return parse_broker_url(self.mqtt_url), tls_context_for(self.mqtt_url, self.ca_file)


def _host_forms(host: str, port: int) -> set[str]:
    bare = host.strip("[]").lower()
    shown = f"[{bare}]" if ":" in bare else bare
    return {shown, f"{shown}:{port}"}


def allowed_hosts_for(listen: tuple[str, int], extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` header values the dashboard answers when bound to ``listen``.

    The bound address (with and without the port); for a loopback address also ``localhost``;
    for a wildcard address (``0.0.0.0``, ``::``) this machine's name and addresses; then each of
    ``extra`` (``name`` allows the bound port, ``name:port`` exactly that).
    """
    host, port = listen
    names = {host}
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if (address is not None and address.is_loopback) or host.lower() == "localhost":
        names |= {"localhost", "127.0.0.1", "::1"}
    if address is not None and address.is_unspecified:
        names |= {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None)
        except OSError:
            infos = []
        names |= {str(info[4][0]) for info in infos}
    allowed: set[str] = set()
    for name in names:
        allowed |= _host_forms(name, port)
    for entry in extra:
        name, sep, entry_port = entry.rpartition(":")
        if sep and entry_port.isdigit() and not entry.endswith("]"):
            allowed.add(entry.lower())
        else:
            allowed |= _host_forms(entry, port)
    return frozenset(allowed)


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
        self.fleet = Fleet(config.prefix, limits=config.limits, max_devices=config.max_devices)
        self.hub = UpdateHub(self.snapshot, queue_size=config.browser_queue)
        self.pages = PageSlots(
            max_pages=config.max_browsers,
            max_per_address=config.max_browsers_per_address,
            ack_timeout_s=config.ack_timeout_s,
        )
        self.subscriber = TelemetrySubscriber(
            self.address,
            self.tls,
            self.fleet,
            self.hub,
            backoff=config.backoff,
            clock=clock,
            log=self.log,
        )
        # Set by DashboardServer once bound; until then only the configured names are allowed.
        self.allowed_hosts = frozenset(h.lower() for h in config.allowed_hosts)
        self._snapshot_cache: tuple[tuple[int, int, bool], str] = ((-1, -1, False), "")
        # Set by DashboardServer: the HTTP connections it holds, reported by /healthz.
        self.connections: ConnectionGuard | None = None

    def serve_on(self, listen: tuple[str, int]) -> None:
        """The address the page is served on: the Host/Origin allow-list follows from it."""
        self.allowed_hosts = allowed_hosts_for(listen, self.config.allowed_hosts)

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.fleet.snapshot(),
            "title": self.config.title,
            "broker_url": display_url(self.address),
            "stop_enabled": self.config.stop_enabled,
            "pages": self.pages_status(),
        }

    def pages_status(self) -> dict[str, Any]:
        """Open pages, the caps, and how many were evicted, dropped or refused."""
        return self.pages.status(time.monotonic())

    def snapshot_text(self) -> str:
        """The snapshot as JSON, made once per change of the view however many pages ask."""
        key = (self.fleet.version, self.pages.version, self.pages.saturated(time.monotonic()))
        if self._snapshot_cache[0] != key:
            self._snapshot_cache = (key, json_text(self.snapshot()))
        return self._snapshot_cache[1]


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_text(content).encode()


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class _GuardMiddleware:
    """Host and Origin allow-lists in front of every route; security headers on every answer."""

    def __init__(self, app: ASGIApp, dashboard: Dashboard) -> None:
        self.app, self.dashboard = app, dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.dashboard.allowed_hosts
        host = (_header(scope, b"host") or "").lower()
        origin = _header(scope, b"origin")
        foreign = (
            origin is not None and urlsplit(origin.lower()).netloc not in allowed
        ) or _header(scope, b"sec-fetch-site") in ("cross-site", "same-site")
        problem: str | None = None
        if host not in allowed:
            problem = "this dashboard does not answer to that Host name"
        elif foreign:
            problem = "requests from other sites are refused"
        if problem is not None:
            self.dashboard.log.warning(
                "http_request_refused", reason=problem, host=host[:80], origin=(origin or "")[:80]
            )
            response = _JSON({"error": problem}, status_code=403)
            await response(scope, receive, self._secured(send))
            return
        await self.app(scope, receive, self._secured(send))

    @staticmethod
    def _secured(send: Send) -> Send:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k not in _REPLACED_HEADERS
                ]
                message = {**message, "headers": headers + _SECURITY_HEADERS}
            await send(message)

        return secured


class _EventStream:
    """``GET /events``: Server-Sent Events for one browser, within the dashboard's caps.

    A raw ASGI app rather than a StreamingResponse so that every piece it sends is awaited under
    ``send_timeout_s`` (a browser whose connection does not drain is dropped instead of holding
    a snapshot in a socket buffer), and so that the stream can send pings and end itself: a
    stream that does not answer its pings is dropped, one evicted to make room for a new page is
    told so (``event: bye``) and ended. The connection is closed after the stream ends.
    """

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        dashboard = self.dashboard
        client = scope.get("client")
        # One IPv6 host may take any address in its /64: it counts as one address.
        address = client_key(str(client[0])) if client else "unknown"
        admitted = dashboard.pages.admit(address, time.monotonic())
        if isinstance(admitted, Refused):
            dashboard.log.warning("page_refused", reason=admitted.reason, client=address)
            busy = _JSON({"error": admitted.reason}, status_code=503, headers={"retry-after": "5"})
            await busy(scope, receive, send)
            return
        slot = admitted
        try:
            async with dashboard.hub.subscribe() as subscription:
                slot.end = subscription.end
                if slot not in dashboard.pages:  # evicted before it could be told
                    subscription.end("evicted: a new page needed room")
                await self._serve(receive, send, slot, subscription)
        finally:
            dashboard.pages.release(slot)

    async def _serve(
        self, receive: Receive, send: Send, slot: Slot, subscription: Subscription
    ) -> None:
        await self._send(
            send,
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"x-accel-buffering", b"no"),
                    (b"connection", b"close"),
                ],
            },
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(self._disconnected(receive), name="sse-disconnect")
                streamer = tasks.create_task(
                    self._stream(send, slot, subscription), name="sse-stream"
                )
                done, _ = await asyncio.wait(
                    (watcher, streamer), return_when=asyncio.FIRST_COMPLETED
                )
                for task in (watcher, streamer):
                    if task not in done:
                        task.cancel()
        except* TimeoutError:
            self.dashboard.pages.drop(slot)
            self.dashboard.log.warning(
                "browser_dropped", reason="its connection does not drain", client=slot.address
            )
        except* OSError:
            pass  # the connection went away under us: nothing to tell it

    async def _send(self, send: Send, message: Message) -> None:
        await asyncio.wait_for(send(message), self.dashboard.config.send_timeout_s)

    async def _text(self, send: Send, text: str) -> None:
        data = text.encode()
        for start in range(0, len(data), _SSE_CHUNK):
            chunk = data[start : start + _SSE_CHUNK]
            await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})

    async def _goodbye(self, send: Send, reason: str) -> None:
        await self._text(send, _sse("bye", json_text({"reason": reason})))
        await self._send(send, {"type": "http.response.body", "body": b""})

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _stream(self, send: Send, slot: Slot, subscription: Subscription) -> None:
        dashboard, config, pages = self.dashboard, self.dashboard.config, self.dashboard.pages
        now = time.monotonic()
        first = _sse("snapshot", dashboard.snapshot_text())
        token = json_text(pages.ping(slot, now))
        await self._text(send, "retry: 2000\n" + first + _sse("ping", token))
        next_ping = now + config.keepalive_s
        while True:
            now = time.monotonic()
            if now >= next_ping:
                # Checked here, not only when idle: a stream kept busy by updates is pinged too.
                if pages.overdue(slot, now):
                    pages.drop(slot)
                    dashboard.log.warning(
                        "browser_dropped", reason="it does not read", client=slot.address
                    )
                    await self._goodbye(send, "dropped: this page did not answer its pings")
                    return
                await self._text(send, _sse("ping", json_text(pages.ping(slot, now))))
                next_ping = now + config.keepalive_s
            try:
                item = await asyncio.wait_for(subscription.next(), max(next_ping - now, 0.001))
            except TimeoutError:
                continue
            if isinstance(item, Goodbye):
                dashboard.log.warning("browser_evicted", reason=item.reason, client=slot.address)
                await self._goodbye(send, item.reason)
                return
            if item is not None and not isinstance(item, Resync) and config.coalesce_s > 0:
                # Let a burst gather: one write per page per interval, not one per message.
                await asyncio.sleep(config.coalesce_s)
            batch: list[str] = []
            while isinstance(item, Update):
                batch.append(item.encoded)
                if subscription.queue.empty() or len(batch) >= _MAX_UPDATES_PER_EVENT:
                    break
                queued = subscription.queue.get_nowait()
                if isinstance(queued, Goodbye):
                    subscription.queue.put_nowait(queued)  # after this batch
                    break
                item = queued
            if batch:
                await self._text(send, _sse("delta", "[" + ",".join(batch) + "]"))
            if item is None:
                await self._send(send, {"type": "http.response.body", "body": b""})
                return
            if isinstance(item, Resync):
                await self._text(send, _sse("snapshot", dashboard.snapshot_text()))


def create_app(dashboard: Dashboard) -> Starlette:
    """The ASGI app serving ``dashboard``; ``app.state.dashboard`` is that object."""
    config, hub, fleet, log = dashboard.config, dashboard.hub, dashboard.fleet, dashboard.log

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as tasks:
            subscriber = tasks.create_task(
                dashboard.subscriber.run(), name="dashboard-mqtt-subscriber"
            )
            reporter = tasks.create_task(_report_pages(dashboard), name="dashboard-pages")
            try:
                yield
            finally:
                hub.close()
                subscriber.cancel()
                reporter.cancel()

    async def index(_request: Request) -> Response:
        page = resources.files("devicectl.dashboard").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    async def snapshot(_request: Request) -> Response:
        return Response(dashboard.snapshot_text(), media_type="application/json")

    async def healthz(_request: Request) -> Response:
        reader = dashboard.subscriber.health()
        reading = reader["running"] and reader["connected"]
        pages = dashboard.pages_status()
        guard = dashboard.connections
        connections = guard.status() if guard is not None else None
        healthy = reading and not pages["saturated"]
        healthy = healthy and not (connections is not None and connections["saturated"])
        return _JSON(
            {
                "ok": healthy,
                "reader": reader,
                "broker_connected": reading,
                "devices": fleet.device_count,
                "browsers": pages["open"],
                "pages": pages,
                **({"connections": connections} if connections is not None else {}),
            },
            status_code=200 if healthy else 503,
        )

    async def ack(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _JSON({"error": 'send a JSON body {"token": ...}'}, status_code=415)
        body = await _bounded_body(request)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not dashboard.pages.ack(token, time.monotonic()):
            return _JSON(
                {"error": "no open stream is waiting for that ping: reconnect"}, status_code=404
            )
        return Response(status_code=204)

    async def stop(request: Request) -> Response:
        site, device = request.path_params["site"], request.path_params["device"]
        if not config.stop_enabled:
            return _JSON(
                {"error": "stop is not enabled on this dashboard: it has no stop credentials"},
                status_code=403,
            )
        if not (is_valid_id(site) and is_valid_id(device)):
            return _JSON({"error": f"site and device ids are {ID_ALLOWED}"}, status_code=404)
        # A JSON body cannot be sent cross-site without a CORS preflight, which is never granted.
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _JSON({"error": 'send a JSON body {"confirm": true}'}, status_code=415)
        body = await _bounded_body(request)
        confirmed = (
            isinstance(body, dict)
            and body.get("confirm") is True
            and body.get("site", site) == site
            and body.get("device", device) == device
        )
        if not confirmed:
            return _JSON(
                {
                    "error": 'stop needs an explicit confirmation naming the device: {"confirm": '
                    'true, "site": ..., "device": ...}'
                },
                status_code=400,
            )
        if not fleet.knows(site, device):
            return _JSON(
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
            return _JSON({"error": str(exc)}, status_code=502)
        log.warning("stop_sent", device=f"{site}/{device}", topic=topic)
        return _JSON({"ok": True, "topic": topic})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/events", _EventStream(dashboard)),
            Route("/events/ack", ack, methods=["POST"]),
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
    app.add_middleware(_GuardMiddleware, dashboard=dashboard)
    app.state.dashboard = dashboard
    return app


async def _report_pages(dashboard: Dashboard, every_s: float = 1.0) -> None:
    """Tell every page when the page counts change (at most once a second, whatever the churn)."""
    shown: dict[str, Any] | None = None
    while True:
        status = dashboard.pages_status()
        if status != shown:
            if shown is not None:
                dashboard.hub.publish([Update({"op": "pages", "pages": status})])
            shown = status
        await asyncio.sleep(every_s)


async def _bounded_body(request: Request) -> Any:
    """The request's JSON body, or None when it is too large, too deep or not JSON."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > _MAX_STOP_BODY:
            return None
    try:
        return loads_json(data, max_bytes=_MAX_STOP_BODY, max_depth=4)
    except BoundedInputError:
        return None
