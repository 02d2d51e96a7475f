"""The broker going away, the publisher restarting, the publisher being killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from devicectl.telemetry import Telemetry
from protocols.mqtt import Stream, json_schemas, schema_id
from tests.brokers import Broker
from tests.telemetry.helpers import Received, config, recorder, until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def _seqs_in_order(messages: list[Received]) -> dict[str, list[int]]:
    """Per topic: the seqs seen, after dropping repeats of already-seen seqs (at-least-once)."""
    seen: dict[str, list[int]] = {}
    for message in messages:
        if not message.payload or message.topic.endswith("/availability"):
            continue
        seq = message.json()["seq"]
        values = seen.setdefault(message.topic, [])
        if seq in values:
            continue  # a repeat: allowed (a PUBACK lost with the connection)
        values.append(seq)
    return seen


async def test_outage_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    """Publish while mosquitto is stopped for a while: a persistent QoS 1 subscriber still sees
    every seq of every topic, in order; what waited in the outbox is marked historical."""
    with (
        Broker(tmp_path / "broker") as broker,
        recorder(broker.port, client_id="persistent-dashboard", persistent=True) as rec,
    ):
        async with Telemetry(config(broker.url, tmp_path / "data")) as tm:
            await until(lambda: tm.connected, what="first connection")
            pulse_no = 0

            async def produce(rounds: int) -> None:
                nonlocal pulse_no
                for _ in range(rounds):
                    for _ in range(20):
                        pulse_no += 1
                        tm.offer_pulse(pulse_no, pulse_no * 1000, 1000, "neck", "S-9")
                    tm.publish_alert("info", "tick", f"round at pulse {pulse_no}")
                    tm.publish_state(state="EMITTING", armed=True, session="S-9")
                    await asyncio.sleep(0.02)

            await produce(10)
            broker.stop()
            await until(lambda: not tm.connected, what="the publisher noticing the outage")
            started = time.monotonic()
            await produce(30)  # the caller never waits on the broker
            assert time.monotonic() - started < 10
            assert tm.stats.outbox_depth > 0
            broker.start()
            await until(lambda: tm.connected, what="reconnection")
            await produce(10)
            await until(lambda: tm.stats.outbox_depth == 0, what="outbox drained")
            expected = {
                "alerts": 50, "state": 50, "pulses": tm.stats.pulse_batches,
            }  # fmt: skip
        await until(
            lambda: all(
                len(_seqs_in_order(rec.snapshot()).get(f"lasers/clinic1/SN42/{name}", [])) >= count
                for name, count in expected.items()
            ),
            timeout=15,
            what="the subscriber to catch up",
        )
        messages = rec.snapshot()

    for topic, seqs in _seqs_in_order(messages).items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{topic}: gap or reorder"
    schemas = json_schemas()
    for message in messages:
        if message.payload and not message.topic.endswith("/availability"):
            stream = message.topic.rsplit("/", 1)[1]
            jsonschema.validate(message.json(), schemas[stream])  # historical ones too
    pulses = [m.json() for m in messages if m.topic.endswith("/pulses")]
    delivered = {n for batch in pulses for n, _t, _e in batch["pulses"]}
    assert delivered == set(range(1, pulse_no + 1))
    assert any(m.get("historical") is True for m in pulses), "outage backlog not marked"
    assert not pulses[0].get("historical")


async def test_restart_continues_seq_and_replays_leftovers(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Messages queued while the broker was unreachable survive the daemon's exit; the next run
    delivers them with historical=true and its own messages continue each topic's seq."""
    data = tmp_path / "data"
    unreachable = config("mqtt://127.0.0.1:1", data)
    async with Telemetry(unreachable) as first:
        for n in range(5):
            first.publish_alert("warning", "queued", f"alert {n}")
        first.publish_state(state="STANDBY")
        assert first.boot == 1
        assert not first.connected
    with recorder(mosquitto.port) as rec:
        async with Telemetry(config(mosquitto.url, data)) as second:
            assert second.boot == 2
            await until(lambda: second.connected)
            second.publish_alert("info", "fresh", "after restart")
            await until(lambda: len(rec.on("alerts")) >= 6, what="alerts")
        alerts = [m.json() for m in rec.on("alerts")]
    assert [a["seq"] for a in alerts] == [1, 2, 3, 4, 5, 6]
    assert all(a["historical"] is True and a["boot"] == 1 for a in alerts[:5])
    assert "historical" not in alerts[5]
    assert alerts[5]["boot"] == 2


async def test_a_backlog_built_while_the_broker_was_down_at_start_is_historical(
    tmp_path: Path,
) -> None:
    """Same boot, broker down when the daemon starts: what waited through the failed attempts
    is delivered late, so marked historical, though no connection had succeeded yet; what is
    published once connected is not."""
    with Broker(tmp_path / "broker") as broker:
        with recorder(broker.port, client_id="persistent-dashboard", persistent=True) as rec:
            broker.stop()  # the subscriber's session survives (broker persistence)
            async with Telemetry(config(broker.url, tmp_path / "data")) as tm:
                for n in range(3):
                    tm.publish_alert("warning", "while_down", f"alert {n}")
                await until(lambda: tm.stats.connect_failures >= 1, what="a failed attempt")
                broker.start()
                await until(lambda: tm.connected, what="the first connection")
                await until(lambda: tm.stats.outbox_depth == 0, what="the backlog delivered")
                tm.publish_alert("info", "fresh", "after connecting")
                await until(lambda: len(rec.on("alerts")) >= 4, timeout=15, what="4 alerts")
            assert tm.stats.connects == 1
        alerts = [m.json() for m in rec.on("alerts")]
    assert [a["seq"] for a in alerts] == [1, 2, 3, 4]
    assert all(a["boot"] == 1 for a in alerts)
    assert [a.get("historical") for a in alerts] == [True, True, True, None]


_KILLED_PUBLISHER = """
import asyncio, sys
from pathlib import Path
from devicectl.logs import configure_logging
from devicectl.telemetry import Telemetry, TelemetryConfig

async def main() -> None:
    configure_logging(json=True)
    config = TelemetryConfig(
        url=sys.argv[1], site="clinic1", device="SN42", data_dir=Path(sys.argv[2])
    )
    async with Telemetry(config) as tm:
        while not tm.connected:
            await asyncio.sleep(0.02)
        tm.publish_state(state="STANDBY")
        while tm.stats.outbox_depth:
            await asyncio.sleep(0.02)
        print("connected", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_killed_publisher_leaves_retained_offline_will(
    mosquitto: Broker, tmp_path: Path
) -> None:
    process = subprocess.Popen(  # noqa: ASYNC220 - killed below, never awaited
        [sys.executable, "-c", _KILLED_PUBLISHER, mosquitto.url, str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.strip() == b"connected"
        with recorder(mosquitto.port, retain_as_published=False) as before:
            await until(lambda: bool(before.on("availability")))
            assert before.on("availability")[0].payload == b"online"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    with recorder(mosquitto.port, retain_as_published=False) as after:
        await until(
            lambda: any(m.payload == b"offline" and m.retain for m in after.on("availability")),
            what="retained Last Will",
        )
    will = next(m for m in after.on("availability") if m.payload == b"offline")
    # the Will names its run, so a dashboard can tell a late one from the current run's
    assert will.user_properties == {"schema": schema_id(Stream.AVAILABILITY), "boot": "1"}
    assert before.on("availability")[0].user_properties["boot"] == "1"
