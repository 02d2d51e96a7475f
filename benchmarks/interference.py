"""Interference benchmark (issue 11): does anything else the daemon does delay a STOP?

The simulator board runs in this process behind a real pty and the daemon as its own process,
as in ``benchmarks/e2e.py``; every load runs in processes of its own, so this process (the
board) only measures. Emitting at 500 Hz, under each condition:

* ``idle``: nothing else;
* ``mqtt-flood``: QoS 1 messages to this device's ``cmd/arm`` at ~15,000/s (30,000 in ~2 s,
  repeated while the row lasts) from a paho client, through a mosquitto started here;
* ``control-conns``: 1,100 idle control connections held while each breach is injected, the
  daemon's open-files limit at systemd's default (1,024, through ``prlimit``); the row also
  tries one ``devicectl stop`` while they are held;
* ``cpu-load``: two CPU-bound processes (both cores busy);
* ``verify-export``: ``devicectl log verify`` and ``devicectl session export`` in a loop on the
  daemon's own log;
* ``outage-replay``: the broker down at the start with 10,000 messages waiting in the outbox
  (written there before the daemon starts); the broker comes up as the breaches begin, and the
  outbox is replayed while they are measured;
* ``lease-cpu``: the packaged default lease (250 ms, nearly-out 80 ms) under the CPU load with
  no breach injected: false ``lease_nearly_out`` breaches (and any other breach latched: a lost
  link, or the board's own LEASE_EXPIRED fault when a heartbeat came too late), the gaps between
  heartbeats as the board received them, and the daemon's ``heartbeat_late`` lines.

Measured in each breach row: breach-to-STOP at the board (the first out-of-tolerance PULSE
frame written to the pty → the STOP frame arriving back), p50/p99/max; pulses the board fired
after that first bad one, before the STOP arrived (the most in any breach); PULSE handling lag
(the board writing a PULSE → the daemon's host timestamp of it in its session log), p50/p99/max.

The board's stand-in (this process) runs SCHED_FIFO 60 where permitted (``--board-priority``),
above the daemon's own 40, so that host load delays the daemon, not the "microcontroller".
``--kernel-workers PRIO`` runs each tree a second time (``NAME+kw``) with the kernel's unbound
workqueue workers, which carry every byte between a serial port or pty and its reader (the tty
layer's flip buffers), kept at SCHED_FIFO PRIO as ``devicectl kernel-workers`` keeps them on a
device (examples/devicectl-kernel-workers.service): measured, they are what is left of the delay
once the daemon is real-time (docs/reliability.md).

``--tree NAME=PATH`` (repeatable) runs the daemon from another source tree (for instance
``git archive main`` unpacked somewhere) with the rows interleaved, so designs are compared in
one run on the same machine; the default is this checkout. Run:

    .venv/bin/python benchmarks/interference.py [--quick] [--rows idle,cpu-load] \\
        [--tree main=/tmp/main --tree branch=.]

Full: ~12 breaches and ~9 s per row per tree (every row, two trees: ~3.5 min on the shared
2-core machine); ``--quick``: 4 breaches, ~2.5 s per row (one tree: ~55 s there, most of it
starting a daemon and a broker per row, so short of the 40 s aimed at). Figures on a shared,
loaded machine are noisy: compare columns within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.e2e import POLICY, _spread  # noqa: E402
from devicectl.control import call_daemon  # noqa: E402
from devicectl.realtime import KernelWorkers  # noqa: E402
from devicectl.telemetry.outbox import Outbox  # noqa: E402
from protocols import FrameReader, MessageType, Pulse  # noqa: E402
from simulator import Board, BoardRunner  # noqa: E402
from simulator.serve import PtyLink  # noqa: E402

RATE_HZ = 500
ENERGY_UJ = 500
ROWS = (
    "idle",
    "mqtt-flood",
    "control-conns",
    "cpu-load",
    "verify-export",
    "outage-replay",
    "lease-cpu",
)
DEFAULT_LEASE_POLICY = POLICY.replace("lease_ms = 1000", "lease_ms = 250").replace(
    "lease_nearly_out_ms = 100", "lease_nearly_out_ms = 80"
)

FLOODER = """
import sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.connect(host, port)
client.loop_start()
start, sent = time.monotonic(), 0
while True:
    due = int((time.monotonic() - start) * rate)
    while sent < due:
        client.publish(topic, b'{"lease_ms": 5000}', qos=1)
        sent += 1
    time.sleep(0.005)
"""

HOLDER = """
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held = []
for line in sys.stdin:
    if line.strip() == "open":
        deadline = time.monotonic() + 1.5  # a full backlog drains meanwhile, or stays full
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            while True:
                try:
                    s.connect(path)
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.001)
                        continue
                    s.close()
                    s = None
                except OSError:
                    s.close()
                    s = None
                break
            if s is not None:
                held.append(s)
    else:
        for s in held:
            s.close()
        held = []
    print(len(held), flush=True)
"""


class Probe:
    """Wraps the board's byte I/O: when each PULSE was written (wall clock, to compare with the
    daemon's host timestamps), the first out-of-tolerance one and the STOP that answers it, the
    pulses written in between, and when each HEARTBEAT arrived."""

    def __init__(self, board: Board) -> None:
        self.limit = ENERGY_UJ * 1.2
        self.watching = False
        self.breach_ns = 0
        self.stop_ns = 0
        self.after_breach = 0
        self.written_ns: dict[int, int] = {}
        self.heartbeats_ns: list[int] = []
        self._out = FrameReader()
        self._in = FrameReader()
        send, receive = board.data_to_send, board.receive_data

        def data_to_send(now_us: int) -> bytes:
            data = send(now_us)
            if data:
                wall, now = time.time_ns(), time.perf_counter_ns()
                for body in self._out.feed(data):
                    if body[1] != MessageType.PULSE:
                        continue
                    pulse = Pulse.from_payload(body[2:])
                    self.written_ns[pulse.pulse_no] = wall  # type: ignore[attr-defined]
                    if not self.watching:
                        continue
                    if not self.breach_ns:
                        if pulse.energy_uj > self.limit:  # type: ignore[attr-defined]
                            self.breach_ns = now
                    elif not self.stop_ns:
                        self.after_breach += 1
            return data

        def receive_data(data: bytes, now_us: int) -> None:
            now = time.perf_counter_ns()
            for body in self._in.feed(data):
                if body[1] == MessageType.HEARTBEAT:
                    self.heartbeats_ns.append(now)
                elif body[1] == MessageType.STOP and self.breach_ns and not self.stop_ns:
                    self.stop_ns = now
            receive(data, now_us)

        board.data_to_send = data_to_send  # type: ignore[method-assign]
        board.receive_data = receive_data  # type: ignore[method-assign]

    def arm(self) -> None:
        self.breach_ns = self.stop_ns = self.after_breach = 0
        self.watching = True


CHECKLIST_BEFORE_USERS = {
    "consultation_done": True,
    "area_cleaned": True,
    "numbing_applied": False,
    "recent_sun_exposure": False,
    "photosensitising_medication": False,
    "active_skin_infection": False,
    "pregnancy": False,
    "allergy_to_active_ingredient": False,
}


class Requests:
    """The control requests of a daemon from ``tree``: before identified users (issue 14) a
    request names its operator; after, it carries a registered user's credentials, which are
    added to the data directory first (as ``tests/daemon`` does)."""

    def __init__(self, tree: Path, control: Path, data: Path) -> None:
        self.control = control
        self.users: Any = None
        if (tree / "devicectl" / "users.py").exists():
            import importlib

            self.users = importlib.import_module("tests.daemon.conftest")
            self.users.add_test_users(data)

    async def call(self, command: str, wait_s: float = 10.0, **fields: Any) -> Any:
        if self.users is not None and command in self.users.IDENTIFIED:
            fields.setdefault("auth", self.users.OPERATOR)
        request = {"command": command, **fields}
        return await asyncio.to_thread(call_daemon, self.control, request, timeout=wait_s)

    async def start_session(self) -> None:
        if self.users is not None:
            await self.call(**(self.users.SESSION | {"patient_ref": "PT-BENCH"}))
        else:
            await self.call(
                "session_start", operator="BENCH", patient_ref="PT-BENCH", skin_type="III",
                concerns=["fine_lines"], preset="fine_lines", checklist=CHECKLIST_BEFORE_USERS,
            )  # fmt: skip

    async def acknowledge(self) -> None:
        if self.users is not None:
            await self.call("fault_ack", **self.users.ACK)
        else:
            await self.call("fault_ack", operator="BENCH", reason="benchmark")


async def _until(predicate: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, **kwargs
    )


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _prefill_outbox(data: Path, count: int) -> None:
    """``count`` alert-sized messages waiting in the daemon's outbox, as after an outage."""
    outbox = Outbox(data / "telemetry-outbox.sqlite", max_bytes=256 * 1024 * 1024)
    try:
        outbox.start_boot()
        body = json.dumps({"severity": "warning", "code": "bench", "message": "x" * 120})
        for _ in range(count):
            outbox.enqueue("lasers/bench/PREFILL/alerts", "alerts", lambda _seq: body.encode())
    finally:
        outbox.close()


def _lags(db: Path, written: dict[int, int]) -> list[float]:
    """PULSE handling lags (ms): the daemon's host timestamp minus the board's write."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT pulse_no, host_ns FROM pulses").fetchall()
    finally:
        conn.close()
    return [(host - written[n]) / 1e6 for n, host in rows if n in written]


async def run_row(row: str, tree: Path, *, quick: bool, tmp: Path) -> dict[str, Any]:
    """One condition against the daemon from ``tree``; the figures of that row."""
    from tests.brokers import Broker  # a test mosquitto on a free port

    breaches = 4 if quick else 12
    budget_s = 2.5 if quick else 9.0
    work = Path(tempfile.mkdtemp(prefix=f"{row}-", dir=tmp))
    data = work / "data"
    data.mkdir()
    control = work / "ctl.sock"
    api = Requests(tree, control, data)  # before the daemon starts: it reads its users then
    (work / "policy.toml").write_text(DEFAULT_LEASE_POLICY if row == "lease-cpu" else POLICY)
    config = f'policy = "{work / "policy.toml"}"\n'
    env = os.environ | {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cli = [sys.executable, "-c", "from devicectl.cli import main; main()"]
    result: dict[str, Any] = {"row": row, "notes": []}
    loads: list[subprocess.Popen[str]] = []
    async with AsyncExitStack() as stack:
        broker = None
        if row in ("mqtt-flood", "outage-replay"):
            broker = stack.enter_context(Broker(work / "broker"))
            config += f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker.port}"\nsite = "bench"\n'
            if row == "outage-replay":
                broker.stop()
                _prefill_outbox(data, 10_000)
        (work / "devicectl.toml").write_text(config)
        board = Board(max_rate_mhz=500_000)
        probe = Probe(board)
        runner = await stack.enter_async_context(BoardRunner(board))
        link = await stack.enter_async_context(PtyLink(runner))
        limit = ["prlimit", "--nofile=1024:1024"] if row == "control-conns" else []
        daemon = await asyncio.create_subprocess_exec(
            *limit, *cli, "run", "--config", str(work / "devicectl.toml"),
            "--port", link.path, "--data-dir", str(data), "--control", str(control),
            stdout=asyncio.subprocess.DEVNULL, stderr=(work / "daemon.log").open("w"), env=env,
            cwd=work,  # not this checkout: `python -c` puts the working directory first
        )  # fmt: skip

        async def end_daemon() -> None:
            if daemon.returncode is None:
                daemon.terminate()
                await daemon.wait()

        stack.push_async_callback(end_daemon)
        stack.callback(_stop, loads)
        if not await _until(control.exists, 20):
            raise RuntimeError(f"{row}: the daemon did not start: see {work / 'daemon.log'}")
        await _until(lambda: board.status(runner.now_us())["state"] != "BOOT", 5)
        await asyncio.sleep(0.3)
        await api.start_session()
        await api.call("session_zone", zone="forehead")
        await api.call(
            "params_set", energy_uj=ENERGY_UJ, width_us=100, rate_hz=RATE_HZ,
            spot_um=3000,
        )  # fmt: skip
        status = await api.call("status")
        serial = status["device_serial"]

        # the load
        holder = None
        if row == "mqtt-flood":
            assert broker is not None
            topic = f"lasers/bench/{serial}/cmd/arm"
            loads.append(
                _spawn(
                    [sys.executable, "-c", FLOODER, "127.0.0.1", str(broker.port), topic, "15000"],
                    env=env,
                )
            )
        elif row in ("cpu-load", "lease-cpu"):
            loads += [_spawn([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        elif row == "verify-export":
            loop = (
                f"while true; do {' '.join(cli[:2])} '{cli[2]}' log verify "
                f"--db {data / 'sessions.db'}; {' '.join(cli[:2])} '{cli[2]}' session export 1 "
                f"--format json --out {work / 'export.json'} --data-dir {data}; done"
            )
            loads.append(_spawn(["bash", "-c", loop], env=env, cwd=work))
        elif row == "control-conns":
            holder = subprocess.Popen(  # noqa: ASYNC220 - a pipe driven by hand
                [sys.executable, "-c", HOLDER, str(control), "1100"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True,
            )  # fmt: skip
            loads.append(holder)
        await asyncio.sleep(0.3 if quick else 0.5)  # the load under way

        def hold(command: str) -> int:
            assert holder is not None
            assert holder.stdin is not None
            assert holder.stdout is not None
            holder.stdin.write(command + "\n")
            holder.stdin.flush()
            return int(holder.stdout.readline())

        latencies: list[float] = []
        after: list[int] = []
        gaps: list[float] = []

        def heartbeat_gaps() -> None:
            """The gaps between the heartbeats of one armed stretch (STOP ends them)."""
            beats, probe.heartbeats_ns = probe.heartbeats_ns, []
            gaps.extend((b - a) / 1e6 for a, b in itertools.pairwise(beats))

        false_lease = 0
        started = time.monotonic()
        if row == "lease-cpu":
            await api.call("arm")
            board.footswitch(True, runner.now_us())
            runner.wake()
            while time.monotonic() - started < budget_s:
                await asyncio.sleep(0.2)
                status = await api.call("status")
                latched = status["breach_latched"]
                if not latched:
                    continue
                # a false one: nothing is wrong with the board
                false_lease += latched.get("code") == "lease_nearly_out"
                heartbeat_gaps()
                result["notes"].append(f"latched {latched.get('code')}")
                board.footswitch(False, runner.now_us())
                board.clear_faults(runner.now_us())
                runner.wake()
                try:
                    await api.acknowledge()
                    await api.call("arm")
                except Exception as exc:  # the link is being re-established: try again
                    result["notes"].append(f"re-arm failed: {exc}")
                    continue
                board.footswitch(True, runner.now_us())
                runner.wake()
            board.footswitch(False, runner.now_us())
            runner.wake()
        else:
            if broker is not None and row == "outage-replay":
                broker.start()  # the outage ends: the outbox replays during the breaches
            failures = 0
            while len(latencies) < breaches and time.monotonic() - started < budget_s:
                try:
                    status = await api.call("status", wait_s=5.0)
                    if status["breach_latched"]:
                        board.clear_faults(runner.now_us())
                        await api.acknowledge()
                    board.footswitch(False, runner.now_us())
                    runner.wake()
                    heartbeat_gaps()
                    await api.call("arm", wait_s=5.0)
                except Exception as exc:  # noted; a row the daemon cannot serve ends
                    result["notes"].append(f"control failed: {exc}")
                    failures += 1
                    if failures >= 3:
                        break
                    await asyncio.sleep(0.3)
                    continue
                board.footswitch(True, runner.now_us())
                runner.wake()
                if holder is not None:
                    result["held"] = hold("open")
                # emitting between breaches, so that the lag is measured all along the row
                await asyncio.sleep(max(0.05, budget_s / breaches - 0.15))
                probe.arm()
                board.inject("energy-drift", 1.3, runner.now_us())
                stopped = await _until(lambda: probe.stop_ns != 0, 5)
                probe.watching = False
                if holder is not None and not latencies:
                    stop = await asyncio.to_thread(
                        subprocess.run, [*cli, "stop", "--control", str(control)],
                        capture_output=True, text=True, env=env, timeout=30, cwd=work,
                    )  # fmt: skip
                    result["cli_stop"] = stop.returncode
                if holder is not None:
                    hold("close")
                board.clear_faults(runner.now_us())
                if not stopped:
                    result["notes"].append("no STOP within 5 s of a breach")
                    break
                latencies.append((probe.stop_ns - probe.breach_ns) / 1e3)
                after.append(probe.after_breach)
            board.footswitch(False, runner.now_us())
            runner.wake()
        result["after_breach"] = after
        heartbeat_gaps()
        result["seconds"] = time.monotonic() - started
        _stop(loads)
        await asyncio.sleep(0.3)  # the last pulses committed
        await end_daemon()
        result |= _spread("stop", "breaches", "us", latencies)
        result["after_breach_max"] = max(after, default=None)
        result |= _spread("lag", "pulses", "ms", _lags(data / "sessions.db", probe.written_ns))
        result["heartbeat_gap_p99_ms"] = sorted(gaps)[int(len(gaps) * 0.99)] if gaps else None
        result["heartbeat_gap_max_ms"] = max(gaps, default=None)
        result["heartbeat_gaps"] = len(gaps)
        if row == "lease-cpu":
            result["false_lease"] = false_lease
        log = (work / "daemon.log").read_text(errors="replace")
        result["heartbeat_late_lines"] = log.count("heartbeat_late")
        result["link_lost_lines"] = log.count("device_link_lost")
        # the telemetry worker restarted (it died, or the daemon judged it hung)
        result["worker_restarts"] = max(0, log.count("telemetry_process_started") - 1)
        result["daemon_log_kib"] = len(log) / 1024
    return result


def _fmt(value: Any, spec: str) -> str:
    if value is None or value != value:  # None or nan
        return "-"
    return format(value, spec)


def print_table(results: dict[str, dict[str, dict[str, Any]]], trees: list[str]) -> None:
    """One line per row and tree."""
    head = (
        f"{'condition':<15}{'tree':<11}{'n':>4}{'STOP p50':>10}{'p99':>8}{'max µs':>9}"
        f"{'after':>6}{'lag p50':>9}{'p99':>8}{'max ms':>9}{'hb gap':>8}  notes"
    )
    print(head)
    for row, by_tree in results.items():
        for tree in trees:
            r = by_tree.get(tree)
            if r is None:
                continue
            notes = list(dict.fromkeys(r["notes"]))
            if "cli_stop" in r:
                notes.append(f"`devicectl stop` exit {r['cli_stop']} with {r.get('held')} held")
            if "false_lease" in r:
                notes.append(f"{r['false_lease']} false lease_nearly_out")
            if r["link_lost_lines"]:
                notes.append(f"link lost {r['link_lost_lines']}×")
            if r.get("worker_restarts"):
                notes.append(f"telemetry worker restarted {r['worker_restarts']}×")
            if r["heartbeat_late_lines"]:
                notes.append(f"{r['heartbeat_late_lines']} heartbeat_late")
            notes.append(f"log {r['daemon_log_kib']:.0f} KiB")
            print(
                f"{row:<15}{tree:<11}{r['stop_breaches']:>4}"
                f"{_fmt(r['stop_p50_us'], '.0f'):>10}{_fmt(r['stop_p99_us'], '.0f'):>8}"
                f"{_fmt(r['stop_max_us'], '.0f'):>9}{_fmt(r['after_breach_max'], 'd'):>6}"
                f"{_fmt(r['lag_p50_ms'], '.2f'):>9}{_fmt(r['lag_p99_ms'], '.2f'):>8}"
                f"{_fmt(r['lag_max_ms'], '.1f'):>9}{_fmt(r['heartbeat_gap_max_ms'], '.0f'):>8}"
                f"  {'; '.join(notes)}"
            )


def board_realtime(priority: int) -> None:
    """A real board is a microcontroller that no host load delays: its stand-in here (the
    simulator and the measuring, in this process) runs under SCHED_FIFO above the daemon's own
    priority, with SCHED_RESET_ON_FORK so that the daemon and the loads it starts do not inherit
    it (the daemon asks for its own: devicectl/realtime.py)."""
    if priority <= 0:
        return
    policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except OSError as exc:
        print(f"board not real-time ({exc}): its own delays count in STOP", file=sys.stderr)
        return
    # Threads are created with ordinary scheduling (SCHED_RESET_ON_FORK covers them too): the
    # control requests' threads would hold the interpreter's lock while preempted, and the
    # board wait for it. They raise themselves, and the board waits at most 0.5 ms for the lock.
    sys.setswitchinterval(0.0005)
    BOARD_THREADS.append(lambda: os.sched_setscheduler(0, policy, os.sched_param(priority)))


BOARD_THREADS: list[Any] = []  # initializers of this process's worker threads


def board_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The default executor of the board's loop: its threads share the board's scheduling."""

    def initialize() -> None:
        for initializer in BOARD_THREADS:
            initializer()

    return concurrent.futures.ThreadPoolExecutor(max_workers=4, initializer=initialize)


async def _keep_raised(workers: KernelWorkers) -> None:
    """What `devicectl kernel-workers --every 2` does, for the length of a row."""
    while True:
        workers.apply()
        await asyncio.sleep(2.0)


async def main_async(args: argparse.Namespace, trees: dict[str, Path]) -> None:
    asyncio.get_running_loop().set_default_executor(board_executor())
    rows = args.rows.split(",") if args.rows else list(ROWS)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="devicectl-interference-") as directory:
        for row in rows:
            for name, tree in trees.items():
                for raised in (False, True) if args.kernel_workers else (False,):
                    label = f"{name}+kw" if raised else name
                    print(f"... {row} ({label})", file=sys.stderr, flush=True)
                    workers = KernelWorkers(args.kernel_workers) if raised else None
                    try:
                        if workers is not None:  # as `devicectl kernel-workers` does on a device
                            watch = asyncio.create_task(_keep_raised(workers))
                        results.setdefault(row, {})[label] = await run_row(
                            row, tree, quick=args.quick, tmp=Path(directory)
                        )
                    except Exception as exc:  # one row failing leaves the others' figures
                        print(f"    {row} ({label}) failed: {exc!r}", file=sys.stderr, flush=True)
                    finally:
                        if workers is not None:
                            watch.cancel()
                            workers.restore()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    print(
        f"devicectl interference, {RATE_HZ} Hz over a pty, {os.cpu_count()} cores "
        f"({'quick' if args.quick else 'full'}); STOP: breach-to-STOP at the board; after: most "
        "pulses fired after the first bad one; lag: PULSE written → handled by the daemon; "
        "hb gap: longest gap between heartbeats at the board (ms)"
    )
    labels = [f"{name}{kw}" for name in trees for kw in ("", "+kw")]
    print_table(results, [label for label in labels if any(label in r for r in results.values())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer breaches, shorter rows")
    parser.add_argument("--rows", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument(
        "--tree", action="append", help="NAME=PATH: run the daemon from that source tree"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--board-priority",
        type=int,
        default=60,
        help="SCHED_FIFO priority of this process, the board's stand-in (0: none); what it "
        "starts (daemon, loads) runs under ordinary scheduling",
    )
    parser.add_argument(
        "--kernel-workers",
        type=int,
        default=0,
        metavar="PRIO",
        help="run each tree twice more, NAME+kw: with the kernel's tty workers at SCHED_FIFO "
        "PRIO, as `devicectl kernel-workers` keeps them on a device (39); root only",
    )
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))  # the board
    board_realtime(args.board_priority)
    trees: dict[str, Path] = {}
    for item in args.tree or [f"this={REPO}"]:
        name, _, path = item.partition("=")
        trees[name] = Path(path).resolve()
    asyncio.run(main_async(args, trees))


if __name__ == "__main__":
    main()
