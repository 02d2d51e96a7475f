"""The ``devicectl`` Typer application and its command groups.

Each ``devicectl.cli.<area>`` module adds its commands to these objects; ``devicectl.cli`` imports
them all. Exit codes (docs/cli.md): 0 success, 1 refused, 2 usage error, 3 cannot reach the
daemon or device.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from devicectl import __version__

__all__ = [
    "ExitCode",
    "app",
    "config_app",
    "fault_app",
    "log_app",
    "params_app",
    "session_app",
    "tidy_help",
    "users_app",
    "version_lines",
    "wants_json",
]


def wants_json(as_json: bool) -> bool:
    """The one output rule of every command that prints a result: JSON with ``--json`` or when
    the output is not a terminal (a pipe, a file, a script), readable text on a terminal."""
    return as_json or not sys.stdout.isatty()


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3


def tidy_help(command: Any) -> None:
    """One placeholder style in every help text: nothing after a flag (typer would print
    ``<bool>``), an upper-case word after an option that takes a value (its declared ``metavar``,
    else its name), for the whole tree."""
    for param in getattr(command, "params", []):
        _tidy_param(param)
    if not getattr(command, "_devicectl_tidy", False):
        command._devicectl_tidy = True
        take_help_option = command.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = take_help_option(ctx)
            if option is not None:
                _tidy_param(option)  # --help is a flag too
            return option

        command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


def _no_type(ctx: Any) -> None:
    return None


def _tidy_param(param: Any) -> None:
    if param.param_type_name == "option" and (param.is_flag or param.count):
        param.metavar = ""
        if hasattr(param, "display_type_rich"):  # typer >= 0.2x: a type column of its own
            param.display_type_rich = _no_type
    elif param.param_type_name == "argument":
        if param.metavar is None:
            param.metavar = (param.name or "value").upper()
        if hasattr(param, "display_type_rich"):  # the metavar already names the value
            param.display_type_rich = _no_type
    elif param.metavar is None:
        param.metavar = (param.name or "value").upper()


class _Root(TyperGroup):
    """The ``devicectl`` group: its whole tree gets :func:`tidy_help` once it is built, and its
    own options (typer adds the completion ones later) whenever they are read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tidy_help(self)

    def get_params(self, ctx: Any) -> Any:
        params = super().get_params(ctx)
        for param in params:
            _tidy_param(param)
        return params


app = typer.Typer(
    name="devicectl",
    cls=_Root,
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


def version_lines() -> list[str]:
    """What ``devicectl --version`` prints: the software and the interface versions it speaks."""
    from protocols import PROTO_VERSION
    from protocols.mqtt import SCHEMA_VERSION

    return [
        f"devicectl {__version__}",
        f"device protocol: ICD v{PROTO_VERSION} (docs/protocol.md)",
        f"MQTT telemetry: schema v{SCHEMA_VERSION} (docs/mqtt.md)",
    ]


def _version(value: bool) -> None:
    if value:
        for line in version_lines():
            typer.echo(line)
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the software, device protocol and telemetry schema versions.",
        ),
    ] = False,
) -> None:
    """Device-side service of a clinical mesotherapy laser, and its tools."""
