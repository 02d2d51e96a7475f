"""Reading telemetry as hostile input: every check of ``protocols.intake`` and the sequence rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from protocols.bounded import (
    BoundedInputError,
    clip,
    loads_json,
    loads_toml,
    printable,
)
from protocols.intake import (
    MAX_PAYLOAD_BYTES,
    Order,
    StreamOrder,
    Unreadable,
    read_message,
)
from protocols.mqtt import AlertPayload, StatePayload, Stream, is_valid_id

BASE = "lasers/clinic-a/laser-01"
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def envelope(seq: int = 1, boot: int = 1, at_s: float = 0.0, **fields: Any) -> dict[str, Any]:
    ts = (T0 + timedelta(seconds=at_s)).isoformat()
    return {"v": 1, "ts": ts, "device": "laser-01", "seq": seq, "boot": boot} | fields


def state(seq: int = 1, boot: int = 1, at_s: float = 0.0, **fields: Any) -> bytes:
    body: dict[str, Any] = {
        "state": "READY",
        "interlocks": [],
        "faults": [],
        "params": None,
        "armed": False,
        "session": None,
        "daemon_version": "1",
    }
    return json.dumps(envelope(seq, boot, at_s, **(body | fields))).encode()


def alert(seq: int = 1, boot: int = 1, **fields: Any) -> bytes:
    body = {"severity": "critical", "code": "energy", "message": "pulse at +25 %"}
    return json.dumps(envelope(seq, boot, **(body | fields))).encode()


# ---------------------------------------------------------------------------------- bounded


def test_json_bounds_are_checked_before_parsing() -> None:
    deep = b"[" * 100_000
    with pytest.raises(BoundedInputError, match="nested deeper than 8"):
        loads_json(deep, max_bytes=1 << 20, max_depth=8)
    with pytest.raises(BoundedInputError, match="bytes, over"):
        loads_json(b" " * 2000, max_bytes=1000, max_depth=8)
    with pytest.raises(BoundedInputError, match="5,000 digits"):
        loads_json(b'{"seq": ' + b"9" * 5000 + b"}", max_bytes=1 << 20, max_depth=8)
    for text in (b"[Infinity]", b"[NaN]", b"[-Infinity]", b"[1e400]"):
        with pytest.raises(BoundedInputError, match=r"finite|not a JSON number"):
            loads_json(text, max_bytes=100, max_depth=8)
    with pytest.raises(BoundedInputError, match="not UTF-8"):
        loads_json(b'{"a": "\xe9"}', max_bytes=100, max_depth=8)
    # Brackets inside strings are not nesting.
    assert loads_json(b'{"a": "[[[[[[[[[[[["}', max_bytes=100, max_depth=2) == {"a": "[" * 12}


def test_toml_bounds() -> None:
    with pytest.raises(BoundedInputError, match="nested deeper than 16"):
        loads_toml(b"a = " + b"[" * 5000 + b"]" * 5000)
    with pytest.raises(BoundedInputError, match="byte 0xe9 at offset 5"):
        loads_toml(b'a = "\xe9"')
    assert loads_toml(b'a = "[[[[[[[[[[[[[[[[[[[[" # [[[[[[[[[[[[[[[[[[[[\n') == {"a": "[" * 20}
    assert loads_toml(b"a = '''\n[[[[[[[[[[[[[[[[[[[[[[\n'''") == {"a": "[" * 22 + "\n"}


def test_text_from_input_is_one_short_escaped_line() -> None:
    assert clip("laser-01\u200b") == "laser-01\\u200b"
    assert clip("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert len(clip("x" * 10_000_000)) <= 160
    assert printable("41 °C\x1b[2J\n") == "41 °C\\x1b[2J\\x0a"
    assert len(printable("é" * 1_000_000, 200)) <= 200


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("laser-01", True),
        ("CLINIC_a-9", True),
        ("laser-01\u200b", False),
        ("laser\x1b", False),
        ("lаser", False),  # a Cyrillic a
        ("", False),
        ("x" * 65, False),
        ("a b", False),
    ],
)
def test_ids_are_ascii_letters_digits_dash_underscore(value: str, valid: bool) -> None:
    assert is_valid_id(value) is valid


# ---------------------------------------------------------------------------------- intake


def test_a_valid_message_is_read_with_its_model() -> None:
    reading = read_message("lasers", f"{BASE}/state", state(state="FAULT", faults=["INTERNAL"]))
    assert reading is not None
    assert (reading.site, reading.device, reading.stream) == ("clinic-a", "laser-01", Stream.STATE)
    assert isinstance(reading.envelope, StatePayload)
    assert reading.envelope.state == "FAULT"


def test_not_telemetry_is_none() -> None:
    assert read_message("lasers", "other/a/b/state", state()) is None
    assert read_message("lasers", f"{BASE}/cmd/stop", b"") is None
    assert read_message("lasers", f"{BASE}/firmware", b"x") is None
    assert read_message("lasers", "lasers/a", b"x") is None


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{BASE}/state", b"[" * 50_000, "nested deeper"),
        (f"{BASE}/state", b"{" * 10 + b"}" * 10, "nested deeper"),
        (f"{BASE}/state", b" " * (MAX_PAYLOAD_BYTES + 1), "over the"),
        (f"{BASE}/state", state(seq=int("9" * 18)) .replace(b"9" * 18, b"9" * 5000), "digits"),
        (f"{BASE}/pulses", b'{"energy_uj_sum": 1.7e308, "x": 1e999}', "finite"),
        (f"{BASE}/metrics", b'{"rate_hz": NaN}', "not a JSON number"),
        (f"{BASE}/state", b"\xff\xfe", "not UTF-8"),
        (f"{BASE}/state", b"[1, 2]", "not an object"),
        (f"{BASE}/session", json.dumps({"session": 123}).encode(), "session: "),
        (f"{BASE}/state", state(state=["[/]"]), "state: state"),
        (f"{BASE}/alerts", alert(severity="apocalyptic"), "alerts: severity"),
        (f"{BASE}/state", state(device="laser-02"), "laser-02"),
        (f"{BASE}/availability", b"\x1b[2Jmaybe", "not online/offline"),
        (f"{BASE}/sessions/S1/events", json.dumps(envelope(session="S2", event="zone")).encode(),
         "session differs"),
    ],
)  # fmt: skip
def test_a_hostile_message_is_unreadable_with_one_short_line(
    topic: str, payload: bytes, reason: str
) -> None:
    with pytest.raises(Unreadable) as caught:
        read_message("lasers", topic, payload)
    error = caught.value
    assert reason in error.reason
    assert (error.site, error.device, error.invalid_id) == ("clinic-a", "laser-01", False)
    assert len(error.reason) <= 300
    assert error.reason.isprintable()


@pytest.mark.parametrize(
    "topic",
    [
        "lasers/clinic-a/laser-01\u200b/alerts",
        "lasers/clinic-a/laser\x1b[2J/state",
        "lasers/clinic a/laser-01/state",
        "lasers/clinic-a/" + "x" * 5000 + "/state",
        "lasers/clinic-a/laser-01/sessions/S\u200b1/events",
    ],
)
def test_invalid_ids_are_never_a_device(topic: str) -> None:
    with pytest.raises(Unreadable) as caught:
        read_message("lasers", topic, alert())
    assert caught.value.invalid_id
    assert caught.value.site is None
    assert len(caught.value.reason) <= 300
    assert caught.value.reason.isascii()


# ---------------------------------------------------------------------------------- StreamOrder


def checked(order: StreamOrder, payload: bytes, topic: str = "t") -> Order:
    reading = read_message("lasers", f"{BASE}/state", payload)
    assert reading is not None
    assert reading.envelope is not None
    return order.check(topic, reading.envelope).order


def test_normal_progress_gaps_and_redeliveries() -> None:
    order = StreamOrder()
    assert checked(order, state(1)) is Order.FIRST
    assert checked(order, state(2)) is Order.NEXT
    assert checked(order, state(5)) is Order.GAP
    assert checked(order, state(5)) is Order.DUPLICATE
    assert checked(order, state(2)) is Order.DUPLICATE  # an older redelivery, still recent
    assert checked(order, state(6)) is Order.NEXT


def test_a_forged_seq_costs_a_restart_mark_never_the_real_messages() -> None:
    order = StreamOrder()
    for seq in range(1, 51):
        checked(order, state(seq, boot=3, at_s=seq))
    assert checked(order, state(10**15, boot=10**15, at_s=51)) is Order.RESTART
    # The device's next real message: applied (a restart back to its own line), then normal.
    assert checked(order, state(51, boot=3, at_s=52)) is Order.RESTART
    assert checked(order, state(52, boot=3, at_s=53)) is Order.NEXT
    # The same forgery on the device's own boot.
    assert checked(order, state(10**15, boot=3, at_s=54)) is Order.RESTART
    assert checked(order, state(53, boot=3, at_s=55)) is Order.RESTART
    assert checked(order, state(54, boot=3, at_s=56)) is Order.NEXT


def test_a_reprovisioned_device_is_followed() -> None:
    order = StreamOrder()
    checked(order, state(500, boot=7, at_s=0))
    verdict_order = checked(order, state(1, boot=1, at_s=10))
    assert verdict_order is Order.RESTART
    assert checked(order, state(2, boot=1, at_s=11)) is Order.NEXT
    # Even a re-provisioned device whose new counters collide with old ones: its ts differs.
    checked(order, state(3, boot=1, at_s=12))
    assert checked(order, state(1, boot=1, at_s=20)) is Order.RESTART


def test_a_late_historical_message_of_an_older_run() -> None:
    order = StreamOrder()
    checked(order, state(1, boot=4))
    reading = read_message("lasers", f"{BASE}/alerts", alert(9, boot=3, historical=True))
    assert reading is not None
    assert reading.envelope is not None
    assert isinstance(reading.envelope, AlertPayload)
    state_reading = read_message("lasers", f"{BASE}/state", state(9, boot=3, historical=True))
    assert state_reading is not None
    assert state_reading.envelope is not None
    verdict = order.check("t", state_reading.envelope)
    assert verdict.order is Order.LATE
    assert not verdict.applies_to(Stream.STATE)
    assert verdict.applies_to(Stream.ALERTS)


def test_the_topics_followed_are_bounded() -> None:
    order = StreamOrder(max_topics=10)
    for i in range(1000):
        checked(order, state(1), topic=f"t{i}")
    assert len(order) == 10
