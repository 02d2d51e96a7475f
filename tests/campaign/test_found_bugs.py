"""Regression tests for what the campaign found, on the in-process daemon (fast, no broker).

Each first failed as a minimal reproduction of a campaign finding and passes since the daemon's fix
(docs/reliability.md, "What the campaign found"); a failure here is a bug in the daemon.
"""

from __future__ import annotations

from benchmarks.faults import log_accounts
from tests.daemon.conftest import Driver, driver, policy_file

__all__ = ["driver", "policy_file"]  # fixtures, imported for pytest


async def _books(drv: Driver) -> tuple[set[int], list[int]]:
    daemon = drv.daemon
    assert daemon.sessionlog is not None
    await daemon.sessionlog.flush_async()
    logged, charged, _ = log_accounts(daemon.data_dir / "sessions.db")
    return set(range(1, drv.board.pulse_count + 1)), logged + charged


async def test_pulse_events_lost_on_the_wire_are_counted_unlogged(driver: Driver) -> None:
    """DESIGN section 4 rule 6 and section 5: a gap in pulse_no is charged *and logged*; the log
    reconciles with the device's counter so that no pulse goes unaccounted. With PULSE events
    dropped on the wire (line noise, a lost frame) the board's count must still equal the pulses
    in the log plus the pulses it counts as unlogged."""
    await driver.emitting_session(rate_hz=100.0)
    driver.sim("fault drop-frames 0.2")
    start = driver.board.pulse_count
    await driver.until(lambda: driver.board.pulse_count >= start + 100)
    driver.sim("clear-faults")
    driver.sim("footswitch up")
    # Two STATUS periods after the last pulse: the daemon has seen the device's final counter.
    count = driver.board.pulse_count
    await driver.until(lambda: driver.daemon.status is not None and (
        driver.daemon.status.pulse_count == count and not driver.sim("status")["emitting"]
    ))  # fmt: skip
    fired, accounted = await _books(driver)
    missing = sorted(fired - set(accounted))
    assert not missing, f"{len(missing)} fired pulse(s) neither logged nor counted: {missing[:10]}"
    assert len(accounted) == len(set(accounted)), "a pulse accounted twice"
