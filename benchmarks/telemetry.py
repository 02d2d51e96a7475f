"""Telemetry benchmarks on a local mosquitto (started here, as in the tests). Prints a table.

    .venv/bin/python benchmarks/telemetry.py [--messages 20000] [--seconds 5]

1. QoS 1 throughput, 100-byte payloads: a plain paho-mqtt publisher (20 in flight) against
   devicectl's publisher draining its SQLite outbox (20 in flight), and through the public
   ``publish_alert`` path (pydantic model, outbox write, publish). Same broker, same run.
2. Pulse-to-subscriber lag at 5,000 offered pulses/s: offer_pulse() to the moment a paho
   subscriber holds the batch carrying that pulse (p50/p99).
3. Cost on the caller: offer_pulse() per call, one outbox write (insert + commit).

Compare ratios within one run; these machines are noisy (±20 %).
"""

# ruff: noqa: ASYNC110  (polling the publisher's counters is what a benchmark observes)
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from devicectl.logs import configure_logging  # noqa: E402
from devicectl.telemetry import Outbox, Telemetry, TelemetryConfig  # noqa: E402
from tests.brokers import Broker  # noqa: E402

PAYLOAD = b"x" * 100


def paho_throughput(port: int, n: int, protocol: int = paho.MQTTv5) -> tuple[float, float]:
    """(msg/s, CPU µs of this process per message)."""
    done = threading.Event()
    acked = 0

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=protocol)
    client.max_inflight_messages_set(20)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        client.publish("bench/paho", PAYLOAD, qos=1)
    done.wait(120)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return n / elapsed, cpu / n * 1e6


def _config(url: str, data: Path, **extra: object) -> TelemetryConfig:
    return TelemetryConfig(url=url, site="bench", device="SN1", data_dir=data, **extra)  # type: ignore[arg-type]


async def outbox_throughput(url: str, data: Path, n: int) -> tuple[float, float, float]:
    """(msg/s draining a pre-filled outbox, CPU µs per message, µs per outbox write)."""
    cfg = _config(url, data)
    outbox = Outbox(cfg.outbox_path)
    outbox.start_boot()
    started = time.perf_counter()
    for _ in range(n):
        outbox.enqueue("lasers/bench/SN1/alerts", "alerts", lambda _seq: PAYLOAD)
    write_us = (time.perf_counter() - started) / n * 1e6
    outbox.close()
    async with Telemetry(cfg) as tm:
        while not tm.connected:
            await asyncio.sleep(0.001)
        started, cpu = time.perf_counter(), time.process_time()
        while tm.stats.outbox_depth:
            await asyncio.sleep(0.001)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return n / elapsed, cpu / n * 1e6, write_us


async def public_path_throughput(url: str, data: Path, n: int) -> float:
    async with Telemetry(_config(url, data)) as tm:
        while not tm.connected:
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        for i in range(n):
            tm.publish_alert("info", "bench", "x" * 20, float(i))
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the sender run, as a daemon's loop would
        while tm.stats.outbox_depth:
            await asyncio.sleep(0.001)
        return n / (time.perf_counter() - started)


async def pulse_lag(port: int, url: str, data: Path, seconds: float, rate: int) -> list[float]:
    offered: dict[int, float] = {}
    lags: list[float] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        batch = json.loads(msg.payload)
        with lock:
            lags.extend(now - offered[p[0]] for p in batch["pulses"])

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("lasers/bench/SN1/pulses", qos=1)
    sub.loop_start()
    try:
        async with Telemetry(_config(url, data)) as tm:
            while not tm.connected:
                await asyncio.sleep(0.001)
            total = int(seconds * rate)
            started = time.perf_counter()
            pulse_no = 0
            while pulse_no < total:
                due = int((time.perf_counter() - started) * rate)
                while pulse_no < min(due, total):
                    pulse_no += 1
                    offered[pulse_no] = time.perf_counter()
                    tm.offer_pulse(pulse_no, pulse_no * 200, 1000, "cheeks", "S-bench")
                await asyncio.sleep(0.001)
            deadline = time.perf_counter() + 10
            while len(lags) < total and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
    finally:
        sub.disconnect()
        sub.loop_stop()
    return lags


def offer_pulse_cost(data: Path) -> float:
    async def run() -> float:
        async with Telemetry(_config("mqtt://127.0.0.1:1", data, handoff_capacity=10**7)) as tm:
            n = 1_000_000
            offer = tm.offer_pulse
            started = time.perf_counter()
            for i in range(n):
                offer(i, i, 1000, "neck", "S")
            elapsed = time.perf_counter() - started
            tm._pulse_buf.clear()  # not a benchmark of batching 1e6 pulses
            return elapsed / n * 1e9

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging(json=True, level="error")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Broker(root / "broker") as broker:
            # alternate the two publishers so that machine noise hits both alike; medians
            paho_rates, drain_rates, writes, paho_cpus, drain_cpus = [], [], [], [], []
            v311_rates = []
            for round_no in range(args.rounds):
                v311_rates.append(paho_throughput(broker.port, args.messages, paho.MQTTv311)[0])
                rate, cpu_us = paho_throughput(broker.port, args.messages)
                paho_rates.append(rate)
                paho_cpus.append(cpu_us)
                rate, cpu_us, write_us = asyncio.run(
                    outbox_throughput(broker.url, root / f"d1-{round_no}", args.messages)
                )
                drain_rates.append(rate)
                drain_cpus.append(cpu_us)
                writes.append(write_us)
            paho_rate = statistics.median(paho_rates)
            v311_rate = statistics.median(v311_rates)
            drain_rate = statistics.median(drain_rates)
            paho_cpu, drain_cpu = statistics.median(paho_cpus), statistics.median(drain_cpus)
            write_us = statistics.median(writes)
            public_rate = asyncio.run(
                public_path_throughput(broker.url, root / "d2", args.messages)
            )
            lags = asyncio.run(
                pulse_lag(broker.port, broker.url, root / "d3", args.seconds, args.rate)
            )
        offer_ns = offer_pulse_cost(root / "d4")
    quantiles = statistics.quantiles(lags, n=100) if len(lags) > 1 else [float("nan")] * 99
    rows = [
        (
            "paho-mqtt MQTT 3.1.1 QoS 1, 20 in flight",
            f"{v311_rate:,.0f} msg/s",
            "no v5 properties to parse on PUBACK; rounds: "
            + ", ".join(f"{r:,.0f}" for r in v311_rates),
        ),
        (
            "paho-mqtt MQTT 5 QoS 1, 20 in flight",
            f"{paho_rate:,.0f} msg/s",
            "reference (same protocol as devicectl); rounds: "
            + ", ".join(f"{r:,.0f}" for r in paho_rates),
        ),
        (
            "devicectl outbox drain MQTT 5 QoS 1, 20 in flight",
            f"{drain_rate:,.0f} msg/s",
            f"{drain_rate / paho_rate:.0%} of paho (target >= 80 %); rounds: "
            + ", ".join(f"{r:,.0f}" for r in drain_rates),
        ),
        (
            "devicectl publish_alert() end to end",
            f"{public_rate:,.0f} msg/s",
            f"{public_rate / paho_rate:.0%} of paho",
        ),
        (
            "CPU per message (this process): paho / devicectl",
            f"{paho_cpu:.0f} / {drain_cpu:.0f} us",
            "less noisy than msg/s on a shared machine",
        ),
        ("outbox write (insert + commit, WAL)", f"{write_us:.1f} us", "per message"),
        ("offer_pulse()", f"{offer_ns:.0f} ns", "per call"),
        (
            f"pulse lag at {args.rate:,}/s ({len(lags):,} pulses)",
            f"p50 {quantiles[49] * 1e3:.1f} ms",
            f"p99 {quantiles[98] * 1e3:.1f} ms (batches every 100 ms)",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>16}  note")
    print("-" * (width + 50))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")


if __name__ == "__main__":
    main()
