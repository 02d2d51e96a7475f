"""Commands over MQTT: only ``cmd/stop`` is obeyed (stopping is always safe).

Every other ``{base}/cmd/...`` is refused (audited, alerted), retained or not: a retained
``cmd/arm`` left on the broker is still somebody asking the laser to do something it never does
from MQTT, and deserves the same record. A *retained* ``cmd/stop`` is ignored (audited as
ignored): it is stale by definition, and obeying it would stop the laser at every reconnection,
long after anyone meant it. The payload is never parsed, so no payload can crash anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["CommandAction", "CommandDecision", "classify_command"]


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
