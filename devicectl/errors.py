"""The application's errors. All derive from :class:`DevicectlError`, rooted in ``protocols``.

A :class:`SafetyRefusal` is never retried; a :class:`LinkError` is (by reconnecting). Facts travel
as attributes so that the CLI, the control socket and telemetry can report them without parsing.
"""

from __future__ import annotations

from typing import ClassVar

from protocols.bounded import printable
from protocols.errors import DevicectlError

__all__ = [
    "ConfigError",
    "DeviceRefused",
    "DevicectlError",
    "LinkError",
    "LinkLost",
    "LogUnavailable",
    "SafetyRefusal",
]


class ConfigError(DevicectlError):
    """A configuration or policy value is not allowed.

    The message is one line of at most a few hundred characters whatever the input: the value and
    the reason are clipped, and any control or invisible character in them is escaped.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(
            f"config {printable(key, 80)}={printable(repr(value), 120)} is not allowed: "
            f"{printable(allowed, 240)}"
        )


class SafetyRefusal(DevicectlError):
    """A safety limit forbids the request. Never retried.

    ``relation`` says how ``value`` stands to ``bound``: ``above`` (the default: a maximum was
    exceeded), ``below`` (a minimum), ``reached`` (a budget is spent), ``not_offered`` (not one of
    the allowed values) or ``state`` (no numbers to compare: ``detail`` says it all).
    """

    _WORDS: ClassVar[dict[str, str]] = {
        "above": "exceeds the limit",
        "below": "is below the minimum",
        "reached": "has reached the limit",
        "not_offered": "is not offered; the largest is",
    }

    def __init__(
        self,
        rule: str,
        value: float,
        bound: float,
        unit: str = "",
        detail: str = "",
        *,
        relation: str = "above",
    ) -> None:
        self.rule, self.value, self.bound, self.unit, self.detail = rule, value, bound, unit, detail
        self.relation = relation
        if relation == "state":
            super().__init__(f"refused by {rule}: {detail}")
            return
        sep = " " if unit else ""
        words = self._WORDS[relation]
        text = f"refused by {rule}: {value:g}{sep}{unit} {words} {bound:g}{sep}{unit}"
        super().__init__(f"{text} ({detail})" if detail else text)


class DeviceRefused(DevicectlError):
    """The device answered a command with NAK."""

    def __init__(self, command: str, reason: str) -> None:
        self.command, self.reason = command, reason
        super().__init__(f"the device refused {command}: {reason}")


class LinkError(DevicectlError):
    """The byte link to the device failed (port vanished, peer closed). Retried by reconnecting."""


class LinkLost(LinkError):
    """The device stopped answering (no reply after every retry, or no STATUS for 3 periods)."""


class LogUnavailable(DevicectlError):
    """The session log cannot be written: no log, no laser."""
