"""Transport errors, converted at the boundary from OSError and pyserial's SerialException.

``drivers`` sits below ``devicectl`` and may not import it, so its one error class derives directly
from the project root :class:`protocols.errors.DevicectlError`; the application treats it like its
own ``LinkError``: retried by reconnecting.
"""

from __future__ import annotations

import os

from protocols.errors import DevicectlError

__all__ = ["TransportError"]


class TransportError(DevicectlError):
    """A port could not be opened, or vanished (USB pulled, simulator killed, pty closed).

    ``port`` is the URL or path as given; ``cause`` the low-level reason, in words.
    """

    def __init__(self, port: str, what: str, cause: str) -> None:
        self.port, self.what, self.cause = port, what, cause
        super().__init__(f"serial port {port} {what}: {cause}")

    @classmethod
    def from_exception(cls, port: str, what: str, exc: BaseException) -> TransportError:
        """Name ``exc`` in words: its message (or class), and the errno's meaning if it lacks it."""
        cause = str(exc) or type(exc).__name__
        errno = getattr(exc, "errno", None)
        if isinstance(errno, int) and errno > 0:
            meaning = os.strerror(errno)
            if meaning not in cause:
                cause = f"{cause}: {meaning}"
        return cls(port, what, cause)
