"""Settings: file < environment < CLI flags, one-line ConfigErrors, defaults, redaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devicectl.config import (
    Settings,
    default_control_socket,
    default_data_dir,
    load_settings,
)
from devicectl.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "devicectl.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DEVICECTL_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devicectl.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(config_file: Path | None = None, **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file, **overrides)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.key in message and info.value.allowed in message
    return info.value


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert settings.port == "sim" and settings.baudrate == 115200
    assert settings.status_period_ms == 100 and settings.policy is None
    assert settings.log_commit_interval_ms == 10
    assert settings.data_dir == tmp_path / "data" / "devicectl"
    assert settings.control == tmp_path / "run" / "devicectl.sock"
    assert settings.mqtt.url is None and settings.mqtt.prefix == "lasers"
    assert settings.log_json is None and settings.log_level == "info"
    assert settings.patient_ref_regex().fullmatch("PT-0042")
    assert not settings.patient_ref_regex().fullmatch("Jane Doe")
    assert settings.load_policy().lease_ms == 250  # the packaged default policy


def test_the_example_file_is_valid_apart_from_its_absent_files(tmp_path: Path) -> None:
    # the example points at /etc files; swap those for real ones and it must load as is
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("/etc/devicectl/ca.pem", str(ca))
    text = text.replace("/etc/devicectl/policy.toml", str(EXAMPLE.with_name("policy.toml")))
    settings = load_settings(write(tmp_path, text))
    assert settings.port == "/dev/ttyUSB0" and settings.mqtt.site == "lyon-01"
    assert settings.mqtt.ca_file == ca


def test_environment_overrides_the_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        'port = "socket://localhost:7000"\nbaudrate = 9600\n'
        '[mqtt]\nurl = "mqtt://broker:1883"\nsite = "lyon"\n',
    )
    monkeypatch.setenv("DEVICECTL_BAUDRATE", "921600")
    monkeypatch.setenv("DEVICECTL_MQTT__SITE", "paris")
    settings = load_settings(path)
    assert settings.baudrate == 921600  # env over file
    assert settings.mqtt.site == "paris"  # nested env over file ...
    assert settings.mqtt.url == "mqtt://broker:1883"  # ... without losing the file's siblings
    assert settings.port == "socket://localhost:7000"
    flagged = load_settings(path, port="sim", mqtt__url="mqtts://other:8883", baudrate=None)
    assert flagged.port == "sim" and flagged.mqtt.url == "mqtts://other:8883"
    assert flagged.baudrate == 921600  # a flag not given (None) overrides nothing


@pytest.mark.parametrize(
    ("overrides", "key", "value", "allowed"),
    [
        ({"baudrate": 5}, "baudrate", 5, "9600 to 921600"),
        ({"baudrate": 1_000_000}, "baudrate", 1_000_000, "9600 to 921600"),
        ({"status_period_ms": 5}, "status_period_ms", 5, "10 to 10000"),
        ({"log_commit_interval_ms": 2000}, "log_commit_interval_ms", 2000, "0 to 1000"),
        ({"log_commit_interval_ms": -1}, "log_commit_interval_ms", -1, "0 to 1000"),
        ({"port": "COM3"}, "port", "COM3", "socket://HOST:PORT"),
        ({"port": "socket://localhost"}, "port", "socket://localhost", "port"),
        ({"log_level": "loud"}, "log_level", "loud", "debug, info"),
        ({"mqtt__url": "http://broker"}, "mqtt.url", "http://broker", "mqtt://"),
        ({"mqtt__site": "a/b"}, "mqtt.site", "a/b", "ASCII letters, digits, - or _"),
        ({"mqtt__device": "laser-01\u200b"}, "mqtt.device", "laser-01\u200b", "ASCII letters"),
        ({"mqtt__device": "laser\x1b[2J"}, "mqtt.device", "laser\x1b[2J", "ASCII letters"),
        ({"mqtt__prefix": "a/b"}, "mqtt.prefix", "a/b", "without / + #"),
        ({"mqtt__outbox_max_bytes": 10}, "mqtt.outbox_max_bytes", 10, "65536"),
        ({"patient_ref_pattern": "(["}, "patient_ref_pattern", "([", "regular expression"),
        ({"patient_ref_pattern": ".*"}, "patient_ref_pattern", ".*", "empty reference"),
        ({"sim_max_rate_hz": 0}, "sim_max_rate_hz", 0, "1 to 100000"),
        ({"colour": "red"}, "colour", "red", "not a known setting"),
        ({"log_json": "sometimes"}, "log_json", "sometimes", "auto"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_allowed(
    overrides: dict[str, object], key: str, value: object, allowed: str
) -> None:
    error = refused(None, **overrides)
    assert (error.key, error.value) == (key, value)
    assert allowed in error.allowed
    assert repr(value) in str(error)


def test_a_bad_value_from_the_environment_is_named_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICECTL_STATUS_PERIOD_MS", "fast")
    error = refused()
    assert (error.key, error.value) == ("status_period_ms", "fast")


def test_a_bad_value_in_the_file_is_named(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "[mqtt]\nprefix = ''\n"))
    assert error.key == "mqtt.prefix"
    error = refused(write(tmp_path, "[mqtt]\nbroker = 'x'\n"))
    assert error.key == "mqtt.broker" and "not a known setting" in error.allowed


def test_missing_or_broken_files_are_named(tmp_path: Path) -> None:
    error = refused(tmp_path / "absent.toml")
    assert error.key == "config" and "absent.toml" in str(error)
    error = refused(write(tmp_path, "port = \n"))
    assert error.key == "config" and "valid TOML" in error.allowed
    error = refused(policy=str(tmp_path / "no-policy.toml"))
    assert error.key == "policy" and "existing" in error.allowed
    error = refused(mqtt__ca_file=str(tmp_path / "no-ca.pem"))
    assert error.key == "mqtt.ca_file"


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("x")
    error = refused(mqtt__cert_file=str(cert))
    assert error.key == "mqtt.cert_file" and "together" in error.allowed


def test_redacted_dict_hides_the_password_and_errors_never_show_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEVICECTL_MQTT__PASSWORD", "hunter2")
    monkeypatch.setenv("DEVICECTL_MQTT__USERNAME", "laser-1")
    settings = load_settings(None)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "hunter2"
    shown = settings.redacted_dict()
    assert shown["mqtt"]["password"] == "***" and shown["mqtt"]["username"] == "laser-1"
    assert "hunter2" not in repr(shown) and "hunter2" not in repr(settings)
    monkeypatch.delenv("DEVICECTL_MQTT__USERNAME")
    error = refused()
    assert error.key == "mqtt.username" and "hunter2" not in str(error)


def test_redacted_dict_is_plain_json_values() -> None:
    shown = load_settings(None).redacted_dict()
    assert isinstance(shown["data_dir"], str) and shown["mqtt"]["password"] is None


def test_device_id_defaults_to_the_serial() -> None:
    assert load_settings(None).mqtt.device_id(0x91469) == "00091469"
    assert load_settings(None, mqtt__device="room-3").mqtt.device_id(4242) == "room-3"


def test_default_paths_under_systemd_as_root_and_elsewhere(tmp_path: Path) -> None:
    systemd = {"INVOCATION_ID": "abc", "XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/op"}
    assert default_data_dir(systemd, 0) == Path("/var/lib/devicectl")
    assert default_control_socket(systemd, 0, Path("/x")) == Path("/run/devicectl/control.sock")
    # a user's service under systemd is not the system daemon
    assert default_data_dir(systemd, 1000) == Path("/home/op/.local/share/devicectl")
    assert default_control_socket(systemd, 1000, Path("/x")) == Path(
        "/run/user/1000/devicectl.sock"
    )
    plain = {"HOME": str(tmp_path)}
    assert default_data_dir(plain, 1000) == tmp_path / ".local" / "share" / "devicectl"
    assert default_control_socket(plain, 1000, tmp_path / "d") == tmp_path / "d" / "control.sock"
    assert default_data_dir({"XDG_DATA_HOME": "/srv/x"}, 1000) == Path("/srv/x/devicectl")


def test_paths_expand_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(None, data_dir="~/dc", control="~/dc/sock")
    assert settings.data_dir == tmp_path / "dc" and settings.control == tmp_path / "dc" / "sock"


def test_settings_is_a_pydantic_settings_class() -> None:
    # the integrator may build it directly from the environment alone
    assert Settings().port == "sim"


def test_log_json_is_true_false_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICECTL_LOG_JSON", "auto")
    assert load_settings(None).log_json is None
    monkeypatch.setenv("DEVICECTL_LOG_JSON", "true")
    assert load_settings(None).log_json is True
    assert load_settings(None, log_json=False).log_json is False


# TOML has types, so the file (and load_settings' keyword overrides, typed Python values) is strict;
# an environment variable is only ever text, so it is read as the number or boolean its key wants.
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("baudrate = true", "baudrate", True),
        ('baudrate = "9600"', "baudrate", "9600"),
        ("baudrate = 9600.0", "baudrate", 9600.0),
        ("status_period_ms = false", "status_period_ms", False),
        ('status_period_ms = "100"', "status_period_ms", "100"),
        ("sim_max_rate_hz = true", "sim_max_rate_hz", True),  # was read as 1 Hz
        ('sim_max_rate_hz = "500"', "sim_max_rate_hz", "500"),
        ("sim_max_rate_hz = inf", "sim_max_rate_hz", float("inf")),
        ("log_json = 1", "log_json", 1),
        ('log_json = "true"', "log_json", "true"),
        ("[mqtt]\noutbox_max_bytes = true", "mqtt.outbox_max_bytes", True),
        ('[mqtt]\noutbox_max_bytes = "65536"', "mqtt.outbox_max_bytes", "65536"),
    ],
)
def test_the_file_is_strict_no_boolean_or_text_read_as_a_number(
    tmp_path: Path, text: str, key: str, value: object
) -> None:
    error = refused(write(tmp_path, text + "\n"))
    assert (error.key, error.value) == (key, value)
    assert repr(value) in str(error)


def test_a_nan_in_the_file_is_refused(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "sim_max_rate_hz = nan\n"))
    assert error.key == "sim_max_rate_hz" and "1 to 100000" in error.allowed


def test_the_file_may_write_a_real_number_as_an_integer(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "sim_max_rate_hz = 250\nlog_json = false\n"))
    assert settings.sim_max_rate_hz == 250.0 and type(settings.sim_max_rate_hz) is float
    assert settings.log_json is False


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"baudrate": True}, "baudrate"), ({"baudrate": "9600"}, "baudrate"),
     ({"sim_max_rate_hz": True}, "sim_max_rate_hz"),
     ({"mqtt__outbox_max_bytes": "65536"}, "mqtt.outbox_max_bytes")],
)  # fmt: skip
def test_keyword_overrides_are_typed_values_and_strict_too(
    overrides: dict[str, object], key: str
) -> None:
    assert refused(None, **overrides).key == key


def test_the_environment_is_text_read_as_the_type_each_key_wants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEVICECTL_BAUDRATE", " 9600 ")
    monkeypatch.setenv("DEVICECTL_STATUS_PERIOD_MS", "50")
    monkeypatch.setenv("DEVICECTL_SIM_MAX_RATE_HZ", "250.5")
    monkeypatch.setenv("DEVICECTL_MQTT__OUTBOX_MAX_BYTES", "65536")
    monkeypatch.setenv("DEVICECTL_MQTT__PROTOCOL", "5")
    monkeypatch.setenv("DEVICECTL_LOG_JSON", "false")
    settings = load_settings(None)
    assert (settings.baudrate, settings.status_period_ms) == (9600, 50)
    assert settings.sim_max_rate_hz == 250.5 and settings.mqtt.outbox_max_bytes == 65536
    assert settings.mqtt.protocol == "5" and settings.log_json is False


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("DEVICECTL_SIM_MAX_RATE_HZ", "inf", "sim_max_rate_hz"),
        ("DEVICECTL_SIM_MAX_RATE_HZ", "nan", "sim_max_rate_hz"),
        ("DEVICECTL_SIM_MAX_RATE_HZ", "fast", "sim_max_rate_hz"),
        ("DEVICECTL_STATUS_PERIOD_MS", "100.5", "status_period_ms"),
        ("DEVICECTL_BAUDRATE", "true", "baudrate"),
        ("DEVICECTL_MQTT__OUTBOX_MAX_BYTES", "lots", "mqtt.outbox_max_bytes"),
        ("DEVICECTL_LOG_JSON", "sometimes", "log_json"),
    ],
)
def test_environment_text_that_is_not_its_type_is_refused_by_key(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, key: str
) -> None:
    monkeypatch.setenv(name, text)
    assert refused().key == key
