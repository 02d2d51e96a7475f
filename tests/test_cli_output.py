"""One output rule for every command that prints a result, and a status a person can read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from rich.console import Console
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.cli.control import status_panel
from devicectl.users import Role, UserStore

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
    "log_commits": {
        "commit_interval_ms": 10,
        "commits": 420,
        "commits_per_s": 97,
        "commit_delay_p50_ms": 7.1,
        "commit_delay_p99_ms": 13.4,
    },
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
        "97 commits/s (at most one per 10 ms), commit p99 13.4 ms",
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


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["arm", "--user", "OP-7"],
        ["session", "zone", "forehead", "--user", "OP-7"],
        ["session", "note", "tolerated well", "--user", "OP-7"],
        ["session", "reaction", "--erythema", "mild", "--oedema", "none", "--user", "OP-7"],
        ["session", "adverse-event", "--severity", "mild", "--text", "redness", "--user", "OP-7"],
    ],
)
def test_piped_results_are_json(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """CliRunner's output is not a terminal: the rule says JSON, with or without --json."""
    monkeypatch.setenv("DEVICECTL_PIN", "op7-pin-7777")
    sent: list[dict[str, Any]] = []

    def call_daemon(_path: object, request: dict[str, Any]) -> dict[str, Any]:
        sent.append(request)
        return STATUS

    monkeypatch.setattr("devicectl.cli.control.call_daemon", call_daemon)
    result = CliRunner().invoke(app, [*argv, "--control", "/nonexistent.sock"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == STATUS
    if "--user" in argv:  # a treatment-changing request names its user and carries the PIN
        assert sent[0]["auth"] == {"user": "OP-7", "pin": "op7-pin-7777"}


def test_piped_users_list_is_json(tmp_path: Path) -> None:
    store = UserStore.in_data_dir(tmp_path, hasher=PasswordHasher.from_parameters(CHEAPEST))
    store.add("OP-7", Role.OPERATOR, "op7-pin-7777")
    store.add("SUP-1", Role.SUPERVISOR, "sup1-pin-1111")
    store.disable("OP-7", "left the clinic")
    result = CliRunner().invoke(app, ["users", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["users"]
    assert [(u["user"], u["role"], u["active"]) for u in listed] == [
        ("OP-7", "operator", False),
        ("SUP-1", "supervisor", True),
    ]
    assert listed[0]["disabled_reason"] == "left the clinic"
    assert "argon2" not in result.output  # never a PIN hash
