"""Telemetry in a worker process (devicectl.telemetry.process): what crosses, what survives.

A real mosquitto, a real worker process, a plain paho subscriber: messages get through in order,
a killed worker is started again and what it had not taken is sent again, ``cmd/stop`` and
refused bursts come back to the daemon's side, SIGTERM does not end the worker (the daemon does),
and a killed daemon leaves no worker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicectl.control import call_daemon
from devicectl.telemetry import process
from devicectl.telemetry.commands import RefusedBurst
from devicectl.telemetry.outbox import Outbox, OutboxBusy
from devicectl.telemetry.process import TelemetryProcess
from protocols.messages import DeviceState
from tests.brokers import Broker
from tests.telemetry.helpers import config, recorder, until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


class Calls:
    def __init__(self) -> None:
        self.stops = 0
        self.refused: list[RefusedBurst] = []
        self.ignored: list[tuple[str, bytes]] = []
        self.restarts = 0

    def process(self, url: str, data_dir: Path) -> TelemetryProcess:
        def restarted() -> None:
            self.restarts += 1

        return TelemetryProcess(
            config(url, data_dir, flush_timeout_s=0.6),
            on_stop=self._stop,
            on_refused_command=self.refused.append,
            on_ignored_command=lambda c, p: self.ignored.append((c, p)),
            on_restart=restarted,
        )

    def _stop(self, count: int) -> None:
        self.stops += count


def _publish(port: int, topics: list[str], payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for info in [client.publish(topic, payload, qos=1) for topic in topics]:
        info.wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


async def test_messages_cross_in_order_and_stats_come_back(tmp_path: Path) -> None:
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            assert tm.pid is not None and tm.pid != os.getpid()
            tm.publish_state(state=DeviceState.EMITTING, armed=True, session="7")
            for n in range(1, 301):
                tm.offer_pulse(n, n * 5000, 2000, "forehead", "7")
                if n % 100 == 0:
                    tm.publish_alert("warning", "tick", f"after pulse {n}")
                    await asyncio.sleep(0)
            await until(lambda: len(rec.on("alerts")) == 3, what="three alerts")
            await until(
                lambda: sum(len(m.json()["pulses"]) for m in rec.on("pulses")) == 300,
                what="300 pulses",
            )
        pulses = [p[0] for m in rec.on("pulses") for p in m.json()["pulses"]]
        assert pulses == list(range(1, 301))
        assert [m.json()["message"] for m in rec.on("alerts")] == [
            "after pulse 100",
            "after pulse 200",
            "after pulse 300",
        ]
        states = [m.json() for m in rec.on("state") if m.payload]
        assert states[-1]["state"] == "EMITTING" and states[-1]["armed"] is True
        # leaving the block: flushed, offline, and the worker gone
        availability = [m.payload for m in rec.on("availability")]
        assert availability[-1] == b"offline"
        assert not psutil.pid_exists(tm.pid) or psutil.Process(tm.pid).status() == "zombie"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
async def test_a_lost_worker_is_replaced_and_nothing_is_lost(
    tmp_path: Path, how: signal.Signals
) -> None:
    """Killed, or stopped (SIGSTOP: alive, holding its socket, taking nothing: seen as hung
    within seconds): started again, and sent what it had not taken, in order."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            first = tm.pid
            assert first is not None
            os.kill(first, how)
            # published while the worker is lost or not yet back: held, then sent again
            for n in range(5):
                tm.publish_alert("critical", "over_rate", f"alert {n}")
            await until(lambda: tm.restarts == 1 and tm.connected, timeout=30, what="replaced")
            assert tm.pid != first
            await until(lambda: len(rec.on("alerts")) >= 5, what="the five alerts")
            assert calls.restarts == 1  # the daemon re-publishes its retained state then
        messages = [m.json()["message"] for m in rec.on("alerts")]
        assert messages == [f"alert {n}" for n in range(5)]


async def test_stop_and_refused_commands_come_back_to_the_daemon(tmp_path: Path) -> None:
    calls = Calls()
    with Broker(tmp_path / "broker") as broker:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            base = tm.config.topics.base
            _publish(broker.port, [f"{base}/cmd/stop"], b"{}")
            await until(lambda: calls.stops == 1, what="cmd/stop reaching the daemon")
            _publish(broker.port, [f"{base}/cmd/arm-{n}" for n in range(20)], b"{}")
            await until(lambda: calls.refused, what="a refused burst")
        total = sum(burst.count for burst in calls.refused)
        assert total == 20
        assert calls.refused[0].commands[0] == "arm-0"


async def test_sigterm_does_not_end_the_worker(tmp_path: Path) -> None:
    """systemd's stop reaches every process of the unit; telemetry must outlive it until the
    daemon has made the laser safe and says so."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            assert tm.pid is not None
            os.kill(tm.pid, signal.SIGTERM)
            os.kill(tm.pid, signal.SIGINT)
            await asyncio.sleep(0.3)
            assert tm.restarts == 0
            tm.publish_alert("warning", "late", "after SIGTERM")
            await until(lambda: rec.on("alerts"), what="an alert after SIGTERM")


def realtime_permitted(priority: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= priority


def test_a_killed_daemon_leaves_no_worker(tmp_path: Path) -> None:
    """kill -9 of the daemon: its worker sees the socket close, flushes and exits on its own."""
    with Broker(tmp_path / "broker") as broker:
        env = dict(os.environ)  # the default [realtime]: SCHED_FIFO where the system allows
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from devicectl.cli import main; main()",
                "run",
                "--port",
                "sim",
                "--data-dir",
                str(tmp_path / "data"),
                "--control",
                str(tmp_path / "control.sock"),
                "--mqtt",
                broker.url,
            ],
            cwd=REPO,
            env=env,
            stderr=(tmp_path / "daemon.log").open("w"),
        )
        try:
            deadline = time.monotonic() + 30
            workers: list[psutil.Process] = []
            while not workers:
                assert time.monotonic() < deadline, "no telemetry worker started"
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                workers = psutil.Process(daemon.pid).children()
                time.sleep(0.05)
            worker = workers[0]
            while "mqtt_connected" not in (tmp_path / "daemon.log").read_text():
                assert time.monotonic() < deadline, "the worker did not connect"
                time.sleep(0.05)
            assert "devicectl.telemetry.worker" in " ".join(worker.cmdline())
            status = call_daemon(tmp_path / "control.sock", {"command": "status"})
            assert status["telemetry"]["worker_pid"] == worker.pid, status["telemetry"]
            while not status["telemetry"]["connected"]:  # its counters follow within 0.1 s
                assert time.monotonic() < deadline, status["telemetry"]
                time.sleep(0.05)
                status = call_daemon(tmp_path / "control.sock", {"command": "status"})
            if realtime_permitted(40):
                assert status["realtime"]["policy"] == "fifo", status["realtime"]
                assert status["realtime"]["priority"] == 40
            # the worker never runs real-time, whatever the daemon was granted
            assert os.sched_getscheduler(worker.pid) == os.SCHED_OTHER
            if realtime_permitted(40):
                assert os.sched_getscheduler(daemon.pid) == os.SCHED_FIFO
            daemon.kill()
            daemon.wait(10)
            worker.wait(10)  # raises TimeoutExpired if it lingers
        finally:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(10)
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log, log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    started = [line for line in lines if line["event"] == "telemetry_process_started"]
    assert started and started[0]["pid"] == worker.pid
    # the worker's own lines are the daemon's, in its format, naming the worker
    connected = [line for line in lines if line["event"] == "mqtt_connected"]
    assert connected and connected[0]["worker"] == worker.pid, lines


async def test_leaving_while_the_worker_is_down_still_delivers_what_was_pending(
    tmp_path: Path,
) -> None:
    """SIGTERM to the daemon while its worker waits to be restarted (it died a moment before):
    the alerts and session events published meanwhile are handed to a worker started at once,
    which puts them in the durable outbox (the next run delivers them), not dropped as "frames
    lost"; and no SIGKILL goes to the dead worker's recycled pid."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            first = tm.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await until(lambda: tm.restarts == 1, what="the worker's death seen")
            assert tm.pid == first  # waiting out the restart delay: no worker runs
            tm.publish_alert("critical", "over_rate", "raised just before the shut-down")
        assert calls.restarts == 0  # not a restart: the daemon is leaving
        async with calls.process(broker.url, tmp_path / "data") as tm:  # the next run
            await until(lambda: rec.on("alerts"), what="the alert, from the outbox")
        assert [m.json()["message"] for m in rec.on("alerts")] == [
            "raised just before the shut-down"
        ]


async def test_a_worker_that_cannot_be_started_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """posix_spawn refused once (no memory, no process slot): telemetry is tried again at the
    next delay, rather than its supervising task ending and telemetry staying down for good."""
    calls = Calls()
    real_spawn = os.posix_spawn
    refusals = [OSError(11, "Resource temporarily unavailable")]

    def spawn(*args: Any, **kwargs: Any) -> int:
        if refusals:
            raise refusals.pop()
        return real_spawn(*args, **kwargs)

    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            first = tm.pid
            assert first is not None
            monkeypatch.setattr(os, "posix_spawn", spawn)
            os.kill(first, signal.SIGKILL)
            tm.publish_alert("critical", "over_rate", "while no worker could start")
            await until(lambda: not refusals, timeout=15, what="the refused start")
            await until(lambda: tm.connected and tm.pid != first, timeout=15, what="a worker")
            await until(lambda: rec.on("alerts"), what="the alert")
        assert [m.json()["message"] for m in rec.on("alerts")] == ["while no worker could start"]


async def test_a_stop_sent_while_the_worker_is_hung_is_obeyed_by_its_replacement(
    tmp_path: Path,
) -> None:
    """The broker accepts a live cmd/stop (PUBACK to the sender) while the worker is alive but
    stopped; the worker is then killed as hung and replaced. The stop must still reach the
    daemon: the sender was told it was delivered."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            first = tm.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)
            tm.publish_alert("warning", "tick", "pending, so that the hung worker is noticed")
            _publish(broker.port, [f"{tm.config.topics.base}/cmd/stop"], b"{}")
            await until(lambda: tm.restarts == 1 and tm.connected, timeout=30, what="replaced")
            await until(lambda: calls.stops == 1, timeout=5, what="the stop sent meanwhile")


async def test_the_worker_never_imports_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`devicectl run` started from a shared directory (/tmp, a USB stick): a structlog.py left
    there by anyone must not run in the worker, which holds the broker's credentials."""
    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "structlog.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n"
    )
    monkeypatch.chdir(planted)
    calls = Calls()
    with Broker(tmp_path / "broker") as broker:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            assert tm.restarts == 0
    assert not marker.exists()


async def test_after_a_restart_the_new_worker_is_not_taken_for_hung_nor_sent_everything_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted worker counts the frames it takes from 1; the daemon numbers them across
    workers. Its acknowledgements must still clear what it took, or the daemon keeps them
    pending, kills the healthy worker as hung and sends them again, every few seconds."""
    monkeypatch.setattr(process, "HUNG_AFTER_S", 2.0)
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            for n in range(30):
                tm.publish_alert("warning", "tick", f"before {n}")
            await until(lambda: len(rec.on("alerts")) >= 30, what="the first alerts")
            await asyncio.sleep(0.5)  # their acknowledgements back (else resent: at least once)
            assert tm.pid is not None
            os.kill(tm.pid, signal.SIGKILL)
            await until(lambda: tm.restarts == 1 and tm.connected, timeout=15, what="restart")
            for n in range(5):
                tm.publish_alert("warning", "tick", f"after {n}")
            await until(lambda: len(rec.on("alerts")) >= 35, what="the later alerts")
            await asyncio.sleep(5.0)  # over twice HUNG_AFTER_S: ample to be taken for hung
            assert tm.restarts == 1
        expected = [f"before {n}" for n in range(30)] + [f"after {n}" for n in range(5)]
        assert [m.json()["message"] for m in rec.on("alerts")] == expected


async def test_a_restarted_worker_keeps_the_daemon_runs_boot(tmp_path: Path) -> None:
    """``boot`` is the daemon's start counter (docs/mqtt.md): a worker started again within the
    same run must not look to dashboards like a restart of the daemon ("counters reset")."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            tm.publish_alert("warning", "tick", "before")
            await until(lambda: rec.on("alerts"), what="the first alert")
            await asyncio.sleep(0.5)  # its acknowledgement back (else resent: at least once)
            assert tm.pid is not None
            os.kill(tm.pid, signal.SIGKILL)
            await until(lambda: tm.restarts == 1 and tm.connected, timeout=15, what="restart")
            tm.publish_alert("warning", "tick", "after")
            await until(lambda: len(rec.on("alerts")) >= 2, what="the second alert")
        alerts = [m.json() for m in rec.on("alerts")]
        assert [a["message"] for a in alerts] == ["before", "after"]
        assert alerts[0]["boot"] == alerts[1]["boot"]
        assert alerts[1]["seq"] == alerts[0]["seq"] + 1
        assert "historical" not in alerts[1]
        async with calls.process(broker.url, tmp_path / "data") as tm:  # the next run
            tm.publish_alert("warning", "tick", "next run")
            await until(lambda: len(rec.on("alerts")) >= 3, what="the next run's alert")
        assert rec.on("alerts")[2].json()["boot"] == alerts[0]["boot"] + 1


async def test_a_stop_queued_for_an_earlier_run_is_not_obeyed_by_the_next(tmp_path: Path) -> None:
    """The broker keeps a run's session (and stops queued on it) for 30 s after it ends; the next
    daemon run starts a clean session: a stop sent while no daemon ran is not a live request."""
    calls = Calls()
    with Broker(tmp_path / "broker") as broker:
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the first run connected")
            base = tm.config.topics.base
        _publish(broker.port, [f"{base}/cmd/stop"], b"{}")  # between the runs
        async with calls.process(broker.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the second run connected")
            _publish(broker.port, [f"{base}/cmd/arm"], b"{}")  # after the stop, in order
            await until(lambda: calls.refused, what="the later command seen")
        assert calls.stops == 0


async def test_a_worker_waits_for_the_outbox_an_earlier_one_still_holds(tmp_path: Path) -> None:
    """An earlier worker still flushing (here: this test holding the outbox) keeps a new one
    out, since two writers would reuse row ids and seqs: the new one says so in one line and is
    started again until the outbox is free; nothing handed over meanwhile is lost."""
    data = tmp_path / "data"
    held = Outbox(data / "telemetry-outbox.sqlite")
    calls = Calls()
    with Broker(tmp_path / "broker") as broker, recorder(broker.port) as rec:
        async with calls.process(broker.url, data) as tm:
            tm.publish_alert("warning", "tick", "while the outbox was held")
            await until(lambda: tm.restarts >= 1, what="the refused worker started again")
            assert not rec.on("alerts")
            held.close()
            await until(lambda: rec.on("alerts"), timeout=20, what="the alert, once free")
        assert [m.json()["message"] for m in rec.on("alerts")] == ["while the outbox was held"]
    with (
        contextlib.closing(Outbox(data / "telemetry-outbox.sqlite")),
        pytest.raises(OutboxBusy, match="held by another process"),
    ):
        Outbox(data / "telemetry-outbox.sqlite")
