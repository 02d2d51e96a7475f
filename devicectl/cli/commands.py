"""Imports every command module so that each registers its commands on the app."""

from devicectl.cli import records  # noqa: F401
from devicectl.cli import sim  # noqa: F401
from devicectl.cli import telemetry  # noqa: F401
