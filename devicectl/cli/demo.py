"""``devicectl demo``: broker, daemon with the simulator, dashboard, and one scripted session.

Exit codes: 0 the session played as scripted (the one expected breach happened, the counts match
the log, the log verifies); 1 it did not, or the demo was interrupted (one line says why); 2 a bad
option. Ctrl-C (or SIGTERM) at any moment stops the script, then shuts everything down in order:
the daemon makes the laser safe and flushes its log, the dashboard and the broker close.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from structlog.typing import FilteringBoundLogger

from devicectl.cli.app import ExitCode, app
from devicectl.demo.run import (
    DemoOptions,
    DemoResult,
    DemoStack,
    configure_demo_logging,
    default_demo_dir,
)
from devicectl.demo.script import (
    DEFAULT_DURATION_S,
    DEFAULT_SPEED_HZ,
    MAX_DURATION_S,
    MAX_SPEED_HZ,
    MIN_DURATION_S,
    MIN_SPEED_HZ,
    DemoProgress,
    plan_phases,
)
from devicectl.demo.view import closing_lines, progress_panel
from devicectl.errors import DevicectlError

__all__ = ["demo"]

_REFRESH_S = 0.125  # the live view at most 8 times a second


def _fail(message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"devicectl demo: {message}", err=True)
    return typer.Exit(int(code))


def _check_options(mqtt: str | None, duration: float, speed: float, data_dir: Path | None) -> None:
    from devicectl.config import load_settings

    try:
        plan_phases(duration)
        if not MIN_SPEED_HZ <= speed <= MAX_SPEED_HZ:
            allowed = f"from {MIN_SPEED_HZ:g} to {MAX_SPEED_HZ:g} Hz"
            raise _fail(f"--speed {speed:g} Hz is not allowed: {allowed}", ExitCode.USAGE)
        if mqtt is not None:
            load_settings(None, data_dir=Path("."), control=Path("demo.sock"), mqtt__url=mqtt)
    except DevicectlError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from None
    if data_dir is not None and (data_dir / "sessions.db").exists():
        raise _fail(
            f"--data-dir {data_dir} already holds a session log; the demo needs a fresh directory",
            ExitCode.USAGE,
        )


class _LiveProgress:
    """The progress as a rich Live panel on a terminal, else one line per phase (CI logs)."""

    def __init__(self, console: Console, dashboard_url: str | None) -> None:
        self._console = console
        self._dashboard_url = dashboard_url
        self._live: Live | None = None
        self._last_phase = ""
        self._last_draw = 0.0
        self._latest: DemoProgress | None = None

    def __enter__(self) -> _LiveProgress:
        if self._console.is_terminal:
            # No auto-refresh thread: the script's updates redraw it.
            self._live = Live(
                progress_panel(DemoProgress(), dashboard_url=self._dashboard_url),
                console=self._console,
                auto_refresh=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            if self._latest is not None:  # the last state, not the last one drawn
                self._live.update(
                    progress_panel(self._latest, dashboard_url=self._dashboard_url), refresh=True
                )
            self._live.__exit__(None, None, None)

    def update(self, progress: DemoProgress) -> None:
        if self._live is None:
            if progress.phase != self._last_phase:
                self._last_phase = progress.phase
                self._console.print(
                    f"[{progress.phase_index}/{progress.phase_count}] {progress.phase_title}",
                    highlight=False,
                )
            return
        self._latest = progress
        now = time.monotonic()
        if progress.phase != self._last_phase or now - self._last_draw >= _REFRESH_S:
            self._last_phase, self._last_draw = progress.phase, now
            self._live.update(
                progress_panel(progress, dashboard_url=self._dashboard_url), refresh=True
            )


async def _run(
    options: DemoOptions, keep_running: bool, console: Console, log: FilteringBoundLogger
) -> int:
    loop = asyncio.get_running_loop()
    interrupt = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt.set)
    result: DemoResult | None = None
    try:
        async with DemoStack(options, log=log) as stack:
            console.print(f"data directory: {stack.data_dir}", highlight=False)
            embedded = " (embedded amqtt broker)" if options.mqtt_url is None else ""
            console.print(f"MQTT broker: {stack.mqtt_url}{embedded}", highlight=False)
            lasting = (
                "up until Ctrl-C, after the session too"
                if keep_running
                else "live while the demo runs; --keep-running keeps it up afterwards"
            )
            console.print(f"dashboard: {stack.dashboard_url} ({lasting})", highlight=False)
            console.print(
                f"daemon control socket: {stack.control} "
                f"(try: devicectl status --control {stack.control})",
                highlight=False,
            )
            if not interrupt.is_set():
                result = await _play(stack, interrupt, console)
            if result is None and stack.daemon is not None:
                # Interrupted: the session is ended early, its log verified and its report and
                # demo-result.json written all the same (never half a file).
                result = await stack.conclude_interrupted()
            if result is not None:
                dashboard = stack.dashboard_url if keep_running and not interrupt.is_set() else None
                for line in closing_lines(result, dashboard_url=dashboard):
                    console.print(line, highlight=False)
                if keep_running and not interrupt.is_set():
                    console.print(
                        "broker, daemon and dashboard keep running: press Ctrl-C to stop",
                        highlight=False,
                    )
                    await interrupt.wait()
            console.print("shutting down ...", highlight=False)
        console.print(
            "stopped: laser made safe, log flushed, broker and dashboard closed", highlight=False
        )
    except (DevicectlError, OSError) as exc:
        typer.echo(f"devicectl demo: {exc}", err=True)
        return int(ExitCode.REFUSED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if result is None:
        typer.echo(
            "devicectl demo: interrupted before the demo had started; everything was shut down",
            err=True,
        )
        return int(ExitCode.REFUSED)
    if interrupt.is_set() and not result.ok:
        typer.echo(
            f"devicectl demo: {result.reason}; its result and report are in {result.data_dir}; "
            "everything was shut down",
            err=True,
        )
        return int(ExitCode.REFUSED)
    if not result.ok:
        typer.echo(
            f"devicectl demo: the session did not play as scripted: {result.reason}", err=True
        )
        return int(ExitCode.REFUSED)
    console.print("demo OK: the session played as scripted", highlight=False)
    return int(ExitCode.OK)


async def _play(stack: DemoStack, interrupt: asyncio.Event, console: Console) -> DemoResult | None:
    """The script as a task, cancelled on Ctrl-C (the stack itself is never cancelled, so its
    shut-down runs to the end)."""
    with _LiveProgress(console, stack.dashboard_url) as view:
        playing = asyncio.create_task(stack.play(view.update), name="demo-script")
        waiting = asyncio.create_task(interrupt.wait(), name="demo-interrupt")
        try:
            await asyncio.wait({playing, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not playing.done():
                playing.cancel()
            await asyncio.gather(playing, waiting, return_exceptions=True)
    if playing.cancelled():
        return None
    return playing.result()


@app.command("demo")
def demo(
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            metavar="URL",
            help="Use this broker (mqtt://HOST:PORT) instead of starting an embedded one.",
        ),
    ] = None,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            metavar="S",
            help=f"About how long the session plays, {MIN_DURATION_S:g}-{MAX_DURATION_S:g} s.",
        ),
    ] = DEFAULT_DURATION_S,
    speed: Annotated[
        float,
        typer.Option(
            "--speed",
            metavar="HZ",
            help=f"Pulse rate while emitting, {MIN_SPEED_HZ:g}-{MAX_SPEED_HZ:g} Hz.",
        ),
    ] = DEFAULT_SPEED_HZ,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running", help="Keep broker, daemon and dashboard up after the session."
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            help="Where the log, the report and demo.log go (a fresh directory).",
            show_default="./devicectl-demo/<timestamp>",
        ),
    ] = None,
) -> None:
    """Run the whole system on this machine and play one scripted treatment with one breach.

    Example: devicectl demo --duration 20 --speed 25
    """
    from devicectl.extras import MissingExtra, require_extra

    try:
        require_extra("demo", "devicectl demo")
    except MissingExtra as exc:
        raise _fail(str(exc), ExitCode.REFUSED) from None
    _check_options(mqtt, duration, speed, data_dir)
    directory = (data_dir or default_demo_dir()).resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(
            f"cannot create --data-dir {directory}: {exc.strerror}", ExitCode.USAGE
        ) from None
    options = DemoOptions(mqtt_url=mqtt, duration_s=duration, speed_hz=speed, data_dir=directory)
    # Long paths stay on one line when the output is a file or a pipe (scripts grep them).
    console = Console(soft_wrap=True)
    with configure_demo_logging(directory / "demo.log") as log:
        try:
            code = asyncio.run(_run(options, keep_running, console, log))
        except KeyboardInterrupt:  # before or after the demo's own handlers were in place
            raise _fail("interrupted; everything was shut down", ExitCode.REFUSED) from None
    raise typer.Exit(code)
