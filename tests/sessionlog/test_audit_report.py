"""The record an auditor reads: who did what under which limits, in the HTML report and the same
facts in the JSON export, which validates against its published schema. One session is built as
the daemon records it: an override signed off by a supervisor, a breach on a known pulse, its
acknowledgement, the fluence cap of each parameter set, the reaction and an adverse event
appended after the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from playwright.async_api import async_playwright, expect
from typer.testing import CliRunner

from devicectl.cli import records  # noqa: F401 - registers the commands
from devicectl.cli.app import app
from devicectl.policy import load_policy_with_source
from devicectl.sessionlog import LimitsInForce
from devicectl.sessionlog.export import export_schema, session_document
from devicectl.sessionlog.model import Provenance
from devicectl.sessionlog.report import render_report
from devicectl.sessionlog.store import connect
from tests.conftest import require_tool
from tests.sessionlog.helpers import T0, Clock, fill_session, open_log, session_info

runner = CliRunner()
REASON = "tan two months old; test patch on 2026-11-01 showed no reaction"
ACK_REASON = "energy re-measured after cleaning the handpiece window"


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "sessions.db"
    policy, source = load_policy_with_source()
    clock = Clock()
    info = session_info(
        operator="OP-7",
        operator_role="operator",
        ci_recent_sun_exposure_or_tan=True,
        override={
            "signed_off_by": "SUP-1",
            "role": "supervisor",
            "reason_code": "physician_clearance",
            "reason": REASON,
        },
        checklist_numbing_applied=True,
        checklist_numbing_agent="lidocaine 4 % cream",
        checklist_numbing_contact_min=30,
        ingredient_amount=2.0,
        ingredient_unit="ml",
        ingredient_lot="HA-2611-07",
    )
    provenance = Provenance(
        software_version="0.1.0",
        firmware_version="1.0.0",
        device_serial="SIM-0001",
        policy_name=source.name,
        policy_sha256=source.sha256,
        time_zone="Europe/Paris",
    )
    with open_log(path, clock) as slog:
        sid = slog.start_session(
            info,
            device_pulse_count=0,
            limits=LimitsInForce.from_policy(policy),
            provenance=provenance,
        ).session_id
        slog.record_zone(sid, "forehead", actor="OP-7", role="operator", energy_limit_uj=60_000_000)
        slog.record_params(
            sid, energy_uj=1500, width_us=1000, rate_mhz=20_000, spot_um=300, actor="OP-7",
            role="operator",
            fluence_limit={
                "fluence_j_cm2": 2.122, "max_fluence_j_cm2": 30.0,
                "rule": "max_fluence_skin_type_III", "skin_type": "III", "zone": "forehead",
                "preset": "fine_lines",
            },
        )  # fmt: skip
        for i in range(40):
            energy = 1500 if i != 25 else 1950  # pulse 26 is 30 % over its setpoint
            slog.record_pulse(sid, i + 1, i * 50_000, T0 + i * 50_000_000, energy, "forehead")
        slog.record_event(
            sid, "breach", "supervisor",
            {
                "code": "energy_out_of_tolerance", "severity": "high", "value": 1950,
                "limit": 1800, "unit": "µJ", "pulse_no": 26, "detail": None,
                "message": "pulse 26 measured 1950 µJ, outside ±20 % of 1500 µJ",
            },
        )  # fmt: skip
        slog.record_event(
            sid, "fault_ack", "OP-7",
            {
                "breach": "energy_out_of_tolerance", "pulse_no": 26, "signed_off_by": "SUP-1",
                "signed_off_role": "supervisor", "reason_code": "handpiece_checked",
            },
            ACK_REASON, role="operator",
        )  # fmt: skip
        fill_session(
            slog, sid, first_pulse_no=41, pulses=10, zone="cheeks", start_ns=T0 + 3 * 10**9
        )
        clock.advance(seconds=600)
        slog.end_session(
            sid, actor="OP-7", role="operator", post_care=["serum_or_moisturiser", "avoid_sun"]
        )
        clock.advance(seconds=60)
        slog.record_clinical(
            sid, "reaction", actor="OP-7", role="operator",
            entry={"erythema": "mild", "oedema": "none"},
        )  # fmt: skip
        clock.advance(days=1)
        slog.record_clinical(
            sid, "adverse_event", actor="SUP-1", role="supervisor",
            entry={"severity": "moderate", "text": "blister, left cheek",
                   "action_taken": "cold compress, review at 48 h"},
        )  # fmt: skip
    return path


def _document(path: Path) -> dict:  # type: ignore[type-arg]
    conn = connect(path, readonly=True)
    try:
        return session_document(conn, 1)
    finally:
        conn.close()


def _report(path: Path) -> str:
    conn = connect(path, readonly=True)
    try:
        return render_report(conn, 1)
    finally:
        conn.close()


def test_the_json_export_validates_against_its_schema(audited: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.json"
    result = runner.invoke(
        app, ["session", "export", "1", "--format", "json", "--out", str(out), "--db", str(audited)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    schema = export_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    # The schema has teeth: a document missing the sign-offs, or with a malformed hash, fails.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in doc.items() if k != "signoffs"}, schema)
    bad = json.loads(out.read_text())
    bad["provenance"]["policy_sha256"] = "not-a-hash"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    # `devicectl session schema` prints the same schema.
    printed = runner.invoke(app, ["session", "schema"])
    assert printed.exit_code == 0 and json.loads(printed.output) == schema


def test_the_export_carries_the_auditors_facts(audited: Path) -> None:
    doc = _document(audited)
    assert doc["info"]["operator"] == "OP-7" and doc["info"]["operator_role"] == "operator"
    assert doc["provenance"]["policy_name"] == "packaged default policy"
    assert re.fullmatch(r"[0-9a-f]{64}", doc["provenance"]["policy_sha256"])
    assert (doc["provenance"]["software_version"], doc["provenance"]["firmware_version"]) == (
        "0.1.0",
        "1.0.0",
    )
    assert doc["time_zone"] == "Europe/Paris"
    assert doc["started"].endswith("+00:00")  # stored and exported in UTC...
    assert doc["started_local"].endswith("+01:00")  # ...and shown in the clinic's zone
    assert doc["ended_local"] is not None
    (cap,) = [p["fluence_limit"] for p in doc["params"] if p["fluence_limit"]]
    assert (cap["max_fluence_j_cm2"], cap["rule"], cap["preset"]) == (
        30.0,
        "max_fluence_skin_type_III",
        "fine_lines",
    )
    override, ack = doc["signoffs"]
    assert (override["kind"], override["actor"], override["signed_off_by"]) == (
        "override",
        "OP-7",
        "SUP-1",
    )
    assert override["reason_code"] == "physician_clearance" and override["reason"] == REASON
    assert (ack["kind"], ack["signed_off_by"], ack["reason_code"]) == (
        "fault_ack",
        "SUP-1",
        "handpiece_checked",
    )
    assert doc["breaches"][0]["pulse_no"] == 26
    assert doc["info"]["checklist"]["consent_given"] is True
    assert doc["info"]["checklist"]["numbing_agent"] == "lidocaine 4 % cream"
    assert (doc["info"]["ingredient_amount"], doc["info"]["ingredient_lot"]) == (2.0, "HA-2611-07")
    assert doc["post_care"] == ["avoid_sun", "serum_or_moisturiser"]
    assert doc["reactions"][0]["erythema"] == "mild"
    assert doc["adverse_events"][0]["actor"] == "SUP-1"
    assert doc["course_position"]["kind"] == "course" and doc["course_position"]["number"] == 1


def test_the_report_is_readable_and_names_who_under_which_limits(audited: Path) -> None:
    text = _report(audited)
    assert "id=override-banner" in text and "1 contraindication override" in text
    assert "1 breach acknowledgement" in text
    signoffs = text[
        text.index("<section id=signoffs") : text.index(
            "</section>", text.index("<section id=signoffs")
        )
    ]
    for words in (
        "SUP-1 (supervisor)",
        "OP-7 (operator)",
        "physician_clearance",
        REASON,
        ACK_REASON,
        "recent sun exposure or tan",
    ):
        assert words in signoffs, words
    caps = text[text.index("<table id=fluence-caps") :]
    caps = caps[: caps.index("</table>")]
    assert "<td class=num>30</td>" in caps and "skin type III" in caps and "fine_lines" in caps
    assert 'id="breach-pulse-26"' in text  # the breaching pulse, marked on the energy plot
    assert "pulse 26: energy out of tolerance" in text
    assert "of 60 J limit" in text  # the zone's limit as a number beside its bar
    assert "2026-11-25 10:46:40+01:00" in text  # the start in the clinic's time zone (stored UTC)
    assert "times are in Europe/Paris" in text
    assert "Informed consent given" in text and "lidocaine 4 % cream, 30 min contact" in text
    assert "hyaluronic acid 1 %, 2 ml, lot HA-2611-07" in text
    assert "avoid sun exposure, soothing serum or moisturiser" in text
    assert "blister, left cheek" in text and "erythema mild, oedema none" in text
    assert "session 1 of 4 (course C-0042-A, from the log; typed as 1)" in text
    # No raw Python formatting anywhere in the readable text.
    visible = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)
    visible = re.sub(r"<style>.*?</style>", "", visible, flags=re.S)
    for raw in ("None", "=None", "['", "{'", "True", "False"):
        assert raw not in visible, raw


@pytest.mark.system
async def test_the_report_in_a_browser_shows_the_override_banner_and_the_fluence_caps(
    audited: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(
        app, ["session", "export", "1", "--format", "html", "--out", str(out), "--db", str(audited)]
    )
    assert result.exit_code == 0, result.output
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=require_tool("chromium"),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 1400})
            await page.goto(out.as_uri())
            banner = page.locator("#override-banner")
            await expect(banner).to_be_visible()
            await expect(banner).to_contain_text("1 contraindication override")
            color = await banner.evaluate("e => getComputedStyle(e).backgroundColor")
            assert color == "rgb(176, 0, 32)", color  # it stands out
            signoffs = page.locator("#signoff-table tr")
            await expect(signoffs).to_have_count(3)  # header, override, acknowledgement
            await expect(signoffs.nth(1)).to_contain_text("SUP-1 (supervisor)")
            caps = page.locator("#fluence-caps")
            await expect(caps).to_be_visible()
            headers = await caps.locator("th").all_inner_texts()
            assert "Fluence cap (J/cm²)" in headers and "Cap set by" in headers
            row = caps.locator("tr").nth(1)
            await expect(row).to_contain_text("skin type III")
            cells = await row.locator("td").all_inner_texts()
            assert cells[headers.index("Fluence cap (J/cm²)")] == "30"
            assert await page.locator("#breach-pulse-26").count() == 1
            await page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            await browser.close()


def test_session_show_names_the_breach_its_signoffs_and_the_appended_entries(
    audited: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = runner.invoke(app, ["session", "show", "1", "--db", str(audited)])
    assert piped.exit_code == 0, piped.output
    doc = json.loads(piped.output)  # not a terminal: the same facts, as JSON
    assert (doc["info"]["operator"], doc["info"]["operator_role"]) == ("OP-7", "operator")
    assert doc["time_zone"] == "Europe/Paris"
    # On a terminal (CliRunner's output never is one): the readable summary.
    monkeypatch.setattr("devicectl.cli.records.wants_json", lambda as_json: as_json)
    result = runner.invoke(app, ["session", "show", "1", "--db", str(audited)])
    assert result.exit_code == 0, result.output
    text = result.output
    for words in (
        "OP-7 (operator)",
        "(Europe/Paris)",
        "session 1 of 4 (from the log)",
        "override by OP-7, signed off by SUP-1 (physician_clearance)",
        "fault ack by OP-7, signed off by SUP-1 (handpiece_checked)",
        "energy out of tolerance",  # the breach shows its code, not only "breach"
        "adverse event",
        "2 ml, lot HA-2611-07",
    ):
        assert words in text, words


def test_session_show_prints_free_text_as_typed_never_as_markup_or_terminal_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A note or a reason is the clinician's text: `[/oops]` made `session show` crash with a
    traceback (rich read it as markup), `[black on black]...[/]` hid a note on the terminal, and
    an escape sequence or a line break went to the terminal as it was (a forged line)."""
    path = tmp_path / "sessions.db"
    forged = "checked\r\n\x1b[32mfault ack by SUP-2, signed off by SUP-2\x1b[0m"
    info = session_info(
        override={
            "signed_off_by": "SUP-1", "role": "supervisor",
            "reason_code": "physician_clearance", "reason": forged,
        },
        ci_pregnancy=True,
    )  # fmt: skip
    with open_log(path, Clock()) as slog:
        sid = slog.start_session(info, device_pulse_count=0).session_id
        for text in ("all fine [/oops]", "[black on black]blister, left cheek[/]"):
            slog.record_clinical(sid, "note", actor="OP-7", role="operator", entry={"text": text})
    piped = runner.invoke(app, ["session", "show", str(sid), "--db", str(path)])
    assert "\x1b" not in piped.output and "\r" not in piped.output  # JSON escapes them itself
    # On a terminal (CliRunner's output never is one): the readable summary.
    monkeypatch.setattr("devicectl.cli.records.wants_json", lambda as_json: as_json)
    result = runner.invoke(app, ["session", "show", str(sid), "--db", str(path)])
    assert result.exit_code == 0, result.output
    assert "all fine [/oops]" in result.output
    assert "[black on black]blister, left cheek[/]" in result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert "checked\\r\\n\\x1b[32mfault ack by SUP-2" in result.output
