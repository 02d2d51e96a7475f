"""The ``devicectl`` Typer application and its command groups.

Each ``devicectl.cli.<area>`` module adds its commands to these objects; ``devicectl.cli`` imports
them all. Exit codes (docs/cli.md): 0 success, 1 refused, 2 usage error, 3 cannot reach the
daemon or device.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated

import typer

from devicectl import __version__

__all__ = [
    "ExitCode",
    "app",
    "config_app",
    "fault_app",
    "log_app",
    "params_app",
    "session_app",
    "users_app",
]


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3


app = typer.Typer(
    name="devicectl",
    help="Device-side service of a clinical mesotherapy laser, and its tools.",
    epilog="Example: devicectl demo    (a whole treatment on the simulator, in a minute)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
session_app = typer.Typer(
    help="Treatment sessions: start, zone, end, note, reaction, adverse-event, list, show, export.",
    epilog="Example: devicectl session list --since 2026-11-01",
)
params_app = typer.Typer(
    help="Laser parameters.", epilog="Example: devicectl params set --rate-hz 20"
)
fault_app = typer.Typer(
    help="Latched safety breaches.",
    epilog="Example: devicectl fault ack --user SUP-1 --reason-code handpiece_checked "
    '--reason "handpiece checked and recalibrated"',
)
log_app = typer.Typer(
    help="The tamper-evident session log.",
    epilog="Example: devicectl log verify --db /var/lib/devicectl/sessions.db",
)
config_app = typer.Typer(
    help="Configuration.",
    epilog="Example: devicectl config show --config /etc/devicectl/devicectl.toml",
)
users_app = typer.Typer(
    help="Registered users and their roles (operator, supervisor).",
    epilog="Example: devicectl users add OP-7 --role operator",
)
app.add_typer(session_app, name="session")
app.add_typer(users_app, name="users")
app.add_typer(params_app, name="params")
app.add_typer(fault_app, name="fault")
app.add_typer(log_app, name="log")
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"devicectl {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Device-side service of a clinical mesotherapy laser, and its tools."""
