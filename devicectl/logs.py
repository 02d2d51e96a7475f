"""Structured logging: JSON lines when not on a terminal (systemd, CI), readable on one.

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode),
every line starts with its syslog priority (``<4>`` for a warning, sd-daemon(3)), so that
``journalctl -p warning`` filters devicectl's logs by level.

Components take a logger as a parameter (``log: BoundLogger``) defaulting to
``structlog.get_logger("devicectl.<component>")``; nothing logs through the root logger, nothing
prints, and nothing logs in the per-pulse path.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["JournalPriority", "configure_logging", "redact", "redact_url", "stderr_is_journal"]

_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "key_password"})
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact_url(text: str) -> str:
    """``mqtts://user:secret@host`` -> ``mqtts://***@host``: credentials never reach a log."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Hide secrets: the value of any secret-looking key, and credentials inside any URL."""
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(value, str) and "@" in value:
            event[key] = redact_url(value)
    return event


# structlog method name -> syslog priority (sd-daemon(3): "<N>" prefixes on stderr lines)
_PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}


def stderr_is_journal(environ: Any = None) -> bool:
    """Whether stderr is connected to the journal: ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of it."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stderr
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalPriority:
    """Wraps a renderer: each rendered line gets its ``<N>`` syslog priority prefix."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        text = str(self._renderer(logger, name, event))
        prefix = f"<{_PRIORITY.get(name, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog once per process. ``json=None`` picks JSON unless stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    if stderr_is_journal():
        renderer = JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,  # after the traceback is rendered: it may quote a URL too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
