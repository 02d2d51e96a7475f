"""The clinic dashboard: every device's telemetry, live in a browser.

A Starlette app served by uvicorn subscribes to ``{prefix}/#`` on the broker (docs/mqtt.md),
aggregates the messages into a per-device view (:class:`Fleet`, sans-I/O) and pushes changes to
every open page with Server-Sent Events: a snapshot on connect, then deltas. Read-only, except a
separate "Stop emission" button that publishes ``cmd/stop``, shown only when the dashboard has
credentials allowed to send it.

    async with DashboardServer(Dashboard(DashboardConfig(mqtt_url=...)), ("0.0.0.0", 8080)):
        ...
"""

from devicectl.dashboard.app import Dashboard, DashboardConfig, allowed_hosts_for, create_app
from devicectl.dashboard.fleet import Fleet, Update
from devicectl.dashboard.hub import UpdateHub
from devicectl.dashboard.limits import DisplayLimits, display_limits, load_display_limits
from devicectl.dashboard.mqtt import Backoff, StopFailed, TelemetrySubscriber, publish_stop
from devicectl.dashboard.server import DashboardServer, parse_listen

__all__ = [
    "Backoff",
    "Dashboard",
    "DashboardConfig",
    "DashboardServer",
    "DisplayLimits",
    "Fleet",
    "StopFailed",
    "TelemetrySubscriber",
    "Update",
    "UpdateHub",
    "allowed_hosts_for",
    "create_app",
    "display_limits",
    "load_display_limits",
    "parse_listen",
    "publish_stop",
]
