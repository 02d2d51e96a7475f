"""A breach latches until an operator acknowledges it (docs/safety-model.md), whatever comes
between: the end of the session, a new one, a reconnection, a daemon restart. And a STOP that
cannot be confirmed is never reported as done."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from devicectl.simlink import compose
from tests.daemon.conftest import (
    ACK,
    END,
    SESSION,
    Driver,
    _settings,
    driver,
    policy_file,
    session_events,
)

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


async def test_a_latched_breach_belongs_to_its_session(driver: Driver) -> None:
    """No new session while a breach is latched; the acknowledgement is recorded in the breach's
    session (which has ended), and the next session cites it."""
    await _breach(driver)
    await driver.ok("session_end", **END)
    reply = await driver.call(**SESSION)
    assert reply["ok"] is False and reply["rule"] == "breach_latched", reply
    assert "session 1" in reply["error"], reply
    assert (await driver.ok("status"))["breach_latched"]["session"] == 1
    await driver.ok("fault_ack", **ACK)
    assert (await driver.ok(**SESSION))["session"] == 2
    first = session_events(driver, 1)
    assert [e["event"] for e in first].count("fault_ack") == 1, first
    ack = next(e for e in first if e["event"] == "fault_ack")
    assert ack["reason"] == ACK["signoff"]["reason"], ack
    cited = [e for e in session_events(driver, 2) if e["event"] == "prior_breach_acknowledged"]
    assert cited and cited[0]["detail"]["session"] == 1, cited
    await driver.ok("session_zone", zone="forehead")
    driver.sim("footswitch up")
    assert (await driver.ok("arm"))["armed"] is True


async def test_a_latch_survives_a_daemon_restart(
    driver: Driver, tmp_path: Path, policy_file: Path
) -> None:
    await _breach(driver)
    await driver.ok("session_end", **END)
    await driver.daemon.__aexit__(None, None, None)  # an orderly stop while latched (the
    # fixture's own exit later finds nothing left to close)

    async with compose(_settings(tmp_path, policy_file, "sim")) as daemon:
        again = Driver(daemon)
        await again.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        latched = (await again.ok("status"))["breach_latched"]
        assert latched is not None and latched["code"] == "energy_out_of_tolerance", latched
        assert latched["session"] == 1, latched
        reply = await again.call(**SESSION)
        assert reply["ok"] is False and reply["rule"] == "breach_latched", reply
        await again.ok("fault_ack", **ACK)
        assert [e["event"] for e in session_events(again, 1)].count("fault_ack") == 1
        await again.ok(**SESSION)
        await again.ok("session_zone", zone="forehead")
        assert (await again.ok("arm"))["armed"] is True
        await again.ok("disarm")
        await again.ok("session_end", **END)

    # Acknowledged before this stop: the next start has nothing latched.
    async with compose(_settings(tmp_path, policy_file, "sim")) as daemon:
        third = Driver(daemon)
        await third.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        assert (await third.ok("status"))["breach_latched"] is None


async def test_stop_with_the_device_unreachable_says_so(tmp_path: Path, policy_file: Path) -> None:
    settings = _settings(tmp_path, policy_file, str(tmp_path / "no-such-tty"))
    async with compose(settings) as daemon:
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
