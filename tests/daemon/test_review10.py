"""Adversarial review of the treatment core (issue 10), on the daemon with its simulator: each
test replays an ordering of requests, replies and faults that left the laser armed or the core
wedged before it was fixed."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from devicectl.link import DeviceLink
from devicectl.sessionlog import reader, store
from devicectl.users import Authenticator
from protocols import Command, MessageType
from tests.daemon.conftest import SESSION, Driver, driver, policy_file

__all__ = ["driver", "policy_file"]  # fixtures, imported for pytest


async def test_a_stop_between_arms_set_params_and_its_arm_leaves_the_laser_disarmed(
    driver: Driver, monkeypatch: Any
) -> None:
    """After a reboot `arm` sends SET_PARAMS, then ARM. An operator's STOP answered between the
    two (its handler runs before the arm's task resumes) must not be followed by an ARM: the
    operator was told "stopped", and the laser armed after it."""
    await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")
    await driver.ok("params_set", energy_uj=2000, width_us=500, rate_hz=50.0, spot_um=300)
    link = driver.daemon.link
    assert link is not None
    driver.sim("reboot")
    await driver.until(lambda: driver.daemon.core.acked is None and link.connected.is_set())

    request = DeviceLink.request
    stopped: list[dict[str, Any]] = []

    async def stop_after_set_params(self: DeviceLink, command: Command) -> Any:
        reply = await request(self, command)
        if command.TYPE == MessageType.SET_PARAMS and not stopped:
            stopped.append(await driver.ok("stop"))
        return reply

    monkeypatch.setattr(DeviceLink, "request", stop_after_set_params)
    arm = await driver.call("arm")
    assert stopped and stopped[0]["stopped"] is True
    assert not arm["ok"], arm
    assert not driver.daemon.core.armed
    assert driver.sim("status")["state"] == "STANDBY"


async def test_an_arm_queued_before_a_stop_does_not_arm_after_it(driver: Driver) -> None:
    """`arm` on one connection waits its turn behind a slow `params_set`; `stop` on another is
    answered "stopped" meanwhile. The queued arm then armed the laser after the STOP: a request
    made before a STOP must not undo it."""
    await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")
    await driver.ok("params_set", energy_uj=2000, width_us=500, rate_hz=50.0, spot_um=300)
    driver.sim("fault slow-replies 45")
    params = asyncio.create_task(driver.call("params_set", energy_uj=2500))
    await driver.until(lambda: driver.daemon.core.busy == "params_set")
    arm = asyncio.create_task(driver.call("arm"))
    await asyncio.sleep(0.01)
    stop = await driver.ok("stop")
    assert stop["stopped"] is True
    await params
    armed = await arm
    driver.sim("clear-faults")
    assert not armed["ok"] and armed["rule"] == "stopped", armed
    assert not driver.daemon.core.armed
    assert driver.sim("status")["state"] == "STANDBY"
    assert driver.daemon.core.busy is None
    # A STOP is not remembered beyond the requests made before it.
    assert (await driver.ok("arm"))["armed"] is True


async def test_an_arm_whose_pin_is_checked_when_a_stop_is_answered_does_not_arm(
    driver: Driver, monkeypatch: Any
) -> None:
    """A PIN takes a while to verify (argon2): an `arm` read before a `stop` and verified after
    it armed the laser after the operator had been told "stopped"."""
    await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")
    await driver.ok("params_set", energy_uj=2000, width_us=500, rate_hz=50.0, spot_um=300)
    # threading Events: the PIN is checked on the control socket's thread, this test runs on
    # the daemon's loop
    checking, release = threading.Event(), threading.Event()
    actor = Authenticator.actor

    async def slow_actor(self: Authenticator, command: str, *args: Any, **kwargs: Any) -> Any:
        if command == "arm":
            checking.set()
            await asyncio.to_thread(release.wait, 30)
        return await actor(self, command, *args, **kwargs)

    monkeypatch.setattr(Authenticator, "actor", slow_actor)
    arm = asyncio.create_task(driver.call("arm"))
    assert await asyncio.to_thread(checking.wait, 10)
    assert (await driver.ok("stop"))["stopped"] is True
    release.set()
    armed = await arm
    assert not armed["ok"] and armed["rule"] == "stopped", armed
    assert not driver.daemon.core.armed
    assert driver.sim("status")["state"] == "STANDBY"
    assert (await driver.ok("arm"))["armed"] is True  # one made after the STOP arms


async def test_a_clinical_note_records_what_was_written_and_nothing_the_daemon_set(
    driver: Driver,
) -> None:
    await driver.ok(**SESSION)
    await driver.ok("session_note", text="patient comfortable")
    log = driver.daemon.sessionlog
    assert log is not None
    log.flush()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, 1)
    finally:
        conn.close()
    assert record is not None
    notes = [r["body"] for r in record.records if r["kind"] == "note"]
    assert notes, [r["kind"] for r in record.records]
    assert "received" not in json.dumps(notes), notes
