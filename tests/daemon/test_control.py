"""The control socket: every command, malformed requests, refusals with facts, wrong states."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from devicectl.sessionlog import reader, store
from tests.daemon.conftest import CHECKLIST, SESSION, Driver


async def test_socket_is_0660(driver: Driver) -> None:
    assert stat.S_IMODE(os.stat(driver.path).st_mode) == 0o660


async def test_status_describes_device_and_session(driver: Driver) -> None:
    status = await driver.ok("status")
    assert status["connected"] is True
    assert status["state"] == "standby"
    assert status["armed"] is False
    assert status["session"] is None
    assert status["log_ok"] is True


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"no": "command"}\n', "no 'command'"),
        (b'{"command": "self_destruct"}\n', "invalid request"),
        (b'{"command": "arm", "extra": 1}\n', "extra"),
        (b'{"command": "params_set", "energy_uj": -5}\n', "energy_uj"),
        (b'{"command": "session_zone", "zone": "elbow"}\n', "zone"),
        (b"\xff\xfe\n", "not JSON"),
    ],
)
async def test_malformed_requests_are_usage_errors(
    driver: Driver, line: bytes, needle: str
) -> None:
    reply = await driver.raw(line)
    assert reply["ok"] is False
    assert reply["kind"] == "usage"
    assert needle in reply["error"]
    assert "\n" not in reply["error"]
    # ...and the daemon is undisturbed.
    assert (await driver.ok("status"))["connected"] is True


async def test_wrong_states_are_refused_with_the_cause(driver: Driver) -> None:
    for command, fields, needle in [
        ("arm", {}, "no session is open"),
        ("session_zone", {"zone": "cheeks"}, "no session is open"),
        ("params_set", {"energy_uj": 1000}, "no session is open"),
        ("session_end", {}, "no session is open"),
        ("fault_ack", {"operator": "OP-7", "reason": "checked"}, "no breach is latched"),
    ]:
        reply = await driver.call(command, **fields)
        assert reply["ok"] is False, command
        assert reply["kind"] == "refused", command
        assert needle in reply["error"], (command, reply["error"])
    await driver.ok(**SESSION)
    reply = await driver.call("arm")
    assert reply["kind"] == "refused"
    assert "zone" in reply["error"]
    reply = await driver.call(**SESSION)
    assert "still open" in reply["error"]


async def test_limit_refusal_names_rule_value_and_bound(driver: Driver) -> None:
    await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")
    # 30 mJ on a 300 µm spot is ~42 J/cm², above skin type III's 30 J/cm².
    reply = await driver.call("params_set", energy_uj=30000, width_us=500, rate_hz=5, spot_um=300)
    assert reply["ok"] is False
    assert reply["kind"] == "refused"
    assert reply["rule"] == "max_fluence_skin_type_III"
    assert reply["bound"] == 30.0
    assert reply["value"] > 30.0
    reply = await driver.call("params_set", energy_uj=2000, width_us=500, rate_hz=5, spot_um=250)
    assert reply["rule"] == "device_spot"
    reply = await driver.call(
        "params_set", energy_uj=20000, width_us=500, rate_hz=400, spot_um=1000
    )
    assert reply["rule"] == "max_average_power"
    # Far beyond the device but within the wire's fields: a limit refusal (exit 1), not usage.
    reply = await driver.call(
        "params_set", energy_uj=20_000_000, width_us=500, rate_hz=5, spot_um=300
    )
    assert reply["kind"] == "refused" and reply["rule"].startswith("device"), reply
    assert reply["bound"] == 60_000, reply
    # Beyond the wire itself (u32): malformed, exit 2.
    reply = await driver.call("params_set", energy_uj=2**32, width_us=500, rate_hz=5, spot_um=300)
    assert reply["kind"] == "usage", reply


async def test_contraindication_blocks_the_session(driver: Driver) -> None:
    checklist = dict(CHECKLIST, pregnancy=True)
    reply = await driver.call(**dict(SESSION, checklist=checklist))
    assert reply["ok"] is False
    assert "pregnancy" in reply["error"]


async def test_patient_name_is_refused(driver: Driver) -> None:
    reply = await driver.call(**dict(SESSION, patient_ref="Jane Doe"))
    assert reply["ok"] is False
    assert "pseudonymous" in reply["error"]


async def test_whole_session_through_the_socket(driver: Driver) -> None:
    started = await driver.ok(**SESSION)
    assert started["active_ingredient"] == "hyaluronic acid"
    zone = await driver.ok("session_zone", zone="forehead")
    assert zone["params"]["energy_uj"] == 6000  # the preset, checked and sent
    await driver.ok("params_set", rate_hz=40)
    assert (await driver.ok("arm"))["armed"] is True
    driver.sim("footswitch down")
    await driver.until(lambda: driver.daemon.treatment.pulses >= 10)
    await driver.ok("disarm")
    assert (await driver.ok("status"))["armed"] is False
    summary = await driver.ok("session_end", post_care=["soothing_serum"])
    assert summary["pulses"] >= 10
    assert summary["outcome"] == "completed"
    assert (await driver.ok("status"))["session"] is None


async def test_stop_is_always_accepted(driver: Driver) -> None:
    assert (await driver.ok("stop"))["stopped"] is True
    await driver.emitting_session()
    assert (await driver.ok("stop"))["stopped"] is True
    await driver.until(lambda: not driver.daemon.armed)
    count = driver.pulse_count()
    status = await driver.ok("status")
    assert status["state"] == "standby"
    await asyncio.sleep(0.2)
    assert driver.pulse_count() == count


async def test_contraindication_override_needs_a_reason_and_is_recorded(driver: Driver) -> None:
    checklist = dict(CHECKLIST, recent_sun_exposure=True)
    reply = await driver.call(**dict(SESSION, checklist=checklist))
    assert reply["ok"] is False
    assert "override" in reply["error"]
    reply = await driver.call(
        **dict(SESSION, checklist=checklist, contraindication_override="short")
    )
    assert reply["kind"] == "usage"  # a reason too short to mean anything
    reason = "tan is two months old; test patch on 2026-11-01 showed no reaction"
    started = await driver.ok(
        **dict(SESSION, checklist=checklist, contraindication_override=reason)
    )
    await driver.ok("session_zone", zone="forehead")
    assert (await driver.ok("arm"))["armed"] is True
    log = driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, started["session"])
    finally:
        conn.close()
    assert record is not None
    overrides = [r["body"] for r in record.records if r["body"].get("event") == "override"]
    assert len(overrides) == 1
    assert overrides[0]["reason"] == reason
    assert overrides[0]["detail"]["contraindications"] == ["recent_sun_exposure_or_tan"]
