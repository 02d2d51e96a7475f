"""compile_limits and check_params: three layers, the tightest wins, refusals name the limit."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from devicectl.errors import SafetyRefusal
from devicectl.policy import (
    Policy,
    PulseParams,
    SkinType,
    Zone,
    average_power_w,
    fluence_j_cm2,
    load_policy,
    spot_area_cm2,
)
from devicectl.safety import check_params, compile_limits, session_limits
from protocols.messages import Ident

# The simulator's board (docs/protocol.md).
IDENT = Ident(
    proto=1,
    fw=(1, 0, 0),
    serial=4242,
    wavelength_nm=1550,
    max_energy_uj=60_000,
    min_width_us=100,
    max_width_us=20_000,
    max_rate_mhz=500_000,
    spots_um=(120, 300, 1000, 3000),
)
OK = PulseParams(energy_uj=6_000, width_us=1_000, rate_mhz=10_000, spot_um=300)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy()


def test_derived_quantities() -> None:
    assert spot_area_cm2(1000) == pytest.approx(math.pi * 0.05**2)
    # 10 mJ on a 1 mm spot: 0.01 J / 0.007854 cm² = 1.273 J/cm²
    assert fluence_j_cm2(10_000, 1000) == pytest.approx(1.2732, rel=1e-4)
    assert average_power_w(10_000, 20_000) == pytest.approx(0.2)  # 10 mJ at 20 Hz
    assert OK.period_us == 100_000


def test_good_params_compile_and_pass(policy: Policy) -> None:
    limits = check_params(IDENT, policy, SkinType.III, Zone.CHEEKS, OK)
    assert limits.zone is Zone.CHEEKS and limits.params == OK
    assert limits.zone_energy_j == policy.zones[Zone.CHEEKS].energy_j
    assert limits.session.session_energy_j == policy.session_energy_j
    assert limits.fluence_j_cm2 == pytest.approx(8.488, rel=1e-3)


def test_darker_skin_gets_a_lower_fluence_cap(policy: Policy) -> None:
    caps = [
        compile_limits(IDENT, policy, skin, Zone.CHEEKS, OK).max_fluence_j_cm2 for skin in SkinType
    ]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1]
    strong = PulseParams(energy_uj=9_000, width_us=1_000, rate_mhz=10_000, spot_um=300)  # 12.7
    check_params(IDENT, policy, SkinType.I, Zone.CHEEKS, strong)
    with pytest.raises(SafetyRefusal) as refused:
        check_params(IDENT, policy, SkinType.VI, Zone.CHEEKS, strong)
    assert refused.value.rule == "max_fluence_skin_type_VI"
    assert refused.value.bound == policy.max_fluence_j_cm2[SkinType.VI]
    assert refused.value.value == pytest.approx(12.732, rel=1e-3)
    assert refused.value.unit == "J/cm²"


def test_a_zone_cap_tighter_than_the_skin_type_wins(policy: Policy) -> None:
    # periorbital is capped at 10 J/cm² in the default policy, below type I's 40
    limits = compile_limits(IDENT, policy, SkinType.I, Zone.PERIORBITAL, OK)
    assert (limits.max_fluence_j_cm2, limits.fluence_rule) == (10.0, "max_fluence_zone_periorbital")
    strong = PulseParams(energy_uj=9_000, width_us=1_000, rate_mhz=10_000, spot_um=300)
    with pytest.raises(SafetyRefusal) as refused:
        check_params(IDENT, policy, SkinType.I, Zone.PERIORBITAL, strong)
    assert refused.value.rule == "max_fluence_zone_periorbital"
    # and where the skin type is tighter than the zone, the skin type wins
    limits = compile_limits(IDENT, policy, SkinType.VI, Zone.PERIORAL, OK)  # 12 < 15
    assert limits.fluence_rule == "max_fluence_skin_type_VI"


def test_the_energy_ceiling_is_the_tighter_of_the_device_and_the_fluence_cap(
    policy: Policy,
) -> None:
    small_spot = compile_limits(
        IDENT, policy, SkinType.I, Zone.CHEEKS, PulseParams(1000, 1000, 10_000, 120)
    )
    assert small_spot.max_energy_uj == math.floor(40.0 * spot_area_cm2(120) * 1e6) < 60_000
    big_spot = compile_limits(
        IDENT, policy, SkinType.I, Zone.CHEEKS, PulseParams(1000, 1000, 10_000, 3000)
    )
    assert big_spot.max_energy_uj == IDENT.max_energy_uj  # fluence would allow more


def test_the_rate_ceiling_follows_the_average_power_limit(policy: Policy) -> None:
    limits = compile_limits(IDENT, policy, SkinType.I, Zone.CHEEKS, OK)
    # 3 W at 6 mJ: 500 Hz, which is also the device's ceiling
    assert limits.max_rate_mhz == 500_000
    heavy = PulseParams(energy_uj=60_000, width_us=1_000, rate_mhz=10_000, spot_um=3000)
    assert compile_limits(IDENT, policy, SkinType.I, Zone.CHEEKS, heavy).max_rate_mhz == 50_000


def test_average_power_is_refused_above_the_policy(policy: Policy) -> None:
    too_fast = PulseParams(energy_uj=30_000, width_us=1_000, rate_mhz=200_000, spot_um=3000)  # 6 W
    with pytest.raises(SafetyRefusal) as refused:
        check_params(IDENT, policy, SkinType.I, Zone.CHEEKS, too_fast)
    assert (refused.value.rule, refused.value.value, refused.value.bound, refused.value.unit) == (
        "max_average_power",
        6.0,
        3.0,
        "W",
    )
    assert "at most 100 Hz" in str(refused.value)


def test_the_device_power_ceiling_wins_over_a_generous_policy(policy: Policy) -> None:
    generous = policy.model_copy(update={"max_average_power_w": 1_000.0})
    assert session_limits(IDENT, generous).max_average_power_w == pytest.approx(
        30.0
    )  # 60 mJ·500 Hz


@pytest.mark.parametrize(
    ("params", "rule", "value", "bound"),
    [
        (PulseParams(0, 1_000, 10_000, 300), "device_min_energy", 0, 1),
        (PulseParams(60_001, 1_000, 10_000, 3000), "device_max_energy", 60_001, 60_000),
        (PulseParams(6_000, 99, 10_000, 300), "device_min_width", 99, 100),
        (PulseParams(6_000, 20_001, 10_000, 300), "device_max_width", 20_001, 20_000),
        (PulseParams(6_000, 1_000, 0, 300), "device_min_rate", 0, 0.001),
        (PulseParams(100, 100, 500_001, 300), "device_max_rate", 500.001, 500),
        (PulseParams(6_000, 1_000, 10_000, 200), "device_spot", 200, 3000),
        (PulseParams(6_000, 10_000, 100_000, 300), "width_period", 10_000, 10_000),
    ],
)
def test_device_ranges_are_refused_naming_the_limit(
    policy: Policy, params: PulseParams, rule: str, value: float, bound: float
) -> None:
    with pytest.raises(SafetyRefusal) as refused:
        check_params(IDENT, policy, SkinType.I, Zone.CHEEKS, params)
    assert (refused.value.rule, refused.value.value, refused.value.bound) == (rule, value, bound)
    assert "\n" not in str(refused.value) and rule in str(refused.value)


def test_every_packaged_preset_passes_for_each_skin_type_it_lists(policy: Policy) -> None:
    for preset in policy.presets.values():
        for skin in preset.skin_types:
            check_params(IDENT, policy, skin, Zone.CHEEKS, preset.params())


@settings(max_examples=300, deadline=None)
@given(
    energy=st.integers(0, 70_000),
    width=st.integers(50, 25_000),
    rate=st.integers(0, 600_000),
    spot=st.sampled_from([100, 120, 300, 1000, 3000]),
    skin=st.sampled_from(list(SkinType)),
    zone=st.sampled_from(list(Zone)),
)
def test_check_params_passes_exactly_what_every_layer_allows(
    energy: int, width: int, rate: int, spot: int, skin: SkinType, zone: Zone
) -> None:
    policy = load_policy()
    params = PulseParams(energy, width, rate, spot)
    zone_cap = policy.zones[zone].max_fluence_j_cm2
    cap = min(policy.max_fluence_j_cm2[skin], zone_cap if zone_cap is not None else math.inf)
    allowed = (
        1 <= energy <= IDENT.max_energy_uj
        and IDENT.min_width_us <= width <= IDENT.max_width_us
        and 1 <= rate <= IDENT.max_rate_mhz
        and spot in IDENT.spots_um
        and width * rate < 10**9  # width < period
        and energy * 1e-6 / (math.pi * (spot * 1e-4 / 2) ** 2) <= cap
        and energy * 1e-6 * rate * 1e-3 <= policy.max_average_power_w
    )
    event("allowed" if allowed else "refused")
    if not allowed:
        with pytest.raises(SafetyRefusal) as refused:
            check_params(IDENT, policy, skin, zone, params)
        refusal = refused.value
        assert (
            refusal.value > refusal.bound
            or refusal.rule.startswith(("device_min", "device_spot"))
            or refusal.rule == "width_period"
        ), refusal
        return
    limits = check_params(IDENT, policy, skin, zone, params)
    assert limits.fluence_j_cm2 <= limits.max_fluence_j_cm2 == cap
    assert energy <= limits.max_energy_uj and rate <= limits.max_rate_mhz
