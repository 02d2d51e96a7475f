"""Transports that move bytes to a device: serial ports and socket:// (pyserial-asyncio-fast) and an
in-memory pair for tests and the in-process simulator.

Every transport is callback-driven (see :mod:`drivers.transport`) and reports failures as
:class:`TransportError`. This package imports only ``protocols`` and third-party libraries.
"""

from drivers.errors import TransportError
from drivers.memory import Manipulator, MemoryLink, MemoryTransport
from drivers.serialport import DEFAULT_BAUDRATE, SerialTransport, open_serial
from drivers.transport import DataHandler, LostHandler, Transport, TransportFactory

__all__ = [
    "DEFAULT_BAUDRATE",
    "DataHandler",
    "LostHandler",
    "Manipulator",
    "MemoryLink",
    "MemoryTransport",
    "SerialTransport",
    "Transport",
    "TransportError",
    "TransportFactory",
    "open_serial",
]
