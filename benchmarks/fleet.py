"""Fleet recorder benchmark: a simulated fleet on a local mosquitto, recorders into PostgreSQL.

A load generator publishes the real telemetry contract — payloads built by the contract's own
models (``protocols/mqtt.py``) — for N simulated devices (not N daemons): a share of them treating
(one session each, a pulse batch every 100 ms at the given rate, a session summary every second),
the rest idle (metrics every second, state every 10 s); every device sends metrics (QoS 0). The
recorders are real ``devicectl recorder`` processes on one shared subscription, writing to a
throwaway PostgreSQL cluster started here (or ``--db URL``; ``--db sqlite`` for the embedded
store). Three runs: one recorder, two recorders, two recorders with one SIGKILLed mid-run and
restarted 3 s later (as a service manager would). For each: QoS 1 messages published (PUBACKed by
the broker), stored, lost (must be 0), messages/s and pulses/s stored, ingest lag p50/p99 (from a
message's ``ts`` to the recorder taking it off the broker for its next batch), rows/s and the
recorders' CPU per message.

    .venv/bin/python benchmarks/fleet.py                       # 1,000 devices, 20 s per run
    .venv/bin/python benchmarks/fleet.py --devices 200 --seconds 10 --runs one
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from devicectl.recorder import open_store, queries
from protocols.mqtt import (
    MetricsPayload,
    PulseBatchPayload,
    SessionEventPayload,
    SessionPayload,
    SessionSummary,
    StatePayload,
    Stream,
    TopicBase,
    encode_payload,
    pulse_batch_fields,
)
from tests.brokers import Broker
from tests.postgres import PostgresCluster, find_pg_bin

DEVICECTL = [sys.executable, "-c", "from devicectl.cli import main; main()"]


@dataclass
class SimDevice:
    """One simulated device's contract state: topics, per-topic seq, its session, pulse_no."""

    name: str
    treating: bool
    base: TopicBase = field(init=False)
    seqs: dict[str, int] = field(default_factory=dict)
    pulse_no: int = 0
    t_us: int = 0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        self.base = TopicBase("lasers", "bench", self.name)

    def envelope(self, topic: str) -> dict[str, object]:
        seq = self.seqs[topic] = self.seqs.get(topic, 0) + 1
        return {"v": 1, "ts": datetime.now(UTC), "device": self.name, "seq": seq, "boot": 1}

    def pulses(self, count: int, period_us: int) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.PULSES)
        first = self.pulse_no + 1
        batch = []
        for n in range(first, first + count):
            self.t_us = (self.t_us + period_us) & 0xFFFFFFFF
            batch.append((n, self.t_us, 1000 + n % 41))
        self.pulse_no += count
        payload = PulseBatchPayload(
            **self.envelope(topic),  # type: ignore[arg-type]
            **pulse_batch_fields(batch, session="1", zone="cheeks"),
        )
        return topic, encode_payload(payload)

    def summary(self, ended: bool = False) -> SessionSummary:
        now = datetime.now(UTC)
        return SessionSummary(
            session="1",
            operator="OP-1",
            patient=f"{abs(hash(self.name)):064x}"[-64:],
            skin_type="III",
            zone="cheeks",
            started=self.started,
            ended=now if ended else None,
            pulses=self.pulse_no,
            energy_uj=self.pulse_no * 1020,
            energy_uj_by_zone={"cheeks": self.pulse_no * 1020},
            duration_s=(now - self.started).total_seconds(),
        )

    def session(self) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.SESSION)
        return topic, encode_payload(
            SessionPayload(**self.envelope(topic), summary=self.summary())  # type: ignore[arg-type]
        )

    def event(self, event: str) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.SESSION_EVENTS, "1")
        payload = SessionEventPayload(
            **self.envelope(topic),  # type: ignore[arg-type]
            session="1",
            event=event,  # type: ignore[arg-type]
            details={"patient": self.summary().patient} if event == "started" else {},
            summary=self.summary(ended=True) if event == "ended" else None,
        )
        return topic, encode_payload(payload)

    def state(self) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.STATE)
        return topic, encode_payload(
            StatePayload(
                **self.envelope(topic),  # type: ignore[arg-type]
                state="EMITTING" if self.treating else "STANDBY",
                interlocks=[],
                faults=[],
                params=None,
                armed=self.treating,
                session="1" if self.treating else None,
                daemon_version="bench",
            )
        )

    def metrics(self) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.METRICS)
        return topic, encode_payload(
            MetricsPayload(
                **self.envelope(topic),  # type: ignore[arg-type]
                rate_hz=500.0 if self.treating else 0.0,
                avg_power_w=0.5 if self.treating else 0.0,
                skin_temp_c=33.0,
                head_temp_c=30.0,
                counters={"frames": self.pulse_no},
            )
        )


class Generator:
    """Publishes the fleet's load from one paho client (its own network thread)."""

    def __init__(self, port: int, devices: int, treating_share: float, rate_hz: int) -> None:
        treating = round(devices * treating_share)
        self.devices = [SimDevice(f"dev{n:05d}", n < treating) for n in range(devices)]
        self.rate_hz = rate_hz
        self.qos1_sent = 0
        self.qos1_acked = 0
        self.pulses_acked = 0
        self.behind_s = 0.0
        self._pulse_mids: dict[int, int] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-fleet", protocol=paho.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, _c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:  # never held across a paho call: paho holds its own locks here
            pulses = self._pulse_mids.pop(mid, None)
            if pulses is None:
                self._early.add(mid)  # acknowledged before _send noted it
            else:
                self._count(pulses)

    def _count(self, pulses: int) -> None:
        self.qos1_acked += 1
        self.pulses_acked += pulses

    def _send(self, message: tuple[str, bytes], qos: int, pulses: int = 0) -> None:
        info = self.client.publish(message[0], message[1], qos=qos)
        if qos == 1:
            with self._lock:
                self.qos1_sent += 1
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self._count(pulses)
                else:
                    self._pulse_mids[info.mid] = pulses

    def run(self, seconds: float, on_tick: object = None) -> None:
        per_batch = max(1, self.rate_hz // 10)
        period_us = 1_000_000 // self.rate_hz
        treating = [d for d in self.devices if d.treating]
        for device in treating:
            self._send(device.event("started"), 1)
        start = time.monotonic()
        tick = 0
        while (now := time.monotonic()) - start < seconds:
            if callable(on_tick):
                on_tick(now - start)
            for device in treating:
                self._send(device.pulses(per_batch, period_us), 1, per_batch)
            for n, device in enumerate(self.devices):
                if n % 10 == tick % 10:  # 1 Hz per device, spread over the 10 ticks
                    self._send(device.metrics(), 0)
                    if device.treating:
                        self._send(device.session(), 1)
                if n % 100 == tick % 100 and not device.treating:  # state every 10 s
                    self._send(device.state(), 1)
            tick += 1
            next_tick = start + tick * 0.1
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.behind_s = max(self.behind_s, -delay)
        for device in treating:
            self._send(device.event("ended"), 1)

    def wait_acked(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.qos1_acked < self.qos1_sent and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RecorderProcess:
    def __init__(self, broker: Broker, db_url: str, name: str, group: str, log: Path) -> None:
        self.args = [*DEVICECTL, "recorder", "--mqtt", broker.url, "--db", db_url,
                     "--client-id", name, "--group", group]  # fmt: skip
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.cpu_s = 0.0
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1

    def wait_subscribed(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count("recorder_subscribed") < self.starts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"recorder did not subscribe; see {self.log}")
            time.sleep(0.05)
        # CPU from here on: the interpreter's start-up is not the recorder's work.
        self.sample_cpu()
        self.cpu_s -= getattr(self, "_last_cpu", 0.0)

    def sample_cpu(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(self.process.pid).cpu_times()
                self._last_cpu = times.user + times.system

    def kill(self) -> None:
        assert self.process is not None
        self.sample_cpu()
        self.cpu_s += getattr(self, "_last_cpu", 0.0)
        self._last_cpu = 0.0
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.sample_cpu()
        self.cpu_s += getattr(self, "_last_cpu", 0.0)
        self._last_cpu = 0.0
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Outcome:
    name: str
    published: int
    stored: int
    pulses_published: int
    pulses_stored: int
    seconds: float
    lag_p50_s: float
    lag_p99_s: float
    rows: int
    every_message: int  # metrics (QoS 0) included
    recorder_cpu_s: float
    generator_behind_s: float

    @property
    def lost(self) -> int:
        return self.published - self.stored


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _measure(db_url: str) -> tuple[int, int, list[float], int, int]:
    async with await open_store(db_url, migrate=False) as store:
        counts = await queries.stored_counts(store)
        qos1 = await store.fetch("SELECT COUNT(*) FROM messages WHERE stream <> 'metrics'")
        rows = await store.fetch("SELECT ts, recorded FROM messages")
        other = 0
        for table in ("sessions", "session_ends", "boots"):
            other += int((await store.fetch(f"SELECT COUNT(*) FROM {table}"))[0][0])
    lags = [
        (datetime.fromisoformat(r[1].replace("Z", "+00:00"))
         - datetime.fromisoformat(r[0].replace("Z", "+00:00"))).total_seconds()
        for r in rows
    ]  # fmt: skip
    total_rows = counts["messages"] + counts["pulse_batches"] + other
    return int(qos1[0][0]), counts["pulses"], lags, total_rows, counts["messages"]


def run_once(
    name: str, broker: Broker, db_url: str, args: argparse.Namespace, tmp: Path, *, recorders: int,
    kill: bool,
) -> Outcome:  # fmt: skip
    import asyncio

    group = f"bench{abs(hash(name)) % 10_000}"
    procs = [
        RecorderProcess(broker, db_url, f"{group}-rec{n}", group, tmp / f"{group}-{n}.log")
        for n in range(recorders)
    ]
    asyncio.run(_migrate(db_url))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.wait_subscribed()
    generator = Generator(broker.port, args.devices, args.treating, args.rate_hz)
    killed_at: list[float] = []

    def on_tick(elapsed: float) -> None:
        for proc in procs:
            proc.sample_cpu()
        if kill and not killed_at and elapsed >= args.seconds / 2:
            procs[0].kill()
            killed_at.append(elapsed)
        if killed_at and len(killed_at) == 1 and elapsed >= killed_at[0] + 3:
            procs[0].start()  # the service manager restarts it, same client id
            killed_at.append(elapsed)

    began = time.monotonic()
    try:
        generator.run(args.seconds, on_tick)
        generator.wait_acked()
        if kill and len(killed_at) == 1:
            procs[0].start()
        published, pulses_published = generator.qos1_acked, generator.pulses_acked
        # Drain: until every PUBACKed QoS 1 message is stored (or 60 s).
        deadline = time.monotonic() + 60
        while True:
            stored, pulses_stored, lags, rows, every = asyncio.run(_measure(db_url))
            if stored >= published or time.monotonic() > deadline:
                break
            for proc in procs:
                proc.sample_cpu()
            time.sleep(0.5)
        elapsed = time.monotonic() - began
    finally:
        generator.close()
        for proc in procs:
            proc.stop()
    return Outcome(
        name,
        published,
        stored,
        pulses_published,
        pulses_stored,
        elapsed,
        _percentile(lags, 0.5),
        _percentile(lags, 0.99),
        rows,
        every,
        sum(p.cpu_s for p in procs),
        generator.behind_s,
    )


async def _migrate(db_url: str) -> None:
    async with await open_store(db_url):
        pass


@contextlib.contextmanager
def _databases(choice: str | None, tmp: Path) -> Iterator[object]:
    """Yields a function name -> fresh database URL."""
    if choice == "sqlite":
        yield lambda name: f"sqlite:///{tmp / (name + '.sqlite')}"
        return
    if choice:
        yield lambda _name: choice
        return
    import psycopg

    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl): pass --db URL")
    directory = Path(tempfile.mkdtemp(prefix="devicectl-bench-pg-"))
    user = None
    if os.geteuid() == 0:
        import pwd

        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cluster = PostgresCluster(bin_dir, directory, port, user)
    cluster.start()

    def fresh(name: str) -> str:
        with psycopg.connect(cluster.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return cluster.url(name)

    try:
        yield fresh
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--treating", type=float, default=0.10, help="share of devices treating")
    parser.add_argument("--rate-hz", type=int, default=500, help="pulse rate while treating")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per run")
    parser.add_argument("--db", default=None, help="a database URL, or sqlite (default: a "
                        "throwaway PostgreSQL cluster)")  # fmt: skip
    parser.add_argument(
        "--runs", default="one,two,killed", help="which runs: one, two, killed (comma-separated)"
    )
    args = parser.parse_args()
    runs = {
        "one": ("1 recorder", 1, False),
        "two": ("2 recorders", 2, False),
        "killed": ("2 recorders, one SIGKILLed mid-run", 2, True),
    }
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "mosquitto")
        broker.start()
        try:
            with _databases(args.db, tmp) as fresh:
                for key in args.runs.split(","):
                    name, recorders, kill = runs[key]
                    db_url = fresh(f"bench_{key}")  # type: ignore[operator]
                    print(f"running: {name} ...", file=sys.stderr, flush=True)
                    outcomes.append(
                        run_once(name, broker, db_url, args, tmp, recorders=recorders, kill=kill)
                    )
        finally:
            broker.stop()
    engine = "SQLite" if args.db == "sqlite" else "PostgreSQL"
    print(
        f"\n{args.devices} devices ({round(args.devices * args.treating)} treating at "
        f"{args.rate_hz} Hz, pulse batches every 100 ms), {args.seconds:g} s of load, "
        f"{engine}, mosquitto 2, {os.cpu_count()} cores (shared)\n"
    )
    print(
        "| run | QoS 1 published | stored | lost | msg/s stored | pulses/s stored | "
        "lag p50 | lag p99 | rows/s | recorder CPU µs/msg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        per_msg = o.recorder_cpu_s / o.every_message * 1e6 if o.every_message else float("nan")
        print(
            f"| {o.name} | {o.published:,} | {o.stored:,} | {o.lost:,} | "
            f"{o.stored / o.seconds:,.0f} | {o.pulses_stored / o.seconds:,.0f} | "
            f"{o.lag_p50_s * 1000:,.0f} ms | {o.lag_p99_s * 1000:,.0f} ms | "
            f"{o.rows / o.seconds:,.0f} | {per_msg:,.0f} |"
        )
    behind = max(o.generator_behind_s for o in outcomes)
    if behind > 0.1:
        print(f"\nthe load generator fell behind its schedule by up to {behind:.2f} s")
    print(
        "\nmsg/s and rows/s are over the whole run including the drain (stored / wall time); "
        "metrics (QoS 0) are stored too but not counted in published/lost; recorder CPU is "
        "per message of any stream, metrics included."
    )


if __name__ == "__main__":
    main()
