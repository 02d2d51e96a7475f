"""Session rules: patient reference, checklist and contraindications, course warnings, summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from devicectl.errors import DevicectlError
from devicectl.policy import load_policy
from devicectl.sessionlog import (
    InvalidSessionInfo,
    LimitsInForce,
    SessionInfo,
    SessionRefused,
    SkinType,
    parse_session_info,
)
from devicectl.sessionlog.reader import load_session
from devicectl.sessionlog.store import connect
from tests.sessionlog.helpers import T0, Clock, fill_session, open_log, session_info


@pytest.mark.parametrize("ref", ["PT-0042", "ABCD", "2026-11-0042", "X" * 32])
def test_pseudonymous_references_are_accepted(ref: str) -> None:
    assert parse_session_info(session_info(patient_ref=ref)).patient_ref == ref


@pytest.mark.parametrize("ref", ["Jane Doe", "jane.doe", "ABC", "X" * 33, "PT_0042", "Müller"])
def test_a_name_or_malformed_reference_is_refused(ref: str) -> None:
    with pytest.raises(InvalidSessionInfo) as caught:
        parse_session_info(session_info(patient_ref=ref))
    assert caught.value.field == "patient_ref"
    assert "never a name" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_reference_pattern_is_configurable(tmp_path: Path) -> None:
    info = session_info(patient_ref="clinic7/123")
    assert parse_session_info(info, patient_ref_pattern=r"^clinic\d+/\d+$").patient_ref
    with open_log(tmp_path / "s.db", patient_ref_pattern=r"^P\d{4}$") as slog:
        with pytest.raises(InvalidSessionInfo):
            slog.start_session(session_info())  # PT-0042 does not match ^P\d{4}$
        # A model built elsewhere is still checked against the log's pattern.
        with pytest.raises(InvalidSessionInfo):
            slog.start_session(SessionInfo.model_validate(session_info()))
        assert slog.start_session(session_info(patient_ref="P1234")).session_id == 1


@pytest.mark.parametrize(
    ("given", "expected"), [("I", SkinType.I), ("vi", SkinType.VI), (4, SkinType.IV)]
)
def test_skin_type_accepts_roman_numerals_and_numbers(given: object, expected: SkinType) -> None:
    assert parse_session_info(session_info(skin_type=given)).skin_type is expected


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"skin_type": "VII"}, "skin_type"),
        ({"concerns": ["wrinkles"]}, "concerns.0"),
        ({"course_planned_sessions": 3}, "course.planned_sessions"),
        ({"course_planned_sessions": 7}, "course.planned_sessions"),
        ({"operator": ""}, "operator"),
        ({"active_ingredient": ""}, "active_ingredient"),
        ({"ci_pregnancy": "maybe"}, "checklist.contraindications.pregnancy"),
        ({"surname": "Doe"}, "surname"),
    ],
)
def test_malformed_fields_are_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSessionInfo) as caught:
        parse_session_info(session_info(**changes))
    assert caught.value.field == field
    assert isinstance(caught.value, DevicectlError)


@pytest.mark.parametrize(
    ("changes", "rule", "words"),
    [
        ({"checklist_consultation_done": False}, "checklist.consultation_done", "consultation"),
        ({"checklist_area_cleaned": False}, "checklist.area_cleaned", "cleaned"),
        ({"checklist_numbing_applied": None}, "checklist.numbing_applied", "numbing"),
        ({"ci_pregnancy": True}, "contraindication.pregnancy", "present: pregnancy"),
        ({"ci_pregnancy": None}, "contraindication.pregnancy", "not answered: pregnancy"),
        (
            {"ci_photosensitising_medication": True},
            "contraindication.photosensitising_medication",
            "present: photosensitising medication",
        ),
        (
            {"ci_recent_sun_exposure_or_tan": True},
            "contraindication.recent_sun_exposure_or_tan",
            "recent sun exposure",
        ),
    ],
)
def test_checklist_and_contraindications_are_enforced(
    tmp_path: Path, changes: dict[str, object], rule: str, words: str
) -> None:
    with open_log(tmp_path / "s.db") as slog:
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(**changes))
        assert caught.value.rule == rule
        assert words in str(caught.value)
        assert slog.open_session() is None
        # numbing "no" is an answer, not a refusal
        assert slog.start_session(session_info(checklist_numbing_applied=False)).session_id == 1


def test_every_missing_item_is_named_in_one_line(tmp_path: Path) -> None:
    info = session_info(
        checklist_area_cleaned=False, ci_pregnancy=True, ci_allergy_to_active_ingredient=None
    )
    with open_log(tmp_path / "s.db") as slog, pytest.raises(SessionRefused) as caught:
        slog.start_session(info)
    text = str(caught.value)
    assert "\n" not in text
    for words in ("cleaned", "present: pregnancy", "not answered: allergy to active ingredient"):
        assert words in text


def _course_session(number: int) -> dict[str, object]:
    return session_info(course_session_number=number)


def test_a_course_spaced_a_week_apart_has_no_warnings(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        for n in range(1, 5):
            opened = slog.start_session(_course_session(n))
            assert opened.warnings == ()
            slog.end_session(opened.session_id, actor="op-anna")
            clock.advance(days=7)


def test_under_seven_days_since_the_last_session_warns(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        first = slog.start_session(_course_session(1))
        slog.end_session(first.session_id, actor="op-anna")
        clock.advance(days=6.5)
        second = slog.start_session(_course_session(2))
    assert [w.code for w in second.warnings] == ["interval_short"]
    assert "6.5 days since session 1" in second.warnings[0].message


def test_a_complete_course_warns_and_the_warning_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        for n in range(1, 5):
            slog.end_session(slog.start_session(_course_session(n)).session_id, actor="op-anna")
            clock.advance(days=10)
    # Reopened: the course history is read back from the file.
    with open_log(tmp_path / "s.db", clock) as slog:
        fifth = slog.start_session(_course_session(5))
    codes = {w.code for w in fifth.warnings}
    assert codes == {"course_complete"}
    assert "4 of 4 planned sessions already given" in fifth.warnings[0].message


def test_a_session_number_out_of_step_with_the_log_warns(tmp_path: Path) -> None:
    with open_log(tmp_path / "s.db") as slog:
        opened = slog.start_session(_course_session(3))
    assert [w.code for w in opened.warnings] == ["session_number"]


def test_a_course_of_another_patient_is_refused(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        slog.end_session(slog.start_session(_course_session(1)).session_id, actor="op-anna")
        clock.advance(days=8)
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(patient_ref="PT-0043", course_session_number=2))
    assert caught.value.rule == "course.patient_ref"


def test_one_session_at_a_time(tmp_path: Path) -> None:
    with open_log(tmp_path / "s.db") as slog:
        opened = slog.start_session(session_info())
        with pytest.raises(SessionRefused, match="session 1 is still open; end it first"):
            slog.start_session(session_info())
        with pytest.raises(SessionRefused):
            slog.end_session(opened.session_id + 1, actor="op-anna")
        slog.end_session(opened.session_id, actor="op-anna")
        assert slog.open_session() is None
        assert slog.current_summary() is None


def test_the_closing_summary_counts_pulses_energy_fluence_and_faults(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        sid = slog.start_session(session_info()).session_id
        assert slog.open_session() == sid
        nxt = fill_session(slog, sid, first_pulse_no=1, pulses=10, zone="forehead", energy_uj=1000)
        nxt = fill_session(
            slog, sid, first_pulse_no=nxt, pulses=5, zone="cheeks", energy_uj=3000, spot_um=1000
        )
        slog.record_event(sid, "breach", "supervisor", {"rule": "energy", "value": 3700}, None)
        slog.record_event(sid, "ack", "op-anna", {}, "handpiece cleaned")
        slog.record_pulse_gap(
            sid, nxt, nxt + 1, charged_energy_uj=60_000, zone="cheeks", cause="gap"
        )
        clock.advance(seconds=90)
        running = slog.current_summary()
        summary = slog.end_session(sid, actor="op-anna", post_care=["sunscreen", "soothing_serum"])
        assert slog.last_pulse_no() == nxt + 1
    forehead = sum(1000 + i % 7 for i in range(10))
    cheeks = sum(3000 + i % 7 for i in range(5)) + 2 * 60_000
    assert summary.pulses == 15
    assert summary.unlogged_pulses == 2
    assert summary.unlogged_energy_uj == 120_000
    assert summary.energy_per_zone_uj == {"forehead": forehead, "cheeks": cheeks}
    assert summary.total_energy_uj == forehead + cheeks
    assert summary.faults == 2  # the breach and the gap; an ack is not a fault
    assert summary.duration_s == pytest.approx(90)
    # Peak fluence: 1006 µJ on a 300 µm spot beats 3006 µJ on a 1000 µm spot.
    assert summary.peak_fluence_j_cm2 == pytest.approx(1006e-6 / (3.141592653589793 * 0.015**2))
    assert summary.started_ns == T0
    assert running is not None
    assert running.outcome == "open"
    assert (running.pulses, running.energy_per_zone_uj) == (
        summary.pulses,
        summary.energy_per_zone_uj,
    )


def test_unknown_zone_post_care_and_event_kind_are_refused(tmp_path: Path) -> None:
    with open_log(tmp_path / "s.db") as slog:
        sid = slog.start_session(session_info()).session_id
        with pytest.raises(InvalidSessionInfo, match="zone"):
            slog.record_zone(sid, "scalp", actor="op-anna")
        with pytest.raises(InvalidSessionInfo, match="event kind"):
            slog.record_event(sid, "Bad Kind!", "op-anna", {})
        with pytest.raises(InvalidSessionInfo, match="JSON"):
            slog.record_event(sid, "note", "op-anna", {"when": object()})
        with pytest.raises(InvalidSessionInfo, match="JSON"):
            slog.record_event(sid, "note", "op-anna", {}, "half a character \ud800")
        with pytest.raises(InvalidSessionInfo, match="post_care"):
            slog.end_session(sid, actor="op-anna", post_care=["massage"])
        assert slog.open_session() == sid


def test_the_limits_in_force_are_recorded_at_start_from_the_policy(tmp_path: Path) -> None:
    policy = load_policy()
    limits = LimitsInForce.from_policy(policy)
    assert (limits.energy_tolerance_pct, limits.skin_temp_max_c) == (
        policy.energy_tolerance_pct,
        policy.skin_temp_max_c,
    )
    with open_log(tmp_path / "s.db") as slog:
        sid = slog.start_session(session_info(), limits=limits).session_id
        slog.flush()
        conn = connect(tmp_path / "s.db", readonly=True)
        record = load_session(conn, sid)
        conn.close()
    assert record is not None
    assert record.limits == limits.model_dump(mode="json")


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"energy_tolerance_pct": 0, "skin_temp_max_c": 41.0}, "limits.energy_tolerance_pct"),
        ({"energy_tolerance_pct": 20, "skin_temp_max_c": float("nan")}, "limits.skin_temp_max_c"),
        ({"energy_tolerance_pct": 20}, "limits.skin_temp_max_c"),
        ({"energy_tolerance_pct": 20, "skin_temp_max_c": 41.0, "skin": 1}, "limits.skin"),
    ],
)
def test_malformed_limits_are_named_and_no_session_opens(
    tmp_path: Path, limits: dict[str, object], field: str
) -> None:
    with open_log(tmp_path / "s.db") as slog:
        with pytest.raises(InvalidSessionInfo) as caught:
            slog.start_session(session_info(), limits=limits)
        assert caught.value.field == field
        assert slog.open_session() is None
