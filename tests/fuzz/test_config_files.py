"""Config and policy files with wrong types and out-of-range values: always one ConfigError naming
the key and the value, never a traceback of another type."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicectl.config import load_settings
from devicectl.errors import ConfigError
from devicectl.policy import load_policy, parse_policy

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
BASELINE = tomllib.loads(Path("tests/daemon/conftest.py").read_text().split('"""')[3])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
SETTING_KEYS = [
    "port", "baudrate", "status_period_ms", "log_level", "log_json", "patient_ref_pattern",
    "sim_max_rate_hz", "policy", "control", "data_dir", "no_such_setting",
]  # fmt: skip
MQTT_KEYS = ["url", "prefix", "site", "device", "username", "password", "outbox_max_bytes",
             "ca_file", "cert_file", "key_file", "bogus"]  # fmt: skip


def _paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys += _paths(value, path + ".")
    return keys


POLICY_KEYS = _paths(BASELINE)


def _replace(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    copy: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    *parents, leaf = dotted.split(".")
    target = copy
    for parent in parents:
        target[parent] = dict(target[parent])
        target = target[parent]
    target[leaf] = value
    return copy


def refusal(load: Callable[[], object]) -> ConfigError | None:
    """The ConfigError ``load`` raised, or None when it accepted. Any other exception escapes."""
    try:
        load()
    except ConfigError as exc:
        return exc
    return None


def test_the_baseline_policy_is_valid() -> None:
    assert parse_policy(BASELINE).lease_ms == 1500


@FUZZ
@given(st.sampled_from(POLICY_KEYS), scalars)
def test_any_policy_value_is_accepted_or_refused_with_its_key(key: str, value: object) -> None:
    exc = refusal(lambda: parse_policy(_replace(BASELINE, key, value), "fuzz.toml"))
    if exc is not None:
        assert exc.key.startswith("policy"), exc
        assert "\n" not in str(exc)
        assert "fuzz.toml" in str(exc)


@FUZZ
@given(st.sampled_from(POLICY_KEYS))
def test_a_missing_policy_key_is_named(key: str) -> None:
    *parents, leaf = key.split(".")
    data = _replace(BASELINE, key, None)
    target = data
    for parent in parents:
        target = target[parent]
    del target[leaf]
    exc = refusal(lambda: parse_policy(data))
    if exc is not None:
        assert leaf in exc.key or any(p in exc.key for p in parents), exc


@FUZZ
@given(st.text(max_size=200))
def test_a_policy_file_of_random_text_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert caught.value.key.startswith("policy")


@FUZZ
@given(st.sampled_from(SETTING_KEYS), scalars)
def test_any_setting_is_accepted_or_refused_with_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    given = {"data_dir": tmp_path, "control": tmp_path / "c.sock"} | {key: value}
    exc = refusal(lambda: load_settings(None, **given))
    if exc is not None:
        assert exc.key == key, exc
        assert "\n" not in str(exc)


@FUZZ
@given(st.sampled_from(MQTT_KEYS), scalars)
def test_any_mqtt_setting_is_accepted_or_refused_with_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    given = {"data_dir": tmp_path, "control": tmp_path / "c.sock", f"mqtt__{key}": value}
    exc = refusal(lambda: load_settings(None, **given))
    if exc is not None:
        assert exc.key.startswith("mqtt"), exc
        if key == "password" and isinstance(value, str) and len(value) > 3:
            assert value not in str(exc), "the password leaked into the error"


@FUZZ
@given(st.text(max_size=200))
def test_a_config_file_of_random_text_is_settings_or_a_config_error(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "devicectl.toml"
    path.write_text(text, encoding="utf-8")
    exc = refusal(lambda: load_settings(path, data_dir=tmp_path, control=tmp_path / "c.sock"))
    if exc is not None:
        assert exc.key, exc
