"""What `pip install devicectl` brings, and what the optional commands say without their extra."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*(.*)$")


def _name(requirement: str) -> str:
    match = _REQUIREMENT.match(requirement)
    assert match is not None, requirement
    return match.group(1).lower().replace("_", "-")


def test_the_device_runtime_brings_only_what_the_daemon_uses() -> None:
    runtime = {_name(r) for r in PROJECT["dependencies"]}
    for optional in ("matplotlib", "numpy", "starlette", "uvicorn", "amqtt", "jsonschema"):
        assert optional not in runtime, optional
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["report"]} == {"matplotlib", "numpy"}
    assert {_name(r) for r in extras["dashboard"]} == {"starlette", "uvicorn"}
    assert "amqtt" in {_name(r) for r in extras["demo"]}
    assert "jsonschema" in {_name(r) for r in extras["test"]}


def _floors() -> dict[str, str]:
    floors: dict[str, str] = {}
    groups = [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
    for requirement in (r for group in groups for r in group):
        match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        if match:
            floors[_name(requirement)] = match.group(1)
    return floors


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_ci_installs_exactly_the_declared_floors() -> None:
    pinned: dict[str, str] = {}
    for raw in (ROOT / ".ci" / "floors.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = version.strip()
    floors = {k: v for k, v in _floors().items() if k not in {"ruff", "mypy"}}  # tools, not code
    assert set(pinned) == set(floors)
    for name, floor in floors.items():
        assert _release(pinned[name]) == _release(floor), name


def test_the_license_file_is_the_declared_one() -> None:
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["demo", "--duration", "20"], "demo"),
        (["dashboard", "--mqtt", "mqtt://127.0.0.1:1"], "dashboard"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], extra: str
) -> None:
    missing = EXTRAS[extra][0]
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert f"[{extra}]" in lines[0] and missing in lines[0]
    assert f"pip install 'devicectl[{extra}]'" in lines[0]


def test_the_html_report_without_plotting_names_the_report_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from devicectl.sessionlog import store

    db = tmp_path / "sessions.db"
    store.connect(db).close()  # an empty, valid log
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(
        app, ["session", "export", "1", "--format", "html", "--out", str(tmp_path / "r.html"),
              "--db", str(db)]
    )  # fmt: skip
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "[report]" in result.output and "matplotlib" in result.output
