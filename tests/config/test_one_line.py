"""Every bad input of issue 17 (points 8 and 9), as a user gives it: one line naming the key, at
most a few hundred bytes, exit 2 — never a traceback, never silently accepted. One test per input.
The Stop body's deep JSON is in tests/dashboard/test_server.py; the policy the dashboard shares
with the daemon in tests/dashboard/test_parts.py."""

from __future__ import annotations

import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devicectl.cli import (
    app,
    commands,  # noqa: F401 - registers every command, as the script does
)
from devicectl.config import load_settings
from devicectl.errors import ConfigError

LINE_MAX = 400
DEVICECTL = str(Path(sys.executable).parent / "devicectl")


def one_line(result_text: str, *names: str) -> str:
    text = result_text.strip()
    assert "Traceback" not in text
    assert "\n" not in text, text[:2000]
    assert len(text.encode()) <= LINE_MAX, text[:2000]
    for name in names:
        assert name in text, text
    return text


def _runner() -> CliRunner:
    """stdout and stderr apart: click 8.2 keeps them apart itself and no longer takes
    ``mix_stderr``; older clicks (the floors' typer pins one) need it said."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run(args: list[str], env: dict[str, str] | None = None) -> str:
    result = _runner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    return result.stderr


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))


def packaged_policy() -> str:
    return (resources.files("devicectl") / "defaults" / "policy.toml").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------- point 8


def test_a_latin1_byte_in_a_config_file(tmp_path: Path, clean_env: None) -> None:
    config = tmp_path / "devicectl.toml"
    config.write_bytes(b'port = "sim"\n# caf\xe9\n')
    one_line(run(["config", "show", "--config", str(config)]), "config", "not UTF-8", "0xe9")


def test_a_latin1_byte_in_a_policy_file(tmp_path: Path, clean_env: None) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_bytes(packaged_policy().encode().replace(b"# devicectl", b"# d\xe9vicectl", 1))
    config = tmp_path / "devicectl.toml"
    config.write_text(f'policy = "{policy}"\n')
    one_line(run(["config", "show", "--config", str(config)]), "policy", "not UTF-8")
    one_line(run(["dashboard", "--policy", str(policy)]), "policy", "not UTF-8")


def test_5000_deep_toml_arrays_in_a_config_file(tmp_path: Path, clean_env: None) -> None:
    config = tmp_path / "devicectl.toml"
    config.write_text("port = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line(run(["config", "show", "--config", str(config)]), "config", "nested deeper")


def test_5000_deep_toml_arrays_in_a_policy_file(tmp_path: Path, clean_env: None) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("zones = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line(run(["dashboard", "--policy", str(policy)]), "policy", "nested deeper")


def test_a_table_set_as_one_variable(clean_env: None) -> None:
    text = run(["config", "show"], env={"DEVICECTL_MQTT": "mqtt://broker"})
    one_line(text, "DEVICECTL_MQTT", "DEVICECTL_MQTT__URL")


def test_a_5000_digit_baudrate(clean_env: None) -> None:
    text = run(["config", "show"], env={"DEVICECTL_BAUDRATE": "9" * 5000})
    one_line(text, "baudrate", "characters) is not allowed")


def test_a_broker_url_with_port_0_is_refused_before_serving() -> None:
    one_line(run(["dashboard", "--mqtt", "mqtt://127.0.0.1:0"]), "mqtt.url", "port")


@pytest.mark.system
def test_sim_max_rate_nan() -> None:
    done = subprocess.run(
        [DEVICECTL, "sim", "--max-rate", "nan"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    one_line(done.stderr, "--max-rate")


@pytest.mark.system
def test_sim_tcp_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [DEVICECTL, "sim", "--tcp", f"127.0.0.1:{port}", "--control", str(tmp_path / "s")],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    one_line(done.stderr.strip().splitlines()[-1], "--tcp", "address already in use")


@pytest.mark.system
def test_sim_control_in_a_missing_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [DEVICECTL, "sim", "--control", str(tmp_path / "missing" / "sim.sock")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    one_line(done.stderr.strip().splitlines()[-1], "control socket", "No such file")


# ------------------------------------------------------------------------------------- point 9


def test_an_empty_data_dir_is_refused_not_the_current_directory(clean_env: None) -> None:
    one_line(run(["config", "show"], env={"DEVICECTL_DATA_DIR": ""}), "data_dir", "empty")


@pytest.mark.parametrize("flag", ["--data-dir", "--control"])
def test_an_empty_path_flag_of_run_is_refused(clean_env: None, flag: str) -> None:
    one_line(run(["run", "--port", "sim", flag, ""]), flag.removeprefix("--").replace("-", "_"))


def test_an_empty_policy_path_is_refused(clean_env: None) -> None:
    one_line(run(["config", "show"], env={"DEVICECTL_POLICY": ""}), "policy", "empty")
    one_line(run(["dashboard", "--policy", ""]), "--policy", "empty")


def test_the_dashboard_refuses_an_infinite_skin_limit(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(packaged_policy().replace("skin_temp_max_c = 41.0", "skin_temp_max_c = inf"))
    one_line(run(["dashboard", "--policy", str(policy)]), "policy.skin_temp_max_c")


def test_a_control_character_in_the_device_id(clean_env: None) -> None:
    text = one_line(
        run(["config", "show"], env={"DEVICECTL_MQTT__DEVICE": "laser\x1b[2J\u200b"}),
        "mqtt.device",
        "ASCII letters",
    )
    assert "\x1b" not in text
    assert "\u200b" not in text


def test_at_true_in_a_scenario(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('[[step]]\nat = true\ncommand = "footswitch down"\n')
    one_line(run(["sim", "--scenario", str(scenario)]), "step 1", "at")


def test_error_lines_stay_short_whatever_the_input(tmp_path: Path, clean_env: None) -> None:
    one_line(run(["config", "show"], env={"DEVICECTL_PORT": "x" * 2_000_000}), "port")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[[step]]\nat = 1\ncommand = "{"x" * 500_000}"\n')
    one_line(run(["sim", "--scenario", str(scenario)]), "step 1")
    big = tmp_path / "big.toml"
    big.write_text(f'port = "{"y" * 13_000_000}"\n')
    one_line(run(["config", "show", "--config", str(big)]), "config", "bytes, over")


@pytest.mark.parametrize("key", ["policy", "data_dir", "control"])
def test_a_home_directory_that_does_not_exist_is_one_line(key: str) -> None:
    """``~0`` names a user with no home directory: pathlib raises RuntimeError; refused instead."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, **{key: "~0"})
    assert "\n" not in str(caught.value) and key in str(caught.value)
