"""The daemon's side of the course request: never blocks, says why it fell back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from devicectl.recorder.course_client import CourseLookup, ask_course, merge_warnings
from devicectl.sessionlog.model import CourseWarning
from devicectl.telemetry import TelemetryConfig
from tests.brokers import free_port

_COURSE = {"given": 1, "planned": 4, "devices": ["laser-a"]}


async def test_not_configured_is_local_at_once() -> None:
    lookup = await ask_course(None, "ab" * 32, 4)
    assert lookup.source == "local"
    assert "course_from_recorder" in str(lookup.reason)
    assert lookup.record() == {"source": "local", "reason": lookup.reason}


async def test_an_unreachable_broker_is_local_within_the_timeout(tmp_path: Path) -> None:
    config = TelemetryConfig(
        url=f"mqtt://127.0.0.1:{free_port()}", site="s", device="d1", data_dir=tmp_path
    )
    began = time.monotonic()
    lookup = await ask_course(config, "ab" * 32, 4, timeout_s=1.0)
    assert time.monotonic() - began < 3.0
    assert lookup.source == "local"
    assert lookup.reason is not None


def test_the_recorders_course_rules_replace_the_local_ones_only_when_it_answered() -> None:
    local = (
        CourseWarning("interval_short", "local: 2 days"),
        CourseWarning("session_number", "local: numbering"),
    )
    answered = CourseLookup(
        "recorder", None, (("interval_long", "fleet: 20 days"),), {"given": 2, "planned": 4}
    )
    assert merge_warnings(local, answered) == ["local: numbering", "fleet: 20 days"]
    fallback = CourseLookup("local", "no answer")
    assert merge_warnings(local, fallback) == ["local: 2 days", "local: numbering"]
    assert answered.record()["warnings"] == ["interval_long"]


def test_what_crosses_from_the_worker_keeps_what_the_session_log_records() -> None:
    answered = CourseLookup(
        "recorder",
        None,
        (("interval_short", "2 days since session 1 of the course"),),
        {"ok": True, "given": 1, "planned": 4, "devices": ["laser-a"], "sessions": [{"x": 1}]},
    )
    back = CourseLookup.from_wire(json.loads(json.dumps(answered.to_wire())))
    assert back.record() == answered.record()
    assert back.warnings == answered.warnings
    assert "sessions" not in back.course  # only what the daemon keeps crosses
    fallback = CourseLookup("local", "broker unreachable:\n[Errno 111] Connection refused")
    back = CourseLookup.from_wire(json.loads(json.dumps(fallback.to_wire())))
    assert back.record() == {"source": "local", "reason": back.reason}
    assert back.reason == "broker unreachable: [Errno 111] Connection refused"  # one line


def test_an_answer_too_large_or_off_contract_crosses_as_a_fallback_with_its_reason() -> None:
    huge = CourseLookup(
        "recorder", None, (), {"given": 1, "planned": 4, "devices": ["d" * 64] * 1000}
    )
    assert huge.to_wire()["reason"] == "the recorder's answer is too large"
    odd = CourseLookup("recorder", None, (), {"given": "one", "planned": 4, "devices": []})
    assert odd.to_wire()["reason"] == "the recorder's answer is malformed"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"source": "recorder"},
        {"source": "elsewhere", "reason": None, "warnings": [], "course": {}},
        {"source": "local", "reason": None, "warnings": [], "course": {}},
        {"source": "local", "reason": 7, "warnings": [], "course": {}},
        {"source": "recorder", "reason": None, "warnings": [["a"]], "course": _COURSE},
        {"source": "recorder", "reason": None, "warnings": [[1, 2]], "course": _COURSE},
        {"source": "recorder", "reason": None, "warnings": [], "course": {}},
        {"source": "recorder", "reason": None, "warnings": [], "course": _COURSE | {"x": 1}},
        {"source": "recorder", "reason": None, "warnings": [], "course": _COURSE | {"given": []}},
        {"source": "recorder", "reason": None, "warnings": {}, "course": _COURSE},
        {"source": "local", "reason": "r", "warnings": [], "course": _COURSE, "extra": 1},
    ],
)
def test_anything_else_from_the_worker_is_refused(body: object) -> None:
    with pytest.raises(ValueError, match="not a course lookup"):
        CourseLookup.from_wire(body)
