"""Every rule of the supervisor, one at a time, with the edges spelled out."""

from __future__ import annotations

import sys

import pytest

from devicectl.errors import SafetyRefusal
from devicectl.policy import PulseParams, Zone
from devicectl.safety import (
    AcknowledgementRefused,
    BreachCode,
    SafetySupervisor,
    SessionLimits,
    Severity,
)
from protocols.messages import DeviceState, Interlock
from tests.safety.helpers import limits, session

U32 = 2**32
# 10 mJ at 10 Hz: period 100 ms, over-rate below 90 ms, 0.1 W.
PARAMS = PulseParams(energy_uj=10_000, width_us=1000, rate_mhz=10_000, spot_um=300)
PERIOD = 100_000


def armed(s: SessionLimits | None = None, zone_energy_j: float = 80.0) -> SafetySupervisor:
    sup = SafetySupervisor(s or session())
    sup.set_zone(Zone.CHEEKS, limits(sup.session_limits, Zone.CHEEKS, PARAMS, zone_energy_j))
    sup.arm()
    return sup


def train(sup: SafetySupervisor, count: int, *, first_no: int = 1, t0: int = 0) -> list[int]:
    return [sup.on_pulse(first_no + i, (t0 + i * PERIOD) % U32, 10_000) for i in range(count)]


def test_a_clean_train_passes_and_is_counted() -> None:
    sup = armed()
    assert train(sup, 20) == [0] * 20
    assert sup.pulses == 20
    assert sup.zone_energy_uj(Zone.CHEEKS) == sup.session_energy_uj == 200_000
    assert sup.latched is None and sup.last_breach is None


# ---------------------------------------------------------------- rule 1: uncommanded emission


def test_a_pulse_before_arming_is_uncommanded_emission() -> None:
    sup = SafetySupervisor(session())
    assert sup.on_pulse(1, 0, 10_000) == BreachCode.UNCOMMANDED_EMISSION
    breach = sup.last_breach
    assert breach is not None and breach.severity is Severity.CRITICAL
    assert breach.pulse_no == 1 and breach.alert_code == "uncommanded_emission"


def test_a_pulse_after_disarm_is_uncommanded_even_at_the_right_energy_and_rate() -> None:
    sup = armed()
    assert train(sup, 3) == [0, 0, 0]
    sup.disarm()
    assert sup.on_pulse(4, 3 * PERIOD, 10_000) == BreachCode.UNCOMMANDED_EMISSION


def test_uncommanded_emission_takes_precedence_over_every_other_rule() -> None:
    sup = SafetySupervisor(session())
    sup.set_zone(Zone.CHEEKS, limits(sup.session_limits, Zone.CHEEKS, PARAMS, 0.001))
    # energy far off, too soon, over the zone: still reported as uncommanded first
    assert sup.on_pulse(1, 0, 60_000) == BreachCode.UNCOMMANDED_EMISSION
    assert sup.on_pulse(2, 1, 60_000) == BreachCode.UNCOMMANDED_EMISSION


# ---------------------------------------------------------------- rule 2: energy tolerance


@pytest.mark.parametrize(
    ("energy", "verdict"),
    [
        (8_000, 0),  # exactly -20 %
        (7_999, BreachCode.ENERGY_OUT_OF_TOLERANCE),
        (12_000, 0),  # exactly +20 %
        (12_001, BreachCode.ENERGY_OUT_OF_TOLERANCE),
        (0, BreachCode.ENERGY_OUT_OF_TOLERANCE),
    ],
)
def test_measured_energy_within_20_percent_of_the_setpoint(energy: int, verdict: int) -> None:
    sup = armed()
    assert sup.on_pulse(1, 0, energy) == verdict


def test_an_energy_breach_reports_the_bound_it_crossed() -> None:
    sup = armed()
    sup.on_pulse(1, 0, 13_000)
    assert sup.last_breach is not None
    assert (sup.last_breach.value, sup.last_breach.limit, sup.last_breach.unit) == (
        13_000,
        12_000,
        "µJ",
    )
    sup.on_pulse(2, PERIOD, 5_000)
    assert sup.last_breach.limit == 8_000


# ---------------------------------------------------------------- rule 3: over-rate


def test_an_interval_of_90_percent_of_the_period_passes_and_one_microsecond_less_breaches() -> None:
    sup = armed()
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(2, 90_000, 10_000) == 0
    assert sup.on_pulse(3, 90_000 + 89_999, 10_000) == BreachCode.OVER_RATE
    assert sup.last_breach is not None and sup.last_breach.value == 89_999


def test_the_device_clock_wrapping_is_not_a_short_interval() -> None:
    sup = armed()
    assert sup.on_pulse(1, U32 - 40_000, 10_000) == 0
    assert sup.on_pulse(2, 60_000, 10_000) == 0  # 100 ms later, across the wrap
    assert sup.on_pulse(3, 60_000 + PERIOD, 10_000) == 0


def test_a_short_interval_across_the_wrap_is_caught() -> None:
    sup = armed()
    assert sup.on_pulse(1, U32 - 10_000, 10_000) == 0
    assert sup.on_pulse(2, 20_000, 10_000) == BreachCode.OVER_RATE  # 30 ms later
    assert sup.last_breach is not None and sup.last_breach.value == 30_000


def test_the_first_pulse_after_arming_or_new_params_starts_a_new_train() -> None:
    sup = armed()
    assert sup.on_pulse(1, 0, 10_000) == 0
    sup.disarm()
    sup.arm()
    assert sup.on_pulse(2, 1_000, 10_000) == 0  # the first of a new train
    sup.set_params(limits(sup.session_limits, Zone.CHEEKS, PARAMS))
    assert sup.on_pulse(3, 2_000, 10_000) == 0
    assert sup.on_pulse(4, 3_000, 10_000) == BreachCode.OVER_RATE


# ---------------------------------------------------------------- rule 4: 1 s average power


def test_average_power_over_a_sliding_second_and_its_edges() -> None:
    # 0.02 W = 20 mJ per second: two 10 mJ pulses fit in any 1 s, three do not.
    sup = armed(session(max_average_power_w=0.02))
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(2, 500_000, 10_000) == 0  # 20 mJ in the window: at the limit, not above
    assert sup.on_pulse(3, 999_999, 10_000) == BreachCode.AVERAGE_POWER  # pulse 1 still inside
    breach = sup.last_breach
    assert breach is not None and (breach.value, breach.limit, breach.unit) == (0.03, 0.02, "W")


def test_a_pulse_exactly_one_second_old_has_left_the_window() -> None:
    sup = armed(session(max_average_power_w=0.02))
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(2, 500_000, 10_000) == 0
    assert sup.on_pulse(3, 1_000_000, 10_000) == 0  # pulse 1 is exactly 1 s old: out
    assert sup.window_power_w == pytest.approx(0.02)


def test_the_window_follows_the_device_clock_across_the_wrap() -> None:
    sup = armed(session(max_average_power_w=0.02))
    assert sup.on_pulse(1, U32 - 300_000, 10_000) == 0
    assert sup.on_pulse(2, 100_000, 10_000) == 0
    assert sup.on_pulse(3, 600_000, 10_000) == BreachCode.AVERAGE_POWER  # 900 ms after pulse 1
    assert sup.on_pulse(4, 1_099_999, 10_000) == BreachCode.AVERAGE_POWER  # 2 and 3 inside
    assert sup.on_pulse(5, 2_200_000, 10_000) == 0


def test_a_full_window_folds_entries_and_never_undercounts() -> None:
    # A ring of 16 slots and pulses 1 ms apart (the rate rule is satisfied by a fast setpoint):
    # the window must still count every pulse of the last second.
    fast = PulseParams(energy_uj=1_000, width_us=100, rate_mhz=500_000, spot_um=300)
    s = session(max_average_power_w=0.0405)  # 40.5 mJ per second: 41 pulses of 1 mJ breach
    sup = SafetySupervisor(s, window_capacity=16)
    sup.set_zone(Zone.CHEEKS, limits(s, Zone.CHEEKS, fast))
    sup.arm()
    verdicts = [sup.on_pulse(i + 1, i * 2_000, 1_000) for i in range(41)]
    assert verdicts[:40] == [0] * 40
    assert verdicts[40] == BreachCode.AVERAGE_POWER
    assert sup.window_power_w >= 0.041


# ---------------------------------------------------------------- rule 5: cumulative energy


def test_zone_energy_limit() -> None:
    sup = armed(zone_energy_j=0.03)  # three 10 mJ pulses
    assert train(sup, 4) == [0, 0, 0, BreachCode.ZONE_ENERGY]
    breach = sup.last_breach
    assert breach is not None and (breach.value, breach.limit, breach.unit) == (0.04, 0.03, "J")


def test_session_energy_limit_spans_zones() -> None:
    s = session(session_energy_j=0.05)
    sup = SafetySupervisor(s)
    sup.set_zone(Zone.CHEEKS, limits(s, Zone.CHEEKS, PARAMS))
    sup.arm()
    assert train(sup, 3) == [0, 0, 0]
    sup.set_zone(Zone.NECK, limits(s, Zone.NECK, PARAMS))
    assert train(sup, 3, first_no=4, t0=10 * PERIOD) == [0, 0, BreachCode.SESSION_ENERGY]


def test_zone_energy_is_carried_across_zone_changes_and_re_arms() -> None:
    s = session()
    sup = SafetySupervisor(s)
    sup.set_zone(Zone.CHEEKS, limits(s, Zone.CHEEKS, PARAMS, 0.05))
    sup.arm()
    assert train(sup, 3) == [0, 0, 0]
    sup.disarm()
    sup.set_zone(Zone.FOREHEAD, limits(s, Zone.FOREHEAD, PARAMS, 0.05))
    sup.arm()
    assert train(sup, 2, first_no=4, t0=10 * PERIOD) == [0, 0]
    sup.disarm()
    sup.set_zone(Zone.CHEEKS, limits(s, Zone.CHEEKS, PARAMS, 0.05))
    sup.arm()
    assert sup.zone_energy_uj(Zone.CHEEKS) == 30_000
    assert sup.zone_energy_uj(Zone.FOREHEAD) == 20_000
    assert train(sup, 3, first_no=6, t0=20 * PERIOD) == [0, 0, BreachCode.ZONE_ENERGY]
    assert sup.session_energy_uj == 80_000


def test_arming_a_spent_zone_or_session_is_refused() -> None:
    s = session(session_energy_j=0.05)
    sup = SafetySupervisor(s)
    sup.set_zone(Zone.CHEEKS, limits(s, Zone.CHEEKS, PARAMS, 0.02))
    sup.arm()
    assert train(sup, 2) == [0, 0]
    sup.disarm()
    with pytest.raises(SafetyRefusal) as refused:
        sup.arm()
    assert (refused.value.rule, refused.value.value, refused.value.bound) == (
        "zone_energy",
        0.02,
        0.02,
    )
    sup.set_zone(Zone.NECK, limits(s, Zone.NECK, PARAMS, 1.0))
    sup.arm()
    assert train(sup, 3, first_no=3, t0=10 * PERIOD) == [0, 0, 0]
    sup.disarm()
    with pytest.raises(SafetyRefusal) as refused:
        sup.arm()
    assert refused.value.rule == "session_energy"
    assert not sup.armed


# ---------------------------------------------------------------- rule 6: gaps in pulse_no


def test_missing_pulses_are_charged_at_the_device_maximum_energy() -> None:
    sup = armed(session(device_max_energy_uj=60_000))
    assert sup.on_pulse(100, 0, 10_000) == 0
    assert sup.on_pulse(104, 4 * PERIOD, 10_000) == 0  # 101..103 missing
    assert sup.missed_pulses == 3
    assert sup.gap_energy_uj == 180_000
    assert sup.zone_energy_uj(Zone.CHEEKS) == 10_000 + 10_000 + 180_000


def test_a_gap_that_takes_the_zone_over_its_limit_is_a_pulse_gap_breach() -> None:
    sup = armed(session(device_max_energy_uj=60_000), zone_energy_j=0.1)
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(3, 2 * PERIOD, 10_000) == 0  # 80 mJ charged: 0.08 J
    assert sup.on_pulse(5, 4 * PERIOD, 10_000) == BreachCode.PULSE_GAP  # 0.15 J
    breach = sup.last_breach
    assert breach is not None and breach.limit == 0.1 and breach.value == pytest.approx(0.15)
    assert "1 missing pulse(s) charged at 60000 µJ" in breach.detail
    # what was charged stays charged: the next clean pulse is over the zone (rule 5)
    assert sup.on_pulse(6, 5 * PERIOD, 10_000) == BreachCode.ZONE_ENERGY


def test_missing_pulses_are_charged_to_the_power_window_when_discovered() -> None:
    # Rule 4 counts every pulse fired: lost ones at the device's maximum, at the time seen.
    sup = armed(session(device_max_energy_uj=60_000, max_average_power_w=0.4))
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(2, PERIOD, 10_000) == 0
    assert sup.window_power_w == pytest.approx(0.02)
    assert sup.on_pulse(10, 9 * PERIOD, 10_000) == BreachCode.AVERAGE_POWER  # 7 × 60 mJ lost
    assert sup.window_power_w == pytest.approx(0.03 + 0.42)


def test_over_rate_judges_a_gap_by_the_periods_it_spans() -> None:
    # k missing pulse numbers: k + 1 periods must have passed, else one interval was too short.
    sup = armed()
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_pulse(4, 3 * PERIOD, 10_000) == 0  # 3 periods for 3 intervals: fine
    assert sup.on_pulse(7, 4 * PERIOD, 10_000) == BreachCode.OVER_RATE  # 3 intervals in 1 period


def test_a_gap_a_status_counts_is_charged_to_budgets_and_window_now() -> None:
    sup = armed(session(device_max_energy_uj=60_000, max_average_power_w=0.2), zone_energy_j=10)
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.charge_gap(2, 3) == 0  # 120 mJ in the window with the first: 0.13 W
    assert sup.zone_energy_uj(Zone.CHEEKS) == 130_000
    assert sup.missed_pulses == 2 and sup.last_pulse_no == 3
    assert sup.charge_gap(4, 4) == 0  # 0.19 W
    assert sup.charge_gap(5, 5) == BreachCode.AVERAGE_POWER  # 0.25 W
    assert sup.latched is not None and sup.latched.code is BreachCode.AVERAGE_POWER


def test_a_gap_found_with_no_pulse_in_the_window_is_charged_with_the_next_pulse() -> None:
    sup = armed(session(device_max_energy_uj=60_000, max_average_power_w=0.1))
    assert sup.charge_gap(1, 1) == 0
    assert sup.on_pulse(2, 0, 10_000) == 0  # 70 mJ in the window
    assert sup.window_power_w == pytest.approx(0.07)


def test_the_first_pulse_seen_and_a_repeated_number_are_not_gaps() -> None:
    sup = armed()
    assert sup.on_pulse(5_000_000, 0, 10_000) == 0
    assert sup.on_pulse(5_000_000, PERIOD, 10_000) == 0
    assert sup.missed_pulses == 0


def test_follow_on_charges_a_gap_from_the_pulse_number_accounted_for() -> None:
    sup = armed()
    sup.follow_on(41)
    assert sup.on_pulse(43, 0, 10_000) == 0
    assert sup.missed_pulses == 1
    assert sup.zone_energy_uj(Zone.CHEEKS) == 10_000 + 60_000


# ---------------------------------------------------------------- STATUS rules


def test_skin_and_head_temperature_limits_apply_armed_or_not() -> None:
    sup = SafetySupervisor(session(skin_temp_max_c=41.0, head_temp_max_c=43.0))
    assert sup.on_status(DeviceState.STANDBY, 0, 4300, 4100, 0) == 0
    assert sup.on_status(DeviceState.STANDBY, 0, 2500, 4101, 0) == BreachCode.SKIN_OVERTEMP
    assert sup.last_breach is not None and sup.last_breach.value == 41.01
    assert sup.on_status(DeviceState.STANDBY, 0, 4301, 3000, 0) == BreachCode.HEAD_OVERTEMP


def test_interlocks_fault_state_and_lease_count_only_while_armed() -> None:
    sup = SafetySupervisor(session(lease_nearly_out_ms=80))
    open_door = int(Interlock.DOOR | Interlock.CONTACT)
    assert sup.on_status(DeviceState.STANDBY, open_door, 2500, 3000, 0) == 0
    assert sup.on_status(DeviceState.FAULT, 0, 2500, 3000, 0) == 0
    sup.set_zone(Zone.CHEEKS, limits(sup.session_limits, Zone.CHEEKS, PARAMS))
    sup.arm()
    assert sup.on_status(DeviceState.READY, 0, 2500, 3000, 80) == 0
    assert sup.on_status(DeviceState.READY, 0, 2500, 3000, 79) == BreachCode.LEASE_NEARLY_OUT
    assert sup.on_status(DeviceState.READY, open_door, 2500, 3000, 200) == (
        BreachCode.INTERLOCK_OPEN
    )
    assert sup.last_breach is not None and "door, contact" in sup.last_breach.detail
    assert sup.on_status(DeviceState.FAULT, 0, 2500, 3000, 0) == BreachCode.DEVICE_FAULT


def test_a_status_overtaking_the_ack_of_disarm_is_not_a_breach() -> None:
    # DISARM sent, the device already reports STANDBY with no lease, its ACK still on the way
    sup = armed()
    assert sup.on_status(DeviceState.STANDBY, 0, 2500, 3000, 0) == 0
    assert sup.on_status(DeviceState.STANDBY, int(Interlock.DOOR), 2500, 3000, 0) == 0
    assert sup.armed  # until the ACK: a pulse now would still be judged as commanded


# ---------------------------------------------------------------- link, boot, fault


def test_link_loss_boot_and_fault_breach_only_while_armed() -> None:
    sup = SafetySupervisor(session())
    assert sup.on_link_lost() == 0
    assert sup.on_boot(0) == 0
    assert sup.on_device_fault(2, 8) == 0
    for event, code, still_armed in [
        (sup.on_link_lost, BreachCode.LINK_LOST, True),
        (lambda: sup.on_boot(1), BreachCode.DEVICE_BOOT, False),
        (lambda: sup.on_device_fault(2, 8), BreachCode.DEVICE_FAULT, False),
    ]:
        sup.disarm()
        sup.acknowledge("op-1", "reconnected and checked")
        sup.set_zone(Zone.CHEEKS, limits(sup.session_limits, Zone.CHEEKS, PARAMS))
        sup.arm()
        assert event() == code
        # A BOOT or FAULT disarmed the device itself; after a lost link it may still be firing
        # under its lease until the STOP sent on reconnection is acknowledged (rule 1).
        assert sup.armed is still_armed
    assert sup.last_breach is not None and "INTERLOCK_OPENED" in sup.last_breach.detail


def test_pulses_after_a_lost_link_are_commanded_until_the_ack_of_stop() -> None:
    # 100 ms period at 10 Hz; pulse 1, then the link is lost while pulses 2..5 are fired unseen
    sup = armed()
    assert sup.on_pulse(1, 0, 10_000) == 0
    assert sup.on_link_lost() == BreachCode.LINK_LOST
    # the link heals before STOP's ACK: pulse 6 was fired under the lease, with a gap before it
    assert sup.on_pulse(6, 500_000, 10_000) == 0
    assert sup.missed_pulses == 4
    sup.disarm()  # the ACK of the STOP sent right after IDENT
    assert sup.on_pulse(7, 600_000, 10_000) == BreachCode.UNCOMMANDED_EMISSION


def test_after_a_boot_the_device_has_no_params_so_arming_is_refused() -> None:
    sup = armed()
    sup.on_boot(2)
    sup.acknowledge("op-1", "power glitch, checked")
    with pytest.raises(SafetyRefusal) as refused:
        sup.arm()
    assert refused.value.rule == "not_configured"


# ---------------------------------------------------------------- latching and acknowledgement


def test_a_breach_latches_and_arming_needs_an_acknowledgement_with_a_reason() -> None:
    sup = armed()
    assert sup.on_pulse(1, 0, 30_000) == BreachCode.ENERGY_OUT_OF_TOLERANCE
    sup.disarm()
    with pytest.raises(SafetyRefusal) as refused:
        sup.arm()
    assert refused.value.rule == "breach_latched"
    assert "energy_out_of_tolerance" in str(refused.value)
    with pytest.raises(AcknowledgementRefused):
        sup.acknowledge("op-1", "   ")
    with pytest.raises(AcknowledgementRefused):
        sup.acknowledge("", "recalibrated")
    cleared = sup.acknowledge("op-1", "recalibrated the energy monitor")
    assert cleared is not None and cleared.code is BreachCode.ENERGY_OUT_OF_TOLERANCE
    assert sup.latched is None
    sup.arm()
    assert sup.armed
    assert sup.acknowledge("op-1", "nothing latched") is None


def test_the_first_breach_stays_latched_and_repeats_are_marked() -> None:
    sup = armed()
    assert sup.on_status(DeviceState.READY, 0, 2500, 4200, 200) == BreachCode.SKIN_OVERTEMP
    assert sup.last_breach is not None and not sup.last_breach.repeat
    assert sup.on_pulse(1, 0, 30_000) == BreachCode.ENERGY_OUT_OF_TOLERANCE
    assert not sup.last_breach.repeat
    assert sup.on_status(DeviceState.READY, 0, 2500, 4200, 200) == BreachCode.SKIN_OVERTEMP
    assert sup.last_breach.repeat
    assert sup.latched is not None and sup.latched.code is BreachCode.SKIN_OVERTEMP
    assert sup.breach_count == 3


def test_breach_codes_have_stable_alert_names_and_severities() -> None:
    assert [c.alert_code for c in BreachCode] == [
        "uncommanded_emission",
        "energy_out_of_tolerance",
        "over_rate",
        "average_power",
        "zone_energy",
        "session_energy",
        "pulse_gap",
        "skin_overtemp",
        "head_overtemp",
        "interlock_open",
        "lease_nearly_out",
        "link_lost",
        "device_boot",
        "device_fault",
    ]
    assert [int(c) for c in BreachCode] == list(range(1, 15))
    assert all(isinstance(c.severity, Severity) for c in BreachCode)


def test_a_breach_reads_as_one_line() -> None:
    sup = armed(zone_energy_j=0.01)
    train(sup, 2)
    breach = sup.last_breach
    assert breach is not None
    assert breach.message == (
        "zone_energy at pulse 2: 0.02 J (limit 0.01 J); cumulative energy in cheeks"
    )
    assert breach.as_dict()["code"] == "zone_energy"
    assert "\n" not in breach.message


# ---------------------------------------------------------------- the hot loop's discipline


def test_on_pulse_keeps_no_memory_per_call() -> None:
    sup = armed(session(session_energy_j=1e9), zone_energy_j=1e9)
    train(sup, 1_000)  # warm every code path and free list
    before = sys.getallocatedblocks()
    train(sup, 20_000, first_no=1_001, t0=1_000 * PERIOD)
    after = sys.getallocatedblocks()
    # the list that train() returns is the only growth: 20 000 small ints are cached or one list
    assert after - before < 200


def test_wrong_use_is_a_programming_error() -> None:
    s = session()
    sup = SafetySupervisor(s)
    with pytest.raises(ValueError, match="zone"):
        sup.set_zone(Zone.NECK, limits(s, Zone.CHEEKS, PARAMS))
    with pytest.raises(ValueError, match="set_zone"):
        sup.set_params(limits(s, Zone.CHEEKS, PARAMS))
    with pytest.raises(SafetyRefusal) as refused:
        sup.arm()
    assert refused.value.rule == "not_configured"
