"""MQTT telemetry (docs/mqtt.md): a publisher behind a durable outbox, MQTT commands
(``cmd/stop`` only) and the ``devicectl watch`` fleet view.

Topics and payload models live in :mod:`protocols.mqtt` (sans-I/O); this package does the I/O.
"""

from devicectl.telemetry.commands import (
    CommandAction,
    CommandDecision,
    CommandRefusals,
    RefusedBurst,
    classify_command,
)
from devicectl.telemetry.config import BrokerAddress, TelemetryConfig, parse_broker_url
from devicectl.telemetry.outbox import Outbox, OutboxRow, OverflowReport
from devicectl.telemetry.publisher import Telemetry, TelemetryStats
from devicectl.telemetry.watch import DeviceView, FleetView, watch

__all__ = [
    "BrokerAddress",
    "CommandAction",
    "CommandDecision",
    "CommandRefusals",
    "DeviceView",
    "FleetView",
    "Outbox",
    "OutboxRow",
    "OverflowReport",
    "RefusedBurst",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryStats",
    "classify_command",
    "parse_broker_url",
    "watch",
]
