"""A breach latches until an operator acknowledges it (docs/safety-model.md), whatever comes
between: the end of the session, a new one, a reconnection, a daemon restart. And a STOP that
cannot be confirmed is never reported as done."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from devicectl.daemon import Daemon
from tests.daemon.conftest import ACK, END, SESSION, Driver, _settings, driver, policy_file

__all__ = ["driver", "policy_file"]  # fixtures, imported for pytest


async def _breach(drv: Driver) -> dict[str, object]:
    await drv.emitting_session()
    drv.sim("fault energy-drift 1.3")
    await drv.until(lambda: drv.daemon.supervisor and drv.daemon.supervisor.latched)
    drv.sim("clear-faults")
    drv.sim("footswitch up")
    latched: dict[str, object] = (await drv.ok("status"))["breach_latched"]
    assert latched["code"] == "energy_out_of_tolerance", latched
    return latched


async def _arm_in_a_new_session(drv: Driver) -> dict[str, object]:
    await drv.ok(**SESSION)
    await drv.ok("session_zone", zone="forehead")
    return await drv.call("arm")


async def test_ending_the_session_and_starting_another_does_not_clear_a_latch(
    driver: Driver,
) -> None:
    await _breach(driver)
    await driver.ok("session_end", **END)
    reply = await _arm_in_a_new_session(driver)
    assert reply["ok"] is False and reply["rule"] == "breach_latched", reply
    assert (await driver.ok("status"))["breach_latched"]["code"] == "energy_out_of_tolerance"
    await driver.ok("fault_ack", **ACK)
    assert (await driver.ok("arm"))["armed"] is True


async def test_a_latch_survives_a_daemon_restart(
    driver: Driver, tmp_path: Path, policy_file: Path
) -> None:
    await _breach(driver)
    await driver.ok("session_end", **END)
    await driver.daemon.__aexit__(None, None, None)  # an orderly stop while latched (the
    # fixture's own exit later finds nothing left to close)

    async with Daemon(_settings(tmp_path, policy_file, "sim")) as daemon:
        again = Driver(daemon)
        await again.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        latched = (await again.ok("status"))["breach_latched"]
        assert latched is not None and latched["code"] == "energy_out_of_tolerance", latched
        reply = await _arm_in_a_new_session(again)
        assert reply["ok"] is False and reply["rule"] == "breach_latched", reply
        await again.ok("fault_ack", **ACK)
        assert (await again.ok("arm"))["armed"] is True
        await again.ok("disarm")
        await again.ok("session_end", **END)

    # Acknowledged before this stop: the next start has nothing latched.
    async with Daemon(_settings(tmp_path, policy_file, "sim")) as daemon:
        third = Driver(daemon)
        await third.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        assert (await third.ok("status"))["breach_latched"] is None


async def test_stop_with_the_device_unreachable_says_so(tmp_path: Path, policy_file: Path) -> None:
    settings = _settings(tmp_path, policy_file, str(tmp_path / "no-such-tty"))
    async with Daemon(settings) as daemon:
        reply = await Driver(daemon).call("stop")
        assert reply["ok"] is False, reply
        assert reply["kind"] == "unreachable", reply  # the CLI's exit 3
        assert "not connected" in reply["error"] and "no-such-tty" in reply["error"], reply
        assert daemon.link is not None and daemon.link.stop_pending


async def test_a_stalled_log_stops_emission_and_refuses_arming(driver: Driver) -> None:
    """No log, no laser, when a commit hangs rather than fails (a stalled disk, a lock held by
    another process): here a second SQLite connection holds the write lock."""
    await driver.emitting_session()
    db = driver.daemon.data_dir / "sessions.db"
    blocker = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for the lock
        # stall_timeout_s (2 s) and a STATUS period, well before the 5 s busy timeout fails it
        await driver.until(lambda: not driver.daemon.armed, timeout=4)
        status = await driver.ok("status")
        assert status["log_ok"] is False, status
        count = driver.pulse_count()
        await asyncio.sleep(0.3)
        assert driver.pulse_count() == count  # emission stopped
        reply = await driver.call("arm")
        assert reply["ok"] is False and "stuck" in reply["error"], reply
        assert "\n" not in reply["error"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The lock released, the queued records commit; the log is healthy and arming works again.
    await driver.until(lambda: driver.daemon.sessionlog.healthy, timeout=10)
    driver.sim("footswitch up")
    assert (await driver.ok("arm"))["armed"] is True
