"""Structured logging: JSON lines when not on a terminal (systemd, CI), readable on one.

Components take a logger as a parameter (``log: BoundLogger``) defaulting to
``structlog.get_logger("devicectl.<component>")``; nothing logs through the root logger, nothing
prints, and nothing logs in the per-pulse path.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "redact", "redact_url"]

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


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog once per process. ``json=None`` picks JSON unless stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
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
