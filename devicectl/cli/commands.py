"""Imports every command module so that each registers its commands on the app."""

from devicectl.cli import (
    control,  # noqa: F401
    dashboard,  # noqa: F401
    demo,  # noqa: F401
    logkey,  # noqa: F401
    recorder,  # noqa: F401
    records,  # noqa: F401
    reference,  # noqa: F401
    sim,  # noqa: F401
    telemetry,  # noqa: F401
    users,  # noqa: F401
)
