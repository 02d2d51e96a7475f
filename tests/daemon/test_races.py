"""Issue 10's five defects, replayed against the daemon on the simulator as they were found:
requests on two control connections a few milliseconds apart, faults injected through the
simulator's control. Each ends in a refused request or a latched breach with the laser stopped,
never in a pulse judged against the wrong limits. (Each failed on the daemon before the treatment
core.)"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

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


async def _two(
    drv: Driver, first: dict[str, Any], second: dict[str, Any], gap_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``first`` on one control connection, ``second`` on another ``gap_s`` later."""
    a = asyncio.create_task(drv.call(**first))
    await asyncio.sleep(gap_s)
    b = asyncio.create_task(drv.call(**second))
    return await a, await b


async def _latched_and_stopped(drv: Driver, code: str, timeout: float = 8.0) -> None:
    await drv.until(lambda: drv.daemon.core.latched is not None, timeout=timeout)
    latched = drv.daemon.core.latched
    assert latched is not None and latched.alert_code == code, latched
    await drv.until(lambda: not drv.sim("status")["emitting"], timeout=2)
    count = drv.pulse_count()
    await asyncio.sleep(0.2)
    assert drv.pulse_count() == count  # the laser stopped


async def test_1_params_set_racing_arm_arms_on_what_the_device_acknowledged(
    driver: Driver,
) -> None:
    await driver.ok(**SESSION)  # preset fine_lines: 6,000 µJ
    await driver.ok("session_zone", zone="forehead")
    driver.sim("fault slow-replies 40")
    params, arm = await _two(
        driver,
        {"command": "params_set", "energy_uj": 5000},
        {"command": "arm"},
        0.010,
    )
    assert params["ok"], params
    assert arm["ok"], arm  # queued behind params_set: judged on the 5,000 µJ acknowledged
    driver.sim("clear-faults")
    supervisor = driver.daemon.core.supervisor
    assert supervisor is not None and supervisor.limits is not None
    assert supervisor.limits.params.energy_uj == 5000
    driver.sim("fault energy-drift 1.35")
    driver.sim("footswitch down")
    await _latched_and_stopped(driver, "energy_out_of_tolerance")


async def test_2_session_zone_racing_arm_after_a_reboot_is_refused(driver: Driver) -> None:
    await driver.ok(**SESSION)
    await driver.ok("session_zone", zone="forehead")
    await driver.ok("params_set", energy_uj=8000, width_us=1000, rate_hz=10.0, spot_um=300)
    link = driver.daemon.link
    assert link is not None
    driver.sim("reboot")
    await driver.until(lambda: link.stats["reconnects"] >= 0 and link.connected.is_set())
    await driver.until(lambda: driver.daemon.core.acked is None)  # the BOOT was seen
    driver.sim("fault slow-replies 40")
    arm, zone = await _two(
        driver, {"command": "arm"}, {"command": "session_zone", "zone": "periorbital"}, 0.015
    )
    driver.sim("clear-faults")
    assert arm["ok"], arm
    assert not zone["ok"] and zone["rule"] == "disarm_first", zone
    status = await driver.ok("status")
    assert status["zone"] == "forehead"
    supervisor = driver.daemon.core.supervisor
    assert supervisor is not None and supervisor.zone is not None
    assert supervisor.zone.value == "forehead"  # the limits in force are the zone charged
    refused = [e for e in session_events(driver, 1) if e["event"] == "refused"]
    assert refused and refused[-1]["detail"]["command"] == "session_zone", refused
    # Without the race: a zone whose cap the parameters break is taken, arming is refused.
    await driver.ok("disarm")
    moved = await driver.ok("session_zone", zone="periorbital")
    assert "arming is refused" in moved["warning"]
    reply = await driver.call("arm")
    assert not reply["ok"] and reply["rule"].startswith("max_fluence"), reply


async def test_3_average_power_counts_pulses_lost_on_the_wire(driver: Driver) -> None:
    # 7,000 µJ at 400 Hz: 2.8 W of the policy's 3.0 W; the device drifts to 3.08 W and 5 % of
    # frames are dropped, so that only about 2.93 W arrive as PULSE events.
    await driver.emitting_session(zone="cheeks", rate_hz=400.0, energy_uj=7000, spot_um=1000)
    driver.sim("fault energy-drift 1.10")
    driver.sim("fault drop-frames 0.05")
    try:
        await _latched_and_stopped(driver, "average_power", timeout=6.0)
    finally:
        driver.sim("clear-faults")


async def test_5_a_breach_belongs_to_its_session_and_refusals_are_audited(
    driver: Driver,
) -> None:
    await driver.emitting_session()
    driver.sim("fault energy-drift 1.3")
    await driver.until(lambda: driver.daemon.core.latched is not None)
    driver.sim("clear-faults")
    driver.sim("footswitch up")
    refused_arm = await driver.call("arm")
    assert not refused_arm["ok"] and refused_arm["rule"] == "breach_latched"
    refused_params = await driver.call("params_set", energy_uj=90_000)
    assert not refused_params["ok"]
    await driver.ok("session_end", **END)
    refused_start = await driver.call(**SESSION)
    assert not refused_start["ok"] and refused_start["rule"] == "breach_latched", refused_start
    await driver.ok("fault_ack", **ACK)
    second = (await driver.ok(**SESSION))["session"]
    first = session_events(driver, 1)
    kinds = [e["event"] for e in first]
    assert kinds.count("breach") == 1 and kinds.count("fault_ack") == 1, kinds
    audited = [e["detail"]["command"] for e in first if e["event"] == "refused"]
    assert audited[:2] == ["arm", "params_set"], audited
    cited = [e for e in session_events(driver, second) if e["event"] == "prior_breach_acknowledged"]
    assert cited and cited[0]["detail"]["session"] == 1, cited


# ---------------------------------------------------------------- defect 4: a crashed daemon


async def _spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from devicectl.cli import main; main()", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip


@pytest.mark.system
async def test_4_a_restarted_daemon_recovers_a_board_latched_by_a_crash(
    tmp_path: Path, policy_file: Path
) -> None:
    """`kill -9` while emitting: the board's lease runs out (FAULT, LEASE_EXPIRED) and the new
    daemon holds no breach for it. `fault ack` clears it with CLEAR_FAULT, recorded; `status` says
    what is latched and what clears it."""
    sim = await _spawn("sim", "--pty", "--control", str(tmp_path / "sim.sock"))
    daemon_process: asyncio.subprocess.Process | None = None
    try:
        assert sim.stdout is not None
        port = (await asyncio.wait_for(sim.stdout.readline(), 30)).decode().strip()
        settings = _settings(tmp_path, policy_file, port)
        env = {
            **os.environ,
            "DEVICECTL_PORT": port,
            "DEVICECTL_DATA_DIR": str(settings.data_dir),
            "DEVICECTL_CONTROL": str(settings.control),
            "DEVICECTL_POLICY": str(policy_file),
        }
        daemon_process = await _spawn("run", env=env)
        first = Driver.__new__(Driver)
        first.path, first.sim_socket = Path(settings.control), tmp_path / "sim.sock"
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                if (await first.ok("status"))["connected"]:
                    break
            except (OSError, ValueError):
                pass
            assert asyncio.get_running_loop().time() < deadline, "the daemon did not start"
            await asyncio.sleep(0.1)
        await first.ok(**SESSION)
        await first.ok("session_zone", zone="forehead")
        await first.ok("params_set", energy_uj=2000, width_us=500, rate_hz=50.0, spot_um=300)
        await first.ok("arm")
        first.sim("footswitch down")
        await asyncio.sleep(0.3)
        daemon_process.send_signal(signal.SIGKILL)
        await daemon_process.wait()
        daemon_process = None
        await asyncio.sleep(2.0)  # the lease (1.5 s) runs out: LEASE_EXPIRED
        assert first.sim("status")["state"] == "FAULT"

        async with compose(settings) as daemon:
            again = Driver(daemon, tmp_path / "sim.sock")
            await again.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
            status = await again.ok("status")
            assert status["breach_latched"] is None
            latched = status["device_fault_latched"]
            assert latched["faults"] == ["lease_expired"], status
            assert "fault ack" in latched["clears_with"]
            await again.ok(**SESSION)
            await again.ok("session_zone", zone="forehead")
            refused = await again.call("arm")
            assert not refused["ok"] and refused["rule"] == "device_fault", refused
            acked = await again.ok("fault_ack", **ACK)
            assert acked["acknowledged"] == "device_fault"
            assert acked["device_faults"] == ["lease_expired"]
            armed = await again.ok("arm")  # the footswitch is still held since the crash
            assert armed["armed"] is True
            assert "press it again" in armed["note"]
            records = [e for e in session_events(again, 2) if e["event"] == "fault_ack"]
            assert records and records[0]["actor"] == "OP-7", records
            assert records[0]["reason"] == ACK["signoff"]["reason"]
            assert records[0]["detail"]["signed_off_by"] == "SUP-1", records
            again.sim("footswitch up")
            await again.ok("disarm")
    finally:
        if daemon_process is not None and daemon_process.returncode is None:
            daemon_process.kill()
            await daemon_process.wait()
        if sim.returncode is None:
            sim.terminate()
        await sim.wait()
