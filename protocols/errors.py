"""The project's exception tree.

Every error devicectl raises on purpose derives from :class:`DevicectlError`. It is rooted here, in
the lowest layer, so that codecs, drivers, the simulator and the application share one tree; the
application re-exports it. Facts travel in attributes, not in message prefixes.
"""

from __future__ import annotations

__all__ = [
    "DevicectlError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class DevicectlError(Exception):
    """Root of every error devicectl raises on purpose."""


class ProtocolError(DevicectlError):
    """The device wire protocol (ICD v1) was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a field out of range, a payload too long)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""
