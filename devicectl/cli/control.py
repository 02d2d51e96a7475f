"""Operator commands: the daemon (`run`) and everything that drives it over the control socket."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from devicectl.cli.app import ExitCode, app, config_app, fault_app, params_app, session_app
from devicectl.control import ControlError, DaemonUnreachable, call_daemon, stop_socket_path
from devicectl.errors import ConfigError, DevicectlError

__all__: list[str] = []

_EXIT_BY_KIND = {
    "refused": ExitCode.REFUSED,
    "usage": ExitCode.USAGE,
    "unreachable": ExitCode.UNREACHABLE,
    "internal": ExitCode.REFUSED,
}

ControlOpt = Annotated[
    Path | None,
    typer.Option(
        "--control",
        help="The daemon's control socket (default: from the config, as `devicectl run` uses).",
        envvar="DEVICECTL_CONTROL",
        show_envvar=False,
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="A devicectl TOML config file.", exists=True)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

_err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line, never wrapped
_out = Console(highlight=False)


def _control_path(control: Path | None, config: Path | None = None) -> Path:
    if control is not None:
        return control
    from devicectl.config import load_settings

    try:
        return Path(load_settings(config).control)
    except DevicectlError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc


def _call(control: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    path = _control_path(control)
    try:
        return call_daemon(path, request)
    except DaemonUnreachable as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    except ControlError as exc:
        _err.print(f"{'refused' if exc.kind == 'refused' else 'error'}: {exc}")
        raise typer.Exit(_EXIT_BY_KIND.get(exc.kind, ExitCode.REFUSED)) from exc


def _show(result: dict[str, Any], as_json: bool, title: str = "") -> None:
    if as_json or not sys.stdout.isatty():
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    table = Table(title=title or None, show_header=False, box=None)
    for key, value in result.items():
        text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        table.add_row(f"[bold]{key}[/]", text)
    _out.print(table)


# ---------------------------------------------------------------- the daemon


@app.command()
def run(
    config: ConfigOpt = None,
    port: Annotated[
        str | None,
        typer.Option("--port", help="Device: a tty path, socket://HOST:PORT, or `sim`."),
    ] = None,
    mqtt: Annotated[
        str | None, typer.Option("--mqtt", help="Broker URL, mqtt:// or mqtts://.")
    ] = None,
    control: Annotated[Path | None, typer.Option("--control", help="Control socket path.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Session log, outbox and state.")
    ] = None,
) -> None:
    """Run the daemon: supervise the laser, log sessions, publish telemetry.

    Example: devicectl run --port sim --data-dir ./data --control ./devicectl.sock
    """
    import asyncio

    from devicectl.config import load_settings
    from devicectl.daemon import run_daemon
    from devicectl.logs import configure_logging

    overrides: dict[str, Any] = {
        k: v
        for k, v in {"port": port, "control": control, "data_dir": data_dir}.items()
        if v is not None
    }
    if mqtt is not None:
        overrides["mqtt__url"] = mqtt
    try:
        settings = load_settings(config, **overrides)
    except DevicectlError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    configure_logging(json=settings.log_json, level=settings.log_level)
    try:
        code = asyncio.run(run_daemon(settings))
    except KeyboardInterrupt:
        code = 0
    except ConfigError as exc:  # the policy file: a usage error, like a bad setting
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    except DevicectlError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    raise typer.Exit(code)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the effective configuration (file, environment, defaults), secrets hidden, after
    checking it and the clinic policy it names as `devicectl run` would.

    Example: devicectl config show --config /etc/devicectl/devicectl.toml --json
    """
    from devicectl.config import load_settings
    from devicectl.policy import load_policy

    try:
        settings = load_settings(config)
        load_policy(settings.policy)
    except DevicectlError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    _show(settings.redacted_dict(), as_json, "devicectl configuration")


# ---------------------------------------------------------------- status and emission


@app.command()
def status(control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Show the device, the session and the safety state.

    Example: devicectl status --json
    """
    _show(_call(control, {"command": "status"}), as_json, "devicectl status")


@app.command()
def arm(control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Arm the laser (checks every limit, the checklist and the log first).

    Example: devicectl arm
    """
    _show(_call(control, {"command": "arm"}), as_json)


@app.command()
def disarm(control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Disarm the laser.

    Example: devicectl disarm
    """
    _show(_call(control, {"command": "disarm"}), as_json)


@app.command()
def stop(control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Stop emission at once (always allowed).

    Goes through the daemon's stop-only socket beside the control socket, which a control
    socket full of other connections cannot block (the control socket itself when there is none).

    Example: devicectl stop
    """
    path = _control_path(control)
    stop_path = stop_socket_path(path)
    _show(_call(stop_path if stop_path.exists() else path, {"command": "stop"}), as_json)


@fault_app.command("ack")
def fault_ack(
    reason: Annotated[str, typer.Option("--reason", help="Why re-arming is safe now.")],
    operator: Annotated[str, typer.Option("--operator", help="Who acknowledges.")] = "",
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge a latched safety breach so the laser may be armed again.

    Example: devicectl fault ack --operator OP-7 --reason "energy drift checked, handpiece replaced"
    """
    request: dict[str, Any] = {"command": "fault_ack", "reason": reason}
    request["operator"] = operator or _default_operator()
    _show(_call(control, request), as_json)


@params_app.command("set")
def params_set(
    energy_uj: Annotated[int | None, typer.Option("--energy-uj", help="Pulse energy, µJ.")] = None,
    width_us: Annotated[int | None, typer.Option("--width-us", help="Pulse width, µs.")] = None,
    rate_hz: Annotated[float | None, typer.Option("--rate-hz", help="Pulse rate, Hz.")] = None,
    spot_um: Annotated[int | None, typer.Option("--spot-um", help="Spot diameter, µm.")] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Start from a treatment preset (a concern).")
    ] = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the laser parameters (checked against every limit before they reach the device).

    Example: devicectl params set --energy-uj 2000 --width-us 300 --rate-hz 20 --spot-um 300
    """
    request: dict[str, Any] = {"command": "params_set"}
    for key, value in (
        ("energy_uj", energy_uj),
        ("width_us", width_us),
        ("rate_hz", rate_hz),
        ("spot_um", spot_um),
        ("preset", preset),
    ):
        if value is not None:
            request[key] = value
    _show(_call(control, request), as_json)


# ---------------------------------------------------------------- sessions

_CONTRAINDICATIONS = {
    "sun": "recent_sun_exposure",
    "photosensitising-medication": "photosensitising_medication",
    "skin-infection": "active_skin_infection",
    "pregnancy": "pregnancy",
    "allergy": "allergy_to_active_ingredient",
}


def _checklist(
    consultation: bool,
    cleaned: bool,
    numbing: bool,
    contraindications: list[str],
    none_: bool,
) -> dict[str, bool] | None:
    if not (consultation or cleaned or contraindications or none_):
        return None
    unknown = [c for c in contraindications if c not in _CONTRAINDICATIONS]
    if unknown:
        _err.print(
            f"error: unknown contraindication {unknown[0]!r}; one of: "
            + ", ".join(_CONTRAINDICATIONS)
        )
        raise typer.Exit(ExitCode.USAGE)
    if contraindications and none_:
        _err.print("error: --no-contraindications contradicts --contraindication")
        raise typer.Exit(ExitCode.USAGE)
    if not (contraindications or none_):
        _err.print(
            "error: answer the contraindications: --no-contraindications, or "
            "--contraindication NAME for each answered yes"
        )
        raise typer.Exit(ExitCode.USAGE)
    answers = {field: name in contraindications for name, field in _CONTRAINDICATIONS.items()}
    return {
        "consultation_done": consultation,
        "area_cleaned": cleaned,
        "numbing_applied": numbing,
        **answers,
    }


ConsultOpt = Annotated[
    bool, typer.Option("--consultation-done", help="Consultation and skin assessment done.")
]
CleanedOpt = Annotated[bool, typer.Option("--area-cleaned", help="Treatment area cleaned.")]
NumbingOpt = Annotated[bool, typer.Option("--numbing/--no-numbing", help="Numbing cream applied.")]
ContraOpt = Annotated[
    list[str],
    typer.Option(
        "--contraindication",
        help="A contraindication answered YES: " + ", ".join(_CONTRAINDICATIONS),
    ),
]
NoContraOpt = Annotated[
    bool,
    typer.Option("--no-contraindications", help="Every contraindication was asked and is NO."),
]
OverrideOpt = Annotated[
    str | None,
    typer.Option("--override", help="Reason to treat despite a contraindication (recorded)."),
]


def _default_operator() -> str:
    import getpass

    return getpass.getuser()


@session_app.command("start")
def session_start(
    patient: Annotated[str, typer.Option("--patient", help="Pseudonymous patient reference.")],
    skin_type: Annotated[str, typer.Option("--skin-type", help="Fitzpatrick type I-VI.")],
    concern: Annotated[
        list[str], typer.Option("--concern", help="fine_lines, laxity, acne_scars, ...")
    ],
    operator: Annotated[str, typer.Option("--operator", help="Operator id.")] = "",
    ingredient: Annotated[
        str | None, typer.Option("--ingredient", help="Active ingredient delivered.")
    ] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Treatment preset.")] = None,
    course: Annotated[str | None, typer.Option("--course", help="Course id.")] = None,
    course_session: Annotated[int, typer.Option("--course-session", help="Session n.")] = 1,
    course_planned: Annotated[
        int, typer.Option("--course-planned", help="Planned sessions (4-6).")
    ] = 4,
    consultation: ConsultOpt = False,
    cleaned: CleanedOpt = False,
    numbing: NumbingOpt = False,
    contraindication: ContraOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    no_contraindications: NoContraOpt = False,
    override: OverrideOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open a treatment session.

    Example: devicectl session start --operator OP-7 --patient PT-0042 --skin-type III
    --concern fine_lines --consultation-done --area-cleaned --numbing --no-contraindications
    """
    request: dict[str, Any] = {
        "command": "session_start",
        "operator": operator or _default_operator(),
        "patient_ref": patient,
        "skin_type": skin_type,
        "concerns": concern,
        "course_session": course_session,
        "course_planned": course_planned,
    }
    for key, value in (
        ("active_ingredient", ingredient),
        ("preset", preset),
        ("course_id", course),
        ("contraindication_override", override),
    ):
        if value is not None:
            request[key] = value
    checklist = _checklist(consultation, cleaned, numbing, contraindication, no_contraindications)
    if checklist is None:
        _err.print(
            "error: the pre-treatment checklist is required: --consultation-done --area-cleaned "
            "--numbing/--no-numbing and --no-contraindications (or --contraindication NAME)"
        )
        raise typer.Exit(ExitCode.USAGE)
    request["checklist"] = checklist
    _show(_call(control, request), as_json)


@session_app.command("zone")
def session_zone(
    zone: Annotated[str, typer.Argument(help="forehead, periorbital, perioral, cheeks, ...")],
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move to the next treatment zone (its energy limit applies from now on).

    Example: devicectl session zone cheeks
    """
    _show(_call(control, {"command": "session_zone", "zone": zone}), as_json)


@session_app.command("end")
def session_end(
    post_care: Annotated[
        list[str], typer.Option("--post-care", help="Post-care given (repeatable).")
    ] = [],  # noqa: B006
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close the open session and print its summary.

    Example: devicectl session end --post-care "soothing serum" --post-care "SPF 50"
    """
    _show(_call(control, {"command": "session_end", "post_care": post_care}), as_json)
