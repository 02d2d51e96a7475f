"""Dashboard against clients that open the event stream and never read (issue 17).

A real ``devicectl dashboard`` process on a local mosquitto; N raw sockets, 20 from each of N/20
loopback addresses, each with the smallest receive buffer the kernel allows, ask for ``/events``
and never read. Then a page (a plain HTTP client that reads and answers its pings, as the page's
script does) opens the stream, and a device publishes a critical alert. Per N: whether the page
was served, how long until it had the alert, the dashboard's RSS, what ``/healthz`` said, and how
many pages were open, evicted and dropped.

    .venv/bin/python benchmarks/dashboard_idle.py                 # N = 0, 100, 500, 1000
    .venv/bin/python benchmarks/dashboard_idle.py --idle 0 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from tests.brokers import Broker
from tests.dashboard.conftest import EventStream, FakeDevice, http, never_reading_stream


@dataclass
class Row:
    idle: int
    served: int  # the page's HTTP status
    open_ms: float
    alert_ms: float | None
    rss_before_mib: float
    rss_idle_mib: float
    healthz: int
    pages: dict[str, Any]


def one_run(broker: Broker, idle_count: int) -> Row:
    """One dashboard process, ``idle_count`` sockets that never read, then a page and an alert."""
    process = subprocess.Popen(
        [sys.executable, "-c", "from devicectl.cli import main; main()", "dashboard",
         "--mqtt", broker.url, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    device = FakeDevice(broker)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().decode().strip()
        return asyncio.run(measure(url, psutil.Process(process.pid), device, idle_count))
    finally:
        device.close()
        process.terminate()
        process.wait(10)


async def measure(url: str, dashboard: psutil.Process, device: FakeDevice, idle_count: int) -> Row:
    idle: list[socket.socket] = []
    page: EventStream | None = None
    try:
        await asyncio.sleep(1.0)
        rss_before = dashboard.memory_info().rss / 2**20
        idle = [never_reading_stream(url, f"127.0.1.{1 + n // 20}") for n in range(idle_count)]
        await asyncio.sleep(2.0)
        health_status, _, content = await http(url, "GET", "/healthz")
        pages = json.loads(content)["pages"]
        rss_idle = dashboard.memory_info().rss / 2**20
        page = EventStream(url)
        started = time.monotonic()
        status = await page.open()
        served_ms = (time.monotonic() - started) * 1000
        alert_ms: float | None = None
        if status == 200:
            event, _ = await page.next_event()
            assert event == "snapshot"
            code = f"door_{idle_count}"
            sent = time.monotonic()
            await device.send("alerts", severity="critical", code=code, message="door opened")
            async with asyncio.timeout(30):
                while True:
                    event, data = await page.next_event()
                    if event == "delta" and any(
                        op["op"] == "alert" and op["alert"]["code"] == code for op in data
                    ):
                        alert_ms = (time.monotonic() - sent) * 1000
                        break
        return Row(
            idle_count, status, served_ms, alert_ms, rss_before, rss_idle, health_status, pages
        )
    finally:
        if page is not None:
            await page.close()
        for sock in idle:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, nargs="+", default=[0, 100, 500, 1000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Broker(Path(tmp) / "mosquitto") as broker:
        rows = [one_run(broker, count) for count in args.idle]
    print(f"{'idle':>5} {'page':>5} {'open ms':>8} {'alert ms':>9} {'RSS MiB':>14} "
          f"{'healthz':>8} {'open':>5} {'evicted':>8} {'dropped':>8}")  # fmt: skip
    for row in rows:
        pages = row.pages
        alert = "-" if row.alert_ms is None else f"{row.alert_ms:.0f}"
        print(
            f"{row.idle:>5} {row.served:>5} {row.open_ms:>8.0f} {alert:>9} "
            f"{row.rss_before_mib:>6.0f} → {row.rss_idle_mib:<5.0f} {row.healthz:>8} "
            f"{pages['open']:>5} {pages['evicted']:>8} {pages['dropped']:>8}"
        )


if __name__ == "__main__":
    main()
