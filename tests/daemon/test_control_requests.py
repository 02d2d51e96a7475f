"""Control requests as an operator writes them: skin types in every usual notation, and refusals
that name the field and the value, never a validator's location path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devicectl.control import ControlError, parse_request
from tests.daemon.conftest import CHECKLIST, OPERATOR, SESSION


def _start(**fields: Any) -> dict[str, Any]:
    return SESSION | {"auth": OPERATOR} | fields


def _parse(request: dict[str, Any]) -> Any:
    return parse_request(json.dumps(request).encode())


@pytest.mark.parametrize(
    ("given", "roman"),
    [(3, "III"), ("3", "III"), ("iii", "III"), ("III", "III"), (" vi ", "VI"), (1, "I"),
     ("iv", "IV")],
)  # fmt: skip
def test_skin_type_reads_as_the_policy_file_writes_it(given: object, roman: str) -> None:
    assert _parse(_start(skin_type=given)).skin_type == roman


@pytest.mark.parametrize("given", [0, 7, "VII", "x", True, "3.0"])
def test_other_skin_types_are_refused_naming_every_notation(given: object) -> None:
    with pytest.raises(ControlError) as caught:
        _parse(_start(skin_type=given))
    assert caught.value.kind == "usage"
    assert "skin_type" in str(caught.value)
    assert "1-6, I-VI or i-vi" in str(caught.value)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (_start(concerns=["wrinkles"]), "invalid request: concerns 'wrinkles' is not allowed"),
        ({"command": "session_zone", "zone": "chin"}, "invalid request: zone 'chin'"),
        (
            {"command": "fault_ack", "auth": OPERATOR, "signoff": {"reason_code": "sensor_fault"}},
            "invalid request: reason is required",
        ),
        ({"command": "session_note", "text": ""}, "invalid request: text '' is not allowed"),
        ({"command": "arm", "force": True}, "invalid request: force is not a known field"),
        ({"command": "self_destruct"}, "invalid request: unknown command 'self_destruct'"),
        (
            _start(checklist=CHECKLIST | {"pregnancy": "maybe"}),
            "invalid request: checklist item pregnancy 'maybe'",
        ),
    ],
)
def test_refusals_name_the_field_not_a_validator_path(
    request_: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ControlError) as caught:
        _parse(request_)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "session_start." not in message and ".0" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            {"command": "session_end", "auth": {"user": "OP-7", "pin": "secret-pin-42"}},
            "invalid request: give the post-care advice",
        ),
        (
            {"command": "arm", "auth": {"user": "OP-7", "pin": "secret-pin-42" * 20}},
            "invalid request: pin is not allowed",
        ),
    ],
)
def test_a_refusal_never_echoes_a_pin(request_: dict[str, Any], expected: str) -> None:
    with pytest.raises(ControlError) as caught:
        _parse(request_)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "secret-pin" not in message


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"command": "session_note"}, "invalid request: session_note needs text"),
        (
            {"command": "session_reaction", "erythema": "mild"},
            "invalid request: session_reaction needs oedema",
        ),
        (
            {"command": "session_adverse_event", "text": "blister"},
            "invalid request: session_adverse_event needs severity",
        ),
        (
            {"command": "session_note", "text": "fine", "severity": "serious"},
            "invalid request: session_note takes no severity",
        ),
    ],
)
def test_a_clinical_entry_carries_the_fields_of_its_kind(
    request_: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ControlError) as caught:
        _parse(request_ | {"auth": OPERATOR})
    assert str(caught.value) == expected
