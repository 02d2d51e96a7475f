"""The clinic policy file: the packaged default loads, and a bad policy is refused by key."""

from __future__ import annotations

import math
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


def _with(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    return data


def test_an_infinite_preset_rate_is_one_line_naming_the_key_not_a_traceback(
    tmp_path: Path,
) -> None:
    # `inf` is valid TOML; the wire rate round(inf * 1000) raised OverflowError
    text = EXAMPLE.read_text(encoding="utf-8").replace("rate_hz = 8.0", "rate_hz = inf")
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    error = info.value
    assert (error.key, error.value) == ("policy.presets.laxity.rate_hz", math.inf)
    assert "\n" not in str(error) and "policy.toml" in str(error)
    assert "finite" in error.allowed and "0.001" in error.allowed and "Hz" in error.allowed


LIMITS = [
    "session_energy_j",
    "zones.forehead.energy_j",
    "max_average_power_w",
    "max_fluence_j_cm2.I",
    "max_fluence_j_cm2.VI",
    "zones.neck.max_fluence_j_cm2",
    "skin_temp_max_c",
    "head_temp_max_c",
]
PRESET_INTEGERS = [
    "presets.laxity.energy_uj",
    "presets.laxity.width_us",
    "presets.laxity.spot_um",
    "lease_ms",
    "lease_nearly_out_ms",
    "energy_tolerance_pct",
    "min_interval_pct",
]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=repr)
@pytest.mark.parametrize("key", [*LIMITS, "presets.laxity.rate_hz"])
def test_an_infinite_or_nan_limit_is_refused_rather_than_switched_off(
    key: str, value: float
) -> None:
    error = refused(_with(default_data(), key, value))
    assert error.key == f"policy.{key}"
    assert error.value is value or error.value == value
    assert error.allowed.startswith("a finite number")


@pytest.mark.parametrize("value", [True, False, "5", "22.0"], ids=repr)
@pytest.mark.parametrize("key", [*LIMITS, "presets.laxity.rate_hz", *PRESET_INTEGERS])
def test_a_boolean_or_a_string_is_not_read_as_a_number(key: str, value: object) -> None:
    error = refused(_with(default_data(), key, value))
    assert (error.key, error.value) == (f"policy.{key}", value)
    assert repr(value) in str(error)


@pytest.mark.parametrize("key", PRESET_INTEGERS)
def test_a_fraction_where_the_wire_wants_an_integer_is_refused(key: str) -> None:
    error = refused(_with(default_data(), key, 100.5))
    assert error.key == f"policy.{key}" and error.allowed.startswith("an integer")


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("session_energy_j", 1e30, "1,000,000 J"),
        ("zones.hands.energy_j", 2**63 - 1, "1,000,000 J"),
        ("max_average_power_w", 1e9, "100 W"),
        ("max_fluence_j_cm2.I", 1e6, "1,000 J/cm²"),
        ("zones.neck.max_fluence_j_cm2", 0, "above 0"),
        ("presets.laxity.energy_uj", 2**40, "10,000,000 µJ"),
        ("presets.laxity.spot_um", 2**20, "50,000 µm"),
        ("presets.laxity.width_us", 0, "from 1"),
        ("presets.laxity.rate_hz", 1e12, "10,000 Hz"),
        ("presets.laxity.rate_hz", 0.0001, "from 0.001"),
        ("lease_nearly_out_ms", -1, "from 1"),
    ],
)
def test_a_number_outside_its_documented_range_names_the_range(
    key: str, value: object, bound: str
) -> None:
    error = refused(_with(default_data(), key, value))
    assert (error.key, error.value) == (f"policy.{key}", value)
    assert bound in error.allowed


def test_an_integer_is_a_fine_way_to_write_a_real_limit() -> None:
    data = _with(default_data(), "max_average_power_w", 3)
    data = _with(data, "presets.laxity.rate_hz", 8)
    policy = parse_policy(data)
    assert policy.max_average_power_w == 3.0 and type(policy.max_average_power_w) is float
    assert type(policy.presets[Concern.LAXITY].rate_hz) is float


def test_a_preset_for_no_skin_type_is_refused() -> None:
    error = refused(_with(default_data(), "presets.laxity.skin_types", []))
    assert error.key == "policy.presets.laxity.skin_types" and "at least one" in error.allowed


def test_a_skin_type_given_twice_in_the_fluence_table_is_refused() -> None:
    # "6" and "VI" are the same type: which one wins would depend on the order of the file
    data = default_data()
    data["max_fluence_j_cm2"]["6"] = 5.0
    error = refused(data)
    assert error.key == "policy.max_fluence_j_cm2"
    assert "VI given as 'VI' and '6'" in error.allowed
