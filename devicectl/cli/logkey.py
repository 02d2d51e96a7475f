"""``devicectl log key`` and ``devicectl log rotate-key``: the session log's signing key.

The key is found as the daemon finds it (:mod:`devicectl.sessionlog.keys`): ``--key-file``
(the ``[checkpoints] key_file`` setting), else the systemd credential ``devicectl-log-key``,
else ``DATA_DIR/log-key.pem``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from devicectl.cli.app import ExitCode, log_app
from devicectl.cli.records import DataDirOption, DbOption
from devicectl.errors import LogUnavailable
from devicectl.sessionlog import store

__all__ = ["key", "rotate_key"]

KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        metavar="FILE",
        help="The signing key (default: as the daemon finds it: the systemd credential "
        "devicectl-log-key, else DATA_DIR/log-key.pem).",
    ),
]


def _fail(command: str, message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"devicectl {command}: {message}", err=True)
    return typer.Exit(int(code))


def _chain_key(db: Path) -> tuple[str, str] | None:
    """(key id, base64 public key) of the key the log's last log_key record introduced."""
    from devicectl.sessionlog.checkpoint import KEY_KIND

    if not db.is_file():
        return None
    conn = store.connect(db, readonly=True)
    try:
        row = conn.execute(
            "SELECT body FROM records WHERE kind = ? ORDER BY seq DESC LIMIT 1", (KEY_KIND,)
        ).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    try:
        body = json.loads(row[0])
    except (ValueError, TypeError, RecursionError):
        body = None
    fields = [
        body.get(name) if isinstance(body, dict) else None for name in ("key_id", "public_key")
    ]
    if not all(
        isinstance(value, str) and value.isascii() and value.isprintable() for value in fields
    ):
        raise LogUnavailable(
            f"the last log_key record in {db} is malformed (see devicectl log verify)"
        )
    return str(fields[0]), str(fields[1])


@log_app.command("key")
def key(
    key_file: KeyFileOption = None,
    data_dir: DataDirOption = None,
    db: DbOption = None,
    pem: Annotated[bool, typer.Option("--pem", help="Print the public key as PEM.")] = False,
) -> None:
    """Print the public key that signs the session log's checkpoints, and its key id, for a
    clinic to enrol (keep it off the device; `log verify --key` takes it back). Reads the key
    file when it can, else the key the log itself names.

    Example: devicectl log key --data-dir /var/lib/devicectl
    """
    from devicectl.sessionlog.keys import DeviceKey, SigningKeyError, key_source

    directory = data_dir if data_dir is not None else store.default_data_dir()
    source = key_source(key_file, directory, os.environ)
    if source.path.is_file():
        try:
            data = source.path.read_bytes()
            device_key = DeviceKey.from_pem(data, f"signing key {source.path}")
        except OSError as exc:
            raise _fail(
                "log key", f"cannot read {source.path}: {exc.strerror}", ExitCode.REFUSED
            ) from None
        except SigningKeyError as exc:
            raise _fail("log key", str(exc), ExitCode.REFUSED) from None
        typer.echo(f"key id:     {device_key.key_id}")
        typer.echo(f"public key: {device_key.public_b64}")
        typer.echo(f"from:       {source.path} ({source.origin})")
        if pem:
            typer.echo(device_key.public_pem(), nl=False)
        return
    db_path = db if db is not None else store.default_db_path(directory)
    try:
        named = _chain_key(db_path)
    except LogUnavailable as exc:
        raise _fail("log key", str(exc), ExitCode.REFUSED) from None
    if named is None:
        raise _fail(
            "log key",
            f"no signing key at {source.path} and no key named in {db_path}: the daemon "
            "generates it at its first start",
            ExitCode.USAGE,
        )
    typer.echo(f"key id:     {named[0]}")
    typer.echo(f"public key: {named[1]}")
    typer.echo(f"from:       {db_path} (the key the log names; the key file was not found)")


@log_app.command("rotate-key")
def rotate_key(key_file: KeyFileOption = None, data_dir: DataDirOption = None) -> None:
    """Stage a new signing key. The daemon introduces it at its next start, in a checkpoint
    signed with the current key, then signs with it and replaces the old key file; a log whose
    key changed any other way is flagged by `log verify`. Enrol the new key id it prints.

    Example: devicectl log rotate-key --data-dir /var/lib/devicectl
    """
    from devicectl.sessionlog.keys import SigningKeyError, key_source, stage_rotation

    directory = data_dir if data_dir is not None else store.default_data_dir()
    source = key_source(key_file, directory, os.environ)
    try:
        new = stage_rotation(source)
    except SigningKeyError as exc:
        raise _fail("log rotate-key", str(exc), ExitCode.REFUSED) from None
    typer.echo(f"new key id:     {new.key_id}")
    typer.echo(f"new public key: {new.public_b64}")
    typer.echo(
        f"staged at {source.pending}: the daemon introduces it at its next start "
        "(restart it: systemctl restart devicectl)"
    )
