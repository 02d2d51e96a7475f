"""The treatment core, by plain synchronous calls: events in, effects out."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from devicectl.core import (
    PULSE_FOLLOW,
    PULSE_RECORD,
    PULSE_STOP,
    AckFault,
    ArmLaser,
    ChangeZone,
    CloseSession,
    DisarmLaser,
    EndSession,
    Heartbeats,
    RecordEvent,
    RecordGap,
    Refused,
    Send,
    SetParams,
    StartSession,
)
from devicectl.errors import DeviceRefused, LinkLost, SafetyRefusal
from devicectl.policy import PulseParams, SkinType, Zone
from protocols.messages import (
    Arm,
    ClearFault,
    DeviceState,
    Disarm,
    FaultCode,
    Interlock,
    MessageType,
)
from protocols.messages import SetParams as SetParamsCommand
from tests.core.helpers import (
    IDENT,
    NOW,
    PARAMS,
    PERIOD_US,
    ack,
    armed,
    connected,
    last,
    lease_expired,
    open_session,
    ready,
    refusal,
    reply,
    status,
    stopped,
)


def events(effects: Sequence[object], kind: str) -> list[RecordEvent]:
    return [e for e in effects if isinstance(e, RecordEvent) and e.kind == kind]


def train(
    core: object, first: int, count: int, energy: int = 6_000, period_us: int = PERIOD_US
) -> list[int]:
    on_pulse = core.on_pulse  # type: ignore[attr-defined]
    return [on_pulse(first + i, i * period_us, energy) for i in range(count)]


# ---------------------------------------------------------------- limits follow the device


def test_the_limits_in_force_change_at_the_set_params_ack_not_before() -> None:
    core = armed()
    effects = core.begin(DisarmLaser("OP-7"), NOW)
    reply(ack(core, effects))
    lower = PulseParams(5_000, 1_000, 10_000, 300)
    effects = core.begin(SetParams("OP-7", energy_uj=5_000), NOW)
    sent = last(effects)
    assert isinstance(sent, Send) and sent.command == SetParamsCommand(5_000, 1_000, 10_000, 300)
    supervisor = core.supervisor
    assert supervisor is not None and supervisor.limits is not None
    assert supervisor.limits.params == PARAMS  # in flight: the device still runs 6,000
    assert core.acked == PARAMS
    core.on_reply(MessageType.SET_PARAMS, True)
    assert core.acked == lower
    assert supervisor.limits.params == lower  # at the ACK
    reply(core.settled(MessageType.SET_PARAMS, None, NOW))
    assert core.chosen == lower


def test_a_set_params_never_acknowledged_leaves_the_device_params_unknown() -> None:
    core = connected()
    ready(core)
    reply(ack(core, core.begin(ArmLaser("OP-7"), NOW)))
    reply(ack(core, core.begin(DisarmLaser("OP-7"), NOW)))
    effects = core.begin(SetParams("OP-7", energy_uj=5_000), NOW)
    assert isinstance(last(effects), Send)
    refusal(core.settled(MessageType.SET_PARAMS, LinkLost("no reply"), NOW))
    assert core.acked is None  # it may have run: ARM sends the chosen ones again
    effects = core.begin(ArmLaser("OP-7"), NOW)
    sent = last(effects)
    assert isinstance(sent, Send) and sent.command == PARAMS.as_command()


def test_arm_judges_the_parameters_the_device_acknowledged_last() -> None:
    """After a reboot the device has no parameters: ARM sends them first and arms on what the
    device acknowledged."""
    core = connected()
    ready(core)
    core.on_boot(0)
    assert core.acked is None
    effects = core.begin(ArmLaser("OP-7"), NOW)
    assert isinstance(last(effects), Send) and last(effects).command == PARAMS.as_command()  # type: ignore[union-attr]
    effects = ack(core, effects)
    sent = last(effects)
    assert isinstance(sent, Send) and sent.command == Arm(1500)
    result = reply(ack(core, effects))
    assert result["armed"] is True
    assert core.supervisor is not None and core.supervisor.limits.params == PARAMS  # type: ignore[union-attr]


def test_operator_requests_do_not_overlap() -> None:
    core = connected()
    open_session(core)
    reply(core.begin(ChangeZone("OP-7", Zone.FOREHEAD), NOW))
    pending = core.begin(SetParams("OP-7", 5_000, 1_000, 10_000, 300), NOW)
    assert isinstance(last(pending), Send)
    overlapping = core.begin(ArmLaser("OP-7"), NOW)
    error = refusal(overlapping)
    assert isinstance(error, Refused) and error.rule == "request_in_progress"
    assert "params_set is in progress" in str(error)
    assert events(overlapping, "refused")[0].detail["command"] == "arm"
    assert not core.arming and not core.armed
    reply(ack(core, pending))
    assert core.busy is None


def test_a_zone_change_while_armed_is_refused_and_audited() -> None:
    core = armed(Zone.FOREHEAD, PulseParams(8_000, 1_000, 10_000, 300))
    effects = core.begin(ChangeZone("OP-7", Zone.PERIORBITAL), NOW)
    error = refusal(effects)
    assert isinstance(error, Refused) and error.rule == "disarm_first"
    assert core.zone is Zone.FOREHEAD and core.supervisor.zone is Zone.FOREHEAD  # type: ignore[union-attr]
    audit = events(effects, "refused")
    assert audit and audit[0].detail["command"] == "session_zone" and audit[0].session == 1


def test_a_zone_whose_cap_the_params_break_is_accepted_but_arming_is_refused() -> None:
    core = connected()
    ready(core, Zone.FOREHEAD, PulseParams(8_000, 1_000, 10_000, 300))  # 11.3 J/cm²
    result = reply(core.begin(ChangeZone("OP-7", Zone.PERIORBITAL), NOW))  # cap 10 J/cm²
    assert "arming is refused" in str(result["warning"])
    assert core.supervisor.zone is Zone.PERIORBITAL  # type: ignore[union-attr]
    effects = core.begin(ArmLaser("OP-7"), NOW)
    error = refusal(effects)
    assert isinstance(error, SafetyRefusal) and error.rule.startswith("max_fluence")
    assert events(effects, "refused")[0].detail["command"] == "arm"
    assert not core.arming


def test_refused_params_and_arm_are_audit_records() -> None:
    core = connected()
    open_session(core)
    effects = core.begin(ArmLaser("OP-7"), NOW)
    assert events(effects, "refused")[0].detail["rule"] == "no_zone"
    reply(core.begin(ChangeZone("OP-7", Zone.FOREHEAD), NOW))
    effects = core.begin(SetParams("OP-7", 60_000, 1_000, 10_000, 300), NOW)
    error = refusal(effects)
    assert isinstance(error, SafetyRefusal)
    record = events(effects, "refused")[0]
    assert (
        record.session == 1 and record.actor == "OP-7" and record.detail["command"] == "params_set"
    )


# ---------------------------------------------------------------- pulses and gaps


def test_an_accepted_pulse_is_recorded_and_nothing_else() -> None:
    core = armed()
    assert core.on_pulse(1, 0, 6_000) == PULSE_RECORD
    assert core.take_effects() == []
    assert core.ledger is not None and core.ledger.pulses == 1
    assert core.ledger.energy_by_zone_uj == {"forehead": 6_000}


def test_a_breach_stops_first_and_latches_in_its_session() -> None:
    core = armed()
    flags = core.on_pulse(1, 0, 9_000)  # 50 % over
    assert flags == PULSE_STOP | PULSE_FOLLOW | PULSE_RECORD
    effects = core.take_effects()
    assert events(effects, "breach")[0].detail["code"] == "energy_out_of_tolerance"
    assert core.latch_session == 1 and not core.armed
    assert core.ledger is not None and core.ledger.faults == 1


def test_pulses_lost_on_the_wire_are_charged_to_the_power_window() -> None:
    # 2.8 W of 3.0 set, the device delivering 2.9 W: within every rule while every PULSE arrives
    core = armed(Zone.CHEEKS, PulseParams(28_000, 1_000, 100_000, 1000))
    flags = train(core, 1, 100, energy=29_000, period_us=10_000)
    assert all(f == PULSE_RECORD for f in flags)
    # 101..105 lost on the wire; 106 seen on time: 5 × 60 mJ charged with it, 3.06 W
    verdict = core.on_pulse(106, 105 * 10_000, 29_000)
    assert verdict & PULSE_STOP
    effects = core.take_effects()
    gap = [e for e in effects if isinstance(e, RecordGap)]
    assert gap and (gap[0].first, gap[0].last, gap[0].charged_uj) == (101, 105, IDENT.max_energy_uj)
    breach = events(effects, "breach")[0].detail
    assert breach["code"] == "average_power", breach


def test_pulses_a_status_counts_but_never_arrived_are_charged_at_once() -> None:
    core = armed()
    train(core, 1, 3)
    effects = core.on_status(status(5, DeviceState.EMITTING, lease_left_ms=1000))
    gap = [e for e in effects if isinstance(e, RecordGap)]
    assert gap and (gap[0].first, gap[0].last) == (4, 5)
    assert core.supervisor is not None and core.supervisor.missed_pulses == 2
    assert core.ledger is not None and core.ledger.unlogged_pulses == 2
    assert core.ledger.energy_by_zone_uj["forehead"] == 3 * 6_000 + 2 * 60_000


# ---------------------------------------------------------------- faults and recovery


def test_a_device_fault_without_a_breach_is_cleared_by_an_acknowledgement() -> None:
    """After a restart the board holds LEASE_EXPIRED and the daemon no breach: `fault ack`
    sends CLEAR_FAULT and records who and why."""
    core = connected()
    core.on_status(lease_expired())
    assert core.latched is None and core.device_fault == FaultCode.LEASE_EXPIRED.bit
    open_session(core)
    reply(core.begin(ChangeZone("OP-7", Zone.FOREHEAD), NOW))
    reply(ack(core, core.begin(SetParams("OP-7", 6_000, 1_000, 10_000, 300), NOW)))
    error = refusal(core.begin(ArmLaser("OP-7"), NOW))
    assert isinstance(error, Refused) and error.rule == "device_fault"
    assert "lease_expired" in str(error) and "fault ack" in str(error)
    effects = core.begin(AckFault("OP-9", "daemon restarted after a crash"), NOW)
    sent = last(effects)
    assert isinstance(sent, Send) and sent.command == ClearFault()
    effects = ack(core, effects)
    result = reply(effects)
    assert result["acknowledged"] == "device_fault" and result["device_faults"] == ["lease_expired"]
    record = events(effects, "fault_ack")[0]
    assert record.actor == "OP-9" and record.reason == "daemon restarted after a crash"
    assert record.session == 1


def test_a_fault_the_device_keeps_is_refused_naming_what_to_do() -> None:
    core = connected()
    bits = FaultCode.INTERLOCK_OPENED.bit
    core.on_status(status(state=DeviceState.FAULT, faults=bits, interlocks=Interlock.DOOR))
    effects = ack(core, core.begin(AckFault("OP-9", "door closed"), NOW), acked=False)
    error = refusal(effects)
    assert isinstance(error, Refused) and error.rule == "device_fault_persists"


def test_nothing_latched_is_refused() -> None:
    core = connected()
    error = refusal(core.begin(AckFault("OP-9", "just in case"), NOW))
    assert isinstance(error, Refused) and error.rule == "nothing_latched"


def test_a_device_fault_breach_reads_as_a_sentence() -> None:
    core = armed()
    effects = core.on_fault(FaultCode.INTERLOCK_OPENED, int(Interlock.DOOR))
    assert stopped(effects)
    breach = events(effects, "breach")[0].detail
    assert breach["message"] == "device_fault: the device latched INTERLOCK_OPENED: door open"


def test_arming_with_the_footswitch_held_says_to_press_it_again() -> None:
    core = connected()
    ready(core)
    core.on_input(True, 0)
    result = reply(ack(core, core.begin(ArmLaser("OP-7"), NOW)))
    assert "release it and press it again" in str(result["note"])


# ---------------------------------------------------------------- sessions and the latch


def test_no_new_session_while_a_breach_is_latched() -> None:
    core = armed()
    core.on_pulse(1, 0, 9_000)
    core.take_effects()
    core.on_reply(MessageType.STOP, True)  # the breach's STOP acknowledged
    effects = core.begin(EndSession("OP-7"), NOW)
    assert isinstance(last(effects), CloseSession)  # nothing can fire: nothing to send
    reply(core.session_closed(NOW))
    effects = core.begin(StartSession("OP-8", "PT-0043", SkinType.II, None, "niacinamide"), NOW)
    error = refusal(effects)
    assert isinstance(error, Refused) and error.rule == "breach_latched"
    assert "in session 1" in str(error)
    effects = core.begin(AckFault("OP-7", "handpiece checked"), NOW)
    result = reply(effects)
    assert result["acknowledged"] == "energy_out_of_tolerance"
    assert events(effects, "fault_ack")[0].session == 1  # the breach's session, closed
    open_session(core, 2)
    # the new session's first records cite it: checked through the effects of session_opened


def test_a_session_ends_only_once_the_device_cannot_fire_for_it() -> None:
    core = armed()
    core.on_pulse(1, 0, 9_000)  # a breach: STOP written, not yet acknowledged
    core.take_effects()
    effects = core.begin(EndSession("OP-7"), NOW)
    assert isinstance(last(effects), Send) and last(effects).command == Disarm()  # type: ignore[union-attr]
    assert core.on_pulse(2, PERIOD_US, 6_000) & PULSE_RECORD  # still this session's
    effects = ack(core, effects)
    assert isinstance(last(effects), CloseSession)


def test_the_ledger_is_the_summary_of_session_end() -> None:
    core = armed()
    train(core, 1, 4)
    core.on_status(status(6, DeviceState.EMITTING, lease_left_ms=1000))  # 5, 6 lost
    core.take_effects()
    effects = core.begin(EndSession("OP-7"), NOW)
    effects = ack(core, effects)
    assert isinstance(last(effects), CloseSession)
    summary = reply(core.session_closed(NOW + 10**9))
    assert summary["pulses"] == 4 and summary["unlogged_pulses"] == 2
    assert summary["energy_per_zone_uj"] == {"forehead": 4 * 6_000 + 2 * 60_000}
    assert summary["faults"] == 1 and summary["duration_s"] == 1.0


@pytest.mark.parametrize("answer", ["nak", "lost"])
def test_an_arm_that_fails_leaves_nothing_armed(answer: str) -> None:
    core = connected()
    ready(core)
    effects = core.begin(ArmLaser("OP-7"), NOW)
    assert core.arming
    if answer == "nak":
        core.on_reply(MessageType.ARM, False)
        effects = core.settled(MessageType.ARM, DeviceRefused("ARM", "INTERLOCK_OPEN"), NOW)
        assert not stopped(effects)
    else:
        effects = core.settled(MessageType.ARM, LinkLost("no reply to ARM"), NOW)
        assert stopped(effects)  # it may have armed: STOP
    refusal(effects)
    assert not core.armed and not core.arming and core.busy is None
    assert not [e for e in effects if isinstance(e, Heartbeats) and e.lease_ms]


def test_the_ledger_carries_a_zone_total_across_visits() -> None:
    core = armed(Zone.FOREHEAD)
    train(core, 1, 2)
    reply(ack(core, core.begin(DisarmLaser("OP-7"), NOW)))
    reply(core.begin(ChangeZone("OP-7", Zone.CHEEKS), NOW))
    reply(core.begin(ChangeZone("OP-7", Zone.FOREHEAD), NOW))
    assert core.ledger is not None
    assert core.ledger.energy_by_zone_uj == {"forehead": 12_000}
    reply(ack(core, core.begin(ArmLaser("OP-7"), NOW)))
    core.on_pulse(3, 10 * PERIOD_US, 6_000)
    assert core.ledger.energy_by_zone_uj == {"forehead": 18_000}
    assert core.supervisor is not None
    assert core.supervisor.zone_energy_uj(Zone.FOREHEAD) == 18_000
