"""Structured logging: JSON lines when not on a terminal (systemd, CI), readable on one.

Components take a logger as a parameter (``log: BoundLogger``) defaulting to
``structlog.get_logger("devicectl.<component>")``; nothing logs through the root logger, nothing
prints, and nothing logs in the per-pulse path.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "redact"]

_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "key_password"})


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any secret-looking key, so no secret reaches a log line."""
    for key in event:
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
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
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
