"""Operator commands: the daemon (`run`) and everything that drives it over the control socket.

Commands that change a treatment identify their user: ``--user ID`` (or ``DEVICECTL_USER``) and
that user's PIN, prompted on the terminal or, for scripts, from ``DEVICECTL_PIN`` (never an option:
a command line is visible to every process). A supervisor's sign-off (a contraindication override,
a breach acknowledgement) names ``--supervisor ID`` with ``DEVICECTL_SUPERVISOR_PIN`` or a prompt;
a supervisor running the command signs it themselves. See docs/users.md.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from devicectl.cli.app import (
    ExitCode,
    app,
    config_app,
    fault_app,
    params_app,
    session_app,
    wants_json,
)
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
        metavar="SOCK",
        help="The daemon's control socket (default: $DEVICECTL_CONTROL, else as `devicectl run` "
        "computes it from the config).",
        envvar="DEVICECTL_CONTROL",
        show_envvar=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="A devicectl TOML config file (default: $DEVICECTL_CONFIG, else "
        "/etc/devicectl/devicectl.toml when it exists).",
        envvar="DEVICECTL_CONFIG",
        show_envvar=False,
        exists=True,
        dir_okay=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (the default when the output is not a terminal).")
]
UserOpt = Annotated[
    str | None,
    typer.Option(
        "--user",
        "--operator",
        help="Your registered user id; the PIN is prompted (or DEVICECTL_PIN).",
        envvar="DEVICECTL_USER",
        show_envvar=False,
    ),
]
SupervisorOpt = Annotated[
    str | None,
    typer.Option(
        "--supervisor",
        help="The supervisor signing off, when you are not one; their PIN is prompted "
        "(or DEVICECTL_SUPERVISOR_PIN).",
    ),
]

_err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line, never wrapped
_out = Console(highlight=False)


def _config_file(config: Path | None) -> Path | None:
    """``--config`` (or ``$DEVICECTL_CONFIG``), else the system's file when there is one."""
    import os

    from devicectl.config import default_config_file

    return config if config is not None else default_config_file(os.environ)


def _control_path(control: Path | None, config: Path | None = None) -> Path:
    if control is not None:
        return control
    from devicectl.config import load_settings

    try:
        return Path(load_settings(_config_file(config)).control)
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


def _usage(message: str) -> typer.Exit:
    _err.print(f"error: {message}")
    return typer.Exit(ExitCode.USAGE)


def _pin(variable: str, user: str) -> str:
    pin = os.environ.get(variable)
    if pin:
        return pin
    if sys.stdin.isatty():
        return getpass.getpass(f"PIN for {user}: ")
    raise _usage(f"no PIN for {user}: type it on a terminal, or set {variable} for a script")


def _auth(user: str | None) -> dict[str, str]:
    """The request's ``auth``: who asks, and their PIN. No fall-back to the OS account."""
    if not user:
        raise _usage(
            "this changes the treatment: name yourself with --user ID (a registered user: "
            "`devicectl users list`)"
        )
    return {"user": user, "pin": _pin("DEVICECTL_PIN", user)}


def _signoff(
    supervisor: str | None, code: str | None, reason: str | None, what: str
) -> dict[str, str]:
    if not code or not reason:
        raise _usage(f"{what} needs a reason code and a reason (a supervisor signs them off)")
    signoff = {"reason_code": code, "reason": reason}
    if supervisor:
        signoff |= {"user": supervisor, "pin": _pin("DEVICECTL_SUPERVISOR_PIN", supervisor)}
    return signoff


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items()) or "—"
    return str(value)


def _show(result: dict[str, Any], as_json: bool, title: str = "") -> None:
    if wants_json(as_json):
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    table = Table(title=title or None, show_header=False, box=None)
    for key, value in result.items():
        table.add_row(f"[bold]{key.replace('_', ' ')}[/]", _text(value))
    _out.print(table)


def status_panel(status: dict[str, Any]) -> Panel:
    """``devicectl status`` on a terminal: the device, the emission, the session, the safety."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    link = "connected" if status.get("connected") else "[red]not connected[/]"
    serial = status.get("device_serial") or "—"
    grid.add_row("device", f"{serial} on {status.get('port', '—')} ({link})")
    state = str(status.get("state", "unknown")).upper()
    armed = "armed" if status.get("armed") else "not armed"
    grid.add_row("state", f"{state}, {armed}")
    pedal = "pressed" if status.get("footswitch") else "released"
    grid.add_row("footswitch", pedal)
    interlocks = status.get("interlocks_open") or []
    grid.add_row(
        "interlocks", f"[red]open: {', '.join(interlocks)}[/]" if interlocks else "all closed"
    )
    faults = status.get("faults") or []
    grid.add_row("device faults", f"[red]{', '.join(faults)}[/]" if faults else "none")
    params = status.get("params")
    if params:
        grid.add_row(
            "parameters",
            f"{params['energy_uj']} µJ, {params['width_us']} µs, {params['rate_hz']:g} Hz, "
            f"spot {params['spot_um']} µm",
        )
    else:
        grid.add_row("parameters", "not set")
    head, skin = status.get("head_temp_c"), status.get("skin_temp_c")
    if head is not None and skin is not None:
        grid.add_row("temperatures", f"head {head:.2f} °C, skin {skin:.2f} °C")
    if status.get("pulse_count") is not None:
        grid.add_row("device pulses", f"{status['pulse_count']:,} (lifetime)")
    session = status.get("session")
    if session is not None:
        zone = status.get("zone") or "no zone yet"
        grid.add_row("session", f"{session}, {zone}, {status.get('session_pulses', 0):,} pulses")
        energy = status.get("energy_by_zone_uj") or {}
        if energy:
            grid.add_row(
                "energy", ", ".join(f"{z} {uj / 1e6:.3f} J" for z, uj in sorted(energy.items()))
            )
    else:
        grid.add_row("session", "none open")
    breach = status.get("breach_latched")
    grid.add_row(
        "breach",
        f"[red]LATCHED: {breach.get('message') or breach.get('code')}[/] "
        "(devicectl fault ack --reason TEXT)"
        if breach
        else "none",
    )
    log_state = "ok" if status.get("log_ok") else "[red]NOT WRITABLE[/]"
    commits = status.get("log_commits")
    if commits:  # a daemon before issue 16 sends none
        p99 = commits.get("commit_delay_p99_ms")
        fsyncs = commits.get("fsyncs_per_s")
        log_state += (
            f", {commits.get('commits_per_s', 0)} commits/s"
            + (f", {fsyncs:g} fsyncs/s" if fsyncs is not None else "")
            + f" (at most one per {commits.get('commit_interval_ms', 0):g} ms)"
            + (f", commit p99 {p99:g} ms" if p99 is not None else "")
        )
    grid.add_row("session log", log_state)
    counters = status.get("link") or {}
    if counters:
        grid.add_row(
            "link",
            f"{counters.get('frames', 0):,} frames, {counters.get('dropped', 0)} dropped, "
            f"{counters.get('retries', 0)} retries, {counters.get('reconnects', 0)} reconnects",
        )
    realtime = status.get("realtime") or {}
    if realtime:
        grid.add_row(
            "scheduling",
            f"SCHED_FIFO {realtime.get('priority')}"
            if realtime.get("policy") == "fifo"
            else "[yellow]ordinary (not real-time: see the daemon's realtime log line)[/]",
        )
    telemetry = status.get("telemetry")
    if telemetry is not None:
        grid.add_row(
            "telemetry",
            (
                f"worker {telemetry.get('worker_pid')}, "
                + ("connected" if telemetry.get("connected") else "[yellow]not connected[/]")
                + f", {telemetry.get('restarts', 0)} restarts"
            )
            if telemetry.get("running")
            else "[yellow]not running[/]",
        )
    if status.get("sim_control"):
        grid.add_row("simulator", f"devicectl sim-control --socket {status['sim_control']} ...")
    return Panel(grid, title=f"devicectl {status.get('version', '')}".strip(), expand=False)


@app.command("kernel-workers")
def kernel_workers(
    priority: Annotated[
        int,
        typer.Option(
            "--priority",
            min=1,
            max=99,
            help="SCHED_FIFO priority for the workers: below the daemon's own (40 by default), "
            "above every ordinary process.",
        ),
    ] = 39,
    every: Annotated[
        float,
        typer.Option(
            "--every",
            min=0.0,
            help="Seconds between two scans for new workers; 0: raise those there now, then exit.",
        ),
    ] = 2.0,
) -> None:
    """Keep the kernel's tty workers ahead of ordinary processes (a root job of the device's).

    Every byte between the serial port and the daemon passes through the kernel's unbound
    workqueue workers (kworker/u*), which run under ordinary scheduling; on a loaded computer a
    real-time daemon still waits for them. This raises them to SCHED_FIFO, again for new ones
    every --every seconds, and puts back those it raised when it is stopped. Needs root or
    CAP_SYS_NICE, which the daemon itself never has: examples/devicectl-kernel-workers.service.

    Example: devicectl kernel-workers --priority 39 --every 2
    """
    import signal
    import threading

    import structlog

    from devicectl.logs import configure_logging
    from devicectl.realtime import KernelWorkers

    configure_logging()
    log = structlog.get_logger("devicectl.kernel_workers")
    workers = KernelWorkers(priority)
    try:
        raised = workers.apply()
    except PermissionError:
        _err.print(
            "error: changing the kernel workers' scheduling needs root or CAP_SYS_NICE "
            "(see examples/devicectl-kernel-workers.service)"
        )
        raise typer.Exit(ExitCode.REFUSED) from None
    log.info("kernel_workers_raised", priority=priority, workers=len(raised), every_s=every)
    if every == 0:
        return
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: stopping.set())
    while not stopping.wait(every):
        raised = workers.apply()
        if raised:
            log.info("kernel_workers_raised", priority=priority, workers=len(raised))
    log.info("kernel_workers_restored", workers=workers.restore())


# ---------------------------------------------------------------- the daemon


@app.command()
def run(
    config: ConfigOpt = None,
    port: Annotated[
        str | None,
        typer.Option(
            "--port",
            metavar="PORT",
            help="The device: a serial port such as /dev/ttyUSB0, socket://HOST:PORT, or sim "
            "(the bundled simulator, in-process).",
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt", metavar="URL", help="MQTT broker: mqtt://HOST[:PORT] or mqtts://..."
        ),
    ] = None,
    # Paths as typed (str): typer would turn an empty one into ".", which the settings refuse.
    control: Annotated[
        str | None,
        typer.Option("--control", metavar="SOCK", help="Where to serve the control socket."),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", metavar="DIR", help="Where the session log, outbox and state live."
        ),
    ] = None,
) -> None:
    """Run the daemon: supervise the laser, log sessions, publish telemetry.

    Example: devicectl run --port sim --data-dir ./data --control ./devicectl.sock
    """
    import asyncio

    import structlog

    from devicectl.config import load_settings
    from devicectl.daemon import run_daemon
    from devicectl.logs import configure_logging
    from devicectl.realtime import enter_realtime
    from devicectl.simlink import device_for

    overrides: dict[str, Any] = {
        k: v
        for k, v in {"port": port, "control": control, "data_dir": data_dir}.items()
        if v is not None
    }
    if mqtt is not None:
        overrides["mqtt__url"] = mqtt
    try:
        settings = load_settings(_config_file(config), **overrides)
    except DevicectlError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    # queued: a journal that stops reading never stalls the safety loop
    configure_logging(json=settings.log_json, level=settings.log_level, queued=True)
    # This process is the daemon's: the safety loop asks for the CPU before anything else.
    enter_realtime(
        settings.realtime.priority,
        lock_memory=settings.realtime.lock_memory,
        switch_interval_s=settings.realtime.switch_interval_ms / 1000,
        log=structlog.get_logger("devicectl.daemon"),
        tty=settings.port != "sim" and not settings.port.startswith("socket://"),
    )
    try:
        code = asyncio.run(run_daemon(settings, device=device_for(settings)))
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
        settings = load_settings(_config_file(config))
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
    result = _call(control, {"command": "status"})
    if wants_json(as_json):
        _show(result, as_json)
    else:
        _out.print(status_panel(result))


@app.command()
def arm(user: UserOpt = None, control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Arm the laser (checks every limit, the checklist and the log first).

    Example: devicectl arm --user OP-7
    """
    _show(_call(control, {"command": "arm", "auth": _auth(user)}), as_json)


@app.command()
def disarm(user: UserOpt = None, control: ControlOpt = None, as_json: JsonOpt = False) -> None:
    """Disarm the laser (always allowed; --user records who).

    Example: devicectl disarm
    """
    request: dict[str, Any] = {"command": "disarm"}
    if user:
        request["auth"] = _auth(user)
    _show(_call(control, request), as_json)


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
    reason_code: Annotated[
        str,
        typer.Option(
            "--reason-code",
            help="cause_found_and_fixed, handpiece_checked, patient_checked, transient_cause",
        ),
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why re-arming is safe now.")],
    user: UserOpt = None,
    supervisor: SupervisorOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge a latched safety breach so the laser may be armed again: a supervisor signs
    it off (the user, if a supervisor; else --supervisor).

    Example: devicectl fault ack --user OP-7 --supervisor SUP-1 --reason-code handpiece_checked
    --reason "energy drift checked, handpiece replaced"
    """
    request: dict[str, Any] = {
        "command": "fault_ack",
        "auth": _auth(user),
        "signoff": _signoff(supervisor, reason_code, reason, "acknowledging a breach"),
    }
    _show(_call(control, request), as_json)


@params_app.command("set")
def params_set(
    energy_uj: Annotated[
        int | None, typer.Option("--energy-uj", metavar="UJ", help="Pulse energy, µJ.")
    ] = None,
    width_us: Annotated[
        int | None, typer.Option("--width-us", metavar="US", help="Pulse width, µs.")
    ] = None,
    rate_hz: Annotated[
        float | None, typer.Option("--rate-hz", metavar="HZ", help="Pulse rate, Hz.")
    ] = None,
    spot_um: Annotated[
        int | None, typer.Option("--spot-um", metavar="UM", help="Spot diameter, µm.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", metavar="CONCERN", help="Start from a treatment preset (a concern)."
        ),
    ] = None,
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the laser parameters (checked against every limit before they reach the device).

    Example: devicectl params set --user OP-7 --energy-uj 2000 --width-us 300 --rate-hz 20
    --spot-um 300
    """
    request: dict[str, Any] = {"command": "params_set", "auth": _auth(user)}
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
    consent: bool,
    cleaned: bool,
    numbing: bool,
    contraindications: list[str],
    none_: bool,
) -> dict[str, bool] | None:
    if not (consultation or consent or cleaned or contraindications or none_):
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
        "consent_given": consent,
        "area_cleaned": cleaned,
        "numbing_applied": numbing,
        **answers,
    }


ConsultOpt = Annotated[
    bool, typer.Option("--consultation-done", help="Consultation and skin assessment done.")
]
ConsentOpt = Annotated[
    bool, typer.Option("--consent", help="The patient's informed consent is given (required).")
]
CleanedOpt = Annotated[bool, typer.Option("--area-cleaned", help="Treatment area cleaned.")]
NumbingOpt = Annotated[bool, typer.Option("--numbing/--no-numbing", help="Numbing cream applied.")]
ContraOpt = Annotated[
    list[str],
    typer.Option(
        "--contraindication",
        metavar="NAME",
        help="A contraindication answered YES (repeatable): " + ", ".join(_CONTRAINDICATIONS),
    ),
]
NoContraOpt = Annotated[
    bool,
    typer.Option("--no-contraindications", help="Every contraindication was asked and is NO."),
]
OverrideCodeOpt = Annotated[
    str | None,
    typer.Option(
        "--override-code",
        help="Treating despite a contraindication: physician_clearance, "
        "resolved_since_assessment, outside_treatment_area, benefit_outweighs_risk.",
    ),
]
OverrideOpt = Annotated[
    str | None,
    typer.Option(
        "--override-reason", help="Why, in words (recorded with the supervisor's sign-off)."
    ),
]


@session_app.command("start")
def session_start(
    patient: Annotated[
        str, typer.Option("--patient", metavar="REF", help="Pseudonymous patient reference.")
    ],
    skin_type: Annotated[
        str,
        typer.Option("--skin-type", metavar="TYPE", help="Fitzpatrick skin type: 1-6 or I-VI."),
    ],
    concern: Annotated[
        list[str],
        typer.Option(
            "--concern",
            metavar="CONCERN",
            help="fine_lines, laxity, acne_scars, pigmentation, dehydration or sun_damage "
            "(repeatable).",
        ),
    ],
    amount: Annotated[
        float,
        typer.Option("--amount", metavar="AMOUNT", help="Amount of the active ingredient applied."),
    ],
    lot: Annotated[
        str, typer.Option("--lot", metavar="LOT", help="Lot (batch) of the active ingredient.")
    ],
    user: UserOpt = None,
    ingredient: Annotated[
        str | None,
        typer.Option(
            "--ingredient",
            metavar="NAME",
            help="Active ingredient delivered (default: the preset's).",
        ),
    ] = None,
    unit: Annotated[str, typer.Option("--unit", metavar="UNIT", help="ml or mg.")] = "ml",
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", metavar="CONCERN", help="Treatment preset: its parameters and ingredient."
        ),
    ] = None,
    course: Annotated[str | None, typer.Option("--course", metavar="ID", help="Course id.")] = None,
    course_session: Annotated[
        int | None,
        typer.Option(
            "--course-session",
            metavar="N",
            min=1,
            help="Session N, as you count it (the log decides; a difference is a warning).",
        ),
    ] = None,
    course_planned: Annotated[
        int,
        typer.Option("--course-planned", metavar="N", min=4, max=6, help="Sessions planned."),
    ] = 4,
    consultation: ConsultOpt = False,
    consent: ConsentOpt = False,
    cleaned: CleanedOpt = False,
    numbing: NumbingOpt = False,
    numbing_agent: Annotated[
        str | None, typer.Option("--numbing-agent", help="The numbing cream used.")
    ] = None,
    numbing_minutes: Annotated[
        int | None, typer.Option("--numbing-minutes", help="Its contact time, minutes.")
    ] = None,
    contraindication: ContraOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    no_contraindications: NoContraOpt = False,
    override_code: OverrideCodeOpt = None,
    override: OverrideOpt = None,
    supervisor: SupervisorOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open a treatment session.

    Example: devicectl session start --user OP-7 --patient PT-0042 --skin-type III
    --concern fine_lines --preset fine_lines --amount 2 --lot HA-2611-07 --consultation-done
    --consent --area-cleaned --no-numbing --no-contraindications
    """
    request: dict[str, Any] = {
        "command": "session_start",
        "patient_ref": patient,
        "skin_type": skin_type,
        "concerns": concern,
        "course_planned": course_planned,
        "ingredient": {"amount": amount, "unit": unit, "lot": lot},
    }
    if ingredient is not None:
        request["ingredient"]["name"] = ingredient
    for key, value in (
        ("preset", preset),
        ("course_id", course),
        ("course_session", course_session),
    ):
        if value is not None:
            request[key] = value
    checklist = _checklist(
        consultation, consent, cleaned, numbing, contraindication, no_contraindications
    )
    if checklist is None:
        raise _usage(
            "the pre-treatment checklist is required: --consultation-done --consent "
            "--area-cleaned --numbing/--no-numbing and --no-contraindications "
            "(or --contraindication NAME)"
        )
    request["checklist"] = checklist
    if numbing:
        if numbing_agent is None or numbing_minutes is None:
            raise _usage("with --numbing, give --numbing-agent and --numbing-minutes")
        request["numbing"] = {"agent": numbing_agent, "contact_min": numbing_minutes}
    request["auth"] = _auth(user)
    if contraindication:
        request["signoff"] = _signoff(
            supervisor, override_code, override, "treating despite a contraindication"
        )
    _show(_call(control, request), as_json)


@session_app.command("zone")
def session_zone(
    zone: Annotated[str, typer.Argument(help="forehead, periorbital, perioral, cheeks, ...")],
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move to the next treatment zone (its energy limit applies from now on).

    Example: devicectl session zone cheeks --user OP-7
    """
    request = {"command": "session_zone", "zone": zone, "auth": _auth(user)}
    _show(_call(control, request), as_json)


@session_app.command("end")
def session_end(
    post_care: Annotated[
        list[str],
        typer.Option(
            "--post-care",
            help="Advice given (repeatable): serum_or_moisturiser, avoid_sun, sunscreen, "
            "gentle_skincare.",
        ),
    ] = [],  # noqa: B006
    declined: Annotated[
        str | None,
        typer.Option("--post-care-declined", help="Why no post-care advice was given."),
    ] = None,
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close the open session and print its summary. Post-care is required: the advice given,
    or why it was declined.

    Example: devicectl session end --user OP-7 --post-care serum_or_moisturiser
    --post-care avoid_sun --post-care sunscreen --post-care gentle_skincare
    """
    request: dict[str, Any] = {"command": "session_end", "post_care": post_care}
    if declined is not None:
        request["post_care_declined"] = declined
    request["auth"] = _auth(user)
    _show(_call(control, request), as_json)


SessionOpt = Annotated[
    int | None,
    typer.Option("--session", help="The session (default: the open one)."),
]


@session_app.command("note")
def session_note(
    text: Annotated[str, typer.Argument(help="The note.")],
    session: SessionOpt = None,
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Append a clinician's note to a session (during it or after its end; never an edit).

    Example: devicectl session note --session 12 --user OP-7 "patient tolerated well"
    """
    _clinical(control, as_json, "session_note", session, user, text=text)


@session_app.command("reaction")
def session_reaction(
    erythema: Annotated[str, typer.Option("--erythema", help="none, mild, moderate or severe.")],
    oedema: Annotated[str, typer.Option("--oedema", help="none, mild, moderate or severe.")],
    text: Annotated[str | None, typer.Option("--text", help="Anything else seen.")] = None,
    session: SessionOpt = None,
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record the immediate skin reaction (erythema, oedema) at or after the session's end.

    Example: devicectl session reaction --session 12 --user OP-7 --erythema mild --oedema none
    """
    _clinical(
        control, as_json, "session_reaction", session, user,
        erythema=erythema, oedema=oedema, text=text,
    )  # fmt: skip


@session_app.command("adverse-event")
def session_adverse_event(
    severity: Annotated[str, typer.Option("--severity", help="mild, moderate, severe or serious.")],
    text: Annotated[str, typer.Option("--text", help="What happened.")],
    action: Annotated[str | None, typer.Option("--action", help="What was done about it.")] = None,
    session: SessionOpt = None,
    user: UserOpt = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record an adverse event against a session (appended; the record is never edited).

    Example: devicectl session adverse-event --session 12 --user SUP-1 --severity moderate
    --text "blister, left cheek, day 1" --action "cold compress, review at 48 h"
    """
    _clinical(
        control, as_json, "session_adverse_event", session, user,
        severity=severity, text=text, action_taken=action,
    )  # fmt: skip


def _clinical(
    control: Path | None,
    as_json: bool,
    command: str,
    session: int | None,
    user: str | None,
    **entry: Any,
) -> None:
    request: dict[str, Any] = {"command": command, "auth": _auth(user)}
    if session is not None:
        request["session"] = session
    request |= {k: v for k, v in entry.items() if v is not None}
    _show(_call(control, request), as_json)
