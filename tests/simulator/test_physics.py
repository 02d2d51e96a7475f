"""The thermal model: first order, driven by pulses, time passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.physics import (
    HEAD_CUTOFF_C,
    ThermalModel,
    ThermalState,
    head_steady_state_c,
    relax,
    skin_steady_state_c,
    spot_area_cm2,
    time_to_reach_s,
)

MODEL = ThermalModel()


def run_pulses(
    state: ThermalState, energy_uj: float, rate_hz: float, seconds: float, spot_um: int = 1000,
    *, contact: bool = True, overheat: bool = False,
) -> None:  # fmt: skip
    period_us = round(1e6 / rate_hz)
    for _ in range(round(seconds * rate_hz)):
        state.advance_to(state.t_us + period_us, overheat=overheat, contact=contact)
        state.pulse(energy_uj, spot_um, contact=contact)


def test_spot_area() -> None:
    assert spot_area_cm2(1000) == pytest.approx(math.pi * 0.05**2)


def test_starts_at_ambient_and_skin_base() -> None:
    state = ThermalState()
    assert state.head_c == MODEL.ambient_c == 25.0
    assert state.skin_c == MODEL.skin_base_c == 32.0


def test_head_rises_toward_ambient_plus_power_then_cools_back() -> None:
    state = ThermalState()
    run_pulses(state, 20_000, 500, seconds=10 * MODEL.head_tau_s)  # 10 W
    expected = head_steady_state_c(MODEL, 10.0)
    assert expected == pytest.approx(30.0)
    assert state.head_c == pytest.approx(expected, abs=0.05)
    hot = state.head_c
    state.advance_to(state.t_us + round(MODEL.head_tau_s * 1e6), overheat=False, contact=True)
    assert state.head_c == pytest.approx(25.0 + (hot - 25.0) / math.e, abs=1e-6)
    state.advance_to(state.t_us + 100_000_000, overheat=False, contact=True)
    assert state.head_c == pytest.approx(25.0, abs=1e-6)


def test_more_power_heats_more() -> None:
    temps = []
    for energy in (1_000, 10_000, 40_000):
        state = ThermalState()
        run_pulses(state, energy, 200, seconds=5)
        temps.append((state.head_c, state.skin_c))
    assert temps[0][0] < temps[1][0] < temps[2][0]
    assert temps[0][1] < temps[1][1] < temps[2][1]


def test_skin_heats_per_spot_area_and_only_in_contact() -> None:
    small, large, lifted = ThermalState(), ThermalState(), ThermalState()
    seconds = 10 * MODEL.skin_tau_s
    run_pulses(small, 5_000, 100, seconds, spot_um=1000)
    run_pulses(large, 5_000, 100, seconds, spot_um=3000)
    run_pulses(lifted, 5_000, 100, seconds, spot_um=1000, contact=False)
    assert small.skin_c == pytest.approx(skin_steady_state_c(MODEL, 0.5, 1000), abs=0.05)
    assert large.skin_c == pytest.approx(skin_steady_state_c(MODEL, 0.5, 3000), abs=0.05)
    assert small.skin_c > large.skin_c > MODEL.skin_base_c
    assert lifted.skin_c == pytest.approx(MODEL.ambient_c, abs=1e-3)  # the sensor sees air
    assert small.head_c == pytest.approx(lifted.head_c)  # the head heats either way


def test_overheat_drives_the_head_past_the_cut_off_at_the_predicted_time() -> None:
    state = ThermalState()
    at = state.head_reaches_us(HEAD_CUTOFF_C, overheat=True)
    assert at is not None
    assert at == pytest.approx(MODEL.head_tau_s * math.log(30 / 10) * 1e6, abs=2)
    state.advance_to(at - 1000, overheat=True, contact=True)
    assert state.head_c < HEAD_CUTOFF_C
    state.advance_to(at, overheat=True, contact=True)
    assert state.head_c >= HEAD_CUTOFF_C
    assert ThermalState().head_reaches_us(HEAD_CUTOFF_C, overheat=False) is None


def test_time_never_runs_backwards() -> None:
    state = ThermalState(t_us=1_000)
    state.pulse(50_000, 120, contact=True)
    before = (state.head_c, state.skin_c)
    state.advance_to(500, overheat=True, contact=True)
    assert (state.head_c, state.skin_c) == before


@given(
    temp=st.floats(-20, 200),
    target=st.floats(-20, 200),
    dt=st.floats(0, 1000),
)
def test_relax_stays_between_start_and_target(temp: float, target: float, dt: float) -> None:
    out = relax(temp, target, dt, 4.0)
    assert min(temp, target) - 1e-9 <= out <= max(temp, target) + 1e-9


@given(temp=st.floats(0, 44.9), target=st.floats(45.1, 200))
def test_time_to_reach_is_exact(temp: float, target: float) -> None:
    seconds = time_to_reach_s(temp, target, 45.0, 4.0)
    assert seconds is not None
    assert relax(temp, target, seconds, 4.0) == pytest.approx(45.0, abs=1e-6)
