"""A churn soak of the dashboard: two rounds of 5,000 new devices each (the view keeps 500) while
500 clients from 25 addresses connect at once (at most 100 open; half of the clients never read,
the others read and answer their pings). Memory stays flat from the first round to the last, the
view and the pages stay within their bounds, the clients that do not read are dropped, and a real
alarm still reaches the pages that read. Runs in tens of seconds; memory growth is judged, timings
only printed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokers import Broker
from tests.dashboard.conftest import (
    ChunkedBody,
    FakeDevice,
    dashboard_config,
    http,
    running_dashboard,
)

pytestmark = pytest.mark.system

DEVICES = 5_000
CLIENTS = 500
MAX_BROWSERS = 100
ADDRESSES = 25  # clients come from 127.0.0.2 … 127.0.0.26, 20 each: the cap per address
ROUNDS = 2
FLAT_MIB = 40.0  # growth allowed from the end of round 1 to the end of the last round


def rss_mib() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def publish_round(broker: Broker, round_no: int) -> int:
    """Every one of DEVICES new devices publishes its state and an alert; QoS 1."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"churn-{round_no}")
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    sent = 0
    try:
        last = None
        for n in range(DEVICES):
            device = f"r{round_no}-d{n}"
            base = f"lasers/churn/{device}"
            envelope = {"v": 1, "ts": "2026-11-25T10:00:00Z", "device": device, "seq": 1, "boot": 1}
            state = envelope | {"state": "READY", "interlocks": [], "faults": [], "params": None,
                                "armed": False, "session": None, "daemon_version": "1"}  # fmt: skip
            alert = envelope | {"severity": "warning", "code": "churn", "message": "m" * 200}
            client.publish(f"{base}/state", json.dumps(state).encode(), qos=1)
            last = client.publish(f"{base}/alerts", json.dumps(alert).encode(), qos=1)
            sent += 2
        assert last is not None
        last.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()
        del client
        gc.collect()
    return sent


class Page:
    """One /events client: reads everything, answering its pings, looking for a needle; or reads
    nothing at all."""

    def __init__(self, url: str, *, reads: bool, source: str) -> None:
        self.url, self.reads, self.source = url, reads, source
        self.status = 0
        self.received = 0
        self.found_at: float | None = None
        self.ended = False  # the dashboard ended its stream (evicted)
        self.needle = b""
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        assert parts.port is not None
        reader, self.writer = await asyncio.open_connection(
            parts.hostname, parts.port, limit=1024, local_addr=(self.source, 0)
        )
        self.writer.write(f"GET /events HTTP/1.1\r\nhost: {parts.netloc}\r\n\r\n".encode())
        self.status = int((await reader.readline()).split()[1])
        self.body = ChunkedBody(reader)

    async def read(self) -> None:
        pieces: list[bytes] = []  # of the event being received (a snapshot can be megabytes)
        while self.reads:
            chunk = await self.body.read()
            if not chunk:
                self.ended = True
                return
            self.received += len(chunk)
            tail = pieces[-1][-1:] if pieces else b""
            if b"\n\n" not in tail + chunk:
                pieces.append(chunk)
                continue
            *events, rest = b"".join([*pieces, chunk]).split(b"\n\n")
            pieces = [rest]
            for event in events:
                if self.needle and self.found_at is None and self.needle in event:
                    self.found_at = time.monotonic()
                if event.startswith(b"event: ping\ndata: "):
                    token = json.loads(event.split(b"data: ", 1)[1])
                    await http(self.url, "POST", "/events/ack", {"token": token})

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def test_memory_stays_flat_under_device_churn_and_500_clients(
    mosquitto: Broker, tmp_path: Path
) -> None:
    config = dashboard_config(
        mosquitto,
        max_devices=500,
        max_browsers=MAX_BROWSERS,
        send_timeout_s=2.0,
        keepalive_s=1.0,
        ack_timeout_s=5.0,
    )
    device = FakeDevice(mosquitto)
    pages: list[Page] = []
    readers: list[asyncio.Task[None]] = []
    try:
        async with running_dashboard(config) as server:
            dashboard = server.dashboard
            pages = [
                Page(server.url, reads=n % 2 == 0, source=f"127.0.0.{2 + n % ADDRESSES}")
                for n in range(CLIENTS)
            ]
            for start in range(0, CLIENTS, 50):
                batch = pages[start : start + 50]
                await asyncio.gather(*(page.open() for page in batch))
                readers += [asyncio.create_task(p.read(), name="soak-page") for p in batch]
            # Every client is served: one that does not show it reads makes room for a new one.
            assert all(page.status == 200 for page in pages)
            assert dashboard.pages.open <= MAX_BROWSERS
            assert dashboard.pages.evicted > 0
            served = pages

            samples: list[float] = []
            expected = dashboard.subscriber.messages
            started = time.monotonic()
            for round_no in range(ROUNDS):
                expected += await asyncio.to_thread(publish_round, mosquitto, round_no)
                async with asyncio.timeout(120):
                    while dashboard.subscriber.messages < expected:  # noqa: ASYNC110 - a counter
                        await asyncio.sleep(0.1)
                samples.append(rss_mib())
                assert dashboard.fleet.device_count <= 500
                assert dashboard.pages.open <= MAX_BROWSERS
                assert len(dashboard.snapshot_text()) < 5_000_000
            elapsed = time.monotonic() - started
            print(
                f"soak: {ROUNDS} rounds of {DEVICES} devices in {elapsed:.1f} s; RSS per round "
                f"{[round(s, 1) for s in samples]} MiB; pages still open {dashboard.hub.browsers}"
            )
            assert samples[-1] - samples[0] < FLAT_MIB, samples
            # The pages that never read were dropped; the reading ones still open were kept.
            still_reading = [p for p in served if p.reads and not p.ended]
            print(f"soak: pages {dashboard.pages_status()}")
            assert still_reading
            assert dashboard.pages.open == len(still_reading)
            assert dashboard.pages.dropped > 0

            # A real alarm still reaches the pages that read, promptly.
            needle = b"door_SOAK"
            for page in served:
                page.needle = needle
            await device.raw("availability", b"online")
            sent = time.monotonic()
            await device.send("alerts", severity="critical", code=needle.decode(), message="m")
            async with asyncio.timeout(30):
                while not all(p.found_at for p in still_reading):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            took = min(p.found_at for p in served if p.found_at is not None) - sent
            print(f"soak: the real alert reached a reading page {took * 1000:.0f} ms after it")
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for page in pages:
            await page.close()
        device.close()
