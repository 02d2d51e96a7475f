"""Helpers for the dashboard's system tests: a device-like paho publisher, the real daemon on its
in-process simulator publishing to a broker, and a dashboard server."""

from __future__ import annotations

import asyncio
import gc
import json
import queue
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicectl.config import Settings, load_settings
from devicectl.dashboard import (
    Backoff,
    Dashboard,
    DashboardConfig,
    DashboardServer,
    DisplayLimits,
)
from devicectl.simlink import compose
from tests.brokers import Broker
from tests.daemon.conftest import TEST_POLICY, Driver, add_test_users

BASE_TS = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


class FakeDevice:
    """Publishes to the broker as a devicectl daemon would (docs/mqtt.md), with paho."""

    def __init__(self, broker: Broker, site: str = "clinic-a", device: str = "laser-01") -> None:
        self.base = f"lasers/{site}/{device}"
        self.device = device
        self.seqs: dict[str, int] = {}
        self.commands: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client: paho.Client | None = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"devicectl-{device}", protocol=paho.MQTTv5
        )
        self.client.will_set(f"{self.base}/availability", b"offline", qos=1, retain=True)
        self.client.on_message = lambda _c, _u, message: self.commands.put(
            (message.topic, bytes(message.payload))
        )
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{self.base}/cmd/#", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        if self.client is None:
            return
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes the socket pair that wakes its loop thread only when the client is
        # collected; collect it now so that the suite's leak check sees it closed.
        self.client = None
        gc.collect()

    async def raw(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.client is not None, "this device has been closed"
        info = self.client.publish(f"{self.base}/{kind}", payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, 5.0)

    async def send(
        self, kind: str, *, retain: bool = False, at_s: float = 0.0, **fields: Any
    ) -> None:
        """A JSON payload with the envelope; ``seq`` counts per topic."""
        self.seqs[kind] = self.seqs.get(kind, 0) + 1
        ts = (BASE_TS + timedelta(seconds=at_s)).isoformat().replace("+00:00", "Z")
        envelope = {"v": 1, "ts": ts, "device": self.device, "seq": self.seqs[kind], "boot": 1}
        await self.raw(kind, json.dumps(envelope | fields).encode(), retain=retain)


@pytest.fixture
def fake_device(mosquitto: Broker) -> Iterator[FakeDevice]:
    device = FakeDevice(mosquitto)
    try:
        yield device
    finally:
        device.close()


async def wait_until_subscribed(dashboard: Dashboard, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        await dashboard.subscriber.subscribed.wait()


def dashboard_config(broker: Broker, **overrides: Any) -> DashboardConfig:
    fields: dict[str, Any] = {
        "mqtt_url": broker.url,
        "backoff": Backoff(0.05, 0.5),
        "limits": DisplayLimits({"forehead": 60.0, "cheeks": 80.0}, 300.0, 41.0),
    }
    return DashboardConfig(**(fields | overrides))


@asynccontextmanager
async def running_dashboard(config: DashboardConfig) -> AsyncIterator[DashboardServer]:
    """A dashboard served on a free port of 127.0.0.1, subscribed before it is handed out.

    A context manager rather than a fixture: the server's TaskGroup must be entered and left by
    the test's own task.
    """
    dashboard = Dashboard(config)
    async with DashboardServer(dashboard, ("127.0.0.1", 0)) as server:
        await wait_until_subscribed(dashboard)
        yield server


def daemon_settings(broker: Broker, directory: Path, site: str) -> Settings:
    """The daemon's settings for the in-process simulator (``port = "sim"``), publishing to
    ``broker``, with the daemon tests' policy, all under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.toml"
    policy.write_text(TEST_POLICY)
    add_test_users(directory / "data")
    return load_settings(
        None,
        port="sim",
        data_dir=directory / "data",
        control=directory / "ctl.sock",
        policy=policy,
        sim_max_rate_hz=5000,
        mqtt__url=broker.url,
        mqtt__site=site,
    )


@asynccontextmanager
async def running_daemon(
    broker: Broker, directory: Path, site: str = "clinic-a"
) -> AsyncIterator[Driver]:
    """The real daemon on its in-process simulator, handed out once its link is up, the device
    identified and its telemetry connected; left with an orderly shut-down.

    A context manager rather than a fixture, like :func:`running_dashboard`: the test decides
    when the daemon stops (the page must see it go offline).
    """
    async with compose(daemon_settings(broker, directory, site)) as daemon:
        driver = Driver(daemon)
        await driver.until(lambda: daemon.ident is not None and daemon.link is not None)
        await driver.until(lambda: daemon.link.connected.is_set())  # type: ignore[union-attr]
        await driver.until(lambda: daemon.telemetry is not None and daemon.telemetry.connected)
        yield driver
