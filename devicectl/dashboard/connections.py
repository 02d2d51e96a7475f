"""Which TCP connections the dashboard's HTTP server keeps open: per address, and not forever.

uvicorn has no deadline for a request's headers: a client that sends ``GET / HTTP/1.1\\r\\n`` and
then a byte now and then (slowloris), or a body that never ends, holds its connection, and its
file descriptor, for ever; a few hundred such connections exhausted the process's descriptors
(``accept`` failing with ``EMFILE``), and then no page, no ``/healthz`` and no alarm could reach
anyone. So every accepted connection passes :class:`ConnectionGuard`:

- one client address (an IPv6 client: its /64, which one host can fill with addresses) holds at
  most ``per_address`` connections; one more is closed as it is accepted. Loopback (127.0.0.1,
  ::1) is exempt: it is where a reverse proxy on this machine connects from, for all its clients,
  which uvicorn tells apart by ``X-Forwarded-For`` (it trusts that header from 127.0.0.1 only);
  the two caps below still apply to it;
- a connection the server has written nothing to for ``quiet_timeout_s`` is closed: a request
  still arriving, a body never finished, a response the client never reads. Every page's event
  stream is written to at least every ``keepalive_s`` (its pings), and uvicorn closes an idle
  keep-alive connection after 5 s by itself, so only a client that holds a connection without
  using it meets this;
- the whole server holds at most ``total`` connections (below the descriptor limit); when full,
  the oldest connection that has not yet been answered at all is closed to make room; when every
  one has been answered, a connection from a client holding at least two fewer than the client
  holding the most takes the place of that client's least recently written one (so that filling
  the server with connections in use takes ``total`` clients, not ``total / per_address``); else
  the new one is closed.

:class:`GuardedProtocol` wraps uvicorn's HTTP/1.1 protocol (``uvicorn.Config(http=...)``) and
watches what it writes through :class:`_WatchedTransport`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard", "GuardedProtocol", "client_key"]

# Where a reverse proxy on this machine connects from (uvicorn trusts X-Forwarded-For from there).
_PROXIES = frozenset({"127.0.0.1", "::1"})


def client_key(address: str) -> str:
    """The client a connection counts against: its IPv4 address (also when mapped into IPv6),
    or its IPv6 /64 (one host on a LAN may take any number of addresses in its /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip.is_loopback:
            return str(ip)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionGuard:
    """The open connections, counted by client (see the module's docstring)."""

    def __init__(
        self,
        *,
        per_address: int,
        total: int,
        quiet_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.quiet_timeout_s = quiet_timeout_s
        self.clock = clock
        self._open: dict[GuardedProtocol, None] = {}  # in order of arrival
        self._by_client: Counter[str] = Counter()
        self.refused = 0  # closed on arrival: too many from that client, or all answered
        self.closed_quiet = 0  # closed after quiet_timeout_s without an answer
        self.evicted = 0  # closed to make room for a newer one
        self.window_s = 60.0  # how long a full server is reported as saturated
        self._last_full = -math.inf

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, connection: GuardedProtocol) -> bool:
        capped = connection.client not in _PROXIES
        if capped and self._by_client[connection.client] >= self.per_address:
            self.refused += 1
            return False
        if len(self._open) >= self.total:
            self._last_full = self.clock()
            victim = next((c for c in self._open if not c.answered), None)
            if victim is None:
                victim = self._fair_share(connection.client)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            self._leave(victim)
            victim.abort()
        self._open[connection] = None
        self._by_client[connection.client] += 1
        return True

    def leave(self, connection: GuardedProtocol) -> None:
        if connection in self._open:
            self._leave(connection)

    def sweep(self) -> None:
        """Close every connection written nothing for ``quiet_timeout_s``."""
        now = self.clock()
        for connection in [c for c in self._open if now - c.last_write > self.quiet_timeout_s]:
            self.closed_quiet += 1
            self._leave(connection)
            connection.abort()

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.sweep()

    def saturated(self) -> bool:
        """Full, or full within ``window_s``: new connections close others or are refused."""
        return self.open >= self.total or self.clock() - self._last_full < self.window_s

    def status(self) -> dict[str, Any]:
        return {
            "saturated": self.saturated(),
            "open": self.open,
            "max": self.total,
            "max_per_address": self.per_address,
            "refused": self.refused,
            "closed_quiet": self.closed_quiet,
            "evicted": self.evicted,
        }

    def _fair_share(self, client: str) -> GuardedProtocol | None:
        """The least recently written connection of the client holding the most, if that is at
        least two more than ``client`` holds (one more would only swap them back and forth)."""
        if not self._by_client:
            return None
        crowded, top = self._by_client.most_common(1)[0]
        if self._by_client[client] > top - 2:
            return None
        return min(
            (c for c in self._open if c.client == crowded), key=lambda c: c.last_write, default=None
        )

    def _leave(self, connection: GuardedProtocol) -> None:
        del self._open[connection]
        self._by_client[connection.client] -= 1
        if self._by_client[connection.client] <= 0:
            del self._by_client[connection.client]


class GuardedProtocol(asyncio.Protocol):
    """uvicorn's HTTP/1.1 protocol behind a :class:`ConnectionGuard`.

    Built by uvicorn as ``http_protocol_class(config=..., server_state=..., app_state=...)``;
    :meth:`for_guard` makes such a class for one guard.
    """

    guard: ConnectionGuard

    @classmethod
    def for_guard(cls, guard: ConnectionGuard) -> type[GuardedProtocol]:
        return type("GuardedProtocolFor", (cls,), {"guard": guard})

    def __init__(self, **uvicorn_arguments: Any) -> None:
        self.inner = H11Protocol(**uvicorn_arguments)
        self.client = "unknown"
        self.answered = False
        self.last_write = self.guard.clock()
        self._transport: asyncio.Transport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.client = client_key(str(peer[0])) if peer else "unknown"
        self.last_write = self.guard.clock()
        if not self.guard.admit(self):
            transport.abort()
            return
        self._admitted = True
        self.inner.connection_made(_WatchedTransport(transport, self))

    def wrote(self) -> None:
        self.answered = True
        self.last_write = self.guard.clock()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self.inner.data_received(data)

    def eof_received(self) -> None:
        if self._admitted:
            self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.leave(self)
        if self._admitted:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self.inner.resume_writing()


class _WatchedTransport(asyncio.Transport):
    """The connection's transport as uvicorn sees it: every write is noted, then passed on."""

    def __init__(self, transport: asyncio.Transport, owner: GuardedProtocol) -> None:
        super().__init__(extra=None)
        self._real = transport
        self._owner = owner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._owner.wrote()
        self._real.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._owner.wrote()
        self._real.writelines(list_of_data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def close(self) -> None:
        self._real.close()

    def abort(self) -> None:
        self._real.abort()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()
