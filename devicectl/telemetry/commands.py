"""Commands over MQTT: only ``cmd/stop`` is obeyed (stopping is always safe).

Everything else under ``{base}/cmd/`` is refused (audited, alerted). A retained command is
ignored: a stale retained ``cmd/stop`` would otherwise stop the laser at every reconnection, long
after anyone meant it. The payload is never parsed, so no payload can crash anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["CommandAction", "CommandDecision", "classify_command"]


class CommandAction(Enum):
    STOP = "stop"
    REFUSE = "refuse"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class CommandDecision:
    action: CommandAction
    command: str
    reason: str = ""


def classify_command(base: str, topic: str, *, retained: bool) -> CommandDecision:
    """What to do with a message received on ``topic`` (expected under ``{base}/cmd/``)."""
    prefix = f"{base}/cmd/"
    if not topic.startswith(prefix):
        return CommandDecision(CommandAction.IGNORE, topic, "not a command topic of this device")
    command = topic[len(prefix) :]
    if retained:
        return CommandDecision(CommandAction.IGNORE, command, "retained commands are not obeyed")
    if command == "stop":
        return CommandDecision(CommandAction.STOP, command)
    return CommandDecision(CommandAction.REFUSE, command, "only cmd/stop is accepted")
