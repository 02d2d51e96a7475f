"""Did the demo play as scripted? Checked against the session log, never against the script alone.

:func:`check_session` compares what the script saw (the daemon's replies, the board's pulse
counter) with the session's record in the log (``session_document``) and the hash chain's
verification. The first mismatch is the demo's one-line reason for exit 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from devicectl.demo.script import ACK_REASON, ScriptRecord
from devicectl.sessionlog.verify import VerifyReport

__all__ = ["EXPECTED_BREACH", "STOP_WITHIN_US", "SessionCheck", "check_session"]

EXPECTED_BREACH = "energy_out_of_tolerance"
_BREACH_EVENT = "breach"  # the daemon records a repeat of a latched rule as "breach_repeat"
_REPEAT_EVENT = "breach_repeat"
_ACK_EVENT = "fault_ack"
# Pulses already on their way when STOP was written are expected (the link is not instantaneous);
# the board must have stopped within this much device time of the breaching pulse.
STOP_WITHIN_US = 50_000


@dataclass(frozen=True, slots=True)
class SessionCheck:
    """``problems`` empty: the session played as scripted. Counts are from the log."""

    problems: tuple[str, ...]
    pulses: int
    pulses_after_breach: int
    energy_per_zone_uj: dict[str, int]
    breach_pulse_no: int | None
    in_flight: int = 0  # drifted pulses the board fired before the STOP reached it
    stop_within_us: int | None = None  # device time from the breaching pulse to the last of them

    @property
    def ok(self) -> bool:
        return not self.problems


def _outside(energy_uj: int, setpoint_uj: int, tolerance_pct: int) -> bool:
    return 100 * abs(energy_uj - setpoint_uj) > tolerance_pct * setpoint_uj


def check_session(
    doc: dict[str, Any],
    record: ScriptRecord,
    verified: VerifyReport,
    *,
    tolerance_pct: int,
) -> SessionCheck:
    """Every way the session can differ from the script, in the order a reader would ask."""
    problems: list[str] = []
    pulses: list[dict[str, Any]] = doc.get("pulses", [])
    summary: dict[str, Any] | None = doc.get("summary")
    setpoint = record.params.energy_uj

    if not verified.ok:
        brk = verified.first_break
        problems.append(f"the session log does not verify: {brk.message if brk else 'broken'}")
    if doc.get("outcome") != "completed" or summary is None:
        problems.append(f"the session was not closed normally (outcome {doc.get('outcome')})")
        summary = summary or {}

    logged = len(pulses)
    counts = {
        "the log's summary": summary.get("pulses"),
        "the daemon": record.daemon_pulses,
        "the session end reply": (record.end_summary or {}).get("pulses"),
    }
    if record.device_count_before is not None and record.device_count_after is not None:
        counts["the device's pulse counter"] = (
            record.device_count_after - record.device_count_before
        )
    for source, count in counts.items():
        if count != logged:
            problems.append(f"{source} counts {count} pulses, the log holds {logged}")
    if summary.get("unlogged_pulses"):
        problems.append(f"{summary['unlogged_pulses']} pulse(s) went unlogged")

    by_zone: Counter[str] = Counter()
    for pulse in pulses:
        by_zone[pulse["zone"]] += pulse["energy_uj"]
    energy = dict(sorted(by_zone.items()))
    if summary and {str(k): v for k, v in summary.get("energy_per_zone_uj", {}).items()} != energy:
        problems.append(
            f"energy per zone in the summary {summary.get('energy_per_zone_uj')} differs "
            f"from the logged pulses {energy}"
        )
    if set(energy) != {"forehead", "cheeks"}:
        problems.append(
            f"pulses were expected in forehead and cheeks, the log has {sorted(energy)}"
        )

    events: list[dict[str, Any]] = doc.get("events", [])
    breaches = [e for e in events if e.get("event") == _BREACH_EVENT]
    repeated = {
        e.get("detail", {}).get("pulse_no") for e in events if e.get("event") == _REPEAT_EVENT
    }
    breach_pulse_no: int | None = None
    in_flight: list[dict[str, Any]] = []
    stop_within_us: int | None = None
    codes = [b.get("detail", {}).get("code") for b in breaches]
    drifted = [p for p in pulses if _outside(p["energy_uj"], setpoint, tolerance_pct)]
    if codes != [EXPECTED_BREACH]:
        problems.append(f"expected one breach, {EXPECTED_BREACH}; the log has {codes or 'none'}")
    if breaches:
        breach_pulse_no = breaches[0].get("detail", {}).get("pulse_no")
        if not drifted or drifted[0]["pulse_no"] != breach_pulse_no:
            first = drifted[0]["pulse_no"] if drifted else None
            problems.append(
                f"the breach stopped at pulse {breach_pulse_no}, the first drifted pulse is {first}"
            )
        else:
            in_flight = drifted[1:]
            unrecorded = [p["pulse_no"] for p in in_flight if p["pulse_no"] not in repeated]
            if unrecorded:
                problems.append(f"drifted pulse(s) {unrecorded} have no breach record")
            if in_flight:
                stop_within_us = (in_flight[-1]["t_us"] - drifted[0]["t_us"]) % 2**32
                if stop_within_us > STOP_WITHIN_US:
                    problems.append(
                        f"the laser kept firing drifted pulses {stop_within_us / 1000:.1f} ms "
                        f"after the breach at pulse {breach_pulse_no} (pulses "
                        f"{[p['pulse_no'] for p in in_flight]}); STOP must take effect within "
                        f"{STOP_WITHIN_US / 1000:g} ms"
                    )
    if summary and summary.get("faults") != len(breaches):
        problems.append(
            f"the log's summary counts {summary.get('faults')} fault(s), "
            f"the log holds {len(breaches)} breach(es)"
        )
    after = sum(
        1 for p in pulses if breach_pulse_no is not None and p["pulse_no"] > breach_pulse_no
    )
    if breach_pulse_no is not None and after == 0:
        problems.append("no pulse was fired after the breach was acknowledged")
    acks = [e for e in events if e.get("event") == _ACK_EVENT]
    if [a.get("reason") for a in acks] != [ACK_REASON]:
        problems.append(f"expected one acknowledgement with its reason, the log has {len(acks)}")
    return SessionCheck(
        tuple(problems),
        logged,
        after,
        energy,
        breach_pulse_no,
        in_flight=len(in_flight),
        stop_within_us=stop_within_us,
    )
