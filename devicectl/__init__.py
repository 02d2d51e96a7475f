"""devicectl: the device-side service of a clinical mesotherapy laser.

It talks to the laser's controller board (serial, TCP or the bundled simulator), supervises every
pulse against safety limits, records every treatment session in a tamper-evident log, and publishes
live telemetry over MQTT.
"""

from importlib.metadata import PackageNotFoundError, version

from devicectl.errors import (
    ConfigError,
    DevicectlError,
    DeviceRefused,
    LinkError,
    LinkLost,
    LogUnavailable,
    SafetyRefusal,
)

try:
    __version__ = version("devicectl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfigError",
    "DeviceRefused",
    "DevicectlError",
    "LinkError",
    "LinkLost",
    "LogUnavailable",
    "SafetyRefusal",
    "__version__",
]
