"""The control socket: every command, malformed requests, refusals with facts, wrong states."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from devicectl.sessionlog import reader, store
from devicectl.users import MAX_FAILURES, UserStore
from tests.daemon.conftest import ACK, CHECKLIST, END, SESSION, SUPERVISOR, Driver


async def test_socket_is_0660(driver: Driver) -> None:
    assert stat.S_IMODE(os.stat(driver.path).st_mode) == 0o660


async def test_status_describes_device_and_session(driver: Driver) -> None:
    # the connection's first record is committed on the writer's thread, after the link is up
    log = driver.daemon.sessionlog
    await driver.until(lambda: log is not None and log.commits >= 1)
    status = await driver.ok("status")
    assert status["connected"] is True
    assert status["state"] == "standby"
    assert status["armed"] is False
    assert status["session"] is None
    assert status["log_ok"] is True
    commits = status["log_commits"]  # group commit, shown in status (issue 16)
    assert commits["commit_interval_ms"] == 10 and commits["commits"] >= 1
    assert commits["commits_per_s"] >= 0


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
        ("session_end", END, "no session is open"),
        ("fault_ack", ACK, "no breach is latched"),
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
    summary = await driver.ok("session_end", **END)
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


async def test_contraindication_override_needs_a_supervisors_signoff_and_is_recorded(
    driver: Driver,
) -> None:
    checklist = dict(CHECKLIST, recent_sun_exposure=True)
    reply = await driver.call(**dict(SESSION, checklist=checklist))
    assert reply["ok"] is False
    assert reply["rule"] == "signoff.required"
    assert "recent sun exposure" in reply["error"] and "supervisor" in reply["error"]
    reason = "tan is two months old; test patch on 2026-11-01 showed no reaction"
    # The operator alone may not sign off, with any reason.
    own = {"reason_code": "physician_clearance", "reason": reason}
    reply = await driver.call(**dict(SESSION, checklist=checklist, signoff=own))
    assert reply["rule"] == "signoff.supervisor", reply
    # A supervisor's identity needs that supervisor's PIN.
    wrong = dict(own, user=SUPERVISOR["user"], pin="not-the-pin")
    reply = await driver.call(**dict(SESSION, checklist=checklist, signoff=wrong))
    assert reply["rule"] == "auth.bad_pin", reply
    # A reason code outside the list, and a reason too short to mean anything, are refused.
    reply = await driver.call(
        **dict(SESSION, checklist=checklist, signoff=dict(own, **SUPERVISOR, reason_code="x"))
    )
    assert reply["rule"] == "signoff.reason_code", reply
    reply = await driver.call(
        **dict(SESSION, checklist=checklist, signoff=dict(own, **SUPERVISOR, reason="short"))
    )
    assert reply["kind"] == "usage", reply
    started = await driver.ok(**dict(SESSION, checklist=checklist, signoff=dict(own, **SUPERVISOR)))
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
    assert record.info["operator"] == "OP-7" and record.info["operator_role"] == "operator"
    assert record.info["override"] == {
        "signed_off_by": "SUP-1",
        "role": "supervisor",
        "reason_code": "physician_clearance",
        "reason": reason,
    }
    overrides = [r["body"] for r in record.records if r["body"].get("event") == "override"]
    assert len(overrides) == 1
    assert overrides[0]["reason"] == reason
    assert overrides[0]["actor"] == "OP-7" and overrides[0]["role"] == "operator"
    assert overrides[0]["detail"]["contraindications"] == ["recent_sun_exposure_or_tan"]
    assert overrides[0]["detail"]["signed_off_by"] == "SUP-1"
    # Every record of the session names its user and role.
    for rec in record.records:
        if rec["kind"] in {"zone", "params"} or rec["body"].get("event") == "armed":
            assert (rec["body"]["actor"], rec["body"]["role"]) == ("OP-7", "operator"), rec


async def test_treatment_changing_requests_need_a_registered_user_and_their_pin(
    driver: Driver,
) -> None:
    for command, fields in [
        ("session_start", SESSION),
        ("session_zone", {"zone": "cheeks"}),
        ("params_set", {"energy_uj": 1000}),
        ("arm", {}),
        ("session_end", END),
        ("fault_ack", ACK),
        ("session_note", {"text": "patient comfortable"}),
    ]:
        body = {k: v for k, v in fields.items() if k != "command"}
        reply = await driver.call(command, **body, auth=None)
        assert (reply["ok"], reply["rule"]) == (False, "auth.required"), (command, reply)
        assert "\n" not in reply["error"]
    reply = await driver.call(**SESSION, auth={"user": "NOBODY", "pin": "123456"})
    assert reply["rule"] == "auth.unknown_user"
    reply = await driver.call(**SESSION, auth={"user": "OP-7", "pin": "123456"})
    assert reply["rule"] == "auth.bad_pin"
    # An actor cannot be claimed: only the daemon sets it, from verified credentials.
    reply = await driver.call(**SESSION, actor={"user": "SUP-1", "role": "supervisor"})
    assert reply["kind"] == "usage" and "actor" in reply["error"]
    # Stopping and disarming never wait for a PIN; status only reads.
    assert (await driver.ok("stop"))["stopped"] is True
    assert (await driver.ok("status"))["session"] is None
    # Refusals are audited without the PIN.
    log = driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        bodies = [row[0] for row in conn.execute("SELECT body FROM records")]
    finally:
        conn.close()
    refused = [b for b in bodies if '"auth_refused"' in b]
    assert len(refused) >= 9
    assert not any("123456" in b for b in bodies)


async def test_a_disabled_user_and_repeated_wrong_pins_are_refused(driver: Driver) -> None:
    users = UserStore.in_data_dir(driver.daemon.data_dir)
    for _ in range(MAX_FAILURES):
        reply = await driver.call(**SESSION, auth={"user": "SUP-1", "pin": "wrong-pin"})
        assert reply["rule"] == "auth.bad_pin"
    reply = await driver.call(**SESSION, auth=SUPERVISOR)  # the right PIN, too late
    assert reply["rule"] == "auth.locked", reply
    users.disable("OP-7", "left the clinic")
    reply = await driver.call(**SESSION)
    assert reply["rule"] == "auth.disabled", reply


async def test_clinical_entries_are_appended_after_the_end_never_edits(driver: Driver) -> None:
    started = await driver.ok(**SESSION)
    await driver.ok("session_end", **END)
    sid = started["session"]
    await driver.ok("session_reaction", session=sid, erythema="mild", oedema="none")
    await driver.ok(
        "session_adverse_event",
        session=sid,
        severity="moderate",
        text="blister on the left cheek the next day",
        action_taken="cold compress, reviewed at 48 h",
        auth=SUPERVISOR,
    )
    await driver.ok("session_note", session=sid, text="patient happy with the result")
    reply = await driver.call("session_note", session=999, text="no such session")
    assert reply["ok"] is False and "no session 999" in reply["error"]
    log = driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, sid)
    finally:
        conn.close()
    assert record is not None
    kinds = [r["kind"] for r in record.records]
    end = kinds.index("session_ended")
    assert kinds[end + 1 :] == ["reaction", "adverse_event", "note"]
    adverse = record.records[end + 2]["body"]
    assert (adverse["actor"], adverse["role"], adverse["severity"]) == (
        "SUP-1",
        "supervisor",
        "moderate",
    )


async def test_each_parameter_set_records_the_fluence_cap_and_the_rule_that_set_it(
    driver: Driver,
) -> None:
    started = await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")  # the preset: skin type III caps at 30
    await driver.ok("session_zone", zone="periorbital")  # the zone caps tighter, at 10
    await driver.ok("params_set", rate_hz=5)
    log = driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, started["session"])
    finally:
        conn.close()
    assert record is not None
    caps = [r["body"]["fluence_limit"] for r in record.records if r["kind"] == "params"]
    assert [(c["zone"], c["max_fluence_j_cm2"], c["rule"], c["preset"]) for c in caps] == [
        ("forehead", 30.0, "max_fluence_skin_type_III", "fine_lines"),
        ("periorbital", 10.0, "max_fluence_zone_periorbital", "fine_lines"),
        ("periorbital", 10.0, "max_fluence_zone_periorbital", None),  # changed: no preset
    ]
    assert all(c["skin_type"] == "III" and 8.4 < c["fluence_j_cm2"] < 8.5 for c in caps)


async def test_a_wrong_pin_never_prevents_disarming(driver: Driver) -> None:
    await driver.emitting_session()
    reply = await driver.call("disarm", auth={"user": "OP-7", "pin": "wrong-pin"})
    assert reply["ok"], reply
    assert (await driver.ok("status"))["armed"] is False


async def test_an_unproven_disarm_is_recorded_as_nobodys_not_as_the_operators(
    driver: Driver,
) -> None:
    """Disarming needs no identity, so a disarm without a proven one must not be recorded in a
    registered user's name: it was written as the session's operator's (OP-7), whoever typed
    it, here SUP-1 with a wrong PIN: the record named someone who never proved anything."""
    await driver.emitting_session()
    reply = await driver.call("disarm", auth={"user": "SUP-1", "pin": "wrong-pin"})
    assert reply["ok"], reply
    log = driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        bodies = [json.loads(row[0]) for row in conn.execute("SELECT body FROM records")]
    finally:
        conn.close()
    (disarmed,) = [b for b in bodies if b.get("event") == "disarmed"]
    assert (disarmed["actor"], disarmed["role"]) == ("unidentified", None), disarmed
