"""What the demo shows on the terminal: the live progress panel and the closing lines."""

from __future__ import annotations

from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devicectl.demo.run import DemoResult
from devicectl.demo.script import DemoProgress

__all__ = ["closing_lines", "progress_panel"]


def _joules(energy_uj: int) -> str:
    return f"{energy_uj / 1e6:.3f} J"


def progress_panel(progress: DemoProgress, *, dashboard_url: str | None = None) -> RenderableType:
    """The live view: phase, device state, armed, pulses, energy per zone, alerts and breach."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", justify="right")
    grid.add_column()
    grid.add_row(
        "phase",
        f"{progress.phase_index}/{progress.phase_count}  {progress.phase_title}",
    )
    grid.add_row("device", progress.state)
    grid.add_row(
        "laser",
        Text("ARMED", style="bold red") if progress.armed else Text("safe", style="green"),
    )
    grid.add_row("footswitch", "down" if progress.footswitch else "up")
    device = (
        ""
        if progress.device_pulse_count is None
        else f" (device counter {progress.device_pulse_count})"
    )
    grid.add_row("pulses", f"{progress.pulses:,}{device}")
    zones = ", ".join(f"{z} {_joules(e)}" for z, e in sorted(progress.energy_by_zone_uj.items()))
    grid.add_row("energy", zones or "—")
    if progress.breach:
        grid.add_row(
            "breach",
            Text(
                f"LATCHED: {progress.breach.get('message', progress.breach.get('code'))}",
                style="bold yellow",
            ),
        )
    else:
        grid.add_row("breach", "none latched")
    for alert in progress.alerts[-3:]:
        grid.add_row("alert", Text(alert, style="yellow"))
    grid.add_row("elapsed", f"{progress.elapsed_s:.1f} s")
    if dashboard_url:
        grid.add_row("dashboard", dashboard_url)
    return Panel(grid, title="devicectl demo", border_style="red" if progress.armed else "blue")


def closing_lines(result: DemoResult, *, dashboard_url: str | None) -> list[str]:
    """The lines printed at the end, one fact per line, greppable by scripts."""
    lines: list[str] = [f"data directory: {result.data_dir}"]
    summary = result.summary
    if result.session_id is not None and summary is not None:
        zones = ", ".join(
            f"{zone} {_joules(int(energy))}"
            for zone, energy in sorted(summary.get("energy_per_zone_uj", {}).items())
        )
        lines.append(
            f"session {result.session_id}: {summary.get('pulses', 0):,} pulses in "
            f"{summary.get('duration_s', 0):.1f} s; {zones or 'no energy'}; "
            f"peak fluence {summary.get('peak_fluence_j_cm2', 0):.2f} J/cm²"
        )
    if result.breach:
        if result.ok:
            line = (
                f"breach: {result.breach.get('code')} at pulse {result.breach.get('pulse_no')} "
                f"(acknowledged, treatment resumed)"
            )
            check = result.check
            if check is not None and check.in_flight and check.stop_within_us is not None:
                line += (
                    f"; {check.in_flight} pulse(s) already in flight when STOP was written, "
                    f"the last {check.stop_within_us / 1000:.1f} ms after it, each recorded"
                )
        else:
            line = f"breach: {result.breach.get('message', result.breach.get('code'))}"
        lines.append(line)
    lines.append(f"session log: {result.log_path}")
    if result.report_path is not None:
        lines.append(f"report: {result.report_path}")
    if result.verified_records is not None:
        if result.verify_message is None:
            lines.append(
                f"log verify: intact, {result.verified_records} records "
                f"({result.verified_pulses} pulses)"
            )
        else:
            lines.append(f"log verify: NOT intact: {result.verify_message}")
    if dashboard_url:  # only when it stays up (--keep-running): never print a dead address
        lines.append(f"dashboard: {dashboard_url} (up until Ctrl-C)")
        lines.append(f"history: {dashboard_url}/history")
    return lines
