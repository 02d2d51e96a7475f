"""One output rule for every command that prints a result, and a status a person can read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.cli.control import status_panel

STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "connected": True,
    "port": "sim",
    "device_serial": "00091469",
    "state": "emitting",
    "armed": True,
    "interlocks_open": [],
    "faults": [],
    "pulse_count": 1234,
    "head_temp_c": 29.5,
    "skin_temp_c": 32.1,
    "footswitch": True,
    "params": {"energy_uj": 6000, "width_us": 1000, "rate_hz": 20.0, "spot_um": 300},
    "session": 1,
    "zone": "forehead",
    "session_pulses": 240,
    "energy_by_zone_uj": {"forehead": 1441200},
    "breach_latched": None,
    "log_ok": True,
    "sim_control": "devicectl-sim.sock",
    "link": {"frames": 5000, "dropped": 0, "retries": 1, "reconnects": 0, "naks": 0},
}


def _render(status: dict[str, Any]) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(status_panel(status))
    return console.export_text()


def test_status_on_a_terminal_is_a_panel_of_sentences() -> None:
    text = _render(STATUS)
    for words in (
        "00091469 on sim (connected)",
        "EMITTING, armed",
        "pressed",
        "all closed",
        "6000 µJ, 1000 µs, 20 Hz, spot 300 µm",
        "head 29.50 °C, skin 32.10 °C",
        "1, forehead, 240 pulses",
        "forehead 1.441 J",
        "5,000 frames, 0 dropped, 1 retries",
    ):
        assert words in text, (words, text)
    assert "None" not in text and "{" not in text


def test_status_names_what_needs_attention() -> None:
    text = _render(
        STATUS
        | {
            "connected": False,
            "state": "fault",
            "interlocks_open": ["door"],
            "faults": ["interlock_opened"],
            "params": None,
            "session": None,
            "log_ok": False,
            "breach_latched": {"code": "interlock_open", "message": "interlock door opened"},
        }
    )
    for words in (
        "not connected",
        "FAULT",
        "open: door",
        "interlock_opened",
        "not set",
        "none open",
        "LATCHED: interlock door opened",
        "fault ack",
        "NOT WRITABLE",
    ):
        assert words in text, (words, text)


@pytest.mark.parametrize("argv", [["status"], ["arm"], ["session", "zone", "forehead"]])
def test_piped_results_are_json(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """CliRunner's output is not a terminal: the rule says JSON, with or without --json."""
    monkeypatch.setattr("devicectl.cli.control.call_daemon", lambda _path, _request: STATUS)
    result = CliRunner().invoke(app, [*argv, "--control", "/nonexistent.sock"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == STATUS
