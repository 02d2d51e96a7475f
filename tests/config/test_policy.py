"""The clinic policy file: the packaged default loads, and a bad policy is refused by key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from devicectl.errors import ConfigError
from devicectl.policy import Concern, SkinType, Zone, load_policy, parse_policy

EXAMPLE = Path(__file__).parents[2] / "examples" / "policy.toml"


def default_data() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_policy(data, "test.toml")
    assert "\n" not in str(info.value)
    return info.value


def test_the_packaged_default_loads_and_is_marked_illustrative() -> None:
    policy = load_policy(None)
    assert set(policy.zones) == set(Zone)
    assert set(policy.presets) == set(Concern)
    assert policy.skin_temp_max_c == 41.0 and policy.energy_tolerance_pct == 20
    assert policy.min_interval_pct == 90 and policy.lease_ms == 250
    text = (Path(__file__).parents[2] / "devicectl" / "defaults" / "policy.toml").read_text()
    assert "NOT CLINICAL GUIDANCE" in text


def test_the_example_file_loads_and_matches_the_default() -> None:
    assert load_policy(EXAMPLE) == load_policy(None)


def test_presets_give_wire_params_and_an_active_ingredient() -> None:
    preset = load_policy().presets[Concern.FINE_LINES]
    params = preset.params()
    assert params.rate_mhz == round(preset.rate_hz * 1000)
    assert params.as_command().energy_uj == preset.energy_uj
    assert preset.active_ingredient


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path / "nope.toml")
    assert info.value.key == "policy" and "nope.toml" in str(info.value)


def test_a_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("max_average_power_w = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_policy(bad)
    assert info.value.key == "policy" and "valid TOML" in info.value.allowed


def test_an_unknown_key_is_refused_by_name() -> None:
    data = default_data()
    data["max_peak_power_w"] = 5
    error = refused(data)
    assert error.key == "policy.max_peak_power_w" and error.value == 5


def test_a_value_out_of_range_names_key_value_and_bound() -> None:
    data = default_data()
    data["energy_tolerance_pct"] = 80
    error = refused(data)
    assert (error.key, error.value) == ("policy.energy_tolerance_pct", 80)
    assert "50" in error.allowed and "test.toml" in error.allowed


def test_fluence_rising_for_a_darker_type_is_refused() -> None:
    data = default_data()
    data["max_fluence_j_cm2"]["V"] = 25.0  # above type IV's 22
    error = refused(data)
    assert (error.key, error.value) == ("policy.max_fluence_j_cm2.V", 25.0)
    assert "at most 22" in error.allowed


def test_every_skin_type_and_zone_must_be_given() -> None:
    data = default_data()
    del data["max_fluence_j_cm2"]["III"]
    assert "missing III" in refused(data).allowed
    data = default_data()
    del data["zones"]["hands"]
    assert "missing hands" in refused(data).allowed


def test_a_preset_above_the_fluence_of_a_skin_type_it_lists_is_refused() -> None:
    data = default_data()
    data["presets"]["fine_lines"]["energy_uj"] = 9_000  # 12.7 J/cm² at 300 µm; VI allows 12
    error = refused(data)
    assert (error.key, error.value) == ("policy.presets.fine_lines.energy_uj", 9_000)
    assert "skin type VI" in error.allowed and "at most 8482 µJ" in error.allowed
    # restricting the preset to lighter types makes the same numbers acceptable
    data["presets"]["fine_lines"]["skin_types"] = ["I", "II", "III", "IV", "V"]
    policy = parse_policy(data)
    assert SkinType.VI not in policy.presets[Concern.FINE_LINES].skin_types


def test_a_preset_above_the_average_power_is_refused() -> None:
    data = default_data()
    data["presets"]["laxity"]["rate_hz"] = 250.0  # 15 mJ x 250 Hz = 3.75 W > 3 W
    error = refused(data)
    assert error.key == "policy.presets.laxity.rate_hz" and error.value == 250.0


def test_a_preset_width_must_fit_in_its_period() -> None:
    data = default_data()
    data["presets"]["acne_scars"]["width_us"] = 60_000  # the period at 20 Hz is 50 ms
    assert refused(data).key == "policy.presets.acne_scars.width_us"


def test_the_lease_threshold_must_be_below_the_lease() -> None:
    data = default_data()
    data["lease_nearly_out_ms"] = 250
    error = refused(data)
    assert error.key == "policy.lease_nearly_out_ms" and "250" in error.allowed


def test_an_unknown_zone_or_skin_type_is_refused() -> None:
    data = default_data()
    data["zones"]["chin"] = {"energy_j": 10.0}
    assert refused(data).key.startswith("policy.zones.chin")
    data = default_data()
    data["presets"]["acne_scars"]["skin_types"] = ["VII"]
    assert refused(data).key.startswith("policy.presets.acne_scars.skin_types")


@pytest.mark.parametrize(
    ("text", "skin"),
    [("IV", SkinType.IV), ("iv", SkinType.IV), (4, SkinType.IV), ("6", SkinType.VI)],
)
def test_skin_types_parse_from_roman_or_arabic(text: object, skin: SkinType) -> None:
    assert SkinType.parse(text) is skin


@pytest.mark.parametrize("text", ["VII", 0, "", True, 2.5])
def test_anything_else_is_not_a_skin_type(text: object) -> None:
    with pytest.raises(ValueError, match="Fitzpatrick"):
        SkinType.parse(text)
