"""Platform conventions: one environment vocabulary ranking above the file, a default config
path, `--version`, and the record commands finding the daemon's log as the daemon would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.config import DEFAULT_CONFIG_FILE, default_config_file, load_settings
from devicectl.errors import ConfigError
from devicectl.sessionlog import store
from protocols import PROTO_VERSION


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DEVICECTL_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))


def test_nested_variables_rank_above_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "devicectl.toml"
    config.write_text(
        '[mqtt]\nurl = "mqtt://file.example"\nusername = "from-file"\npassword = "file"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("DEVICECTL_MQTT__USERNAME", "from-env")
    monkeypatch.setenv("DEVICECTL_MQTT__PASSWORD", "env-secret")
    settings = load_settings(config)
    assert settings.mqtt.username == "from-env"
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "env-secret"
    shown = settings.redacted_dict()["mqtt"]
    assert shown["username"] == "from-env" and shown["password"] == "***"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("DEVICECTL_MQTT_PASSWORD", "DEVICECTL_MQTT__PASSWORD"),
        ("DEVICECTL_MQTT_USERNAME", "DEVICECTL_MQTT__USERNAME"),
        ("DEVICECTL_MQTT_CA", "DEVICECTL_MQTT__CA_FILE"),
    ],
)
def test_the_old_single_underscore_names_are_refused_naming_the_new_one(
    monkeypatch: pytest.MonkeyPatch, old: str, new: str
) -> None:
    monkeypatch.setenv(old, "s3cret-value")
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    message = str(caught.value)
    assert old in message and new in message
    if "PASSWORD" in old:
        assert "s3cret-value" not in message


def test_the_default_config_file_is_devicectl_config_else_etc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert Path("/etc/devicectl/devicectl.toml") == DEFAULT_CONFIG_FILE
    expected = DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    assert default_config_file({}) == expected
    named = tmp_path / "x.toml"
    assert default_config_file({"DEVICECTL_CONFIG": str(named)}) == named


def test_config_show_reads_devicectl_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "site.toml"
    config.write_text('status_period_ms = 250\n[mqtt]\nsite = "clinic-7"\n', encoding="utf-8")
    monkeypatch.setenv("DEVICECTL_CONFIG", str(config))
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["status_period_ms"] == 250 and shown["mqtt"]["site"] == "clinic-7"


def test_version_names_the_software_and_the_protocols() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("devicectl ")
    assert f"ICD v{PROTO_VERSION}" in result.output
    assert "schema v1" in result.output


def test_record_commands_honour_devicectl_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "daemon-data"
    store.connect(data_dir / "sessions.db").close()
    monkeypatch.setenv("DEVICECTL_DATA_DIR", str(data_dir))
    runner = CliRunner()
    listed = runner.invoke(app, ["session", "list"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == {"sessions": []}
    verified = runner.invoke(app, ["log", "verify"])
    assert verified.exit_code == 0, verified.output
    assert str(data_dir / "sessions.db") in verified.output


def test_record_commands_read_the_data_dir_of_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "from-config"
    store.connect(data_dir / "sessions.db").close()
    config = tmp_path / "devicectl.toml"
    config.write_text(f'data_dir = "{data_dir}"\n', encoding="utf-8")
    monkeypatch.setenv("DEVICECTL_CONFIG", str(config))
    result = CliRunner().invoke(app, ["log", "verify"])
    assert result.exit_code == 0, result.output
    assert str(data_dir / "sessions.db") in result.output
