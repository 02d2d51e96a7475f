"""The software laser controller board: its state machine, physics, fault injection and runner.

:class:`Board` is the device end of ICD v1, sans-I/O (bytes and time in, bytes out);
:class:`BoardRunner` drives one in real time inside an asyncio loop, for the servers and for
in-process links.
"""

from simulator.board import (
    BACKLOG_LIMIT_US,
    DEFAULT_STATUS_PERIOD_MS,
    FAULT_NAMES,
    SPOTS_UM,
    Board,
    BoardInputError,
    LinkCounters,
    period_us,
)
from simulator.physics import HEAD_CLEAR_C, HEAD_CUTOFF_C, ThermalModel, ThermalState
from simulator.runner import BoardRunner, monotonic_us

__all__ = [
    "BACKLOG_LIMIT_US",
    "DEFAULT_STATUS_PERIOD_MS",
    "FAULT_NAMES",
    "HEAD_CLEAR_C",
    "HEAD_CUTOFF_C",
    "SPOTS_UM",
    "Board",
    "BoardInputError",
    "BoardRunner",
    "LinkCounters",
    "ThermalModel",
    "ThermalState",
    "monotonic_us",
    "period_us",
]
