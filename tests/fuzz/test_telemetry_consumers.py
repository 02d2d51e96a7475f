"""Fuzzing the consumers of telemetry (the dashboard's Fleet, ``watch``'s FleetView): whatever a
publisher sends — random JSON, random bytes, deep nesting, huge or non-finite numbers, any seq and
boot, any ids — the reader survives, the view stays JSON (no inf, no nan) and bounded, nothing from
a payload reaches the terminal raw, and the real device's later FAULT and critical alert apply."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from devicectl.dashboard import Fleet
from devicectl.telemetry.watch import FleetView

BASE = "lasers/clinic-a/laser-01"
KINDS = ["availability", "state", "session", "pulses", "metrics", "alerts", "sessions/S1/events"]
REAL_TS = "2031-01-01T00:00:00.000000Z"  # no hostile message carries this ts

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
huge = st.one_of(st.integers(min_value=-5, max_value=10**20), st.sampled_from([10**15, 2**63]))
envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 2, "1", True]),
        "ts": st.sampled_from(["2026-11-25T10:00:00Z", "2099-01-01T00:00:00Z", "yesterday"]),
        "device": st.sampled_from(["laser-01", "laser-01", "laser-02", "laser-01\u200b"]),
        "seq": huge,
        "boot": huge,
    },
    optional={
        "state": st.sampled_from(["EMITTING", "[/]", "[bold red]x", "\x1b]0;PWNED\x07", 7]),
        "armed": st.booleans(),
        "interlocks": st.lists(st.text(max_size=8), max_size=3),
        "faults": st.lists(st.text(max_size=8), max_size=3),
        "params": st.none(),
        "session": st.one_of(st.none(), st.text(max_size=8), st.integers()),
        "daemon_version": st.text(max_size=5),
        "severity": st.sampled_from(["critical", "warning", "info", "x"]),
        "code": st.text(max_size=20),
        "message": st.text(max_size=50),
        "count": huge,
        "energy_uj_sum": huge,
        "rate_hz": st.floats(allow_nan=False, allow_infinity=False),
        "historical": st.sampled_from([True, False, None]),
        "summary": json_values,
    },
)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=100_000).map(_deep),
    st.sampled_from(
        [
            b'{"v":1,"seq":' + b"9" * 5000 + b"}",
            b'{"energy_uj_sum": 1.7e308, "x": 1e999, "y": Infinity, "z": NaN}',
            b"\x1b[2J\x1b]0;PWNED\x07",
            b"",
            b"online",
            b"offline",
        ]
    ),
)
topics = st.one_of(
    st.sampled_from(KINDS).map(lambda k: f"{BASE}/{k}"),
    st.tuples(st.text(max_size=12), st.sampled_from(KINDS)).map(
        lambda t: f"lasers/clinic-a/{t[0]}/{t[1]}"
    ),
    st.text(max_size=40),
)
messages = st.lists(st.tuples(topics, payloads), max_size=25)


def real(kind: str, seq: int, **fields: Any) -> bytes:
    envelope = {"v": 1, "ts": REAL_TS, "device": "laser-01", "seq": seq, "boot": 3}
    return json.dumps(envelope | fields).encode()


FAULT = real(
    "state",
    900_001,
    state="FAULT",
    interlocks=["door"],
    faults=["INTERLOCK_OPENED"],
    params=None,
    armed=False,
    session=None,
    daemon_version="1",
)
CRITICAL = real(
    "alerts", 900_001, severity="critical", code="interlock_opened", message="door opened"
)

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ
@given(messages)
def test_the_dashboard_survives_anything_and_shows_the_real_alarm(
    hostile: list[tuple[str, bytes]],
) -> None:
    fleet = Fleet(max_devices=8)
    for number, (topic, payload) in enumerate(hostile):
        updates = fleet.apply(topic, payload, 1_764_064_800.0 + number)
        json.dumps([u.data for u in updates], allow_nan=False)
    fleet.apply(f"{BASE}/state", FAULT, 1_764_070_000.0)
    fleet.apply(f"{BASE}/alerts", CRITICAL, 1_764_070_000.1)
    view = fleet.device_view("clinic-a", "laser-01")
    assert view is not None
    assert view["state"]["state"] == "FAULT"
    assert view["alerts"][0]["code"] == "interlock_opened"
    snapshot = fleet.snapshot()
    assert snapshot["alerts"][0]["rank"] == 3
    assert len(snapshot["devices"]) <= 8
    json.dumps(snapshot, allow_nan=False)  # a new page can always start


@FUZZ
@given(messages)
def test_watch_survives_anything_and_shows_the_real_alarm_escaped(
    hostile: list[tuple[str, bytes]],
) -> None:
    view = FleetView(max_devices=8)
    for topic, payload in hostile:
        for line in view.feed(topic, payload):
            assert "\x1b" not in line
            assert "\n" not in line
    assert view.failed == 0
    view.feed(f"{BASE}/state", FAULT)
    view.feed(f"{BASE}/alerts", CRITICAL)
    device = view.devices[("clinic-a", "laser-01")]
    assert device.state == "FAULT"
    assert "interlock_opened" in device.alerts[0]
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, force_terminal=False).print(view.render())
    shown = out.getvalue()
    assert "\x1b" not in shown  # no colour asked for: any ESC would have come from a payload
    assert "FAULT" in shown
