"""The transport abstraction every driver implements.

Transports are callback-driven (asyncio Protocols underneath), not stream readers: each received
chunk is handed to ``on_data`` synchronously, so that a caller can decode it and write a reply (a
STOP) from inside the same callback, with no ``await`` in between. ``write`` never blocks: it
buffers what the port cannot take at once.

``on_lost`` is called once, when the connection ends for any reason other than our own
:meth:`Transport.close`, with a :class:`~drivers.errors.TransportError` naming the port and the
cause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from drivers.errors import TransportError

__all__ = ["DataHandler", "LostHandler", "Transport", "TransportFactory"]

DataHandler = Callable[[bytes], None]
LostHandler = Callable[[TransportError], None]


class Transport(Protocol):
    """An open byte link to a device."""

    @property
    def url(self) -> str:
        """Where this transport goes (a tty path, ``socket://host:port``, ``memory://name``)."""
        ...

    @property
    def is_open(self) -> bool:
        """False once closed locally or lost."""
        ...

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the device; never blocks; ignored once closed."""
        ...

    def close(self) -> None:
        """Close at once; ``on_lost`` is not called for a local close."""
        ...

    async def wait_closed(self) -> None:
        """Return once the underlying port or socket is released."""
        ...


class TransportFactory(Protocol):
    """Opens a new transport: what a reconnecting link calls on every connection attempt.

    Raises :class:`~drivers.errors.TransportError` when the port cannot be opened.
    """

    async def __call__(self, *, on_data: DataHandler, on_lost: LostHandler) -> Transport: ...
