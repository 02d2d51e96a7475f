"""check_session: the demo passes only when the log shows exactly what the script did."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devicectl.demo import ScriptRecord, check_session
from devicectl.demo.script import ACK_REASON
from devicectl.policy import PulseParams
from devicectl.sessionlog import ChainBreak, VerifyReport

SETPOINT = 6000
BREACH_AT = 21


def _good() -> tuple[dict[str, Any], ScriptRecord, VerifyReport]:
    pulses: list[dict[str, Any]] = [
        {"pulse_no": n, "energy_uj": SETPOINT + (n % 3) * 50, "zone": "forehead"}
        for n in range(1, 11)
    ]
    pulses += [
        {"pulse_no": n, "energy_uj": SETPOINT - 100, "zone": "cheeks"} for n in range(11, 21)
    ]
    pulses.append({"pulse_no": BREACH_AT, "energy_uj": round(SETPOINT * 1.3), "zone": "cheeks"})
    pulses += [{"pulse_no": n, "energy_uj": SETPOINT, "zone": "cheeks"} for n in range(22, 30)]
    for p in pulses:
        p["t_us"] = p["pulse_no"] * 40_000  # 25 Hz
    energy: dict[str, int] = {}
    for p in pulses:
        energy[p["zone"]] = energy.get(p["zone"], 0) + p["energy_uj"]
    summary = {
        "pulses": len(pulses),
        "unlogged_pulses": 0,
        "energy_per_zone_uj": energy,
        "faults": 1,
    }
    doc = {
        "outcome": "completed",
        "summary": summary,
        "pulses": pulses,
        "events": [
            {"event": "armed", "detail": {}, "reason": None},
            {
                "event": "breach",
                "detail": {"code": "energy_out_of_tolerance", "pulse_no": BREACH_AT},
                "reason": None,
            },
            {"event": "fault_ack", "detail": {}, "reason": ACK_REASON},
        ],
    }
    record = ScriptRecord(
        PulseParams(SETPOINT, 1000, 25000, 300),
        session_id=1,
        device_count_before=100,
        device_count_after=100 + len(pulses),
        daemon_pulses=len(pulses),
        breach={"code": "energy_out_of_tolerance", "pulse_no": BREACH_AT},
        end_summary={"pulses": len(pulses)},
        completed=True,
    )
    verified = VerifyReport(Path("sessions.db"), 60, len(pulses), 60, None)
    return doc, record, verified


def test_the_session_as_scripted_passes() -> None:
    doc, record, verified = _good()
    check = check_session(doc, record, verified, tolerance_pct=20)
    assert check.ok, check.problems
    assert check.pulses == 29
    assert check.breach_pulse_no == BREACH_AT
    assert check.pulses_after_breach == 8
    assert set(check.energy_per_zone_uj) == {"forehead", "cheeks"}


def test_pulses_in_flight_when_stop_was_written_are_accepted_when_recorded() -> None:
    doc, record, verified = _good()
    _in_flight(doc, 21)  # one period (40 ms) after the breaching pulse
    check = check_session(doc, record, verified, tolerance_pct=20)
    assert check.ok, check.problems
    assert check.in_flight == 1
    assert check.stop_within_us == 40_000


def _drop_pulse(doc: dict[str, Any], _record: ScriptRecord) -> None:
    del doc["pulses"][3]


def _device_counted_more(_doc: dict[str, Any], record: ScriptRecord) -> None:
    assert record.device_count_after is not None
    record.device_count_after += 1


def _two_breaches(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["events"].append(
        {"event": "breach", "detail": {"code": "over_rate", "pulse_no": 25}, "reason": None}
    )


def _unrecorded_in_flight(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["pulses"][21]["energy_uj"] = round(SETPOINT * 1.3)  # drifted, after the breach


def _in_flight(doc: dict[str, Any], pulse_index: int) -> None:
    pulse = doc["pulses"][pulse_index]
    drifted = round(SETPOINT * 1.3)
    doc["summary"]["energy_per_zone_uj"][pulse["zone"]] += drifted - pulse["energy_uj"]
    doc["summary"]["faults"] = 1  # a repeat is not another fault
    pulse["energy_uj"] = drifted
    doc["events"].insert(
        2,
        {
            "event": "breach_repeat",
            "detail": {"code": "energy_out_of_tolerance", "pulse_no": pulse["pulse_no"]},
            "reason": None,
        },
    )


def _late_stop(doc: dict[str, Any], _record: ScriptRecord) -> None:
    _in_flight(doc, 21)
    _in_flight(doc, 22)  # 80 ms after the breaching pulse


def _missed_first_drift(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["pulses"][19]["energy_uj"] = round(SETPOINT * 1.3)  # drifted, yet no breach there


def _nothing_after(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["pulses"] = doc["pulses"][:21]


def _no_ack(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["events"] = doc["events"][:2]


def _interrupted(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["outcome"] = "interrupted"


def _faults_uncounted(doc: dict[str, Any], _record: ScriptRecord) -> None:
    doc["summary"]["faults"] = 0


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_drop_pulse, "counts 29 pulses, the log holds 28"),
        (_device_counted_more, "the device's pulse counter counts 30 pulses"),
        (_two_breaches, "expected one breach"),
        (_unrecorded_in_flight, "drifted pulse(s) [22] have no breach record"),
        (_late_stop, "kept firing drifted pulses 80.0 ms after the breach at pulse 21"),
        (_missed_first_drift, "the breach stopped at pulse 21, the first drifted pulse is 20"),
        (_nothing_after, "no pulse was fired after the breach"),
        (_no_ack, "expected one acknowledgement"),
        (_interrupted, "not closed normally (outcome interrupted)"),
        (_faults_uncounted, "summary counts 0 fault(s)"),
    ],
)
def test_each_departure_from_the_script_is_named(
    spoil: Callable[[dict[str, Any], ScriptRecord], None], expected: str
) -> None:
    doc, record, verified = _good()
    doc = copy.deepcopy(doc)
    spoil(doc, record)
    check = check_session(doc, record, verified, tolerance_pct=20)
    assert not check.ok
    assert any(expected in problem for problem in check.problems), check.problems


def test_a_log_that_does_not_verify_fails_first() -> None:
    doc, record, verified = _good()
    broken = VerifyReport(
        verified.path,
        10,
        5,
        60,
        ChainBreak(11, "pulses", "altered", "record 11 (pulse 5) was altered"),
    )
    check = check_session(doc, record, broken, tolerance_pct=20)
    assert check.problems[0] == "the session log does not verify: record 11 (pulse 5) was altered"
