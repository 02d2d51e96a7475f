"""Random JSON and random field values into the daemon's control socket (the in-process daemon of
``tests/daemon``): every bad request gets one error reply naming its cause, and changes nothing —
the session, zone, params, arming and latch read the same before and after."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from devicectl.control import ControlError, parse_request
from tests.daemon.conftest import (
    ACK,
    CHECKLIST,
    END,
    OPERATOR,
    SESSION,
    Driver,
    driver,
    policy_file,
)

__all__ = ["driver", "policy_file"]  # fixtures, imported for pytest

SEED = 20261125
ROUNDS = 250
KINDS = {"usage", "refused", "unreachable"}
AUTH = {"auth": OPERATOR}
TEMPLATES: list[dict[str, Any]] = [
    SESSION | AUTH,
    {"command": "session_zone", "zone": "cheeks"} | AUTH,
    {"command": "params_set", "energy_uj": 2000, "width_us": 500, "rate_hz": 10.0, "spot_um": 300}
    | AUTH,
    {"command": "params_set", "preset": "laxity"} | AUTH,
    {"command": "fault_ack"} | ACK | AUTH,
    {"command": "session_end"} | END | AUTH,
    {"command": "session_note", "text": "a note"} | AUTH,
    {"command": "status"},
    {"command": "arm"} | AUTH,
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), rng.randint(-(10**9), 10**9)])
    if kind == "float":
        return rng.choice([0.0, -0.5, 1e308, 1e-308, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return "".join(
            rng.choice("aZ09 -_/\\\"'\u00e9\u202e\x00{}") for _ in range(rng.randint(0, 12))
        )
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        random_json(rng, 3) or "k": random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))
    }


def bad_request(rng: random.Random) -> bytes:
    """One request line that is wrong in one way: not JSON, not an object, an unknown command, a
    field of the wrong type or out of range, a missing or an extra field."""
    roll = rng.randrange(7)
    if roll == 0:
        return (
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))).replace(b"\n", b"") + b"\n"
        )
    if roll == 1:
        return (json.dumps(random_json(rng)) + "\n").encode()
    request = json.loads(json.dumps(rng.choice(TEMPLATES)))
    fields = [k for k in request if k != "command"]
    if roll == 2 or not fields:
        request["command"] = rng.choice([random_json(rng), "ARM", "arm ", "rm -rf", "status2"])
    elif roll == 3:
        request[rng.choice(fields)] = random_json(rng)
    elif roll == 4:
        del request[rng.choice(fields)]
        if request["command"] in {"params_set", "session_note"}:
            request["unexpected"] = 1  # these accept every field missing
    elif roll == 5:
        request[rng.choice(["extra", "__class__", "armed", "limit"])] = random_json(rng)
    else:
        key = rng.choice(fields)
        request[key] = rng.choice([-1, 0, 10**12, "", "x" * 600, [], {}, 1.5, True])
    return (json.dumps(request) + "\n").encode()


def snapshot(status: dict[str, Any]) -> dict[str, Any]:
    keys = ("session", "zone", "params", "armed", "breach_latched", "state", "session_pulses")
    return {k: status[k] for k in keys}


async def test_random_requests_get_an_error_and_change_nothing(driver: Driver) -> None:
    started = await driver.raw((json.dumps(SESSION | AUTH) + "\n").encode())
    assert started["ok"], started
    await driver.ok("session_zone", zone="forehead")
    rng = random.Random(SEED)
    accepted = 0
    for _ in range(ROUNDS):
        line = bad_request(rng)
        before = snapshot(await driver.ok("status"))
        reply = await driver.raw(line)
        assert set(reply) >= {"ok"}, (line, reply)
        if reply["ok"]:
            # A mutation can land on another valid request (a different zone, a valid preset):
            # that is not bad input. Nothing may ever arm the laser by accident of fuzzing here.
            accepted += 1
            status = await driver.ok("status")
            if status["armed"]:
                await driver.ok("disarm")
            continue
        assert reply["kind"] in KINDS, (line, reply)
        assert reply["error"] and "\n" not in reply["error"], (line, reply)
        assert snapshot(await driver.ok("status")) == before, (line, reply)
    assert accepted < ROUNDS // 4, accepted


async def test_an_oversized_request_is_refused_and_the_daemon_still_answers(
    driver: Driver,
) -> None:
    reply = await driver.raw(b'{"command": "status", "pad": "' + b"x" * 70_000 + b'"}\n')
    assert reply == {"ok": False, "kind": "usage", "error": "request too long"}
    assert (await driver.ok("status"))["connected"]


async def test_a_checklist_with_a_wrong_type_is_named(driver: Driver) -> None:
    request = SESSION | AUTH | {"checklist": CHECKLIST | {"pregnancy": "maybe"}}
    reply = await driver.raw((json.dumps(request) + "\n").encode())
    assert reply["ok"] is False
    assert reply["kind"] == "usage"
    assert "checklist item pregnancy" in reply["error"]
    assert (await driver.ok("status"))["session"] is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = (
    "operator", "patient_ref", "skin_type", "concerns", "checklist", "zone", "energy_uj",
    "width_us", "rate_hz", "spot_um", "preset", "reason", "post_care", "course_session",
    "contraindication_override",
)  # fmt: skip
field_values = st.fixed_dictionaries(
    {"command": st.sampled_from([t["command"] for t in TEMPLATES] + ["", "nope"])},
    optional=dict.fromkeys(FIELDS, json_values),
)


def parsed_or_refusal(line: bytes) -> Any:
    """What parse_request makes of ``line``: the request, or the ControlError it raised."""
    try:
        return parse_request(line)
    except ControlError as exc:
        return exc


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_parse_request_refuses_any_bytes_or_json_with_a_usage_error(line: bytes) -> None:
    result = parsed_or_refusal(line)
    if isinstance(result, ControlError):
        assert result.kind == "usage"
        assert str(result) and "\n" not in str(result)


@settings(max_examples=400, deadline=None)
@given(field_values)
def test_parse_request_validates_every_field_or_names_the_bad_one(request: dict[str, Any]) -> None:
    result = parsed_or_refusal(json.dumps(request).encode())
    if isinstance(result, ControlError):
        assert result.kind == "usage"
        assert str(result).startswith(("invalid request", "request")), result
        assert "\n" not in str(result)
    else:
        assert result.command == request["command"]
