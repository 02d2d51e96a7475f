"""Exports: JSON and CSV parse back to what was logged; the HTML report renders in Chromium with
its three plots; the CLI (log verify, session list/show/export) with its exit codes."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devicectl.cli import records  # noqa: F401 - registers the commands
from devicectl.cli.app import app
from devicectl.sessionlog import LimitsInForce
from devicectl.sessionlog.export import PULSE_CSV_COLUMNS, session_document
from devicectl.sessionlog.report import render_report
from devicectl.sessionlog.store import connect
from tests.conftest import require_tool
from tests.sessionlog.helpers import T0, Clock, fill_session, open_log, session_info

runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session 1 (complete: two zones, a breach and its ack, a gap), session 2 (another operator,
    a day later, open)."""
    path = tmp_path_factory.mktemp("export") / "sessions.db"
    clock = Clock()
    with open_log(path, clock) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        nxt = fill_session(slog, sid, first_pulse_no=1, pulses=40, zone="forehead", energy_uj=1500)
        nxt = fill_session(
            slog, sid, first_pulse_no=nxt, pulses=30, zone="cheeks", start_ns=T0 + 3 * 10**9
        )
        slog.record_event(
            sid, "breach", "supervisor", {"rule": "energy_tolerance", "value": 2600}, None
        )
        slog.record_event(sid, "ack", "op-anna", {}, "handpiece <checked> & cleaned")
        slog.record_pulse_gap(
            sid, nxt, nxt + 1, charged_energy_uj=60_000, zone="cheeks", cause="gap in pulse_no"
        )
        clock.advance(seconds=300)
        slog.end_session(sid, actor="op-anna", post_care=["sunscreen", "serum_or_moisturiser"])
        clock.advance(days=1)
        other = session_info(operator="op-ben", patient_ref="PT-0099", course_course_id="C-0099-A")
        fill_session(slog, slog.start_session(other).session_id, first_pulse_no=nxt + 2, pulses=5)
    return path


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_json_export_is_the_full_record(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.json"
    code, text = _cli(
        "session", "export", "1", "--format", "json", "--out", str(out), "--db", str(db)
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["format"] == "devicectl-session/2"
    assert doc["outcome"] == "completed"
    assert doc["info"]["patient_ref"] == "PT-0042"
    assert doc["info"]["checklist"]["contraindications"]["pregnancy"] is False
    assert [z["zone"] for z in doc["zones"]] == ["forehead", "cheeks"]
    assert [p["energy_uj"] for p in doc["params"]] == [1500, 2000]
    assert [e["event"] for e in doc["events"]] == ["breach", "ack"]
    assert doc["events"][1]["reason"] == "handpiece <checked> & cleaned"
    assert doc["pulse_gaps"][0]["count"] == 2
    assert doc["post_care"] == ["serum_or_moisturiser", "sunscreen"]
    assert len(doc["status"]) >= 3
    assert len(doc["pulses"]) == doc["summary"]["pulses"] == 70
    assert doc["pulses"][0] == {
        "pulse_no": 1,
        "t_us": 0,
        "host_time_ns": T0,
        "energy_uj": 1500,
        "zone": "forehead",
    }
    assert doc["summary"]["unlogged_pulses"] == 2
    assert doc["limits"] is None  # not recorded: started without them


def test_csv_export_holds_every_pulse(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.csv"
    code, text = _cli(
        "session", "export", "1", "--format", "csv", "--out", str(out), "--db", str(db)
    )
    assert code == 0, text
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == PULSE_CSV_COLUMNS
    assert [int(r["pulse_no"]) for r in rows] == list(range(1, 71))
    assert {r["zone"] for r in rows} == {"forehead", "cheeks"}
    assert sum(int(r["energy_uj"]) for r in rows[:40]) == sum(1500 + i % 7 for i in range(40))
    assert rows[0]["host_time"].startswith("2026-11-25T09:46:40")
    assert rows[0]["host_time"].endswith("+00:00")


def test_the_html_report_is_self_contained_with_three_plots(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.html"
    code, text = _cli(
        "session", "export", "1", "--format", "html", "--out", str(out), "--db", str(db)
    )
    assert code == 0, text
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for figure in ("plot-energy", "plot-temperature", "plot-zones"):
        assert f"<figure id={figure}><svg" in page
    assert "@media print" in page
    assert "handpiece &lt;checked&gt; &amp; cleaned" in page  # escaped, not injected
    for external in ("<script", "src=", "<link"):
        assert external not in page


def _report(path: Path, session_id: int) -> str:
    conn = connect(path, readonly=True)
    try:
        return render_report(conn, session_id)
    finally:
        conn.close()


def test_a_log_without_the_limits_in_force_shows_defaults_labelled(db: Path) -> None:
    """Session 1 was started without limits, as every log written before they were recorded."""
    page = _report(db, 1)
    assert "setpoint ±20 % (default)" in page  # the energy plot's legend
    assert "skin limit 41 °C (default)" in page  # the temperature plot's legend and caption
    assert "Defaults: this log does not record the limits in force." in page
    assert "not recorded in this log: defaults shown" in page
    assert "±20 % of the setpoint (default)" in page


def test_the_report_draws_the_limits_the_session_ran_under(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    limits = LimitsInForce(
        energy_tolerance_pct=15, skin_temp_max_c=39.5, head_temp_max_c=43.0, session_energy_j=0.2
    )
    with open_log(path, Clock()) as slog:
        sid = slog.start_session(session_info(), limits=limits).session_id
        fill_session(slog, sid, first_pulse_no=1, pulses=10, zone="neck")  # limit: 2 × 20 mJ
        slog.end_session(sid, actor="op-anna")
    page = _report(path, sid)
    assert "setpoint ±15 %" in page  # the energy plot's legend
    assert "skin limit 39.5 °C" in page  # the temperature plot's legend and caption
    assert "head limit 43 °C" in page
    assert "±15 % of the setpoint" in page
    assert "recorded at session start" in page
    assert "of 0.2 J session limit" in page
    assert "Energy, neck</th><td>0.020 J of 0.04 J limit</td>" in page
    for default in ("default", "±20 %", "41 °C"):
        assert default not in page
    conn = connect(path, readonly=True)
    doc = session_document(conn, sid)
    conn.close()
    assert doc["limits"] == limits.model_dump(mode="json")


@pytest.mark.system
def test_the_html_report_renders_in_chromium(db: Path, tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    out = tmp_path / "report.html"
    assert (
        _cli("session", "export", "1", "--format", "html", "--out", str(out), "--db", str(db))[0]
        == 0
    )
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "<title>Treatment session 1 — PT-0042</title>" in dom
    for figure in ("plot-energy", "plot-temperature", "plot-zones"):
        start = dom.index(f'id="{figure}"')
        assert "<svg" in dom[start : start + 400]
    assert dom.count("<svg") >= 3
    assert "<path" in dom  # the plots' lines and bars were parsed as SVG


def test_log_verify_reports_intact_and_then_the_tampered_record(db: Path, tmp_path: Path) -> None:
    code, text = _cli("log", "verify", "--db", str(db))
    assert code == 0
    assert f"session log {db} intact: " in text
    copy = tmp_path / "sessions.db"
    copy.write_bytes(db.read_bytes())
    conn = sqlite3.connect(copy)
    (seq,) = conn.execute("SELECT seq FROM pulses WHERE pulse_no = 12").fetchone()
    with conn:
        conn.execute("UPDATE pulses SET energy_uj = energy_uj - 500 WHERE pulse_no = 12")
    conn.close()
    code, text = _cli("log", "verify", "--db", str(copy))
    assert code == 1
    assert f"record {seq} (pulse_no 12 of session 1) was altered" in text
    assert "NOT intact" in text


def test_log_verify_finds_the_file_through_the_data_dir(db: Path) -> None:
    code, text = _cli("log", "verify", "--data-dir", str(db.parent))
    assert code == 0, text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"1", "2"}),
        (["--operator", "op-ben"], {"2"}),
        (["--patient", "PT-0042"], {"1"}),
        (["--device", "SIM-0001"], {"1", "2"}),
        (["--device", "SIM-9999"], set()),
        (["--since", "2026-11-26"], {"2"}),
        (["--until", "2026-11-25"], {"1"}),
    ],
)
def test_session_list_filters(db: Path, args: list[str], expected: set[str]) -> None:
    # Dates are local days; the sessions (09:46 UTC on the 25th and 26th) fall on those dates
    # in every time zone from UTC-9 to UTC+14.
    code, text = _cli("session", "list", "--db", str(db), *args)  # piped: JSON
    assert code == 0, text
    ids = {str(row["id"]) for row in json.loads(text)["sessions"]}
    assert ids == expected


def test_session_show_is_a_readable_summary(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("devicectl.cli.records.wants_json", lambda as_json: as_json)  # a terminal
    code, text = _cli("session", "show", "1", "--db", str(db))
    assert code == 0, text
    for words in (
        "PT-0042",
        "completed",
        "hyaluronic acid",
        "C-0042-A: session 1 of 4",
        "breach",
        "forehead",
    ):
        assert words in text


def test_session_show_piped_is_the_json_document(db: Path) -> None:
    code, text = _cli("session", "show", "1", "--db", str(db))
    assert code == 0, text
    doc = json.loads(text)
    assert doc["info"]["patient_ref"] == "PT-0042"
    assert doc["outcome"] == "completed"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["session", "show", "9"], 2, "no session 9 in the log"),
        (["session", "export", "9", "--out", "x.json"], 2, "no session 9 in the log"),
        (["session", "list", "--since", "yesterday"], 2, "not a date"),
    ],
)
def test_bad_requests_are_usage_errors(db: Path, args: list[str], code: int, words: str) -> None:
    got, text = _cli(*args, "--db", str(db))
    assert got == code
    assert words in text


def test_a_missing_log_is_named(tmp_path: Path) -> None:
    code, text = _cli("log", "verify", "--db", str(tmp_path / "none.db"))
    assert code == 2
    assert f"no session log at {tmp_path / 'none.db'}" in text


def test_a_breach_acknowledged_in_a_later_session_is_recorded_with_the_breach(
    tmp_path: Path,
) -> None:
    """A breach latches across sessions: ended with it latched, the next patient's session was
    opened and the acknowledgement went into *that* session's record. Its report then showed a
    breach acknowledgement (banner included) for a breach its patient never had, and the
    breach's own session showed it never acknowledged. It belongs to the breach's session, also
    after the log was reopened (a restart between the breach and the acknowledgement)."""
    path = tmp_path / "sessions.db"
    breach = {"code": "energy_out_of_tolerance", "pulse_no": 3, "value": 1950, "limit": 1800}
    ack = {"breach": "energy_out_of_tolerance", "pulse_no": 3, "signed_off_by": "SUP-1",
           "signed_off_role": "supervisor", "reason_code": "handpiece_checked"}  # fmt: skip
    clock = Clock()
    with open_log(path, clock) as slog:
        first = slog.start_session(session_info(patient_ref="PT-0001")).session_id
        fill_session(slog, first, first_pulse_no=1, pulses=3, start_ns=clock.now)
        slog.record_event(first, "breach", "devicectl", breach)
        slog.end_session(first, actor="OP-7", role="operator")
    clock.advance(seconds=60)
    with open_log(path, clock) as slog:
        second = slog.start_session(
            session_info(patient_ref="PT-0002", course_course_id="C-0002")
        ).session_id
        slog.record_event(second, "fault_ack", "OP-7", ack, "energy re-measured", role="operator")
        slog.end_session(second, actor="OP-7", role="operator")
    conn = connect(path, readonly=True)
    try:
        breached, other = session_document(conn, first), session_document(conn, second)
    finally:
        conn.close()
    assert [s["kind"] for s in breached["signoffs"]] == ["fault_ack"]
    assert breached["signoffs"][0]["signed_off_by"] == "SUP-1"
    assert other["signoffs"] == [] and other["breaches"] == []
    (recorded,) = [e for e in breached["events"] if e["event"] == "fault_ack"]
    assert recorded["detail"]["during_session"] == second  # where the supervisor signed it


def test_a_breach_outside_any_session_acknowledged_during_one_stays_outside(
    tmp_path: Path,
) -> None:
    clock = Clock()
    breach = {"code": "device_fault", "pulse_no": None, "value": 0, "limit": 0}
    ack = {"breach": "device_fault", "pulse_no": None, "signed_off_by": "SUP-1",
           "signed_off_role": "supervisor", "reason_code": "cause_found_and_fixed"}  # fmt: skip
    with open_log(tmp_path / "s.db", clock) as slog:
        slog.record_event(None, "breach", "devicectl", breach)
        sid = slog.start_session(session_info()).session_id
        slog.record_event(sid, "fault_ack", "SUP-1", ack, "board replaced", role="supervisor")
        slog.end_session(sid, actor="SUP-1", role="supervisor")
    conn = connect(tmp_path / "s.db", readonly=True)
    try:
        assert session_document(conn, sid)["signoffs"] == []
        (row,) = conn.execute(
            "SELECT session_id, body FROM records WHERE body LIKE '%fault_ack%'"
        ).fetchall()
    finally:
        conn.close()
    assert row[0] is None and json.loads(row[1])["detail"]["during_session"] == sid
