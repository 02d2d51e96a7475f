"""The reproductions of issue 11 against the daemon as a process, emitting: whatever arrives on
MQTT or the control socket costs a bounded amount of disk and log, and a STOP still gets in."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Broker
from tests.daemon.test_processes import DEVICECTL, Rig, _wait
from tests.telemetry.helpers import flood_commands, stop_flood

pytestmark = pytest.mark.system


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    try:
        rig.start_sim()
        yield rig
    finally:
        rig.stop()


def _log_bytes(data: Path) -> int:
    """The session log on disk, its write-ahead log included."""
    return sum(p.stat().st_size for p in data.glob("sessions.db*"))


def _events(data: Path) -> list[dict[str, Any]]:
    """The session log's ``event`` records, in order."""
    conn = sqlite3.connect(f"{(data / 'sessions.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT body FROM records WHERE kind = 'event'").fetchall()
    finally:
        conn.close()
    return [json.loads(body) for (body,) in rows]


def _refused(data: Path) -> list[int]:
    """The counts of the session log's ``remote_command_refused`` records."""
    return [e["detail"]["count"] for e in _events(data) if e["event"] == "remote_command_refused"]


def test_300_long_named_commands_barely_grow_the_logs(rig: Rig, mosquitto: Broker) -> None:
    """300 ``cmd/<60,000 characters>`` once grew the session log by 18.5 MB and the daemon's log
    by 36 MB: now a few aggregated records. (Not emitting, so that the files' growth is the
    flood's alone: the daemon's work per refusal does not depend on it.)"""
    rig.config.write_text(
        rig.config.read_text() + f'[mqtt]\nurl = "{mosquitto.url}"\nsite = "flood"\n'
    )
    rig.start_daemon()
    base = f"lasers/flood/{rig.call('status')['device_serial']}"
    _wait(lambda: "mqtt_connected" in (rig.tmp / "daemon.log").read_text(), what="telemetry")
    log_before, daemon_log_before = _log_bytes(rig.data), (rig.tmp / "daemon.log").stat().st_size
    flood_commands(mosquitto.host, mosquitto.port, base, 300, 60_000)
    # every refusal audited, in one record per burst (a burst: one second at most)
    _wait(lambda: sum(_refused(rig.data)) == 300, what="the flood audited")
    assert len(_refused(rig.data)) <= 10, _refused(rig.data)
    assert not rig.call("status")["armed"]
    grown = _log_bytes(rig.data) - log_before
    daemon_log_grown = (rig.tmp / "daemon.log").stat().st_size - daemon_log_before
    assert grown < 1_000_000, grown
    assert daemon_log_grown < 100_000, daemon_log_grown
    refusals = (rig.tmp / "daemon.log").read_text().count("mqtt_commands_refused")
    assert 1 <= refusals <= 10, refusals


def test_stop_gets_in_with_the_daemon_at_a_low_open_files_limit(rig: Rig) -> None:
    """At a low open-files limit, far more idle control connections than it could hold: the
    daemon stays under its limit (serving 40 at 160 open files), answers the rest at once, and
    ``devicectl stop`` stops the laser; the log says so in one line, no traceback."""
    rig.start_daemon(open_files_limit=160)
    rig.emit()
    with ExitStack() as stack:
        held = 0
        for _ in range(300):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(str(rig.control))  # blocking: waits while the backlog is full
            held += 1
        assert rig.sim_status()["emitting"]
        stop = subprocess.run(
            [*DEVICECTL, "stop", "--control", str(rig.control)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
        _wait(lambda: not rig.sim_status()["emitting"], what="emission stopped")
        assert held == 300
    log = (rig.tmp / "daemon.log").read_text()
    assert "Traceback" not in log and "out of system resource" not in log
    # the cap fitted to the limit, the rest answered "busy" at once: said once per episode (a
    # slot freed by a client that just left starts another), not once per connection
    busy = [json.loads(line) for line in log.splitlines() if '"control_busy"' in line]
    assert 1 <= len(busy) <= 3, busy
    assert all(b["max_clients"] == 40 for b in busy), busy
    assert len(log) < 100_000


def test_a_command_flood_does_not_delay_the_stop_of_a_breach(
    tmp_path: Path, mosquitto: Broker
) -> None:
    """Issue 11's first reproduction: 30,000 QoS 1 messages to ``cmd/arm`` while emitting at
    200 Hz, the energy drifting ×1.35 mid-flood. The board once fired 17 and 22 pulses after the
    first out-of-tolerance one; with MQTT in its own process and the safety loop first in line
    for the CPU, at most one (the one already on its way).

    The board stands for a microcontroller that no host load delays: where the test may (root,
    as in CI), the simulator runs SCHED_FIFO above the daemon, so what is counted is the
    daemon's delay, not the simulator's; and the kernel's workers, which carry a pty's bytes to
    the daemon, run raised as the shipped kernel-workers unit keeps them (without it a flood on
    a slow machine can hold the bytes back for 300 ms: the daemon then stops on link_lost,
    safe, but that is not what this test is about; docs/reliability.md, "Interference")."""
    rig = Rig(tmp_path, sim_realtime=True)
    try:
        rig.start_sim()
        rig.config.write_text(
            rig.config.read_text() + f'[mqtt]\nurl = "{mosquitto.url}"\nsite = "flood"\n'
        )
        rig.start_daemon()
        base = f"lasers/flood/{rig.call('status')['device_serial']}"
        _wait(lambda: "mqtt_connected" in (rig.tmp / "daemon.log").read_text(), what="telemetry")
        rig.emit(rate_hz=200, energy_uj=1000)  # 0.2 W: the skin stays cool
        flood = threading.Thread(
            target=flood_commands, args=(mosquitto.host, mosquitto.port, base, 30_000, 8)
        )
        flood.start()
        try:
            _wait(lambda: sum(_refused(rig.data)) >= 1_000, what="the flood under way")
            rig.sim_command("fault", "energy-drift", "1.35")
            _wait(lambda: not rig.sim_status()["emitting"], what="emission stopped")
        finally:
            flood.join(120)
        latched = rig.call("status")["breach_latched"]
        assert latched is not None and latched["code"] == "energy_out_of_tolerance", latched
        fired = rig.sim_status()["pulse_count"]
        assert fired - latched["pulse_no"] <= 1, (fired, latched)
    finally:
        rig.stop()


def _mqtt_stops(data: Path) -> list[int]:
    """The counts of the session log's ``stop`` records by MQTT (1 when not given)."""
    return [
        e["detail"].get("count", 1)
        for e in _events(data)
        if e["event"] == "stop" and e.get("actor") == "mqtt"
    ]


def test_a_flood_of_live_stops_stops_the_laser_and_is_audited_in_a_few_records(
    rig: Rig, mosquitto: Broker
) -> None:
    """Every live ``cmd/stop`` is obeyed, but 3,000 of them cost a few audit records with their
    count, not 3,000 (the log cannot be pruned: a flood must not fill the disk)."""
    rig.config.write_text(
        rig.config.read_text() + f'[mqtt]\nurl = "{mosquitto.url}"\nsite = "flood"\n'
    )
    rig.start_daemon()
    base = f"lasers/flood/{rig.call('status')['device_serial']}"
    _wait(lambda: "mqtt_connected" in (rig.tmp / "daemon.log").read_text(), what="telemetry")
    rig.emit()
    stop_flood(mosquitto.host, mosquitto.port, base, 3_000)
    _wait(lambda: not rig.sim_status()["emitting"], what="emission stopped")
    _wait(lambda: sum(_mqtt_stops(rig.data)) == 3_000, what="every stop audited")
    assert len(_mqtt_stops(rig.data)) <= 12, _mqtt_stops(rig.data)
    assert not rig.call("status")["armed"]
