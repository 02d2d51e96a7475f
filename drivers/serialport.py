"""Serial transport: any :func:`serial.serial_for_url` URL through pyserial-asyncio-fast.

A tty path (``/dev/ttyUSB0``, ``/dev/pts/3``) is opened as a serial port at ``baudrate``;
``socket://host:port`` becomes a plain asyncio TCP connection (pyserial-asyncio-fast does that
itself) on which we set ``TCP_NODELAY``, so a 7-byte STOP is not held back by Nagle's algorithm.

A tty path is read here rather than through pyserial-asyncio-fast (issue 16): pyserial opens and
configures it (``serial.Serial``), then one ``os.read`` per readiness takes all the kernel holds
(up to 64 KiB), with no ``select`` of its own and no 1 KiB cap, and a write goes straight to
``os.write`` (what the tty cannot take at once waits for writability, in order).

Errors are converted here: a port that cannot be opened raises, and a port that vanishes reports,
a :class:`~drivers.errors.TransportError` naming the port and the cause, e.g.
``serial port /dev/pts/7 vanished: read failed: [Errno 5] Input/output error``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, cast

import serial
import serial_asyncio_fast

from drivers.errors import TransportError
from drivers.transport import DataHandler, LostHandler

__all__ = ["DEFAULT_BAUDRATE", "SerialTransport", "open_serial"]

DEFAULT_BAUDRATE = 115_200
_READ_MAX = 65_536  # per readiness: all a tty can hold, so one read per wake-up


class _TtyPort:
    """A tty configured by pyserial, read and written with plain ``os`` calls on the loop.

    The two methods :class:`SerialTransport` uses of an asyncio transport (``write``, ``abort``)
    and the protocol calls it makes (``data_received``, ``connection_lost``, the latter once, soon
    after the port closed, with the error or ``None`` for a local close)."""

    __slots__ = ("_closed", "_fd", "_loop", "_out", "_port", "_protocol")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, port: serial.Serial, protocol: asyncio.Protocol
    ) -> None:
        self._loop = loop
        self._port = port
        self._protocol = protocol
        self._fd: int = port.fileno()
        self._out = bytearray()
        self._closed = False
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, _READ_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        if not data:  # readable yet empty: the other end is gone (as pyserial judges it)
            self._close(
                OSError(
                    "device reports readiness to read but returned no data "
                    "(device disconnected or multiple access on port?)"
                )
            )
            return
        self._protocol.data_received(data)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._out:
            self._out += data
            return
        try:
            written = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self._close(exc)
            return
        if written < len(data):
            self._out += data[written:]
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def abort(self) -> None:
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._out.clear()
        try:
            self._port.close()
        finally:
            self._loop.call_soon(self._protocol.connection_lost, exc)


class _PortProtocol(asyncio.Protocol):
    """Forwards asyncio's callbacks to the owning :class:`SerialTransport`."""

    __slots__ = ("_owner",)

    def __init__(self, owner: SerialTransport) -> None:
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(exc)


class SerialTransport:
    """One open serial port or socket:// connection. Create it with :func:`open_serial`."""

    __slots__ = ("_asyncio_transport", "_closed_locally", "_on_data", "_on_lost", "_open",
                 "_released", "_url")  # fmt: skip

    def __init__(self, url: str, on_data: DataHandler, on_lost: LostHandler) -> None:
        self._url = url
        self._on_data = on_data
        self._on_lost = on_lost
        self._asyncio_transport: asyncio.BaseTransport | None = None
        self._open = False
        self._closed_locally = False
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        return self._url

    @property
    def is_open(self) -> bool:
        return self._open

    def write(self, data: bytes) -> None:
        if self._open:
            cast(asyncio.WriteTransport, self._asyncio_transport).write(data)

    def close(self) -> None:
        """Close at once, dropping anything not yet written (a flush could block on a dead port)."""
        if self._asyncio_transport is None or self._closed_locally:
            return
        self._closed_locally = True
        self._open = False
        cast(asyncio.WriteTransport, self._asyncio_transport).abort()

    async def wait_closed(self) -> None:
        if self._asyncio_transport is not None:
            await self._released.wait()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._released.set()
        if self._closed_locally:
            return
        self._open = False
        if exc is None:
            error = TransportError(self._url, "vanished", "closed by the peer")
        else:
            error = TransportError.from_exception(self._url, "vanished", exc)
        self._on_lost(error)


async def open_serial(
    url: str,
    *,
    baudrate: int = DEFAULT_BAUDRATE,
    on_data: DataHandler,
    on_lost: LostHandler,
) -> SerialTransport:
    """Open ``url`` (a tty path or any ``serial_for_url`` URL, e.g. ``socket://127.0.0.1:5000``).

    Raises :class:`~drivers.errors.TransportError` naming ``url`` when it cannot be opened.
    """
    link = SerialTransport(url, on_data, on_lost)
    loop = asyncio.get_running_loop()
    if "://" not in url:  # a tty path: read and written here (see the module's docstring)
        try:
            port = serial.Serial(url, baudrate=baudrate, timeout=0, write_timeout=0)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise TransportError.from_exception(url, "cannot be opened", exc) from exc
        link._asyncio_transport = _TtyPort(loop, port, _PortProtocol(link))  # type: ignore[assignment]
        link._open = True
        return link
    try:
        transport, _ = await serial_asyncio_fast.create_serial_connection(
            loop, lambda: _PortProtocol(link), url, baudrate=baudrate
        )
    except (OSError, ValueError) as exc:  # SerialException is an OSError; ValueError: bad URL
        raise TransportError.from_exception(url, "cannot be opened", exc) from exc
    if url.startswith("socket://"):
        sock: Any = transport.get_extra_info("socket")  # typed str upstream
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link._asyncio_transport = transport
    link._open = True
    return link
