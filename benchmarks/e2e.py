"""End-to-end figures for the daemon (issue 3): pty throughput and breach-to-STOP latency.

The simulator board runs in this process behind a real pseudo-terminal; the daemon runs as its own
process (`devicectl run --port /dev/pts/N`), exactly as on a device. Measured:

* sustained rate: the board fires at the rate asked for (default 5,000 pulses/s) for a few seconds;
  the daemon must account for every pulse (session pulses == the board's pulse count delta, no lost
  events, no dropped frames);
* breach-to-STOP latency: an energy drift is injected; the time from the board writing the first
  out-of-tolerance PULSE frame to the pty, to the STOP frame arriving back at the board. Repeated
  (acknowledge, re-arm, drift again) to give p50/p99/max;
* the daemon's CPU share during the sustained phase and its peak memory (VmHWM);
* commit latency at that rate (issue 4): from the board writing a PULSE frame to that pulse being
  committed in the daemon's session log, seen by a reader polling the log every 2 ms (so the
  figures include up to 2 ms of polling);
* with ``--telemetry`` (issue 7): the sustained phase again with the daemon publishing to a real
  mosquitto (started here) and a paho subscriber on ``lasers/#``: pulse-to-subscriber lag (the
  board writing a PULSE frame to the subscriber holding the batch that carries it), p50/p99/max,
  the messages/s the broker delivered, and the daemon's CPU share with and without telemetry.

The board's own ceiling is just under 10,000 pulses/s (its shortest width, 100 µs, must be
shorter than the period); the benchmark's policy allows 6 W, so ``--rate 9900`` is the fastest
train this ICD allows.

Run: ``.venv/bin/python benchmarks/e2e.py [--rate 5000] [--seconds 5] [--breaches 40]
[--telemetry]``.
Timings on a shared 2-core machine are noisy: compare ratios within one run. A real USB-serial
adapter adds its own latency (FTDI's latency timer: 16 ms by default) on top of these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devicectl.control import call_daemon  # noqa: E402
from protocols import FrameReader, MessageType, Pulse  # noqa: E402
from simulator import Board, BoardRunner  # noqa: E402
from simulator.serve import PtyLink  # noqa: E402
from tests.daemon.conftest import ACK, IDENTIFIED, OPERATOR, SESSION, add_test_users  # noqa: E402

POLICY = """
max_average_power_w = 6.0
session_energy_j = 100000.0
energy_tolerance_pct = 20
min_interval_pct = 90
skin_temp_max_c = 41.0
head_temp_max_c = 43.0
lease_ms = 1000
lease_nearly_out_ms = 100

[max_fluence_j_cm2]
I = 40.0
II = 35.0
III = 30.0
IV = 22.0
V = 16.0
VI = 12.0

[zones]
forehead = { energy_j = 100000.0 }
periorbital = { energy_j = 15.0, max_fluence_j_cm2 = 10.0 }
perioral = { energy_j = 30.0, max_fluence_j_cm2 = 15.0 }
cheeks = { energy_j = 80.0 }
neck = { energy_j = 60.0, max_fluence_j_cm2 = 20.0 }
decollete = { energy_j = 100.0, max_fluence_j_cm2 = 20.0 }
hands = { energy_j = 50.0 }

[presets.fine_lines]
energy_uj = 500
width_us = 100
rate_hz = 10.0
spot_um = 300
active_ingredient = "hyaluronic acid"
"""


class Probe:
    """Wraps the board's byte I/O: timestamps the first out-of-tolerance PULSE written and the
    STOP received, while a measurement is armed."""

    def __init__(self, board: Board, setpoint_uj: int) -> None:
        self.board = board
        self.limit = setpoint_uj * 1.2
        self.watching = False
        self.breach_written_ns = 0
        self.stop_received_ns = 0
        self.pulse_written_ns: dict[int, int] | None = None  # pulse_no -> written, when timing
        self._out = FrameReader()
        self._in = FrameReader()
        self._pulses = FrameReader()
        send, receive = board.data_to_send, board.receive_data

        def data_to_send(now_us: int) -> bytes:
            data = send(now_us)
            written = self.pulse_written_ns
            if written is not None and data:
                now = time.perf_counter_ns()
                for body in self._pulses.feed(data):
                    if body[1] == MessageType.PULSE:
                        written[int.from_bytes(body[2:6], "little")] = now
            if self.watching and data and not self.breach_written_ns:
                for body in self._out.feed(data):
                    if body[1] == MessageType.PULSE:
                        pulse = Pulse.from_payload(body[2:])
                        if pulse.energy_uj > self.limit:  # type: ignore[attr-defined]
                            self.breach_written_ns = time.perf_counter_ns()
                            break
            return data

        def receive_data(data: bytes, now_us: int) -> None:
            if self.watching and self.breach_written_ns and not self.stop_received_ns:
                for body in self._in.feed(data):
                    if body[1] == MessageType.STOP:
                        self.stop_received_ns = time.perf_counter_ns()
            receive(data, now_us)

        board.data_to_send = data_to_send  # type: ignore[method-assign]
        board.receive_data = receive_data  # type: ignore[method-assign]

    def arm(self) -> None:
        self.breach_written_ns = self.stop_received_ns = 0
        self._out, self._in = FrameReader(), FrameReader()
        self.watching = True


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds used, peak RSS in KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return cpu, hwm


async def _call(control: Path, command: str, **fields: Any) -> dict[str, Any]:
    if command in IDENTIFIED:
        fields.setdefault("auth", OPERATOR)
    return await asyncio.to_thread(call_daemon, control, {"command": command, **fields})


async def _until(predicate: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await asyncio.sleep(0.002)


class CommitWatch:
    """A thread polling the session log (read-only) for the highest committed pulse_no."""

    def __init__(self, db: Path) -> None:
        import sqlite3
        import threading

        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()

        def poll() -> None:
            conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
            try:
                while not self._stop.is_set():
                    row = conn.execute("SELECT max(pulse_no) FROM pulses").fetchone()
                    self.samples.append((time.perf_counter_ns(), row[0] or 0))
                    time.sleep(0.002)
            finally:
                conn.close()

        self._thread = threading.Thread(target=poll, name="bench-commit-watch", daemon=True)
        self._thread.start()

    def stop(self, written: dict[int, int]) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        latencies: list[float] = []
        seen = self.samples[0][1] if self.samples else 0
        for at_ns, highest in self.samples:
            latencies.extend(
                (at_ns - written[n]) / 1e6 for n in range(seen + 1, highest + 1) if n in written
            )
            seen = max(seen, highest)
        return _spread("commit", "pulses", "ms", latencies)


class Subscriber:
    """A paho subscriber on ``lasers/#`` noting when each message arrived (its own thread)."""

    def __init__(self, port: int) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.arrivals: list[tuple[int, str, bytes]] = []
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-dashboard")
        self.client.on_connect = lambda c, *_a: c.subscribe("lasers/#", qos=1)
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = lambda _c, _u, m: self.arrivals.append(
            (time.perf_counter_ns(), m.topic, bytes(m.payload))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise TimeoutError("the benchmark's subscriber could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def run(
    rate_hz: int, seconds: float, breaches: int, mqtt_port: int | None = None
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="devicectl-e2e-"))
    (tmp / "policy.toml").write_text(POLICY)
    config = f'policy = "{tmp / "policy.toml"}"\n'
    if mqtt_port is not None:
        config += f'[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\nsite = "bench"\n'
    (tmp / "devicectl.toml").write_text(config)
    control = tmp / "ctl.sock"
    add_test_users(tmp / "data")
    subscriber = Subscriber(mqtt_port) if mqtt_port is not None else None
    energy = 500
    board = Board(max_rate_mhz=max(500_000, rate_hz * 1000))
    probe = Probe(board, energy)
    results: dict[str, Any] = {"rate_hz": rate_hz}
    async with BoardRunner(board) as runner, PtyLink(runner) as link:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from devicectl.cli import main; main()", "run",
            "--config", str(tmp / "devicectl.toml"), "--port", link.path,
            "--data-dir", str(tmp / "data"), "--control", str(control),
            stdout=asyncio.subprocess.DEVNULL, stderr=(tmp / "daemon.log").open("w"),
        )  # fmt: skip
        try:
            await _until(control.exists, 20)
            await _until(lambda: board.status(runner.now_us())["state"] != "BOOT", 5)
            await asyncio.sleep(0.5)
            await _call(**(SESSION | {"control": control, "patient_ref": "PT-BENCH"}))
            await _call(control, "session_zone", zone="forehead")
            await _call(
                control, "params_set", energy_uj=energy, width_us=100, rate_hz=rate_hz,
                spot_um=3000,  # 2.5 W on a 3 mm spot: the skin stays well under 41 °C
            )  # fmt: skip

            # Sustained phase.
            await _call(control, "arm")
            count0 = int(board.status(runner.now_us())["pulse_count"])  # type: ignore[call-overload]
            probe.pulse_written_ns = {}
            if subscriber is not None:
                first_arrival = len(subscriber.arrivals)
            commits = CommitWatch(tmp / "data" / "sessions.db")
            cpu0, _ = _proc(daemon.pid)
            started = time.monotonic()
            board.footswitch(True, runner.now_us())
            runner.wake()
            await asyncio.sleep(seconds)
            board.footswitch(False, runner.now_us())
            runner.wake()
            elapsed = time.monotonic() - started
            cpu1, _ = _proc(daemon.pid)
            await asyncio.sleep(0.5)
            results |= commits.stop(probe.pulse_written_ns)
            emitted = int(board.status(runner.now_us())["pulse_count"]) - count0  # type: ignore[call-overload]
            status = await _call(control, "status")
            results |= {
                "emitted": emitted,
                "emitted_per_s": emitted / elapsed,
                "logged": status["session_pulses"],
                "lost_events": status["link"].get("lost_events", 0),
                "dropped_frames": status["link"].get("dropped", 0),
                "daemon_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
                "breach_latched_during_run": status["breach_latched"],
            }
            if subscriber is not None:
                await asyncio.sleep(1.0)  # the last batches reach the subscriber
                results |= _telemetry_figures(
                    probe.pulse_written_ns, subscriber.arrivals[first_arrival:], elapsed
                )
            probe.pulse_written_ns = None

            # Breach-to-STOP latency, repeated.
            latencies: list[float] = []
            for _ in range(breaches):
                status = await _call(control, "status")
                if status["breach_latched"]:
                    board.clear_faults(runner.now_us())
                    await _call(control, "fault_ack", **ACK)
                board.footswitch(False, runner.now_us())
                runner.wake()
                await _call(control, "arm")
                board.footswitch(True, runner.now_us())
                runner.wake()
                await asyncio.sleep(0.05)
                probe.arm()
                board.inject("energy-drift", 1.3, runner.now_us())
                await _until(lambda: probe.stop_received_ns != 0, 5)
                probe.watching = False
                latencies.append((probe.stop_received_ns - probe.breach_written_ns) / 1e3)
                board.clear_faults(runner.now_us())
            results |= _spread("stop", "breaches", "us", latencies)
            _, hwm = _proc(daemon.pid)
            results["daemon_peak_rss_mib"] = hwm / 1024
        finally:
            daemon.terminate()
            await daemon.wait()
            if subscriber is not None:
                subscriber.close()
    return results


def _spread(name: str, counted: str, unit: str, values: list[float]) -> dict[str, Any]:
    """``{name}_{counted}`` (how many), and ``{name}_p50/p99/max_{unit}`` (nan when none)."""
    ordered = sorted(values) or [float("nan")]
    return {
        f"{name}_{counted}": len(values),
        f"{name}_p50_{unit}": statistics.median(ordered),
        f"{name}_p99_{unit}": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        f"{name}_max_{unit}": ordered[-1],
    }


def _table(title: str, rows: list[tuple[str, str]], value_width: int) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>{value_width}}")


def _telemetry_figures(
    written: dict[int, int], arrivals: list[tuple[int, str, bytes]], elapsed: float
) -> dict[str, Any]:
    """Lag of every pulse the board wrote, from its PULSE frame to the batch at the subscriber."""
    lags: list[float] = []
    for arrived_ns, topic, payload in arrivals:
        if topic.endswith("/pulses"):
            for pulse_no, _t, _e in json.loads(payload)["pulses"]:
                if pulse_no in written:
                    lags.append((arrived_ns - written[pulse_no]) / 1e6)
    return _spread("lag", "pulses", "ms", lags) | {
        "broker_msgs_per_s": len(arrivals) / elapsed,
        "pulse_batches_per_s": sum(t.endswith("/pulses") for _, t, _ in arrivals) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="pulses per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--breaches", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--telemetry", action="store_true", help="also run with MQTT telemetry to a mosquitto"
    )
    args = parser.parse_args()
    r = asyncio.run(run(args.rate, args.seconds, args.breaches))
    t: dict[str, Any] | None = None
    if args.telemetry:
        from tests.brokers import Broker

        with (
            tempfile.TemporaryDirectory(prefix="devicectl-e2e-broker-") as directory,
            Broker(Path(directory)) as broker,
        ):
            t = asyncio.run(run(args.rate, args.seconds, 0, mqtt_port=broker.port))
    if args.json:
        print(json.dumps({"without_telemetry": r, "with_telemetry": t}, indent=2, default=str))
        return
    rows = [
        ("pulses/s asked", f"{r['rate_hz']:,}"),
        ("pulses/s emitted by the board", f"{r['emitted_per_s']:,.0f}"),
        ("pulses emitted / logged by the daemon", f"{r['emitted']:,} / {r['logged']:,}"),
        ("lost events / dropped frames", f"{r['lost_events']} / {r['dropped_frames']}"),
        ("daemon CPU during the run", f"{r['daemon_cpu_pct']:.0f} % of one core"),
        ("daemon peak RSS", f"{r['daemon_peak_rss_mib']:.0f} MiB"),
        (f"PULSE to log commit p50 ({r['commit_pulses']:,})", f"{r['commit_p50_ms']:.1f} ms"),
        ("PULSE to log commit p99", f"{r['commit_p99_ms']:.1f} ms"),
        ("PULSE to log commit max", f"{r['commit_max_ms']:.1f} ms"),
        (f"breach-to-STOP p50 ({r['stop_breaches']} breaches)", f"{r['stop_p50_us']:.0f} µs"),
        ("breach-to-STOP p99", f"{r['stop_p99_us']:.0f} µs"),
        ("breach-to-STOP max", f"{r['stop_max_us']:.0f} µs"),
    ]
    _table(f"devicectl end to end, daemon over a real pty ({os.cpu_count()} cores)", rows, 14)
    if r["breach_latched_during_run"]:
        print(
            f"  note: a breach latched during the sustained run: {r['breach_latched_during_run']}"
        )
    if t is None:
        return
    rows = [
        ("pulses/s emitted by the board", f"{t['emitted_per_s']:,.0f}"),
        ("pulses emitted / logged by the daemon", f"{t['emitted']:,} / {t['logged']:,}"),
        ("daemon CPU without / with telemetry", f"{r['daemon_cpu_pct']:.0f} / "
         f"{t['daemon_cpu_pct']:.0f} % of one core"),
        ("broker messages/s to the subscriber", f"{t['broker_msgs_per_s']:,.1f}"),
        ("  of which pulse batches/s", f"{t['pulse_batches_per_s']:,.1f}"),
        (f"pulse-to-subscriber lag p50 ({t['lag_pulses']:,} pulses)", f"{t['lag_p50_ms']:.1f} ms"),
        ("pulse-to-subscriber lag p99", f"{t['lag_p99_ms']:.1f} ms"),
        ("pulse-to-subscriber lag max", f"{t['lag_max_ms']:.1f} ms"),
    ]  # fmt: skip
    _table("with MQTT telemetry to a local mosquitto (batches every 100 ms)", rows, 22)


if __name__ == "__main__":
    main()
