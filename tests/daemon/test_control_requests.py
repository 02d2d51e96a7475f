"""Control requests as an operator writes them: skin types in every usual notation, and refusals
that name the field and the value, never a validator's location path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devicectl.control import ControlError, parse_request

CHECKLIST = {
    "consultation_done": True,
    "area_cleaned": True,
    "numbing_applied": False,
    "recent_sun_exposure": False,
    "photosensitising_medication": False,
    "active_skin_infection": False,
    "pregnancy": False,
    "allergy_to_active_ingredient": False,
}


def _start(**fields: Any) -> dict[str, Any]:
    return {
        "command": "session_start",
        "operator": "OP-7",
        "patient_ref": "PT-0042",
        "skin_type": "III",
        "concerns": ["fine_lines"],
        "checklist": CHECKLIST,
    } | fields


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
        ({"command": "fault_ack", "operator": "OP-7"}, "invalid request: reason is required"),
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
