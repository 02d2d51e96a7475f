"""The session report a clinician prints and files: one self-contained HTML file.

It tells an auditor who did what under which limits: a banner and a section of their own for every
contraindication override and breach acknowledgement (who acted, which supervisor signed it off,
the reason code and the reason), the fluence cap each parameter set was checked against and the
rule that set it, the policy's name and SHA-256, software and firmware versions, start and end in
the clinic's time zone, the checklist with consent, the clinical entries appended after the end.
Every fact here is also in the JSON export (both start from :func:`session_document`). The report
is built from one function per section (:data:`_SECTIONS`), so a section is added in one place.

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
from devicectl.sessionlog.export import describe_event, local_time, session_document
from devicectl.sessionlog.model import LimitsInForce
from devicectl.users import ACK_REASON_CODES, OVERRIDE_REASON_CODES

__all__ = ["DEFAULT_LIMITS", "render_report", "write_report"]

# The supervisor's defaults (docs/safety-model.md), for logs that do not record the limits a
# session ran under.
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
.banner { background: #b00020; color: #fff; font-weight: 600; padding: .6rem .8rem;
  border-radius: 4px; margin: .8rem 0; }
.signoffs { border: 3px solid #b00020; border-radius: 4px; padding: .2rem .8rem .6rem;
  background: #fff5f6; margin-top: 1.2rem; }
.signoffs h2 { color: #b00020; border-bottom-color: #b00020; }
.adverse { border-left: 4px solid #b00020; }
tr.over td { color: #b00020; font-weight: 600; }
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
        by_no = {p.pulse_no: i for i, p in enumerate(pulses)}
        marked = False
        for breach in doc["breaches"]:
            at = by_no.get(breach["pulse_no"]) if breach["pulse_no"] is not None else None
            if at is None:
                continue
            ax.plot(
                x[at], energy[at], "x", markersize=11, markeredgewidth=2.5, color="#b00020",
                label="_nolegend_" if marked else "breaching pulse",
                gid=f"breach-pulse-{breach['pulse_no']}",
            )  # fmt: skip
            ax.annotate(
                f"pulse {breach['pulse_no']}: {str(breach['code']).replace('_', ' ')}",
                (x[at], energy[at]), textcoords="offset points", xytext=(6, 8), fontsize=8,
                color="#b00020",
            )  # fmt: skip
            marked = True
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
    """Bars of the energy delivered per zone, scaled to what was delivered (a limit 100 times
    larger would flatten them), each labelled with its limit as a number; a limit is drawn as a
    line only where it falls within the scale."""
    zones = sorted(set(energy) | set(limits))
    fig = Figure(figsize=(8, 2.8))
    ax = fig.add_subplot()
    if zones:
        delivered = [energy.get(z, 0) / 1e6 for z in zones]
        top = max(*delivered, 1e-6) * 1.35
        bars = ax.bar(zones, delivered, color="#1f4e9c", label="delivered")
        marked = False
        for i, (zone, bar) in enumerate(zip(zones, bars, strict=True)):
            limit = limits.get(zone)
            label = f"{delivered[i]:.3g} J"
            if limit is not None:
                label += f" of {limit / 1e6:g} J limit"
                if limit / 1e6 <= top:
                    ax.hlines(
                        limit / 1e6, i - 0.4, i + 0.4, colors="#c0392b", linewidth=2,
                        label="_nolegend_" if marked else "limit",
                    )  # fmt: skip
                    marked = True
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8,
            )  # fmt: skip
        ax.set_ylim(0, top)
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no zones treated", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("energy delivered (J)")
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _table(rows: list[tuple[str, str]], *, mono: set[str] | frozenset[str] = frozenset()) -> str:
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td{' class=mono' if k in mono else ''}>"
        f"{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f"<table>{body}</table>"


def _yes_no(value: object) -> str:
    if value is None:
        return "not answered"
    return "yes" if value else "no"


_SKIN = ["I", "II", "III", "IV", "V", "VI"]
_POST_CARE_WORDS = {
    "serum_or_moisturiser": "soothing serum or moisturiser",
    "avoid_sun": "avoid sun exposure",
    "sunscreen": "sunscreen",
    "gentle_skincare": "gentle skincare",
}


@dataclass(frozen=True, slots=True)
class _Context:
    """What every section may draw on."""

    doc: dict[str, Any]
    pulses: list[reader.PulseRow]
    limits: _Limits
    zone_energy: dict[str, int]
    zone: str  # the time zone the report shows

    def when(self, ns: int) -> str:
        return local_time(ns, self.zone)


def render_report(
    conn: sqlite3.Connection, session_id: int, *, time_zone: str | None = None
) -> str:
    """The HTML report of a session (see the module docstring). ``time_zone`` overrides the
    clinic time zone recorded with the session."""
    doc = session_document(conn, session_id, with_pulses=False, time_zone=time_zone)
    pulses = list(reader.iter_pulses(conn, session_id))
    ctx = _Context(doc, pulses, _limits(doc), _zone_energy(doc, pulses), doc["time_zone"])
    last_seq = conn.execute(
        "SELECT max(seq) FROM (SELECT max(seq) AS seq FROM records WHERE session_id = ? "
        "UNION ALL SELECT max(seq) FROM pulses WHERE session_id = ?)",
        (session_id, session_id),
    ).fetchone()[0]
    title = f"Treatment session {session_id} — {doc['info']['patient_ref']}"
    body = "\n".join(section(ctx) for section in _SECTIONS)
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class=sub>Laser mesotherapy — report generated from the tamper-evident session log
(records up to #{last_seq}); times are in {esc(ctx.zone)}.</p>
{body}
<div class=sign><div>Clinician (name, signature)</div><div>Date</div></div>
</body></html>
"""


def _banner(ctx: _Context) -> str:
    signoffs = ctx.doc["signoffs"]
    warnings = "".join(
        f"<p class=warn>{html.escape(w['message'])}</p>" for w in ctx.doc["course_warnings"]
    )
    if not signoffs:
        return warnings
    overrides = sum(1 for s in signoffs if s["kind"] == "override")
    acks = len(signoffs) - overrides
    parts = []
    if overrides:
        parts.append(f"{overrides} contraindication override{'s' if overrides > 1 else ''}")
    if acks:
        parts.append(f"{acks} breach acknowledgement{'s' if acks > 1 else ''}")
    text = (
        f"Treated under {' and '.join(parts)}: see “Overrides and sign-offs” below for who "
        "signed them off and why."
    )
    return f"<div id=override-banner class=banner role=alert>{html.escape(text)}</div>{warnings}"


def _signoffs(ctx: _Context) -> str:
    rows = []
    for s in ctx.doc["signoffs"]:
        codes = OVERRIDE_REASON_CODES if s["kind"] == "override" else ACK_REASON_CODES
        what = (
            "Contraindication override: "
            + ", ".join(str(c).replace("_", " ") for c in s["contraindications"])
            if s["kind"] == "override"
            else "Breach acknowledged: " + str(s["breach"] or "").replace("_", " ")
        )
        signed = (
            f"{s['signed_off_by']} ({s['signed_off_role']})"
            if s["signed_off_by"]
            else "NOT SIGNED OFF (recorded before sign-offs were required)"
        )
        code = s["reason_code"]
        code_text = f"{code} — {codes[code]}" if code in codes else (code or "—")
        rows.append(
            f"<tr><td>{_e(ctx.when(s['at_ns']))}</td><td>{_e(what)}</td>"
            f"<td>{_e(_who(s['actor'], s['role']))}</td><td>{_e(signed)}</td>"
            f"<td>{_e(code_text)}</td><td>{_e(s['reason'] or '')}</td></tr>"
        )
    table = (
        "<table id=signoff-table><tr><th>Time</th><th>What</th><th>By</th>"
        "<th>Signed off by</th><th>Reason code</th><th>Reason</th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else "<p>None: no contraindication was overridden and no breach acknowledged.</p>"
    )
    return f"<section id=signoffs class=signoffs><h2>Overrides and sign-offs</h2>{table}</section>"


def _session(ctx: _Context) -> str:
    doc, info = ctx.doc, ctx.doc["info"]
    prov = doc["provenance"] or {}
    rows = [
        ("Session", str(doc["session_id"])),
        ("Started", ctx.when(doc["started_ns"])),
        ("Ended", ctx.when(doc["summary"]["ended_ns"]) if doc["summary"] else "not ended"),
        ("Operator", _who(info["operator"], info.get("operator_role"))),
        ("Patient reference", info["patient_ref"]),
        ("Fitzpatrick skin type", _SKIN[info["skin_type"] - 1]),
        ("Concerns", ", ".join(c.replace("_", " ") for c in info["concerns"]) or "—"),
        ("Course", _course(doc)),
        ("Active ingredient", _ingredient(info)),
        ("Device serial", info["device_serial"]),
        ("Software", f"devicectl {prov['software_version']}" if prov else "not recorded"),
        ("Firmware", prov.get("firmware_version") or "not recorded"),
        ("Policy", prov.get("policy_name") or "not recorded"),
        ("Policy SHA-256", prov.get("policy_sha256") or "not recorded"),
    ]
    return f"<section><h2>Session</h2>{_table(rows, mono={'Policy SHA-256'})}</section>"


def _summary(ctx: _Context) -> str:
    summary, limits = ctx.doc["summary"], ctx.limits
    if summary is not None:
        session_limit = limits.values.session_energy_j
        rows = [
            ("Outcome", summary["outcome"]),
            ("Pulses logged", f"{summary['pulses']:,}"),
            ("Unlogged pulses (charged at max energy)", f"{summary['unlogged_pulses']:,}"),
            (
                "Total energy",
                f"{summary['total_energy_uj'] / 1e6:.3f} J"
                + ("" if session_limit is None else f" of {session_limit:g} J session limit"),
            ),
            ("Peak fluence", _peak(ctx)),
            ("Duration", f"{summary['duration_s'] / 60:.1f} min"),
            ("Safety breaches", str(len(ctx.doc["breaches"]))),
            ("Faults and safety events", str(summary["faults"])),
            ("Overrides and sign-offs", str(len(ctx.doc["signoffs"]))),
        ] + [
            (f"Energy, {zone}", _of_limit(e, limits.zone_energy_uj.get(zone)))
            for zone, e in sorted(ctx.zone_energy.items())
        ]
    else:
        rows = [("Outcome", "open (not ended)"), ("Pulses logged", f"{len(ctx.pulses):,}")]
    rows += _limit_rows(limits)
    return f"<section><h2>Summary</h2>{_table(rows)}</section>"


def _checklist(ctx: _Context) -> str:
    checklist = ctx.doc["info"]["checklist"]
    numbing = _yes_no(checklist["numbing_applied"])
    if checklist.get("numbing_agent"):
        numbing += f": {checklist['numbing_agent']}, {checklist['numbing_contact_min']} min contact"
    rows = [
        ("Consultation done", _yes_no(checklist["consultation_done"])),
        ("Informed consent given", _yes_no(checklist.get("consent_given"))),
        ("Area cleaned", _yes_no(checklist["area_cleaned"])),
        ("Numbing applied", numbing),
    ] + [
        (f"Contraindication: {name.replace('_', ' ')}", _yes_no(answer))
        for name, answer in checklist["contraindications"].items()
    ]
    return f"<h2>Pre-treatment checklist</h2>{_table(rows)}"


def _zones(ctx: _Context) -> str:
    rows = "".join(
        f"<tr><td>{_e(ctx.when(z['at_ns']))}</td><td>{_e(z['zone'])}</td><td class=num>"
        f"{'—' if not z['energy_limit_uj'] else format(z['energy_limit_uj'] / 1e6, 'g')}</td>"
        f"<td>{_e(_who(z['actor'], z.get('role')))}</td></tr>"
        for z in ctx.doc["zones"]
    )
    return (
        "<h2>Zones</h2><table><tr><th>Time</th><th>Zone</th><th>Energy limit (J)</th>"
        f"<th>By</th></tr>{rows}</table>"
    )


def _parameters(ctx: _Context) -> str:
    """Every parameter set with the fluence cap it was checked against and the rule that set it."""
    rows = []
    for p in ctx.doc["params"]:
        cap = p.get("fluence_limit")
        if cap:
            cells = (
                f"<td class=num>{cap['fluence_j_cm2']:.3g}</td>"
                f"<td class=num>{cap['max_fluence_j_cm2']:g}</td>"
                f"<td>{_e(_rule(cap['rule']))}</td><td>{_e(cap.get('preset') or '—')}</td>"
            )
        else:
            cells = "<td colspan=4>not recorded (older log)</td>"
        rows.append(
            f"<tr><td>{_e(ctx.when(p['at_ns']))}</td><td class=num>{p['energy_uj'] / 1000:g}</td>"
            f"<td class=num>{p['width_us']}</td><td class=num>{p['rate_mhz'] / 1000:g}</td>"
            f"<td class=num>{p['spot_um']}</td>{cells}"
            f"<td>{_e(_who(p['actor'], p.get('role')))}</td></tr>"
        )
    return (
        "<h2>Parameters and fluence limits</h2><table id=fluence-caps><tr><th>Time</th>"
        "<th>Energy (mJ)</th><th>Width (µs)</th><th>Rate (Hz)</th><th>Spot (µm)</th>"
        "<th>Fluence (J/cm²)</th><th>Fluence cap (J/cm²)</th><th>Cap set by</th><th>Preset</th>"
        f"<th>By</th></tr>{''.join(rows)}</table>"
    )


def _plots(ctx: _Context) -> str:
    energy_caption, temperature_caption = _captions(ctx.limits)
    if ctx.doc["breaches"]:
        energy_caption += " A red cross marks each breaching pulse."
    return f"""<h2>Energy per pulse</h2>
<figure id=plot-energy>{_energy_plot(ctx.doc, ctx.pulses, ctx.limits)}<figcaption>
{_e(energy_caption)}</figcaption></figure>
<h2>Temperature</h2>
<figure id=plot-temperature>{_temperature_plot(ctx.doc, ctx.limits)}<figcaption>
{_e(temperature_caption)}</figcaption></figure>
<h2>Energy per zone</h2>
<figure id=plot-zones>{_zone_plot(ctx.zone_energy, ctx.limits.zone_energy_uj)}<figcaption>Energy
delivered per zone (unlogged pulses charged at maximum energy), scaled to what was delivered, each
labelled with the zone's limit as recorded when the zone was chosen.</figcaption></figure>"""


def _events(ctx: _Context) -> str:
    rows = "".join(
        f"<tr{' class=over' if e['event'] == 'breach' else ''}><td>{_e(ctx.when(e['at_ns']))}"
        f"</td><td>{_e(describe_event(e))}</td><td>{_e(_who(e['actor'], e.get('role')))}</td>"
        f"<td>{_e(e['reason'] or '')}</td></tr>"
        for e in ctx.doc["events"]
    ) + "".join(
        f"<tr class=over><td>{_e(ctx.when(g['at_ns']))}</td><td>Pulse gap: pulses "
        f"{g['first']}–{g['last']} ({g['count']}) charged {g['charged_energy_uj'] / 1000:g} mJ "
        f"each to {_e(g['zone'])}</td><td>log</td><td>{_e(g['cause'])}</td></tr>"
        for g in ctx.doc["pulse_gaps"]
    )
    return (
        "<h2>Safety events and operator actions</h2><table id=events><tr><th>Time</th>"
        "<th>What</th><th>By</th><th>Reason</th></tr>"
        f"{rows or '<tr><td colspan=4>none</td></tr>'}</table>"
    )


def _aftercare(ctx: _Context) -> str:
    doc = ctx.doc
    if doc["post_care_declined"]:
        care = f"Declined: {doc['post_care_declined']}"
    else:
        care = ", ".join(_POST_CARE_WORDS.get(p, p.replace("_", " ")) for p in doc["post_care"])
        care = care or "none recorded"
    entries = []
    for r in doc["reactions"]:
        seen = f"erythema {r.get('erythema', '—')}, oedema {r.get('oedema', '—')}"
        if r.get("text"):
            seen += f"; {r['text']}"
        entries.append(("Immediate reaction", r, seen, ""))
    for a in doc["adverse_events"]:
        text = f"{a['severity']}: {a['text']}"
        if a.get("action_taken"):
            text += f" — action: {a['action_taken']}"
        entries.append(("Adverse event", a, text, " class=adverse"))
    entries.extend(("Note", n, n["text"], "") for n in doc["notes"])
    entries.sort(key=lambda entry: entry[1]["seq"])
    rows = "".join(
        f"<tr{css}><td>{_e(ctx.when(rec['at_ns']))}</td><td>{_e(kind)}</td><td>{_e(text)}</td>"
        f"<td>{_e(_who(rec['actor'], rec.get('role')))}</td></tr>"
        for kind, rec, text, css in entries
    )
    clinical = (
        "<table id=clinical><tr><th>Time</th><th>Entry</th><th>Recorded</th><th>By</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>No reaction, adverse event or note recorded.</p>"
    )
    return (
        f"<h2>Post-treatment care</h2><p id=post-care>{_e(care)}</p>"
        f"<h2>Reactions, adverse events and notes</h2>{clinical}"
    )


def _overview(ctx: _Context) -> str:
    return f"<div class=grid>{_session(ctx)}{_summary(ctx)}</div>"


# The report, top to bottom: one function per section, each (ctx) -> HTML.
_SECTIONS = (
    _banner,
    _overview,
    _signoffs,
    _checklist,
    _zones,
    _parameters,
    _plots,
    _events,
    _aftercare,
    lambda ctx: _checkpoint_section(ctx.doc.get("checkpoint")),
)


def _checkpoint_section(checkpoint: dict[str, Any] | None) -> str:
    """The signed checkpoint covering the session: what lets anyone holding this report show
    later that the log still holds the session as the device wrote it (docs/session-log.md)."""
    if checkpoint is None:
        return (
            "<h2 id=log-checkpoint>Log checkpoint</h2><p class=warn>No signed checkpoint of the "
            "session log covers this session yet: the report cannot be checked against the log "
            "later. Export it again once the session has ended.</p>"
        )
    rows = [
        ("Covers log records", f"1 to {checkpoint['log_seq']} (checkpoint record "
         f"{checkpoint.get('record_seq', '?')})"),
        ("Device", str(checkpoint["device"])),
        ("Signed at", str(checkpoint["time"])),
        ("Key fingerprint (key id)", str(checkpoint["key_id"])),
        ("Public key (Ed25519)", str(checkpoint["public_key"])),
        ("Chain hash (SHA-256)", str(checkpoint["hash"])),
        ("Signature", str(checkpoint["signature"])),
    ]  # fmt: skip
    table = "".join(
        f"<tr><th>{_e(name)}</th><td class=mono>{_e(value)}</td></tr>" for name, value in rows
    )
    return (
        f"<h2 id=log-checkpoint>Log checkpoint</h2><table>{table}</table><p class=sub>Signed by "
        "the device's key. Keep this session's JSON export (or the checkpoint published over "
        "MQTT): <span class=mono>devicectl log verify --checkpoints FILE --key PUBKEY</span> "
        "then proves that no record up to this one was altered, deleted or removed.</p>"
    )


def _e(text: object) -> str:
    return html.escape(str(text))


def _who(user: object, role: object) -> str:
    return f"{user} ({role})" if role else str(user)


def _rule(rule: str) -> str:
    if rule.startswith("max_fluence_skin_type_"):
        return f"skin type {rule.removeprefix('max_fluence_skin_type_')}"
    if rule.startswith("max_fluence_zone_"):
        return f"zone {rule.removeprefix('max_fluence_zone_')}"
    return rule.replace("_", " ")


def _course(doc: dict[str, Any]) -> str:
    course, position = doc["info"]["course"], doc["course_position"]
    if position is None:  # an older log: as typed
        return (
            f"session {course['session_number']} of {course['planned_sessions']} as typed "
            f"(course {course['course_id']})"
        )
    if position["kind"] == "maintenance":
        text = (
            f"maintenance session {position['number']} after a completed course of "
            f"{position['planned']}"
        )
    else:
        text = f"session {position['number']} of {position['planned']}"
    text += f" (course {course['course_id']}, from the log"
    if position.get("typed_number") is not None:
        text += f"; typed as {position['typed_number']}"
    return text + ")"


def _ingredient(info: dict[str, Any]) -> str:
    text = str(info["active_ingredient"])
    if info.get("ingredient_amount") is not None:
        text += f", {info['ingredient_amount']:g} {info.get('ingredient_unit') or ''}".rstrip()
    if info.get("ingredient_lot"):
        text += f", lot {info['ingredient_lot']}"
    return text


def _peak(ctx: _Context) -> str:
    peak = ctx.doc["summary"]["peak_fluence_j_cm2"]
    caps = [p["fluence_limit"] for p in ctx.doc["params"] if p.get("fluence_limit")]
    if not caps:
        return f"{peak:.3f} J/cm²"
    cap = min(caps, key=lambda c: c["max_fluence_j_cm2"])
    return (
        f"{peak:.3f} J/cm² (tightest cap in force {cap['max_fluence_j_cm2']:g} J/cm², "
        f"set by {_rule(cap['rule'])})"
    )


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


def write_report(
    conn: sqlite3.Connection, session_id: int, out: Path, *, time_zone: str | None = None
) -> None:
    out.write_text(render_report(conn, session_id, time_zone=time_zone), encoding="utf-8")
