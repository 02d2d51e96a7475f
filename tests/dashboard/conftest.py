"""Helpers for the dashboard's system tests: a device-like paho publisher, the real daemon on its
in-process simulator publishing to a broker, a dashboard server, a plain HTTP client, an event
stream client that reads like the page (answering its pings), and one that never reads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import queue
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


async def http(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection (the suite has no HTTP client library);
    ``source``: the local address to send it from (any 127.x.y.z is this machine)."""
    parts = urlsplit(base)
    assert parts.hostname is not None
    assert parts.port is not None
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    head = {"host": parts.netloc, "connection": "close", "content-length": str(len(data))}
    head |= headers or {}
    if body is not None and not isinstance(body, bytes):
        head.setdefault("content-type", "application/json")
    request = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    local = None if source is None else (source, 0)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, local_addr=local)
    try:
        writer.write(request.encode() + b"\r\n" + data)
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    header_block, _, content = raw.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), fields, content


class ChunkedBody:
    """The body of a chunked HTTP/1.1 response (as the event stream is sent), piece by piece."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.headers_read = False

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end or when the connection closes."""
        try:
            if not self.headers_read:
                await self.reader.readuntil(b"\r\n\r\n")
                self.headers_read = True
            size = int((await self.reader.readline()).strip() or b"0", 16)
            if size == 0:
                return b""
            piece = await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        return piece


class EventStream:
    """A plain HTTP client of ``/events`` that reads it as the page does: it answers every
    ``ping`` with its token (``POST /events/ack``) unless ``answers`` is False."""

    def __init__(self, url: str, *, source: str = "127.0.0.1", answers: bool = True) -> None:
        self.url, self.source, self.answers = url, source, answers
        self.status = 0
        self.pings = 0
        self.events: list[tuple[str, Any]] = []
        self.body: ChunkedBody | None = None
        self.pending = b""
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> int:
        """Send the request and read the status line; the status (200, or 503 when refused)."""
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        assert parts.port is not None
        reader, self.writer = await asyncio.open_connection(
            parts.hostname, parts.port, local_addr=(self.source, 0)
        )
        self.writer.write(f"GET /events HTTP/1.1\r\nhost: {parts.netloc}\r\n\r\n".encode())
        line = await reader.readline()
        self.status = int(line.split()[1]) if line else 0
        self.body = ChunkedBody(reader)
        return self.status

    async def _line(self) -> str | None:
        assert self.body is not None, "open() first"
        while b"\n" not in self.pending:
            piece = await self.body.read()
            if not piece:
                return None
            self.pending += piece
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    async def next_event(self) -> tuple[str, Any]:
        """The next event other than a ping, as (event, data); ("", None) once the stream ends."""
        event = ""
        while True:
            line = await self._line()
            if line is None:
                return "", None
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event:
                data = json.loads(line[len("data: ") :])
                if event != "ping":
                    return event, data
                if self.answers:
                    await http(self.url, "POST", "/events/ack", {"token": data})
                self.pings += 1
                event = ""

    async def follow(self) -> None:
        """Read (and answer pings) until the stream ends, keeping every event in ``events``."""
        while True:
            event, data = await self.next_event()
            if not event:
                return
            self.events.append((event, data))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


def never_reading_stream(url: str, source: str = "127.0.0.1") -> socket.socket:
    """A raw socket that asks for ``/events`` and then never reads a byte, with a receive
    buffer as small as the kernel allows: the hostile client of issue 17."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.bind((source, 0))
        sock.connect((parts.hostname, parts.port))
        sock.sendall(f"GET /events HTTP/1.1\r\nhost: {parts.netloc}\r\n\r\n".encode())
    except OSError:
        sock.close()
        raise
    return sock


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
