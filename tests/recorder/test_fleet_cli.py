"""`devicectl fleet sessions|session|course` read the recorder's database (both engines)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.recorder.intake import utc_text
from devicectl.recorder.store import open_store
from tests.recorder.helpers import T0, FakeDevice, accepted, patient_key

pytestmark = pytest.mark.system
KEY = patient_key("PT-7")


async def _fill(db_url: str) -> None:
    a, b = FakeDevice("laser-a"), FakeDevice("laser-b")
    messages = a.treatment("1", KEY, T0) + b.treatment("4", KEY, T0 + timedelta(days=3))
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in messages], [], utc_text(T0))


def test_fleet_commands_print_sessions_a_session_and_a_course(db_url: str) -> None:
    asyncio.run(_fill(db_url))
    runner = CliRunner()
    listed = runner.invoke(app, ["fleet", "sessions", "--db", db_url, "--patient", KEY])
    assert listed.exit_code == 0, listed.output
    assert "laser-a" in listed.output and "laser-b" in listed.output
    as_json = runner.invoke(app, ["fleet", "sessions", "--db", db_url, "--json"])
    assert [s["device"] for s in json.loads(as_json.output)] == ["laser-b", "laser-a"]
    one = runner.invoke(app, ["fleet", "session", "laser-b", "4", "--db", db_url])
    assert one.exit_code == 0, one.output
    assert "recorded_pulses  15" in one.output
    missing = runner.invoke(app, ["fleet", "session", "laser-b", "9", "--db", db_url])
    assert missing.exit_code == 1
    course = runner.invoke(app, ["fleet", "course", KEY, "--planned", "4", "--db", db_url])
    assert course.exit_code == 0, course.output
    assert "2 of 4 given (next is session 3)" in course.output
    assert "on laser-a, laser-b" in course.output
    assert "3.0" in course.output  # days between the two sessions


def test_a_missing_database_is_one_line_and_exit_3(tmp_path: object) -> None:
    result = CliRunner().invoke(app, ["fleet", "sessions", "--db", f"{tmp_path}/none.sqlite"])
    assert result.exit_code == 3
    assert "no recorder database at" in result.output
