"""Commands over MQTT: only ``cmd/stop`` is obeyed (stopping is always safe).

Every other ``{base}/cmd/...`` is refused (audited, alerted), retained or not: a retained
``cmd/arm`` left on the broker is still somebody asking the laser to do something it never does
from MQTT, and deserves the same record. A *retained* ``cmd/stop`` is ignored (audited as
ignored): it is stale by definition, and obeying it would stop the laser at every reconnection,
long after anyone meant it. The payload is never parsed, so no payload can crash anything.

Whatever arrives, refusals cost a bounded amount: names are capped (:func:`cap_name`) and refusals
are aggregated by :class:`CommandRefusals` into one report per burst (one audit record, one alert,
one log line, each with the count), so a flood of 30,000 ``cmd/<60,000 characters>`` costs a few
records of a few hundred bytes, not a record, an alert and a log line per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "MAX_NAME_CHARS",
    "CommandAction",
    "CommandDecision",
    "CommandRefusals",
    "RefusedBurst",
    "cap_name",
    "classify_command",
]

MAX_NAME_CHARS = 64  # of a command name as logged, audited and alerted
_MAX_NAMES = 8  # distinct names a burst report lists; the rest are only counted


def cap_name(name: str, limit: int = MAX_NAME_CHARS) -> str:
    """``name`` cut to ``limit`` characters, with a marker saying how many were cut."""
    if len(name) <= limit:
        return name
    return f"{name[:limit]}...[{len(name) - limit} more chars]"


class CommandAction(Enum):
    STOP = "stop"
    REFUSE = "refuse"
    IGNORE = "ignore"  # audited as ignored when ``command`` is a command of this device


@dataclass(frozen=True, slots=True)
class CommandDecision:
    action: CommandAction
    command: str  # the topic below ``{base}/cmd/``; the whole topic if not under it
    reason: str = ""
    ours: bool = True  # the topic is under this device's ``{base}/cmd/``


def classify_command(base: str, topic: str, *, retained: bool) -> CommandDecision:
    """What to do with a message received on ``topic`` (expected under ``{base}/cmd/``)."""
    prefix = f"{base}/cmd/"
    if not topic.startswith(prefix):
        return CommandDecision(
            CommandAction.IGNORE, topic, "not a command topic of this device", ours=False
        )
    command = topic[len(prefix) :]
    if command == "stop":
        if retained:
            return CommandDecision(
                CommandAction.IGNORE, command, "a retained cmd/stop is stale: not obeyed"
            )
        return CommandDecision(CommandAction.STOP, command)
    return CommandDecision(CommandAction.REFUSE, command, "only cmd/stop is accepted")


@dataclass(frozen=True, slots=True)
class RefusedBurst:
    """Refused commands aggregated over one burst (see :class:`CommandRefusals`)."""

    count: int
    commands: tuple[str, ...]  # distinct names (capped), in order of arrival, at most 8
    unlisted: int  # refusals whose name is not among ``commands``
    retained: int  # of them, retained messages on the broker
    payload_bytes: int
    first_at: float  # the caller's clock
    last_at: float

    def audit_detail(self) -> dict[str, Any]:
        """The session log's record of the burst: bounded whatever the names were."""
        return {
            "command": self.commands[0],
            "count": self.count,
            "commands": list(self.commands),
            "unlisted": self.unlisted,
            "retained": self.retained,
            "bytes": self.payload_bytes,
            "over_s": round(self.last_at - self.first_at, 3),
        }

    def message(self) -> str:
        """The alert's one line."""
        if self.count == 1:
            head = f"MQTT command {self.commands[0]!r} refused"
        else:
            names = ", ".join(repr(c) for c in self.commands)
            more = f" and {self.unlisted} more" if self.unlisted else ""
            head = f"{self.count} MQTT commands refused ({names}{more})"
        tail = ": only cmd/stop is accepted"
        if self.retained:
            tail += " (retained messages on the broker: clear them)"
        return head + tail


@dataclass(slots=True)
class CommandRefusals:
    """Aggregates refused commands into bursts; no I/O, no clock of its own.

    A burst opens with a refusal when none is pending (:meth:`add` returns True) and the
    caller closes it with :meth:`take` ``window_s`` later: every refusal in between joins it.
    So a flood of any length and any names gives at most one report per ``window_s``, a lone
    refusal is reported ``window_s`` after it arrived, and a report's size is bounded (names
    capped to :data:`MAX_NAME_CHARS`, at most 8 listed, the rest counted).
    """

    window_s: float = 1.0
    _count: int = 0
    _names: list[str] = field(default_factory=list)
    _unlisted: int = 0
    _retained: int = 0
    _bytes: int = 0
    _first_at: float = 0.0
    _last_at: float = 0.0

    @property
    def pending(self) -> int:
        """Refusals waiting to be reported."""
        return self._count

    def add_unread(self, count: int, payload_bytes: int, *, now: float) -> bool:
        """Count ``count`` commands dropped unread (a flood beyond what is read): refused,
        unnamed; True when they opened a burst."""
        self._unlisted += count
        return self._join(count, payload_bytes, now)

    def add(self, command: str, payload_bytes: int, *, retained: bool, now: float) -> bool:
        """Count one refusal; True when it opened a burst (due at ``now + window_s``)."""
        self._retained += retained
        name = cap_name(command)
        if name not in self._names:
            if len(self._names) < _MAX_NAMES:
                self._names.append(name)
            else:
                self._unlisted += 1
        return self._join(1, payload_bytes, now)

    def _join(self, count: int, payload_bytes: int, now: float) -> bool:
        """``count`` refusals join the burst; True when they opened it."""
        opened = self._count == 0
        if opened:
            self._first_at = now
        self._count += count
        self._last_at = now
        self._bytes += payload_bytes
        return opened

    def take(self) -> RefusedBurst | None:
        """The burst so far, which closes it; None when nothing is pending."""
        if not self._count:
            return None
        burst = RefusedBurst(
            count=self._count,
            commands=tuple(self._names),
            unlisted=self._unlisted,
            retained=self._retained,
            payload_bytes=self._bytes,
            first_at=self._first_at,
            last_at=self._last_at,
        )
        self._count = self._unlisted = self._retained = self._bytes = 0
        self._names = []
        return burst
