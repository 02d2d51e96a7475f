"""Config and policy files with wrong types and out-of-range values.

A value is either refused with one one-line ConfigError naming its key, its value and what is
allowed, or, if accepted, what was loaded still makes sense: every limit finite and positive, every
preset within the policy, every setting of its type and range. Checking only the refusals would let
accepted nonsense (``session_energy_j = inf``) pass, so every key path of the example policy meets
every one of a fixed set of bad values deterministically; hypothesis adds random mixes on top.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicectl.config import Settings, load_settings
from devicectl.errors import ConfigError
from devicectl.policy import Policy, SkinType, Zone, load_policy, parse_policy
from protocols.bounded import printable

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
EXAMPLE = Path(__file__).parents[2] / "examples" / "policy.toml"
BASELINE: dict[str, Any] = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))

# Each is wrong for every key of the policy: it switches a limit off (inf, nan, a huge integer),
# is no limit at all (0, negative), or is of the wrong type (a TOML boolean, a quoted number, an
# empty table or list where a number, a string or a table belongs).
BAD_VALUES: dict[str, object] = {
    "inf": math.inf,
    "-inf": -math.inf,
    "nan": math.nan,
    "zero": 0,
    "negative": -1,
    "negative_real": -0.5,
    "true": True,
    "false": False,
    "quoted_5": "5",
    "huge_int": 2**63 - 1,  # the largest TOML integer
    "empty_table": {},
    "empty_list": [],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.001, 100.0),  # plausible numbers, to reach the coherence checks
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(list(BAD_VALUES.values())),
)


def _key_paths(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every table and leaf of a TOML document, in file order."""
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _key_paths(value, f"{prefix}{key}.")


POLICY_PATHS = list(_key_paths(BASELINE))


def _replaced(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    """A copy of ``data`` with ``dotted`` set to ``value`` (unchanged if a parent is no table)."""
    copied = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    target: Any = copied
    for parent in parents:
        target = target.get(parent) if isinstance(target, dict) else None
    if isinstance(target, dict):
        target[leaf] = copy.deepcopy(value)
    return copied


def refusal(load: Callable[[], object]) -> tuple[ConfigError | None, Any]:
    """(the ConfigError ``load`` raised, None) or (None, what it loaded). Nothing else escapes."""
    try:
        return None, load()
    except ConfigError as exc:
        return exc, None


def assert_one_line(exc: ConfigError) -> None:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    # the message shows the key and the reason as printable text (control characters escaped)
    assert printable(exc.key, 80) in message, message
    assert exc.allowed and printable(exc.allowed, 240) in message, message


def _numbers(value: object, where: str) -> Iterator[tuple[str, object]]:
    """Every number in a dumped model, with its key path (enum members are names, not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = key.name if isinstance(key, SkinType) else str(key)
            yield from _numbers(item, f"{where}.{name}")
    elif isinstance(value, int | float) and not isinstance(value, SkinType | Zone):
        yield where, value


def assert_within_limits(policy: Policy) -> None:
    """What the supervisor relies on: every limit a finite positive number, every preset allowed."""
    for where, number in _numbers(policy.model_dump(), "policy"):
        assert not isinstance(number, bool), (where, number)
        assert math.isfinite(number) and number > 0, (where, number)
    assert set(policy.max_fluence_j_cm2) == set(SkinType)
    assert set(policy.zones) == set(Zone)
    caps = [policy.max_fluence_j_cm2[skin] for skin in SkinType]
    assert caps == sorted(caps, reverse=True), caps
    assert 1 <= policy.lease_nearly_out_ms < policy.lease_ms
    assert policy.skin_temp_max_c <= 45 and policy.energy_tolerance_pct <= 50
    for concern, preset in policy.presets.items():
        params = preset.params()
        assert all(type(n) is int for n in (params.energy_uj, params.width_us, params.spot_um))
        assert params.rate_mhz >= 1, concern
        assert params.as_command().payload(), concern  # fits the wire's fields
        assert params.width_us < params.period_us, concern
        assert params.average_power_w <= policy.max_average_power_w, concern
        assert preset.skin_types, concern
        for skin in preset.skin_types:
            assert params.fluence_j_cm2 <= policy.max_fluence_j_cm2[skin], (concern, skin)


def assert_refused_by_key_or_within_limits(data: dict[str, Any], path: str, value: object) -> None:
    exc, policy = refusal(lambda: parse_policy(data, "fuzz.toml"))
    if exc is None:
        assert_within_limits(policy)
        return
    assert_one_line(exc)
    assert "fuzz.toml" in str(exc)
    key = f"policy.{path}"
    assert exc.key == key or exc.key.startswith(key + "."), (path, value, str(exc))
    if exc.key == key and not isinstance(value, dict):  # a table is reported by its keys
        assert repr(value) in str(exc), str(exc)


def test_the_example_policy_is_within_its_own_limits() -> None:
    assert_within_limits(parse_policy(BASELINE))
    assert len(POLICY_PATHS) > 60 and "presets.sun_damage.rate_hz" in POLICY_PATHS
    assert {"zones.neck.max_fluence_j_cm2", "presets.acne_scars.skin_types"} <= set(POLICY_PATHS)


# One test per key, looping over the values: a pytest item costs more than a policy load.
@pytest.mark.parametrize("path", POLICY_PATHS)
def test_every_bad_value_at_every_policy_key_is_refused_by_key_or_harmless(path: str) -> None:
    for value in BAD_VALUES.values():
        assert_refused_by_key_or_within_limits(_replaced(BASELINE, path, value), path, value)


@pytest.mark.parametrize("path", POLICY_PATHS)
def test_a_missing_policy_key_is_named_or_harmless(path: str) -> None:
    data = copy.deepcopy(BASELINE)
    *parents, leaf = path.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    del target[leaf]
    exc, policy = refusal(lambda: parse_policy(data))
    if exc is None:
        assert_within_limits(policy)
    else:
        assert_one_line(exc)
        # a required key names itself; a missing skin type or zone names its table; an optional
        # key whose default does not fit (skin_types: all six) is named in the way out offered
        named = exc.key.removeprefix("policy.")
        assert path == named or path.startswith(named + ".") or leaf in exc.allowed, str(exc)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(POLICY_PATHS), scalars), min_size=1, max_size=4))
def test_a_random_mix_of_policy_values_is_refused_or_within_limits(
    changes: list[tuple[str, object]],
) -> None:
    data = BASELINE
    for path, value in changes:
        data = _replaced(data, path, value)
    exc, policy = refusal(lambda: parse_policy(data, "fuzz.toml"))
    if exc is None:
        assert_within_limits(policy)
    else:
        assert_one_line(exc)
        assert exc.key.startswith("policy") and "fuzz.toml" in str(exc)


@FUZZ
@given(st.text(max_size=200))
def test_a_policy_file_of_random_text_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert caught.value.key.startswith("policy")
    assert_one_line(caught.value)


# --- daemon settings ---------------------------------------------------------------------------

SETTING_KEYS = [
    "port", "baudrate", "status_period_ms", "log_level", "log_json", "patient_ref_pattern",
    "sim_max_rate_hz", "policy", "control_group", "no_such_setting",
]  # fmt: skip
MQTT_KEYS = ["url", "prefix", "site", "device", "username", "password", "outbox_max_bytes",
             "protocol", "ca_file", "cert_file", "key_file", "bogus"]  # fmt: skip
# A cross-field rule may name the other key of the pair.
RELATED = {"mqtt.password": "mqtt.username"}
NUMBERS = {"baudrate", "status_period_ms", "sim_max_rate_hz", "mqtt.outbox_max_bytes"}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{}"
    return json.dumps(value)  # ints, finite floats, strings and [] read back the same in TOML


def assert_settings_make_sense(loaded: Settings) -> None:
    assert type(loaded.baudrate) is int and 9600 <= loaded.baudrate <= 921600
    assert type(loaded.status_period_ms) is int and 10 <= loaded.status_period_ms <= 10000
    assert type(loaded.sim_max_rate_hz) is float and math.isfinite(loaded.sim_max_rate_hz)
    assert 1 <= loaded.sim_max_rate_hz <= 100000
    assert type(loaded.mqtt.outbox_max_bytes) is int and loaded.mqtt.outbox_max_bytes >= 65536
    assert loaded.log_json is None or type(loaded.log_json) is bool
    assert loaded.mqtt.protocol in {"auto", "5", "3.1.1"}


def assert_setting_refused_by_key_or_sensible(
    load: Callable[[], Settings], key: str, value: object, *, typed: bool = True
) -> None:
    """``typed``: the value came from TOML or Python, not from the environment's text."""
    exc, loaded = refusal(load)
    if exc is None:
        assert_settings_make_sense(loaded)
        if typed and key in NUMBERS and value is not None:  # None: "not given"; no bool as 1
            assert type(value) in {int, float}, (key, value)
        if typed and key == "log_json":
            assert isinstance(value, bool) or value in {"auto", "", None}, value
        return
    assert_one_line(exc)
    assert exc.key in {key, RELATED.get(key)}, (key, value, str(exc))
    if key.endswith("password") and isinstance(value, str) and len(value) > 3:
        assert value not in str(exc), "the password leaked into the error"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [n for n in os.environ if n.upper().startswith("DEVICECTL_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("key", [*SETTING_KEYS, *(f"mqtt.{k}" for k in MQTT_KEYS)])
def test_every_bad_value_in_the_config_file_is_refused_by_key_or_sensible(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, key: str
) -> None:
    table, _, leaf = key.rpartition(".")
    path = tmp_path / "devicectl.toml"
    for value in BAD_VALUES.values():
        text = (f"[{table}]\n" if table else "") + f"{leaf} = {_toml(value)}\n"
        path.write_text(text, encoding="utf-8")
        assert_setting_refused_by_key_or_sensible(
            lambda: load_settings(path, data_dir=tmp_path, control=tmp_path / "c.sock"), key, value
        )


ENVIRONMENT_TEXTS = ["inf", "-inf", "nan", "0", "-1", "-0.5", "true", "false", "5", "",
                     str(2**63 - 1), "{}", "[]", "1e400"]  # fmt: skip


@pytest.mark.parametrize("key", [*SETTING_KEYS, *(f"mqtt.{k}" for k in MQTT_KEYS)])
def test_every_bad_environment_text_is_refused_by_key_or_sensible(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, key: str
) -> None:
    for text in ENVIRONMENT_TEXTS:
        clean_environment.setenv("DEVICECTL_" + key.replace(".", "__").upper(), text)
        assert_setting_refused_by_key_or_sensible(
            lambda: load_settings(None, data_dir=tmp_path, control=tmp_path / "c.sock"),
            key,
            text,
            typed=False,
        )


@FUZZ
@given(st.sampled_from([*SETTING_KEYS, "control", "data_dir"]), scalars)
def test_any_setting_is_accepted_or_refused_with_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    given = {"data_dir": tmp_path, "control": tmp_path / "c.sock"} | {key: value}
    assert_setting_refused_by_key_or_sensible(lambda: load_settings(None, **given), key, value)


@FUZZ
@given(st.sampled_from(MQTT_KEYS), scalars)
def test_any_mqtt_setting_is_accepted_or_refused_with_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    given = {"data_dir": tmp_path, "control": tmp_path / "c.sock", f"mqtt__{key}": value}
    assert_setting_refused_by_key_or_sensible(
        lambda: load_settings(None, **given), f"mqtt.{key}", value
    )


@FUZZ
@given(st.text(max_size=200))
def test_a_config_file_of_random_text_is_settings_or_a_config_error(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "devicectl.toml"
    path.write_text(text, encoding="utf-8")
    exc, loaded = refusal(
        lambda: load_settings(path, data_dir=tmp_path, control=tmp_path / "c.sock")
    )
    if exc is None:
        assert_settings_make_sense(loaded)
    else:
        assert exc.key
        assert_one_line(exc)
