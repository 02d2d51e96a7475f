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
    SessionLog,
    SessionOpened,
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


def _course_session(number: int | None) -> dict[str, object]:
    return session_info(course_session_number=number)


class _Course:
    """Sessions of one course on one log: each delivers pulses unless told otherwise."""

    def __init__(self, slog: SessionLog, clock: Clock) -> None:
        self.slog, self.clock, self.pulse_no = slog, clock, 1

    def session(self, typed: int | None = None, *, pulses: int = 3) -> SessionOpened:
        opened = self.slog.start_session(_course_session(typed))
        if pulses:
            self.pulse_no = fill_session(
                self.slog, opened.session_id, first_pulse_no=self.pulse_no, pulses=pulses,
                start_ns=self.clock.now,
            )  # fmt: skip
        self.slog.end_session(opened.session_id, actor="op-anna")
        return opened


def test_a_course_spaced_a_week_apart_has_no_warnings(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        for n in range(1, 5):
            opened = course.session(n)
            assert opened.warnings == ()
            assert opened.position is not None
            assert (opened.position.kind, opened.position.number) == ("course", n)
            clock.advance(days=7)


def test_under_seven_and_over_fourteen_days_since_the_last_session_warn(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        course.session()
        clock.advance(days=6.5)
        second = course.session()
        clock.advance(days=15)
        third = course.session()
    assert [w.code for w in second.warnings] == ["interval_short"]
    assert "6.5 days since session 1" in second.warnings[0].message
    assert [w.code for w in third.warnings] == ["interval_long"]
    assert "15.0 days since session 2" in third.warnings[0].message


def test_the_session_number_comes_from_the_history_not_from_what_was_typed(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        course.session()
        clock.advance(days=8)
        typed_first = course.session(1)  # really the second
    assert typed_first.position is not None and typed_first.position.number == 2
    assert [w.code for w in typed_first.warnings] == ["session_number"]
    assert "typed as session 1 but the log makes it session 2 of 4" in (
        typed_first.warnings[0].message
    )


def test_a_session_without_pulses_is_recorded_but_does_not_count(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        course.session()
        clock.advance(days=8)
        empty = course.session(pulses=0)
        clock.advance(days=1)
        after = course.session()
    assert empty.position is not None and empty.position.number == 2
    # The empty session did not count: this is still session 2, and 9 days after session 1.
    assert after.position is not None and after.position.number == 2
    assert after.position.counted_before == 1
    assert after.warnings == ()


def test_after_a_complete_course_sessions_are_maintenance_also_after_a_restart(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        for _ in range(4):
            course.session()
            clock.advance(days=10)
        pulse_no = course.pulse_no
    # Reopened: the course history (and which sessions delivered pulses) is read back.
    clock.advance(days=90)
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        course.pulse_no = pulse_no
        fifth = course.session(5)
        clock.advance(days=120)
        sixth = course.session()
    assert fifth.position is not None and sixth.position is not None
    assert (fifth.position.kind, fifth.position.number) == ("maintenance", 1)
    assert (sixth.position.kind, sixth.position.number) == ("maintenance", 2)
    assert [w.code for w in fifth.warnings] == ["maintenance", "session_number"]
    assert "4 of 4 planned sessions given" in fifth.warnings[0].message
    # Maintenance has no 14-day rule: months apart is what it is for.
    assert [w.code for w in sixth.warnings] == ["maintenance"]


def test_a_course_of_another_patient_is_refused(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        _Course(slog, clock).session()
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
        summary = slog.end_session(
            sid, actor="op-anna", post_care=["sunscreen", "serum_or_moisturiser"]
        )
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


def test_a_contraindication_override_needs_a_supervisors_signoff(tmp_path: Path) -> None:
    override = {
        "signed_off_by": "op-anna",
        "role": "operator",
        "reason_code": "physician_clearance",
        "reason": "dermatologist's letter of 2026-11-20 on file",
    }
    with open_log(tmp_path / "s.db") as slog:
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(ci_pregnancy=True))
        assert "supervisor" in str(caught.value)
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(ci_pregnancy=True, override=override))
        assert caught.value.rule == "override.signoff"
        signed = dict(override, signed_off_by="sup-ben", role="supervisor")
        sid = slog.start_session(session_info(ci_pregnancy=True, override=signed)).session_id
        slog.flush()
        conn = connect(slog.path, readonly=True)
        try:
            record = load_session(conn, sid)
        finally:
            conn.close()
    assert record is not None
    (event,) = [r["body"] for r in record.records if r["kind"] == "event"]
    assert event["event"] == "override"
    assert event["detail"]["signed_off_by"] == "sup-ben"
    assert event["detail"]["reason_code"] == "physician_clearance"


def test_consent_and_the_numbing_agent_are_required(tmp_path: Path) -> None:
    with open_log(tmp_path / "s.db") as slog:
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(checklist_consent_given=False))
        assert caught.value.rule == "checklist.consent_given"
        with pytest.raises(SessionRefused) as caught:
            slog.start_session(session_info(checklist_numbing_applied=True))
        assert caught.value.rule == "checklist.numbing_agent"
        numbed = session_info(
            checklist_numbing_applied=True,
            checklist_numbing_agent="lidocaine 4 % cream",
            checklist_numbing_contact_min=30,
        )
        assert slog.start_session(numbed).session_id == 1


def test_the_interval_is_the_patients_not_only_the_courses(tmp_path: Path) -> None:
    """Typing another course id for the same patient gave a session two days after the last one
    with no warning: the skin's recovery interval is the patient's, whatever the course."""
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        first = slog.start_session(session_info(course_course_id="FACE-2026"))
        fill_session(slog, first.session_id, first_pulse_no=1, pulses=3, start_ns=clock.now)
        slog.end_session(first.session_id, actor="op-anna")
        clock.advance(days=2)
        other = slog.start_session(session_info(course_course_id="NECK-2026"))
    assert other.position is not None and other.position.number == 1  # its own course's first
    assert [w.code for w in other.warnings] == ["interval_short"]
    assert "2.0 days since session 1 (course FACE-2026)" in other.warnings[0].message


def test_a_clock_behind_the_last_session_is_said_not_counted_as_a_short_interval(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with open_log(tmp_path / "s.db", clock) as slog:
        course = _Course(slog, clock)
        course.session()
        clock.advance(days=-3)  # the host clock was set back (or the last session is in the future)
        behind = course.session()
    assert [w.code for w in behind.warnings] == ["clock_behind"]
    assert "3.0 days before session 1" in behind.warnings[0].message
    assert "-3.0" not in behind.warnings[0].message
