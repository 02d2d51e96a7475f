"""``devicectl dashboard``: serve the clinic dashboard (every device's telemetry, live).

Prints one stdout line, the page's URL, once it is listening; runs until SIGTERM or SIGINT (exit
0). A broker that is down is not fatal: the page says so and the dashboard keeps retrying.
Exit codes: 0 stopped by a signal, 2 usage or configuration error (one line naming the cause).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from devicectl.cli.app import ExitCode, app

__all__ = ["dashboard"]


def _given_path(path: Path | None, flag: str) -> Path | None:
    """``path`` unless it is empty: ``--policy ""`` is a mistake, not the current directory."""
    from devicectl.errors import ConfigError

    if path is not None and str(path) in {"", "."}:
        raise ConfigError(flag, str(path), "a file path (an empty one is refused)")
    return path


@app.command("dashboard")
def dashboard(
    mqtt: Annotated[
        str,
        typer.Option(
            "--mqtt",
            metavar="URL",
            envvar="DEVICECTL_DASHBOARD_MQTT",
            help="Broker to watch: mqtt://[USER:PASS@]HOST[:PORT] or mqtts://...",
        ),
    ] = "mqtt://127.0.0.1:1883",
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            envvar="DEVICECTL_DASHBOARD_LISTEN",
            help="Where to serve the page; 0.0.0.0:8080 to reach it from the clinic's tablets.",
        ),
    ] = "127.0.0.1:8080",
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix.")] = "lasers",
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            metavar="FILE",
            help="Clinic policy TOML the zone bars are drawn against (default: the packaged one).",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca", metavar="FILE", help="CA file for mqtts:// (else DEVICECTL_MQTT__CA_FILE)."
        ),
    ] = None,
    stop_username: Annotated[
        str | None,
        typer.Option(
            "--stop-username",
            metavar="U",
            envvar="DEVICECTL_DASHBOARD_STOP_USERNAME",
            help="Broker user allowed to publish cmd/stop; with --stop-password, shows the "
            "Stop emission button.",
        ),
    ] = None,
    stop_password: Annotated[
        str | None,
        typer.Option(
            "--stop-password",
            metavar="P",
            envvar="DEVICECTL_DASHBOARD_STOP_PASSWORD",
            help="Its password (prefer the environment variable: arguments are visible in ps).",
        ),
    ] = None,
    title: Annotated[str, typer.Option("--title", help="The page's title.")] = "Clinic lasers",
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="HOST[:PORT]",
            help="A host name browsers use to reach the page (repeatable); the bound address "
            "is always allowed. Requests naming any other Host or Origin are refused.",
        ),
    ] = None,
    max_browsers: Annotated[
        int,
        typer.Option(
            "--max-browsers",
            metavar="N",
            help="Open pages served at once; when full, a page that does not show it reads "
            "makes room for a new one.",
        ),
    ] = 100,
    max_browsers_per_address: Annotated[
        int,
        typer.Option(
            "--max-browsers-per-address",
            metavar="N",
            help="Open pages served at once to one client address (behind a reverse proxy every "
            "page has the proxy's address: raise it to --max-browsers).",
        ),
    ] = 20,
    max_devices: Annotated[
        int,
        typer.Option(
            "--max-devices", metavar="N", help="Devices tracked (the least recently heard goes)."
        ),
    ] = 500,
    history_db: Annotated[
        str | None,
        typer.Option(
            "--history-db",
            metavar="URL",
            envvar="DEVICECTL_RECORDER_DB",
            help="The fleet recorder's database (postgresql://... or sqlite:///...): serves the "
            "session history at /history.",
        ),
    ] = None,
) -> None:
    """Serve the clinic dashboard: every device live, alerts impossible to miss.

    Example: devicectl dashboard --mqtt mqtt://broker.clinic.lan --listen 0.0.0.0:8080
    """
    from devicectl.extras import MissingExtra, require_extra

    try:
        require_extra("dashboard", "devicectl dashboard")
    except MissingExtra as exc:
        typer.echo(f"devicectl dashboard: {exc}", err=True)
        raise typer.Exit(int(ExitCode.REFUSED)) from None
    from devicectl.dashboard import (
        Dashboard,
        DashboardConfig,
        DashboardServer,
        load_display_limits,
        parse_listen,
    )
    from devicectl.errors import ConfigError
    from devicectl.logs import configure_logging

    try:
        address = parse_listen(listen)
        config = DashboardConfig(
            mqtt_url=mqtt,
            ca_file=ca,
            prefix=prefix,
            stop_username=stop_username,
            stop_password=stop_password,
            limits=load_display_limits(_given_path(policy, "--policy")),
            title=title,
            allowed_hosts=tuple(allow_host or ()),
            max_browsers=max_browsers,
            max_browsers_per_address=max_browsers_per_address,
            max_devices=max_devices,
            history_db=history_db,
        )
        server = DashboardServer(Dashboard(config), address)
    except ConfigError as exc:
        typer.echo(f"devicectl dashboard: {exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from None
    configure_logging()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with server:
            typer.echo(server.url)
            await stop.wait()

    try:
        asyncio.run(serve())
    except ConfigError as exc:
        typer.echo(f"devicectl dashboard: {exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from exc
