"""Issue 7's outage tests on the real daemon and a real mosquitto: the broker stopped for several
seconds mid-emission, and the daemon killed with -9 and restarted. A persistent paho subscriber
(clean start off, QoS 1) must see every QoS 1 message: per topic no gap in ``seq``, new seqs in
order, a duplicate only ever a repeat of a seq already seen; the laser never stops for it.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

from devicectl.simlink import compose
from protocols.mqtt import STREAMS, parse_topic
from tests.brokers import Broker
from tests.daemon.conftest import END, Driver, _settings
from tests.daemon.test_processes import Rig, _cli, _wait
from tests.telemetry.helpers import Received, Recorder, recorder, until

QOS1_STREAMS = {stream for stream, spec in STREAMS.items() if spec.qos == 1}


def _assigned(data_dir: Path) -> tuple[dict[str, int], int]:
    """Per QoS 1 topic, the last seq the daemon's outbox assigned; and what it still holds."""
    db = sqlite3.connect(f"{(data_dir / 'telemetry-outbox.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        counters = dict(db.execute("SELECT name, value FROM counters WHERE name LIKE 'seq:%'"))
        pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        db.close()
    last = {name.removeprefix("seq:"): int(v) for name, v in counters.items()}
    return {t: n for t, n in last.items() if not t.endswith("/metrics")}, int(pending)


def _highest_seen(messages: list[Received], topics: dict[str, int]) -> dict[str, int]:
    highest: dict[str, int] = {}
    for m in messages:
        if m.topic in topics and m.payload[:1] == b"{":
            highest[m.topic] = max(highest.get(m.topic, 0), m.json()["seq"])
    return highest


def _all_delivered(rec: Recorder, data_dir: Path) -> tuple[list[Received], dict[str, int]]:
    """Wait until the subscriber holds every seq assigned so far (read afresh each time: a state
    change may still be published meanwhile); return its messages and the seqs assigned."""
    deadline = time.monotonic() + 20
    while True:
        assigned, _ = _assigned(data_dir)
        messages = rec.snapshot()
        seen = _highest_seen(messages, assigned)
        if seen == assigned:
            return messages, assigned
        if time.monotonic() > deadline:
            raise AssertionError(f"assigned {assigned}, the subscriber's highest {seen}")
        time.sleep(0.05)


def _check_delivery(messages: list[Received], assigned: dict[str, int]) -> None:
    """At least once, in order, de-duplicable, nothing missing: per QoS 1 topic."""
    arrivals: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        parsed = parse_topic(m.topic)
        assert parsed is not None, m.topic
        if parsed[3] in QOS1_STREAMS and m.payload not in (b"", b"online", b"offline"):
            arrivals[m.topic].append(m.json()["seq"])
    assert set(arrivals) == set(assigned), (sorted(arrivals), sorted(assigned))
    for topic, seqs in arrivals.items():
        highest = seqs[0] - 1
        seen: set[int] = set()
        for seq in seqs:
            if seq > highest:
                assert seq == highest + 1, f"{topic}: gap {highest} -> {seq}"
                highest = seq
            else:
                assert seq in seen, f"{topic}: {seq} arrived late, out of order"
            seen.add(seq)
        assert highest == assigned[topic], (
            f"{topic}: last seen {highest}, assigned {assigned[topic]}"
        )


async def test_a_broker_outage_mid_emission_loses_nothing_and_never_stops_the_laser(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> None:
    settings = _settings(
        tmp_path, policy_file, "sim", mqtt__url=mosquitto.url, mqtt__site="clinic1"
    )
    with recorder(mosquitto.port, client_id="dashboard", persistent=True) as rec:
        async with compose(settings) as daemon:
            drv = Driver(daemon)
            telemetry_up = lambda: daemon.telemetry is not None and daemon.telemetry.connected  # noqa: E731
            await drv.until(telemetry_up)
            await drv.emitting_session(rate_hz=100.0)
            await until(lambda: len(rec.on("pulses")) >= 3, what="pulse batches")

            mosquitto.stop()
            await drv.until(lambda: not daemon.telemetry.connected)
            before = daemon.treatment.pulses  # type: ignore[union-attr]
            await asyncio.sleep(4.0)  # several seconds without a broker, emitting all along
            assert daemon.armed and daemon.supervisor.latched is None  # type: ignore[union-attr]
            assert daemon.treatment.pulses >= before + 200  # type: ignore[union-attr]
            _, held = _assigned(daemon.data_dir)
            assert held > 0  # the outage's messages wait on disk

            mosquitto.start()
            await drv.until(telemetry_up, timeout=40)  # the daemon's backoff caps at 30 s
            drv.sim("footswitch up")
            await drv.ok("disarm")
            await drv.ok("session_end", **END)
            await until(lambda: _assigned(daemon.data_dir)[1] == 0, timeout=20, what="drained")
            assert daemon.supervisor.latched is None  # type: ignore[union-attr]
            messages, assigned = await asyncio.to_thread(_all_delivered, rec, daemon.data_dir)
    _check_delivery(messages, assigned)
    replayed = [m for m in messages if m.payload[:1] == b"{" and m.json().get("historical")]
    assert replayed, "messages held through the outage are delivered marked historical"


def test_kill_9_gives_the_last_will_and_the_restart_continues_seq_and_delivers(
    tmp_path: Path, mosquitto: Broker
) -> None:
    rig = Rig(tmp_path)
    rig.config.write_text(
        rig.config.read_text() + f'\n[mqtt]\nurl = "{mosquitto.url}"\nsite = "clinic1"\n'
    )
    try:
        rig.start_sim()
        with recorder(mosquitto.port, client_id="dashboard", persistent=True) as rec:
            rig.start_daemon()
            _wait(lambda: rec.on("availability"), timeout=20, what="online")
            rig.emit()
            _wait(lambda: len(rec.on("pulses")) >= 3, timeout=20, what="pulse batches")
            assert rig.daemon is not None
            rig.daemon.send_signal(signal.SIGKILL)
            rig.daemon.wait()
            _wait(
                lambda: rec.on("availability")[-1].payload == b"offline",
                timeout=20,
                what="the Last Will",
            )
            boot_before = max(m.json()["boot"] for m in rec.on("state"))
            # A dashboard connecting now reads the retained availability: offline.
            with recorder(mosquitto.port, client_id="late-dashboard") as late:
                _wait(lambda: late.on("availability"), what="retained availability")
                assert late.on("availability")[-1].payload == b"offline"
            # The board's lease stops it; the restart reconciles and drains what was left.
            time.sleep(2.0)
            rig.start_daemon()
            _wait(
                lambda: rec.on("availability")[-1].payload == b"online",
                timeout=20,
                what="online again",
            )
            out = _cli("session", "end", "--post-care", "sunscreen", "--control", str(rig.control))
            # The restart closed the killed session as interrupted: nothing is open to end.
            assert out.returncode == 1, out.stdout + out.stderr
            _wait(lambda: _assigned(rig.data)[1] == 0, what="the outbox drained")
            messages, assigned = _all_delivered(rec, rig.data)
    finally:
        rig.stop()
    _check_delivery(messages, assigned)
    boots = sorted({m.json()["boot"] for m in messages if m.topic.endswith("/state")})
    assert boots == [boot_before, boot_before + 1], boots
    events = [m.json() for m in messages if m.topic.endswith("/events")]
    ended = [e for e in events if e["event"] == "ended"]
    assert ended and ended[-1]["details"].get("outcome") == "interrupted", ended
    alerts = [m.json()["code"] for m in messages if m.topic.endswith("/alerts")]
    assert "session_interrupted" in alerts, alerts
