"""Every command explains itself with an example (issue 5: `--help` on every command)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from devicectl.cli import app


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and every group (``()`` is devicectl itself)."""
    found: list[tuple[str, ...]] = [prefix]
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            found += _commands(command, path)
        else:
            found.append(path)
    return found


COMMANDS = _commands(typer.main.get_command(app))


def test_the_stable_commands_of_design_section_7_exist() -> None:
    names = {" ".join(c) for c in COMMANDS}
    for expected in (
        "run", "sim", "sim-control", "demo", "status", "arm", "disarm", "stop", "watch",
        "schema", "session start", "session zone", "session end", "session list",
        "session show", "session export", "params set", "fault ack", "log verify",
    ):  # fmt: skip
        assert expected in names, expected


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "devicectl" for c in COMMANDS])
def test_help_has_an_example(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: devicectl" in result.output, result.output


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "devicectl" for c in COMMANDS])
def test_help_has_one_placeholder_style(command: tuple[str, ...]) -> None:
    """No `<bool>` after a flag, no `<str>`/`<list[str]>` type names, no space before a full
    stop: an upper-case word after each option that takes a value."""
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for stray in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list"):
        assert stray not in result.output, (stray, result.output)
    assert re.search(r"\w \.(\s|$)", result.output) is None, result.output


def test_help_shows_the_ranges() -> None:
    result = CliRunner().invoke(app, ["session", "start", "--help"], terminal_width=200)
    assert "1<=x<=6" in result.output or "1-6" in result.output.replace(" ", "")
    assert "4<=x<=6" in result.output or "4-6" in result.output
