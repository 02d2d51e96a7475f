"""Random topics and payloads on ``{base}/cmd/#`` over a real mosquitto, against the in-process
daemon while it emits: nothing crashes, every command but ``cmd/stop`` is refused and audited
(one record per burst, with its count), a retained ``cmd/stop`` is ignored, and a live
``cmd/stop`` with any payload stops the laser."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicectl.config import load_settings
from devicectl.simlink import compose
from tests.brokers import Broker
from tests.daemon.conftest import Driver, add_test_users, policy_file

__all__ = ["policy_file"]  # a fixture, imported for pytest

pytestmark = pytest.mark.system

SEED = 6
ROUNDS = 150
BASE = "lasers/fuzz/laser1"
LEVEL_CHARS = "abcSTOPstop-_.é 0\u202e"


@pytest.fixture
def fuzzer(mosquitto: Broker) -> Iterator[paho.Client]:
    """A paho client on the broker; it leaves a retained ``cmd/stop`` there before the daemon
    starts, so the daemon finds a stale stop when it subscribes."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=paho.MQTTv5)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.publish(f"{BASE}/cmd/stop", b"stale", qos=1, retain=True).wait_for_publish(5)
        yield client
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()


@pytest.fixture
async def mqtt_driver(
    tmp_path: Path, policy_file: Path, mosquitto: Broker, fuzzer: paho.Client
) -> AsyncIterator[Driver]:
    settings = load_settings(
        None,
        port="sim",
        data_dir=tmp_path / "data",
        control=tmp_path / "ctl.sock",
        policy=policy_file,
        sim_max_rate_hz=5000,
        mqtt__url=mosquitto.url,
        mqtt__site="fuzz",
        mqtt__device="laser1",
    )
    add_test_users(tmp_path / "data")
    async with compose(settings) as daemon:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        await drv.until(lambda: daemon.telemetry is not None)
        yield drv


def random_command(rng: random.Random) -> str:
    """A command topic under ``{base}/cmd/`` that is not exactly ``stop`` (wildcards cannot be
    published)."""
    while True:
        levels = [
            "".join(rng.choice(LEVEL_CHARS) for _ in range(rng.randint(0, 8)))
            for _ in range(rng.randint(1, 3))
        ]
        command = "/".join(levels)
        if command != "stop":
            return command


def _remote_events(db: Path) -> list[dict[str, Any]]:
    """The session log's events from MQTT: ``remote_command_ignored``, ``_refused``, ``stop``."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT body FROM records WHERE kind = 'event'").fetchall()
    finally:
        conn.close()
    events = [json.loads(body) for (body,) in rows]
    return [e for e in events if e.get("actor") == "mqtt"]


async def test_random_commands_never_crash_and_only_a_live_stop_stops(
    mqtt_driver: Driver, fuzzer: paho.Client
) -> None:
    drv = mqtt_driver
    daemon = drv.daemon
    await drv.emitting_session(rate_hz=50.0)
    assert daemon.sessionlog is not None
    db = daemon.data_dir / "sessions.db"

    async def remote_events() -> list[dict[str, Any]]:
        assert daemon.sessionlog is not None
        await daemon.sessionlog.flush_async()
        return _remote_events(db)

    def flood() -> None:
        rng = random.Random(SEED)
        for _ in range(ROUNDS):
            fuzzer.publish(
                f"{BASE}/cmd/{random_command(rng)}",
                rng.randbytes(rng.choice([0, 1, 17, 300, 5000])),
                qos=rng.choice([0, 1]),
                retain=rng.random() < 0.2,  # delivered live all the same: refused like the rest
            ).wait_for_publish(5)

    # Subscribed (telemetry runs in a process of its own, which connects and subscribes in its
    # own time): the stale retained stop has been found and ignored.
    for _ in range(500):
        if any(e["event"] == "remote_command_ignored" for e in await remote_events()):
            break
        await asyncio.sleep(0.02)
    # From a thread: the daemon (and its in-process board) share this test's event loop.
    await asyncio.to_thread(flood)

    def refused(events: list[dict[str, Any]]) -> int:
        return sum(e["detail"]["count"] for e in events if e["event"] == "remote_command_refused")

    events: list[dict[str, Any]] = []
    for _ in range(500):
        events = await remote_events()
        if refused(events) >= ROUNDS:
            break
        await asyncio.sleep(0.02)
    # Every command refused and audited, one record per burst; the stale retained stop found at
    # subscription ignored (and audited as such, first).
    kinds = [e["event"] for e in events]
    assert kinds == ["remote_command_ignored"] + ["remote_command_refused"] * (len(kinds) - 1)
    assert refused(events) == ROUNDS
    status = await drv.ok("status")
    assert status["armed"] and status["connected"], status
    assert drv.sim("status")["emitting"]
    # A live stop, whatever its payload, stops emission and is audited.
    fuzzer.publish(f"{BASE}/cmd/stop", b"\xff{not json", qos=1).wait_for_publish(5)
    await drv.until(lambda: not drv.sim("status")["emitting"])
    assert not (await drv.ok("status"))["armed"]
    assert (await remote_events())[-1]["event"] == "stop"
