"""Under systemd, with stderr connected to the journal, every log line carries its syslog
priority, so that `journalctl -p warning` can filter devicectl's logs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from devicectl.logs import configure_logging, stderr_is_journal


@pytest.fixture
def journal_stream(tmp_path: Path) -> Iterator[TextIO]:
    """A file to stand for the journal's stream; the test makes it stderr (pytest's capture
    swaps sys.stderr between setup and call)."""
    with (tmp_path / "journal-stream").open("w+", encoding="utf-8") as stream:
        yield stream
    structlog.reset_defaults()


@pytest.mark.parametrize("json", [True, False])
def test_each_line_starts_with_its_priority(
    monkeypatch: pytest.MonkeyPatch, journal_stream: TextIO, json: bool
) -> None:
    info = os.fstat(journal_stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    monkeypatch.setattr(sys, "stderr", journal_stream)
    configure_logging(json=json, level="debug")
    log = structlog.get_logger("devicectl.test")
    log.debug("a_debug")
    log.info("an_info")
    log.warning("a_warning", value=3)
    log.error("an_error")
    log.critical("a_critical")
    journal_stream.flush()
    journal_stream.seek(0)
    lines = journal_stream.read().splitlines()
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert "a_warning" in lines[2]


def test_no_prefix_when_stderr_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream: inherited, not ours
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()
    path = tmp_path / "plain"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging(json=True)
        structlog.get_logger("devicectl.test").warning("plain_warning")
    structlog.reset_defaults()
    assert path.read_text(encoding="utf-8").startswith("{")
