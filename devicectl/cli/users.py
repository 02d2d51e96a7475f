"""``devicectl users add|list|disable``: who may change a treatment (docs/users.md).

These edit ``DATA_DIR/users.json`` directly (mode 0600; the daemon reads it at every check, so a
change counts at once): run them as the daemon's user, or as root (the file is then given to the
data directory's owner). ``--data-dir`` defaults as the daemon's. A PIN is typed twice on a
terminal, or read from one line of standard input with ``--pin-stdin`` (scripts, the demo); it is
never an option. Exit codes: 0 done, 1 refused (an id taken, a PIN too short, an unsafe file),
2 usage.
"""

from __future__ import annotations

import getpass
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from devicectl.cli.app import ExitCode, users_app
from devicectl.users import MIN_PIN_LENGTH, Role, UserStore, UserStoreError

__all__ = ["users_add", "users_disable", "users_list"]

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        help="The daemon's data directory (default: as `devicectl run` uses).",
    ),
]


def _store(data_dir: Path | None) -> UserStore:
    if data_dir is None:
        from devicectl.config import load_settings
        from devicectl.errors import DevicectlError

        try:
            data_dir = load_settings(None).data_dir
        except DevicectlError as exc:
            typer.echo(f"devicectl users: {exc}", err=True)
            raise typer.Exit(ExitCode.USAGE) from None
    return UserStore.in_data_dir(data_dir)


def _read_pin(user_id: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        typer.echo("devicectl users add: no terminal for the PIN: use --pin-stdin", err=True)
        raise typer.Exit(ExitCode.USAGE)
    pin = getpass.getpass(f"New PIN for {user_id} (at least {MIN_PIN_LENGTH} characters): ")
    if getpass.getpass("The same PIN again: ") != pin:
        typer.echo("devicectl users add: the two PINs differ", err=True)
        raise typer.Exit(ExitCode.USAGE)
    return pin


@users_app.command("add")
def users_add(
    user_id: Annotated[str, typer.Argument(metavar="ID", help="The user id, e.g. OP-7.")],
    role: Annotated[Role, typer.Option("--role", help="operator or supervisor.")],
    pin_stdin: Annotated[
        bool, typer.Option("--pin-stdin", help="Read the PIN from one line of standard input.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Register a user with a role and a PIN (hashed with argon2id; never stored as typed).

    Example: devicectl users add OP-7 --role operator
    """
    store = _store(data_dir)
    pin = _read_pin(user_id, pin_stdin)
    try:
        user = store.add(user_id, role, pin)
    except UserStoreError as exc:
        typer.echo(f"devicectl users add: {exc}", err=True)
        raise typer.Exit(ExitCode.REFUSED) from None
    typer.echo(f"user {user.user_id} added as {user.role.value} in {store.path}")


@users_app.command("list")
def users_list(data_dir: DataDirOption = None) -> None:
    """List the registered users, their roles and whether they are active.

    Example: devicectl users list
    """
    store = _store(data_dir)
    try:
        users = store.load()
    except UserStoreError as exc:
        typer.echo(f"devicectl users list: {exc}", err=True)
        raise typer.Exit(ExitCode.REFUSED) from None
    table = Table("id", "role", "added", "status")
    for user in sorted(users.values(), key=lambda u: u.user_id):
        status = (
            "active"
            if user.active
            else f"disabled {_local(user.disabled_ns)}: {user.disabled_reason or ''}"
        )
        table.add_row(user.user_id, user.role.value, _local(user.created_ns), status)
    console = Console(width=None if sys.stdout.isatty() else 160)  # a pipe gets whole lines
    console.print(table)
    console.print(f"{len(users)} user(s) in {store.path}")


@users_app.command("disable")
def users_disable(
    user_id: Annotated[str, typer.Argument(metavar="ID", help="The user to disable.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the user file).")],
    data_dir: DataDirOption = None,
) -> None:
    """Disable a user: their requests are refused from now on. Users are never deleted, so
    that the records naming them keep their meaning.

    Example: devicectl users disable OP-7 --reason "left the clinic"
    """
    store = _store(data_dir)
    try:
        user = store.disable(user_id, reason)
    except UserStoreError as exc:
        typer.echo(f"devicectl users disable: {exc}", err=True)
        raise typer.Exit(ExitCode.REFUSED) from None
    typer.echo(f"user {user.user_id} disabled")


def _local(ns: int | None) -> str:
    if ns is None:
        return "—"
    return datetime.fromtimestamp(ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M")
