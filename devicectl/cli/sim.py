"""``devicectl sim`` (serve the simulated board) and ``devicectl sim-control`` (drive it).

docs/cli.md. ``sim`` opens the link and the control socket before printing anything, then
prints exactly one stdout line, the address ``devicectl run --port`` accepts, and serves until
SIGTERM or SIGINT (exit 0, control socket removed). ``sim-control`` sends one command and returns
once the simulator has applied it: exit 0 done, 2 unknown command or argument (found locally or
refused by the simulator), 3 no simulator at that socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from devicectl.cli.app import ExitCode, app
from protocols.bounded import clip

if TYPE_CHECKING:
    from simulator.scenario import Scenario

__all__ = ["sim", "sim_control"]

_U32_MAX = 2**32 - 1


def _fail(command: str, message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"devicectl {command}: {message}", err=True)
    return typer.Exit(int(code))


@app.command("sim")
def sim(
    pty: Annotated[
        bool, typer.Option("--pty", help="Serve over a pseudo-terminal (the default).")
    ] = False,
    tcp: Annotated[
        str | None,
        typer.Option("--tcp", metavar="HOST:PORT", help="Serve over TCP instead (port 0: any)."),
    ] = None,
    scenario: Annotated[
        Path | None,
        typer.Option("--scenario", metavar="FILE", help="Play this TOML scenario from the start."),
    ] = None,
    control: Annotated[
        Path | None,
        typer.Option(
            "--control",
            metavar="SOCK",
            help="Where to serve the simulator's control socket (default: "
            "$XDG_RUNTIME_DIR/devicectl-sim.sock, else /tmp/devicectl-sim-UID.sock).",
        ),
    ] = None,
    max_rate: Annotated[
        float | None,
        typer.Option(
            "--max-rate",
            metavar="HZ",
            help="The board's maximum pulse rate, 1-100000 Hz (default: 500).",
        ),
    ] = None,
    serial: Annotated[
        int | None, typer.Option("--serial", metavar="N", help="The board's serial number.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="N", help="Seed the board's randomness (reproducible)."),
    ] = None,
) -> None:
    """Serve the simulated laser controller board; print the port for `devicectl run --port`.

    Example: devicectl sim --control /tmp/sim.sock   (then: devicectl run --port /dev/pts/N)
    """
    from simulator.control import default_control_path
    from simulator.scenario import ScenarioError, load_scenario
    from simulator.serve import parse_tcp_address

    if pty and tcp is not None:
        raise _fail("sim", "--pty and --tcp exclude each other: pick one", ExitCode.USAGE)
    address: tuple[str, int] | None = None
    if tcp is not None:
        try:
            address = parse_tcp_address(tcp)
        except ValueError as exc:
            raise _fail("sim", f"--tcp: {exc}", ExitCode.USAGE) from None
    max_rate_mhz: int | None = None
    if max_rate is not None:
        max_rate_mhz = round(max_rate * 1000) if math.isfinite(max_rate) else 0
        if not 1 <= max_rate_mhz <= _U32_MAX:
            raise _fail(
                "sim", f"--max-rate {max_rate:g} Hz is out of range 0.001..4294967", ExitCode.USAGE
            )
    if serial is not None and not 0 <= serial <= _U32_MAX:
        raise _fail("sim", f"--serial {serial} is out of range 0..{_U32_MAX}", ExitCode.USAGE)
    for flag, path in (("--scenario", scenario), ("--control", control)):
        if path is not None and str(path) in {"", "."}:
            raise _fail("sim", f"{flag}: an empty path is refused", ExitCode.USAGE)
    loaded: Scenario | None = None
    if scenario is not None:
        try:
            loaded = load_scenario(scenario)
        except ScenarioError as exc:
            raise _fail("sim", str(exc), ExitCode.USAGE) from None
    control_path = control if control is not None else default_control_path()

    from devicectl.logs import configure_logging

    configure_logging()
    code = asyncio.run(
        _serve(
            tcp=address,
            scenario=loaded,
            control_path=control_path,
            max_rate_mhz=max_rate_mhz,
            serial=serial,
            seed=seed,
        )
    )
    raise typer.Exit(code)


async def _serve(
    *,
    tcp: tuple[str, int] | None,
    scenario: Scenario | None,
    control_path: Path,
    max_rate_mhz: int | None,
    serial: int | None,
    seed: int | None,
) -> int:
    from protocols.errors import DevicectlError
    from simulator.board import Board
    from simulator.runner import monotonic_us
    from simulator.serve import Simulator

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        rng = random.Random(seed)  # noqa: S311 - physics noise, not cryptography
        options: dict[str, Any] = {"rng": rng}
        # Each instance its own serial number unless told (docs/simulator.md).
        options["serial"] = serial if serial is not None else rng.randrange(1, 1_000_000)
        if max_rate_mhz is not None:
            options["max_rate_mhz"] = max_rate_mhz
        options["now_us"] = monotonic_us()
        board = Board(**options)
        code = ExitCode.OK
        # The simulator starts its parts in a TaskGroup: a failure arrives as an ExceptionGroup.
        try:
            async with Simulator(
                board, control_path=control_path, tcp=tcp, scenario=scenario
            ) as simulator:
                typer.echo(simulator.address)  # click.echo flushes: a host may connect now
                typer.echo(f"control socket: {control_path}", err=True)
                await stop.wait()
        except* DevicectlError as group:
            typer.echo(f"devicectl sim: {clip(str(_first(group)), 300)}", err=True)
            code = ExitCode.USAGE
        except* OSError as group:
            error = _first(group)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            where = f"--tcp {tcp[0]}:{tcp[1]}" if tcp is not None else "the link"
            typer.echo(f"devicectl sim: cannot serve {where}: {clip(str(reason), 200)}", err=True)
            code = ExitCode.USAGE if tcp is not None else ExitCode.UNREACHABLE
        return int(code)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf of an exception group: the one line to print."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


@app.command("sim-control")
def sim_control(
    command: Annotated[
        list[str],
        typer.Argument(
            metavar="COMMAND",
            help="footswitch down|up; interlock estop|door|key|contact|cooling open|close; "
            "fault energy-drift FACTOR|stuck-shutter|overheat|line-noise BER|drop-frames P|"
            "slow-replies MS|hang; clear-faults; reboot; status.",
        ),
    ],
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            metavar="SOCK",
            help="The simulator's control socket (default: the same as `devicectl sim`'s).",
        ),
    ] = None,
) -> None:
    """Drive a running simulator; returns once the simulator has applied the command.

    Example: devicectl sim-control --socket /tmp/sim.sock fault energy-drift 1.3
    """
    from simulator.control import (
        CommandError,
        ControlRefused,
        SimulatorUnreachable,
        default_control_path,
        send_command,
    )

    path = socket if socket is not None else default_control_path()
    try:
        result = asyncio.run(send_command(path, command))
    except CommandError as exc:
        raise _fail("sim-control", str(exc), ExitCode.USAGE) from None
    except ControlRefused as exc:
        raise _fail("sim-control", str(exc), ExitCode.USAGE) from None
    except SimulatorUnreachable as exc:
        raise _fail("sim-control", str(exc), ExitCode.UNREACHABLE) from None
    if isinstance(result, str):
        typer.echo(result)
    else:
        typer.echo(json.dumps(result, default=str))
