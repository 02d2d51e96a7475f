"""docs/cli.md is the CLI's own account of itself: regenerate it when a command changes."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.cli.reference import render_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_docs_cli_md_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/cli.md is out of date: run `devicectl cli-reference --out docs/cli.md`"
    )


def test_the_reference_names_every_visible_command() -> None:
    text = render_reference()
    for command in (
        "run", "sim", "sim-control", "demo", "status", "session start", "session export",
        "params set", "fault ack", "log verify", "config show",
    ):  # fmt: skip
        assert f"## `devicectl {command}`" in text, command
    assert "## `devicectl cli-reference`" not in text  # hidden: it documents, it is not documented


def test_the_hidden_command_prints_it(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    result = CliRunner().invoke(app, ["cli-reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == render_reference()
