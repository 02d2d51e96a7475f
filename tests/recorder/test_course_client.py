"""The daemon's side of the course request: never blocks, says why it fell back."""

from __future__ import annotations

import time
from pathlib import Path

from devicectl.recorder.course_client import CourseLookup, ask_course, merge_warnings
from devicectl.sessionlog.model import CourseWarning
from devicectl.telemetry import TelemetryConfig
from tests.brokers import free_port


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
