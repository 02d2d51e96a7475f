"""The recorder's intake: every message is hostile until proven otherwise; nothing raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicectl.recorder.intake import (
    MAX_DEPTH,
    Accepted,
    CourseRequest,
    Ignored,
    Refused,
    take,
    utc_text,
)
from tests.recorder.helpers import T0, FakeDevice

NOW = utc_text(T0)
STATE = "lasers/clinic1/laser-1/state"


def _take(topic: str, payload: bytes, boot: str | None = None) -> object:
    return take(topic, payload, retained=False, boot_property=boot, recorded=NOW)


def _state(**changes: object) -> bytes:
    body = json.loads(FakeDevice("laser-1").state()[1])
    body.update(changes)
    return json.dumps(body).encode()


def test_a_contract_message_becomes_its_rows() -> None:
    outcome = _take(*FakeDevice("laser-1").pulses("3", 4))
    assert isinstance(outcome, Accepted)
    assert (outcome.device, outcome.boot, outcome.seq) == ("laser-1", 1, 1)
    assert set(outcome.rows) == {"messages", "pulse_batches", "boots"}
    assert outcome.rows["pulse_batches"][4] == "3"  # the session the batch belongs to


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
        (b"x" * 300_000, "allowed"),
        (b'{"v": NaN}', "NaN is not a JSON number"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (_state(state="\\u0000"), "NUL"),
        (_state(seq=2**70), "digits"),
        (_state(device="laser-2"), "in a message on laser-1's topic"),
        (_state(extra=1), "extra"),
        (_state(state="\ud800"), "hex escape"),  # a lone surrogate
    ],
)
def test_hostile_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    outcome = _take(STATE, payload)
    assert isinstance(outcome, Refused)
    assert reason.lower() in outcome.reason.lower(), outcome.reason


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    assert isinstance(_take(STATE, _state(state="[" * 100)), Accepted)


def test_topics_that_are_not_telemetry() -> None:
    assert isinstance(_take("lasers/clinic1/laser-1/cmd/stop", b""), Ignored)
    assert isinstance(_take("lasers/clinic1/laser-1/session", b""), Ignored)
    assert isinstance(_take("lasers/clinic1/laser-1/course/response/ab", b"{}"), Ignored)
    assert isinstance(_take("lasers/clinic1/laser-1/bogus", b"{}"), Refused)
    availability = _take("lasers/clinic1/laser-1/availability", b"offline", boot="7")
    assert isinstance(availability, Accepted)
    assert availability.rows["availability"][:3] == ("laser-1", 7, "offline")


def test_course_requests_are_checked() -> None:
    topic = "lasers/clinic1/laser-1/course/request"
    ok = _take(topic, json.dumps({"v": 1, "patient": "ab" * 32, "planned": 5}).encode())
    assert ok == CourseRequest("laser-1", "ab" * 32, 5)
    assert isinstance(_take(topic, b'{"patient": "x", "planned": 9}'), Refused)
    assert isinstance(_take(topic, b'{"planned": 4}'), Refused)


@given(st.binary(max_size=2000), st.sampled_from(["state", "pulses", "log/checkpoint", "alerts"]))
def test_nothing_raises_on_arbitrary_bytes(payload: bytes, stream: str) -> None:
    outcome = _take(f"lasers/clinic1/laser-1/{stream}", payload)
    assert isinstance(outcome, Accepted | Refused)
