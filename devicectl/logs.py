"""Structured logging: JSON lines when not on a terminal (systemd, CI), readable on one.

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode),
every line starts with its syslog priority (``<4>`` for a warning, sd-daemon(3)), so that
``journalctl -p warning`` filters devicectl's logs by level.

Components take a logger as a parameter (``log: BoundLogger``) defaulting to
``structlog.get_logger("devicectl.<component>")``; nothing logs through the root logger, nothing
prints, and nothing logs in the per-pulse path.

Whatever arrives, the log stays bounded (:class:`EventRateLimit`): each kind of event (its name)
has a token bucket, 20 at once and 5 a second after that; the ones over are dropped and counted,
and the next event that is logged carries ``suppressed={kind: count}``. The safety events in
:data:`ALWAYS_LOGGED` (a breach above all) are never held back: each is bounded by what causes
it (a breach latches, a lost link reconnects with a back-off). Every string value is cut to
:data:`MAX_VALUE_CHARS` with a marker, tracebacks included.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = [
    "ALWAYS_LOGGED",
    "MAX_VALUE_CHARS",
    "EventRateLimit",
    "JournalPriority",
    "QueuedStream",
    "cap_values",
    "configure_logging",
    "redact",
    "redact_url",
    "stderr_is_journal",
]

# Never rate-limited: a breach must always be logged; the others are what an engineer needs to
# place it (the link and the log failing, the latch restored). Each is bounded by its cause (a
# breach latches, a lost link reconnects with a back-off). A STOP over MQTT is not among them:
# anyone allowed to publish it can send thousands a second (each is obeyed and audited).
ALWAYS_LOGGED = frozenset(
    {
        "safety_breach",
        "breach_latch_restored",
        "device_link_lost",
        "session_log_unavailable",
        "shutdown_over_budget",
    }
)
MAX_VALUE_CHARS = 4000
_MAX_KINDS = 1000  # distinct event names tracked; any beyond share one bucket

_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "key_password"})
# The scheme's length is bounded so that a long run of letters costs linear time, not quadratic.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]{0,30}://)[^/@\s]+@", re.IGNORECASE)


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


class EventRateLimit:
    """A structlog processor: at most ``burst`` events of one kind at once, ``per_s`` a second
    after that; those over are dropped and counted, and the counts ride on the next event
    logged as ``suppressed={kind: count}``. Thread-safe (the log writer thread logs too)."""

    def __init__(
        self,
        *,
        per_s: float = 5.0,
        burst: int = 20,
        always: frozenset[str] = ALWAYS_LOGGED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s, self.burst, self.always, self._clock = per_s, burst, always, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # kind -> (tokens, at)
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        kind = str(event.get("event"))
        with self._lock:
            if kind not in self.always:
                if kind not in self._buckets and len(self._buckets) >= _MAX_KINDS:
                    kind = "(other)"
                now = self._clock()
                tokens, at = self._buckets.get(kind, (float(self.burst), now))
                tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
                if tokens < 1.0:
                    self._buckets[kind] = (tokens, now)
                    self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                    raise structlog.DropEvent
                self._buckets[kind] = (tokens - 1.0, now)
            if self._suppressed:
                event["suppressed"] = self._suppressed
                self._suppressed = {}
        return event


def cap_values(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Cut every string value to :data:`MAX_VALUE_CHARS`, saying how much was cut."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            event[key] = f"{value[:MAX_VALUE_CHARS]}...[{len(value) - MAX_VALUE_CHARS} more chars]"
    return event


class _LibraryLogLimit(logging.Filter):
    """The same bound for the libraries' own logging (asyncio, aiomqtt, paho): per logger and
    message, through the structlog limiter, so that what is held back is counted there too."""

    def __init__(self, limit: EventRateLimit) -> None:
        super().__init__()
        self._limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        kind = f"{record.name}: {record.msg}"[:200]
        try:
            event = self._limit(None, record.levelname.lower(), {"event": kind})
        except structlog.DropEvent:
            return False
        held = event.get("suppressed")
        if held:
            record.msg = f"{record.getMessage()} (held back meanwhile: {held})"
            record.args = ()
        return True


class _LibraryLogFormat(logging.Formatter):
    """One line per record at most ~2 x MAX_VALUE_CHARS, credentials in URLs hidden."""

    def format(self, record: logging.LogRecord) -> str:
        text = redact_url(super().format(record))
        limit = 2 * MAX_VALUE_CHARS
        if len(text) > limit:
            text = f"{text[:limit]}...[{len(text) - limit} more chars]"
        return text


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


class QueuedStream:
    """A text stream for log lines that never blocks its writer: complete lines go to a bounded
    buffer, and a thread of its own writes them to ``stream``. The daemon logs through one, so
    that a journal (or a terminal, or a pipe) that stops reading cannot stall the safety loop.

    Beyond ``max_bytes`` waiting, lines are dropped whole and counted; once there is room again a
    ``log_lines_dropped`` line says how many. The thread starts at the first line: after
    :func:`devicectl.realtime.enter_realtime`, whose scheduling it then shares (a thread holding
    the interpreter's lock must not be preempted by an ordinary process). :meth:`close` (also
    at exit) writes what is waiting, for at most a second."""

    def __init__(self, stream: Any, *, max_bytes: int = 1 << 20) -> None:
        self._stream = stream
        self._max = max_bytes
        # each thread's line so far: the daemon logs from two (its loop, the control socket's),
        # structlog writes a line in two pieces and the libraries' logging in one, each under
        # a lock of its own, so a line may arrive between the pieces of another thread's
        self._partial = threading.local()
        self._waiting: list[str] = []
        self._size = 0
        self._dropped = 0
        self._closed = False
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def write(self, text: str) -> int:
        line = self._line()
        line.append(text)
        if text.endswith("\n"):
            self._commit(line)
        return len(text)

    def flush(self) -> None:
        line = self._line()
        if line:
            self._commit(line)

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    @property
    def dropped(self) -> int:
        return self._dropped

    def _line(self) -> list[str]:
        """The calling thread's line so far."""
        try:
            line: list[str] = self._partial.line
        except AttributeError:
            line = self._partial.line = []
        return line

    def _commit(self, pieces: list[str]) -> None:
        line = "".join(pieces)
        pieces.clear()
        with self._ready:
            if self._size + len(line) > self._max:
                self._dropped += line.count("\n") or 1
                return
            self._waiting.append(line)
            self._size += len(line)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._ready.notify()

    def _run(self) -> None:
        reported = 0
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                lines, self._waiting, self._size = self._waiting, [], 0
                dropped = self._dropped
                closing = self._closed
            if dropped != reported:
                lines.append(f'{{"event": "log_lines_dropped", "count": {dropped - reported}}}\n')
                reported = dropped
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):
                return  # stderr closed: nowhere left to say it
            if closing:
                return

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)


def configure_logging(
    *, json: bool | None = None, level: str = "info", queued: bool = False
) -> None:
    """Configure structlog once per process. ``json=None`` picks JSON unless stderr is a tty.
    ``queued``: lines go through a :class:`QueuedStream` (the daemon's: never blocks).

    The libraries' own ``logging`` records (warnings and above) go to stderr as well, under the
    same rate limit."""
    stderr: Any = QueuedStream(sys.stderr) if queued else sys.stderr
    limit = EventRateLimit()
    root = logging.getLogger()
    for handler in root.handlers:
        if any(isinstance(f, _LibraryLogLimit) for f in handler.filters):
            root.removeHandler(handler)  # configured again: one handler, the new limiter
    handler = logging.StreamHandler(stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_LibraryLogLimit(limit))
    handler.setFormatter(_LibraryLogFormat("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
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
            limit,  # first: an event held back costs nothing more
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,  # after the traceback is rendered: it may quote a URL too
            cap_values,  # after redact: a cut URL could hide its credentials from it
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stderr),
        cache_logger_on_first_use=False,
    )
