"""Serving the dashboard with uvicorn inside the caller's event loop.

:class:`DashboardServer` is an async context manager owning a TaskGroup with one named task, the
uvicorn server. It binds the listening socket itself, so that a port in use is a one-line
:class:`~devicectl.errors.ConfigError` rather than uvicorn's ``sys.exit``, and so that port 0 works
(tests; :attr:`DashboardServer.url` names the port the system chose), and so that every
connection gets a fixed kernel send buffer (``SEND_BUFFER``, inherited from the listening socket):
what a client that does not read can make the kernel hold for it is bounded, and a stream that
does not drain fills it and meets the send timeout soon. Signals are left to the
caller: the CLI stops on SIGINT/SIGTERM by leaving the context, which ends every browser's event
stream first, so shutdown never waits on an open page.

Every accepted connection also passes a :class:`~devicectl.dashboard.connections.ConnectionGuard`
(uvicorn has no deadline for a request's headers): at most ``2 × max_browsers_per_address + 24``
connections per client address (IPv6: per /64), all of them below the descriptor limit, and
none kept once nothing has been written to it for ``quiet_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import Generator
from types import TracebackType

import uvicorn

from devicectl.dashboard.app import Dashboard, create_app
from devicectl.dashboard.connections import ConnectionGuard, GuardedProtocol
from devicectl.errors import ConfigError

__all__ = ["SEND_BUFFER", "DashboardServer", "parse_listen"]

# Per connection (Linux doubles it for bookkeeping); autotuning would grow it to megabytes on a
# client that never reads. A page's updates are small: a snapshot of hundreds of kilobytes still
# goes out at the LAN's speed through a window this size.
SEND_BUFFER = 64 * 1024
# Descriptors kept for everything but admitted HTTP connections: the broker, the history
# database, logs, and a burst of accepted connections not yet closed (asyncio accepts up to the
# backlog, 128, at once, before the guard has seen any of them).
_RESERVED_FDS = 256


def connection_limit() -> int:
    """How many HTTP connections the process can hold: its descriptor limit, less a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(64, min(soft, 65536) - _RESERVED_FDS)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); raises ConfigError."""
    allowed = "HOST:PORT, e.g. 0.0.0.0:8080"
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError("--listen", value, allowed)
    return host, int(port_text)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the embedding program decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class DashboardServer:
    """``async with DashboardServer(dashboard, ("127.0.0.1", 0)) as server: server.url``."""

    def __init__(self, dashboard: Dashboard, listen: tuple[str, int]) -> None:
        self.dashboard = dashboard
        self.listen = listen
        self.app = create_app(dashboard)
        self._server: _EmbeddedServer | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._serving: asyncio.Task[None] | None = None
        self._guarding: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None
        config = dashboard.config
        self.connections = ConnectionGuard(
            per_address=2 * config.max_browsers_per_address + 24,
            total=connection_limit(),
            quiet_timeout_s=config.quiet_timeout_s,
        )
        dashboard.connections = self.connections

    @property
    def url(self) -> str:
        if self._address is None:
            raise RuntimeError("the dashboard server is not running")
        host, port = self._address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _bind(self) -> socket.socket:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(
                "--listen", f"{host}:{port}", f"a free local address ({exc})"
            ) from exc
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.setblocking(False)
        return sock

    async def __aenter__(self) -> DashboardServer:
        sock = self._bind()
        self._address = sock.getsockname()[:2]
        self.dashboard.serve_on(self._address)
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            timeout_graceful_shutdown=2,
            server_header=False,
            http=GuardedProtocol.for_guard(self.connections),
            # No WebSocket route: an upgrade would hand the connection to another protocol,
            # out of the guard's sight.
            ws="none",
        )
        server = self._server = _EmbeddedServer(config)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._serving = self._tasks.create_task(
            server.serve(sockets=[sock]), name="dashboard-http-server"
        )
        self._guarding = self._tasks.create_task(
            self.connections.run(), name="dashboard-connection-guard"
        )
        try:
            while not server.started:
                if self._serving.done():
                    break
                await asyncio.sleep(0.01)
        finally:
            if not server.started:
                server.should_exit = True
                self._guarding.cancel()
                sock.close()
        if not server.started:
            await self._tasks.__aexit__(None, None, None)
            raise ConfigError("--listen", f"{self.listen[0]}:{self.listen[1]}", "a working server")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None or self._tasks is None:
            return
        # Open pages hold event streams; end them so that uvicorn's graceful shutdown is quick.
        self.dashboard.hub.close()
        self._server.should_exit = True
        if self._guarding is not None:
            self._guarding.cancel()
        # Shut down in order even when the body failed: its exception propagates by itself.
        await self._tasks.__aexit__(None, None, None)
        self._address = None
