"""``devicectl schema`` (JSON Schemas of the MQTT payloads) and ``devicectl watch`` (live view)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import typer

from devicectl.cli.app import ExitCode, app
from devicectl.errors import ConfigError
from protocols.mqtt import DEFAULT_PREFIX

# The MQTT client loads when a command runs, not when `devicectl` starts.

__all__ = ["schema", "watch"]


@app.command()
def schema(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Write one <topic>.schema.json per topic into this directory.",
        ),
    ] = None,
) -> None:
    """Export the JSON Schema of every MQTT telemetry payload (docs/mqtt.md).

    Example: devicectl schema --out ./schemas
    """
    from protocols.mqtt import dumps_schema, json_schemas

    schemas = json_schemas()
    if out is None:
        for name, body in schemas.items():
            typer.echo(f"# {name}")
            typer.echo(dumps_schema(body), nl=False)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, body in schemas.items():
            (out / f"{name}.schema.json").write_text(dumps_schema(body))
    except OSError as exc:
        typer.echo(f"error: cannot write schemas to {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from exc
    typer.echo(f"wrote {len(schemas)} schemas to {out}")


@app.command()
def watch(
    mqtt: Annotated[
        str,
        typer.Option("--mqtt", metavar="URL", help="Broker URL, mqtt://HOST[:PORT] or mqtts://..."),
    ] = "mqtt://127.0.0.1:1883",
    prefix: Annotated[
        str, typer.Option("--prefix", metavar="PREFIX", help="Topic prefix.")
    ] = DEFAULT_PREFIX,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca", metavar="FILE", help="CA file for mqtts:// (else DEVICECTL_MQTT__CA_FILE)."
        ),
    ] = None,
    lines: Annotated[
        bool | None,
        typer.Option(
            "--lines/--table",
            help="One line per event (for pipes and logs), or a table redrawn in place "
            "[default: lines unless stdout is a terminal].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Live view of every device on the broker: availability, state, session, pulses, rate and
    temperatures, alerts; unreadable messages counted, never shown as devices.

    Example: devicectl watch --mqtt mqtt://127.0.0.1:1883 --lines
    """
    import sys

    import aiomqtt

    from devicectl.telemetry.config import parse_broker_url, tls_context_for
    from devicectl.telemetry.watch import watch as watch_fleet

    try:
        address = parse_broker_url(mqtt)
        tls = tls_context_for(mqtt, ca)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from exc
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                watch_fleet(
                    address.host,
                    address.port,
                    prefix=prefix,
                    tls=tls,
                    username=address.username,
                    password=address.password,
                    lines=lines if lines is not None else not sys.stdout.isatty(),
                )
            )
    except aiomqtt.MqttError as exc:
        typer.echo(
            f"error: cannot reach the MQTT broker at {address.host}:{address.port}: {exc}", err=True
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
