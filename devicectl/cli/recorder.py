"""``devicectl recorder`` (the fleet recorder) and ``devicectl fleet sessions|session|course``
(the fleet's history from the recorder's database). See docs/recorder.md.

Exit codes (docs/cli.md): 0 done, 1 not found (no such session), 2 usage or configuration error,
3 cannot reach the database.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from devicectl.cli.app import ExitCode, app

__all__ = ["fleet_app", "recorder"]

fleet_app = typer.Typer(
    help="The fleet's history, from the recorder's database: sessions, one session, a course.",
    epilog="Example: devicectl fleet sessions --db postgresql://recorder@db.clinic.lan/fleet",
)
app.add_typer(fleet_app, name="fleet")

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        metavar="URL",
        envvar="DEVICECTL_RECORDER_DB",
        help="postgresql://USER@HOST/DB, or sqlite:///PATH (the embedded default).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_DEFAULT_DB = "sqlite:///./recorder.sqlite"


def _fail(command: str, message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"devicectl {command}: {message}", err=True)
    return typer.Exit(int(code))


@app.command("recorder")
def recorder(
    mqtt: Annotated[
        str,
        typer.Option(
            "--mqtt",
            metavar="URL",
            envvar="DEVICECTL_RECORDER_MQTT",
            help="Broker: mqtt://[USER:PASS@]HOST[:PORT] or mqtts://...",
        ),
    ] = "mqtt://127.0.0.1:1883",
    db: DbOption = _DEFAULT_DB,
    group: Annotated[
        str,
        typer.Option(
            "--group",
            help="Shared-subscription group: recorders in one group split the fleet's messages.",
        ),
    ] = "devicectl-recorders",
    client_id: Annotated[
        str | None,
        typer.Option(
            "--client-id",
            help="MQTT client id; keep it stable across restarts (the broker keeps the "
            "session's unacknowledged messages under it). Default: devicectl-recorder-HOSTNAME.",
        ),
    ] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix.")] = "lasers",
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="5 (shared subscription, course replies) or 3.1.1 (a broker without MQTT 5: "
            "one recorder, no course replies).",
        ),
    ] = "5",
    ca: Annotated[
        Path | None,
        typer.Option("--ca", metavar="FILE", help="CA file for mqtts:// (else DEVICECTL_MQTT_CA)."),
    ] = None,
) -> None:
    """Record every device's telemetry into the database, exactly once, until SIGTERM.

    Example: devicectl recorder --mqtt mqtt://broker.clinic.lan --db postgresql://recorder@db/fleet
    """
    from devicectl.errors import ConfigError
    from devicectl.logs import configure_logging
    from devicectl.recorder import Recorder, RecorderConfig, StoreUnavailable

    if protocol not in ("5", "3.1.1"):
        raise _fail("recorder", f"--protocol {protocol}: use 5 or 3.1.1", ExitCode.USAGE)
    try:
        config = RecorderConfig(
            mqtt_url=mqtt,
            db_url=db,
            group=group,
            prefix=prefix,
            ca_file=ca,
            protocol="5" if protocol == "5" else "3.1.1",
        )
        if client_id is not None:
            config = replace(config, client_id=client_id)
    except ConfigError as exc:
        raise _fail("recorder", str(exc), ExitCode.USAGE) from exc
    configure_logging()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with Recorder(config):
            await stop.wait()

    try:
        asyncio.run(serve())
    except ConfigError as exc:
        raise _fail("recorder", str(exc), ExitCode.USAGE) from exc
    except StoreUnavailable as exc:
        raise _fail("recorder", str(exc), ExitCode.UNREACHABLE) from exc


def _run_query(command: str, db: str, query: Any) -> Any:
    from devicectl.errors import ConfigError
    from devicectl.recorder import StoreUnavailable, open_store

    async def run() -> Any:
        store = await open_store(db, migrate=False)
        async with store:
            return await query(store)

    try:
        return asyncio.run(run())
    except ConfigError as exc:
        raise _fail(command, str(exc), ExitCode.USAGE) from exc
    except StoreUnavailable as exc:
        raise _fail(command, str(exc), ExitCode.UNREACHABLE) from exc
    except Exception as exc:  # a database without the recorder's tables, and the like
        if type(exc).__module__.startswith(("psycopg", "sqlite3")):
            raise _fail(command, f"{db}: {str(exc).splitlines()[0]}", ExitCode.UNREACHABLE) from exc
        raise


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def _short(key: str | None) -> str:
    return "-" if key is None else (key[:12] + "…" if len(key) > 16 else key)


@fleet_app.command("sessions")
def fleet_sessions(
    db: DbOption = _DEFAULT_DB,
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    patient: Annotated[
        str | None, typer.Option("--patient", help="Only this patient key (the pseudonym).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="DATE", help="Started on or after.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="DATE", help="Started before.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 200,
    as_json: JsonOption = False,
) -> None:
    """Sessions across the fleet, newest first.

    Example: devicectl fleet sessions --since 2026-11-01 --db postgresql://recorder@db/fleet
    """
    from devicectl.recorder import queries

    rows = _run_query(
        "fleet sessions",
        db,
        lambda store: queries.list_sessions(
            store, device=device, patient=patient, since=since, until=until, limit=limit
        ),
    )
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no sessions recorded")
        return
    _table(
        [
            [
                r.started[:19].replace("T", " "),
                r.device,
                r.session,
                _short(r.patient),
                r.operator or "-",
                str(r.pulses),
                "open" if r.ended is None else r.ended[11:19],
            ]
            for r in rows
        ],
        ["started (UTC)", "device", "session", "patient", "operator", "pulses", "ended"],
    )


@fleet_app.command("session")
def fleet_session(
    device: Annotated[str, typer.Argument(help="The device id (its topic level).")],
    session: Annotated[str, typer.Argument(help="The session id on that device.")],
    db: DbOption = _DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """One session as recorded: summary, events, alerts, pulses per zone.

    Example: devicectl fleet session laser-305419896 12 --db sqlite:///recorder.sqlite
    """
    from devicectl.recorder import queries

    detail = _run_query(
        "fleet session", db, lambda store: queries.session_detail(store, device, session)
    )
    if detail is None:
        raise _fail("fleet session", f"no session {session} of {device} recorded", ExitCode.REFUSED)
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    for key in queries.SESSION_FACTS:
        typer.echo(f"{key:16} {detail[key] if detail[key] is not None else '-'}")
    typer.echo("zones:")
    for zone in detail["zones"]:
        typer.echo(
            f"  {zone['zone'] or '-':12} {zone['pulses']} pulses, {zone['energy_uj']} µJ "
            f"({zone['batches']} batches, {zone['dropped']} dropped)"
        )
    typer.echo("events:")
    for event in detail["events"]:
        late = " (historical)" if event["historical"] else ""
        typer.echo(f"  {event['ts'][:23]}  {event['stream']:15} {event['event']}{late}")


@fleet_app.command("course")
def fleet_course(
    patient: Annotated[str, typer.Argument(help="The patient key (the site's pseudonym).")],
    db: DbOption = _DEFAULT_DB,
    planned: Annotated[int, typer.Option("--planned", min=4, max=6)] = 6,
    as_json: JsonOption = False,
) -> None:
    """A patient's course across every device, with the warnings for a session starting now.

    Example: devicectl fleet course 3f1c…e9 --planned 4 --db postgresql://recorder@db/fleet
    """
    from devicectl.recorder import queries

    result = _run_query(
        "fleet course",
        db,
        lambda store: queries.course(store, patient, planned=planned, now=queries.utc_now()),
    )
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    if not result.sessions:
        typer.echo(f"no sessions recorded for patient {_short(patient)}")
        return
    state = "complete" if result.complete else f"next is session {result.next_number}"
    typer.echo(
        f"course of {_short(patient)}: {result.given} of {result.planned} given ({state}), "
        f"{result.maintenance} maintenance, on {', '.join(result.devices)}"
    )
    _table(
        [
            [
                s.started[:19].replace("T", " "),
                s.device,
                s.session,
                s.kind if s.number is None else f"{s.kind} {s.number}",
                str(s.pulses),
                "-" if s.days_since_previous is None else f"{s.days_since_previous:.1f}",
            ]
            for s in result.sessions
        ],
        ["started (UTC)", "device", "session", "kind", "pulses", "days since previous"],
    )
    for warning in result.warnings:
        typer.echo(f"warning: {warning.message}")
