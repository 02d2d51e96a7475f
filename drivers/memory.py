"""In-memory transport: two connected endpoints in one event loop, for tests and the in-process
simulator (the shape of pymodbus's NullModem).

A write on one endpoint is delivered to the other with ``loop.call_soon``, never re-entrantly, so
a handler that writes from inside ``on_data`` cannot recurse into its peer. An optional
*manipulator* per direction sees every written chunk and returns the chunks to deliver instead:
split it (several chunks), corrupt it (altered bytes), or drop it (none) — fault injection::

    def drop_every_other(data: bytes, count=itertools.count()) -> list[bytes]:
        return [data] if next(count) % 2 else []

:class:`MemoryLink` is a :class:`~drivers.transport.TransportFactory`: each ``connect`` makes a
fresh pair and hands the device's end to an ``accept`` callback (as a server would), so a
reconnecting host works against it; ``available = False`` makes ``connect`` fail as an unplugged
port does, and :meth:`MemoryTransport.close` on the device's end makes the host's end report the
port as vanished.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable

from drivers.errors import TransportError
from drivers.transport import DataHandler, LostHandler

__all__ = ["Manipulator", "MemoryLink", "MemoryTransport"]

Manipulator = Callable[[bytes], Iterable[bytes]]

_names = itertools.count(1)


class MemoryTransport:
    """One end of an in-memory pair. Until :meth:`attach` is called, deliveries wait in order."""

    __slots__ = ("_backlog", "_loop", "_manipulator", "_on_data", "_on_lost", "_open", "_peer",
                 "_url")  # fmt: skip

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self._url = url
        self._loop = loop
        self._peer: MemoryTransport | None = None
        self._manipulator: Manipulator | None = None  # applied to what this end writes
        self._on_data: DataHandler | None = None
        self._on_lost: LostHandler | None = None
        self._backlog: list[bytes] = []
        self._open = True

    @property
    def url(self) -> str:
        return self._url

    @property
    def is_open(self) -> bool:
        return self._open

    def attach(self, *, on_data: DataHandler, on_lost: LostHandler) -> None:
        """Install the handlers; anything delivered before now is passed on, in order, soon."""
        self._on_data, self._on_lost = on_data, on_lost
        for chunk in self._backlog:
            self._loop.call_soon(self._deliver, chunk)
        self._backlog.clear()

    def write(self, data: bytes) -> None:
        peer = self._peer
        if not self._open or peer is None:
            return
        manipulator = self._manipulator
        if manipulator is None:
            self._loop.call_soon(peer._deliver, bytes(data))
        else:
            for chunk in manipulator(bytes(data)):
                self._loop.call_soon(peer._deliver, chunk)

    def close(self) -> None:
        """Close this end; the peer's ``on_lost`` is told the port vanished."""
        if not self._open:
            return
        self._open = False
        peer = self._peer
        if peer is not None and peer._open:
            self._loop.call_soon(peer._lose, TransportError(peer._url, "vanished", "peer closed"))

    async def wait_closed(self) -> None:
        return None

    def _deliver(self, data: bytes) -> None:
        if not self._open:
            return
        if self._on_data is None:
            self._backlog.append(data)
        else:
            self._on_data(data)

    def _lose(self, error: TransportError) -> None:
        if not self._open:
            return
        self._open = False
        if self._on_lost is not None:
            self._on_lost(error)


class MemoryLink:
    """A reconnectable in-memory port: the host calls :meth:`connect`; the device, ``accept``."""

    def __init__(
        self,
        accept: Callable[[MemoryTransport], None] | None = None,
        *,
        name: str | None = None,
        to_device: Manipulator | None = None,
        to_host: Manipulator | None = None,
    ) -> None:
        self.url = f"memory://{name or next(_names)}"
        self.accept = accept
        self.to_device = to_device
        self.to_host = to_host
        self.available = True  # False: connect() fails as an unplugged port would
        self.connections = 0
        self.host: MemoryTransport | None = None  # the latest pair
        self.device: MemoryTransport | None = None

    @staticmethod
    def pair(
        url: str = "memory://pair",
        *,
        to_device: Manipulator | None = None,
        to_host: Manipulator | None = None,
    ) -> tuple[MemoryTransport, MemoryTransport]:
        """Two connected endpoints, (host end, device end), in the running loop."""
        loop = asyncio.get_running_loop()
        host, device = MemoryTransport(url, loop), MemoryTransport(url, loop)
        host._peer, device._peer = device, host
        host._manipulator, device._manipulator = to_device, to_host
        return host, device

    async def connect(self, *, on_data: DataHandler, on_lost: LostHandler) -> MemoryTransport:
        """A fresh pair; the device's end goes to ``accept``. TransportError if unavailable."""
        if not self.available:
            raise TransportError(self.url, "cannot be opened", "no device attached")
        host, device = self.pair(self.url, to_device=self.to_device, to_host=self.to_host)
        host.attach(on_data=on_data, on_lost=on_lost)
        self.host, self.device = host, device
        self.connections += 1
        if self.accept is not None:
            self.accept(device)
        return host
