"""The session report a clinician prints and files: one self-contained HTML file.

Plots are drawn with matplotlib's object API (no pyplot, no global backend) and inlined as SVG:
energy per pulse over time with the ±tolerance band around the setpoint, skin and head temperature
from the STATUS samples, and energy per zone against its limit. Long sessions are drawn as a
min/max envelope so the file stays small. Print CSS lays it out on A4.

The limits drawn and tabled are the ones the session ran under: the energy tolerance and the
temperature and session limits recorded at its start, each zone's energy limit recorded with the
zone. A log written before the start limits were recorded gets :data:`DEFAULT_LIMITS` instead,
labelled as defaults wherever they appear.
"""

from __future__ import annotations

import html
import io
import sqlite3
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

from devicectl.sessionlog import reader
from devicectl.sessionlog.export import iso_time, session_document
from devicectl.sessionlog.model import LimitsInForce

__all__ = ["DEFAULT_LIMITS", "render_report", "write_report"]

# The safety defaults (docs/safety-model.md), for logs that do not record their limits.
DEFAULT_LIMITS = LimitsInForce(energy_tolerance_pct=20, skin_temp_max_c=41.0)
_MAX_POINTS = 4000
_DEFAULT_MARK = " (default)"

_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a; }
body { max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem;
  border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #e3e3e3;
  vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: .4rem .6rem;
  margin: .3rem 0; }
.bad { color: #b00020; font-weight: 600; }
figure { margin: 1rem 0; } figure svg { width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #555; }
.sign { display: grid; grid-template-columns: 1fr 1fr; gap: 2rem; margin-top: 2.5rem; }
.sign div { border-top: 1px solid #333; padding-top: .3rem; font-size: .85rem; }
.mono { font-family: ui-monospace, monospace; font-size: .8rem; word-break: break-all; }
@page { size: A4; margin: 14mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 10pt; }
  h2 { break-after: avoid; } figure, table, .sign { break-inside: avoid; }
  .noprint { display: none; }
}
"""


@dataclass(frozen=True, slots=True)
class _Limits:
    """The session's limits and whether the log recorded them (else: defaults, said so)."""

    values: LimitsInForce
    recorded: bool
    zone_energy_uj: dict[str, int]  # the last limit recorded with each zone

    @property
    def mark(self) -> str:
        return "" if self.recorded else _DEFAULT_MARK


def _limits(doc: dict[str, Any]) -> _Limits:
    zones = {z["zone"]: int(z["energy_limit_uj"]) for z in doc["zones"] if z["energy_limit_uj"]}
    raw = doc.get("limits")
    if raw is None:
        return _Limits(DEFAULT_LIMITS, False, zones)
    # Only the fields this devicectl knows: a newer writer may record more.
    known = {k: v for k, v in raw.items() if k in LimitsInForce.model_fields}
    return _Limits(LimitsInForce.model_validate(known), True, zones)


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "devicectl"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins of consecutive points: their mean x, min y and max y (few points are kept as-is)."""
    if len(x) <= _MAX_POINTS:
        return x, y, y
    step = -(-len(x) // (_MAX_POINTS // 2))
    starts = np.arange(0, len(x), step)
    counts = np.diff(np.append(starts, len(x)))
    return (
        np.add.reduceat(x, starts) / counts,
        np.minimum.reduceat(y, starts),
        np.maximum.reduceat(y, starts),
    )


def _energy_plot(doc: dict[str, Any], pulses: list[reader.PulseRow], limits: _Limits) -> str:
    fig = Figure(figsize=(8, 3))
    ax = fig.add_subplot()
    start = doc["started_ns"]
    if pulses:
        x = np.array([(p.host_ns - start) / 1e9 for p in pulses])
        energy = np.array([p.energy_uj / 1000 for p in pulses])
        param_seqs = [p["seq"] for p in doc["params"]]
        setpoints = [p["energy_uj"] / 1000 for p in doc["params"]]
        setpoint = np.array(
            [setpoints[i - 1] if (i := bisect_left(param_seqs, p.seq)) else np.nan for p in pulses]
        )
        pct = limits.values.energy_tolerance_pct
        tol = pct / 100
        bx, lo_sp, hi_sp = _envelope(x, setpoint)
        ax.fill_between(
            bx,
            lo_sp * (1 - tol),
            hi_sp * (1 + tol),
            step="post",
            color="#8fbf8f",
            alpha=0.35,
            label=f"setpoint ±{pct} %{limits.mark}",
        )
        mx, lo, hi = _envelope(x, energy)
        if len(mx) == len(x):
            ax.plot(mx, lo, ".", markersize=2.5, color="#1f4e9c", label="measured energy")
        else:
            ax.fill_between(mx, lo, hi, color="#1f4e9c", alpha=0.6, label="measured (min-max)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pulses logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("energy per pulse (mJ)")
    ax.grid(alpha=0.3)
    return _svg(fig)


def _temperature_plot(doc: dict[str, Any], limits: _Limits) -> str:
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_subplot()
    samples = doc["status"]
    if samples:
        x = [(s["at_ns"] - doc["started_ns"]) / 1e9 for s in samples]
        ax.plot(x, [s["skin_temp_cdeg"] / 100 for s in samples], color="#c0392b", label="skin")
        ax.plot(x, [s["head_temp_cdeg"] / 100 for s in samples], color="#7f8c8d", label="head")
        skin = limits.values.skin_temp_max_c
        ax.axhline(
            skin,
            color="#c0392b",
            linestyle="--",
            linewidth=1,
            label=f"skin limit {skin:g} °C{limits.mark}",
        )
        head = limits.values.head_temp_max_c
        if head is not None:
            ax.axhline(
                head, color="#7f8c8d", linestyle=":", linewidth=1, label=f"head limit {head:g} °C"
            )
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no STATUS samples logged", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("temperature (°C)")
    ax.grid(alpha=0.3)
    return _svg(fig)


def _zone_energy(doc: dict[str, Any], pulses: list[reader.PulseRow]) -> dict[str, int]:
    if doc["summary"] is not None:
        return dict(doc["summary"]["energy_per_zone_uj"])
    energy: dict[str, int] = {}
    for p in pulses:
        energy[p.zone] = energy.get(p.zone, 0) + p.energy_uj
    return energy


def _zone_plot(energy: dict[str, int], limits: dict[str, int]) -> str:
    zones = sorted(set(energy) | set(limits))
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_subplot()
    if zones:
        ax.bar(zones, [energy.get(z, 0) / 1e6 for z in zones], color="#1f4e9c", label="delivered")
        marked = False
        for i, zone in enumerate(zones):
            if zone in limits:
                ax.hlines(
                    limits[zone] / 1e6,
                    i - 0.4,
                    i + 0.4,
                    colors="#c0392b",
                    linewidth=2,
                    label="_nolegend_" if marked else "limit",
                )
                marked = True
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no zones treated", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("energy (J)")
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _yes_no(value: object) -> str:
    if value is None:
        return "not answered"
    return "yes" if value else "no"


def render_report(conn: sqlite3.Connection, session_id: int) -> str:
    """The HTML report of a session (see the module docstring)."""
    doc = session_document(conn, session_id, with_pulses=False)
    pulses = list(reader.iter_pulses(conn, session_id))
    info, summary = doc["info"], doc["summary"]
    course = info["course"]
    checklist = info["checklist"]
    zone_energy = _zone_energy(doc, pulses)
    limits = _limits(doc)
    esc = html.escape

    session_rows = [
        ("Session", str(session_id)),
        ("Started", _when(doc["started_ns"])),
        ("Device serial", info["device_serial"]),
        ("Operator", info["operator"]),
        ("Patient reference", info["patient_ref"]),
        ("Fitzpatrick skin type", ["I", "II", "III", "IV", "V", "VI"][info["skin_type"] - 1]),
        ("Concerns", ", ".join(c.replace("_", " ") for c in info["concerns"]) or "—"),
        (
            "Course",
            f"session {course['session_number']} of {course['planned_sessions']} "
            f"(course {course['course_id']})",
        ),
        ("Active ingredient", info["active_ingredient"]),
    ]
    check_rows = [
        ("Consultation done", _yes_no(checklist["consultation_done"])),
        ("Area cleaned", _yes_no(checklist["area_cleaned"])),
        ("Numbing applied", _yes_no(checklist["numbing_applied"])),
    ] + [
        (f"Contraindication: {name.replace('_', ' ')}", _yes_no(answer))
        for name, answer in checklist["contraindications"].items()
    ]
    if summary is not None:
        session_limit = limits.values.session_energy_j
        summary_rows = [
            ("Outcome", summary["outcome"]),
            ("Pulses logged", f"{summary['pulses']:,}"),
            ("Unlogged pulses (charged at max energy)", f"{summary['unlogged_pulses']:,}"),
            (
                "Total energy",
                f"{summary['total_energy_uj'] / 1e6:.3f} J"
                + ("" if session_limit is None else f" of {session_limit:g} J session limit"),
            ),
            ("Peak fluence", f"{summary['peak_fluence_j_cm2']:.3f} J/cm²"),
            ("Duration", f"{summary['duration_s'] / 60:.1f} min"),
            ("Faults and safety events", str(summary["faults"])),
        ] + [
            (f"Energy, {zone}", _of_limit(e, limits.zone_energy_uj.get(zone)))
            for zone, e in sorted(zone_energy.items())
        ]
    else:
        summary_rows = [("Outcome", "open (not ended)"), ("Pulses logged", f"{len(pulses):,}")]
    summary_rows += _limit_rows(limits)
    param_rows = "".join(
        f"<tr><td>{_when(p['at_ns'])}</td><td class=num>{p['energy_uj'] / 1000:g}</td>"
        f"<td class=num>{p['width_us']}</td><td class=num>{p['rate_mhz'] / 1000:g}</td>"
        f"<td class=num>{p['spot_um']}</td><td>{esc(str(p['actor']))}</td></tr>"
        for p in doc["params"]
    )
    zone_rows = "".join(
        f"<tr><td>{_when(z['at_ns'])}</td><td>{esc(z['zone'])}</td><td class=num>"
        f"{'—' if not z['energy_limit_uj'] else format(z['energy_limit_uj'] / 1e6, 'g')}</td>"
        f"<td>{esc(str(z['actor']))}</td></tr>"
        for z in doc["zones"]
    )
    event_rows = "".join(
        f"<tr><td>{_when(e['at_ns'])}</td><td>{esc(e['event'])}</td><td>{esc(str(e['actor']))}</td>"
        f"<td>{esc(e['reason'] or '')}</td><td class=mono>{esc(_detail(e['detail']))}</td></tr>"
        for e in doc["events"]
    ) + "".join(
        f"<tr><td>{_when(g['at_ns'])}</td><td class=bad>pulse gap</td><td>log</td>"
        f"<td>{esc(g['cause'])}</td><td class=mono>pulses {g['first']}–{g['last']} ({g['count']}) "
        f"charged {g['charged_energy_uj'] / 1000:g} mJ each to {esc(g['zone'])}</td></tr>"
        for g in doc["pulse_gaps"]
    )
    warnings = "".join(f"<p class=warn>{esc(w['message'])}</p>" for w in doc["course_warnings"])
    post_care = ", ".join(p.replace("_", " ") for p in doc["post_care"]) or "none recorded"
    last_seq = conn.execute(
        "SELECT max(seq) FROM (SELECT max(seq) AS seq FROM records WHERE session_id = ? "
        "UNION ALL SELECT max(seq) FROM pulses WHERE session_id = ?)",
        (session_id, session_id),
    ).fetchone()[0]
    title = f"Treatment session {session_id} — {info['patient_ref']}"
    energy_caption, temperature_caption = _captions(limits)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class=sub>Laser mesotherapy — report generated from the tamper-evident session log
(records up to #{last_seq}); times are UTC.</p>
{warnings}
<div class=grid><section><h2>Session</h2>{_table(session_rows)}</section>
<section><h2>Summary</h2>{_table(summary_rows)}</section></div>
<h2>Pre-treatment checklist</h2>{_table(check_rows)}
<h2>Zones</h2><table><tr><th>Time</th><th>Zone</th><th>Energy limit (J)</th><th>By</th></tr>
{zone_rows}</table>
<h2>Parameters</h2><table><tr><th>Time</th><th>Energy (mJ)</th><th>Width (µs)</th>
<th>Rate (Hz)</th><th>Spot (µm)</th><th>By</th></tr>{param_rows}</table>
<h2>Energy per pulse</h2>
<figure id=plot-energy>{_energy_plot(doc, pulses, limits)}<figcaption>{esc(energy_caption)}
</figcaption></figure>
<h2>Temperature</h2>
<figure id=plot-temperature>{_temperature_plot(doc, limits)}<figcaption>{esc(temperature_caption)}
</figcaption></figure>
<h2>Energy per zone</h2>
<figure id=plot-zones>{_zone_plot(zone_energy, limits.zone_energy_uj)}<figcaption>Energy delivered
per zone (unlogged pulses charged at maximum energy) against the zone's limit as recorded when the
zone was chosen.</figcaption></figure>
<h2>Safety events and operator actions</h2>
<table><tr><th>Time</th><th>Event</th><th>By</th><th>Reason</th><th>Detail</th></tr>
{event_rows or "<tr><td colspan=5>none</td></tr>"}</table>
<h2>Post-treatment care</h2><p>{esc(post_care)}</p>
<div class=sign><div>Clinician (name, signature)</div><div>Date</div></div>
</body></html>
"""


def _of_limit(energy_uj: int, limit_uj: int | None) -> str:
    if limit_uj is None:
        return f"{energy_uj / 1e6:.3f} J (no limit recorded)"
    over = " — over the limit" if energy_uj > limit_uj else ""
    return f"{energy_uj / 1e6:.3f} J of {limit_uj / 1e6:g} J limit{over}"


def _captions(limits: _Limits) -> tuple[str, str]:
    """The energy and temperature plots' captions, naming the limits drawn and their source."""
    values, mark = limits.values, limits.mark
    source = "" if limits.recorded else " Defaults: this log does not record the limits in force."
    head = values.head_temp_max_c
    energy = (
        f"Measured energy of every logged pulse with the ±{values.energy_tolerance_pct} %{mark} "
        f"band around the setpoint.{source}"
    )
    temperature = (
        "Skin and head temperature from the device's STATUS samples; dashed: skin limit "
        f"{values.skin_temp_max_c:g} °C{mark}"
        + ("" if head is None else f"; dotted: head limit {head:g} °C")
        + f".{source}"
    )
    return energy, temperature


def _limit_rows(limits: _Limits) -> list[tuple[str, str]]:
    values, mark = limits.values, limits.mark
    rows = [
        (
            "Limits in force",
            "recorded at session start"
            if limits.recorded
            else "not recorded in this log: defaults shown, not necessarily those in force",
        ),
        ("Energy tolerance per pulse", f"±{values.energy_tolerance_pct} % of the setpoint{mark}"),
        ("Skin temperature limit", f"{values.skin_temp_max_c:g} °C{mark}"),
    ]
    if values.head_temp_max_c is not None:
        rows.append(("Head temperature limit", f"{values.head_temp_max_c:g} °C"))
    return rows


def _when(ns: int) -> str:
    return iso_time(ns)[:19].replace("T", " ")


def _detail(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(detail.items()))


def write_report(conn: sqlite3.Connection, session_id: int, out: Path) -> None:
    out.write_text(render_report(conn, session_id), encoding="utf-8")
