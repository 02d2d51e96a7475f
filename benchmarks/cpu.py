"""Daemon CPU per pulse, per thread, fsyncs and wake-ups (issue 16), beside another design.

The board runs in this process behind a real pty; the daemon runs as its own process, as on a
device (`benchmarks/e2e.py`'s harness). One daemon per tree and telemetry setting goes through the
phases in turn: *idle* (connected, a session open, nothing emitted; STATUS every 100 ms), then
each pulse rate (footswitch down for ``--seconds``), then ``--breaches`` energy drifts at 500/s.
For each phase, over the same window:

* **CPU**: user + system time of the daemon process *and every child process it started*
  (psutil, recursively; telemetry may run in a child), as % of one core and µs per pulse;
* **per thread** (``/proc/<pid>/task/*/stat``): the event loop (the main thread), the session-log
  writer (the thread that calls ``fdatasync``), the other threads, and the children together;
* **fsyncs/s**: ``fdatasync`` + ``fsync`` calls of the daemon and its children, counted in the
  kernel (``perf stat`` on the syscall tracepoints: no ptrace, no slow-down; root or
  ``perf_event_paranoid`` ≤ 1 needed, else the column is empty);
* **wake/s**: ``epoll_wait`` calls of the event loop's thread (each is one wake-up of the loop);
* **commit** p50/p99 ms: from the board writing a PULSE frame to the pulse being committed, seen by
  a reader polling the log every 2 ms (`e2e.CommitWatch`: includes up to 2 ms of polling);
* **STOP** p50/p99 µs: from the board writing the first out-of-tolerance PULSE to the STOP frame
  arriving back, over ``--breaches`` drifts (the last row of each design).

``--tree NAME=PATH`` (repeatable) runs the daemon from that source tree (its own ``devicectl``,
``protocols``, ``drivers``), e.g. ``--tree main=/work/main --tree branch=.``, interleaved in one
run; ``--interval MS`` (repeatable) adds rows of a tree that has ``log_commit_interval_ms``, run
with that group-commit interval (``branch@0`` is no grouping). ``--telemetry`` adds the same rows
with the daemon publishing to a real mosquitto (a free port, started here).

``--floor`` adds rows for **this machine's floor**: not a daemon but the least any design that
judges every pulse on arrival and logs it durably must pay here. A process whose main thread blocks
in ``os.read`` on the pty (one wake-up and one read per arriving chunk, nothing decoded) and whose
second thread commits the pulses read so far into a WAL database with ``synchronous=FULL`` (the
session log's schema, no hashing) once per commit interval (10 ms, and each ``--interval``), fed
the same PULSE-sized frames at the same rates by a pacing thread here. A daemon's *loop* and
*writer* columns read against the floor's: the difference is what the daemon's own code costs;
the floor is what the machine's wake-ups and ``fdatasync`` cost (on a virtual machine, far more
than on hardware).

Run: ``.venv/bin/python benchmarks/cpu.py --tree main=/work/main --tree branch=. --telemetry``
(~40 s per design and telemetry setting with the defaults). A shared 2-core machine is noisy:
compare columns within one run, and note ``uptime``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # installed with the dev extras (through amqtt)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.e2e import POLICY, CommitWatch, Probe, _spread  # noqa: E402
from benchmarks.interference import Requests  # noqa: E402
from simulator import Board, BoardRunner  # noqa: E402
from simulator.serve import PtyLink  # noqa: E402

ENERGY_UJ = 500
RATES = (500, 1_000, 5_000, 9_900)
BREACH_RATE = 500
TICKS = os.sysconf("SC_CLK_TCK")
PERF_EVENTS = (
    "syscalls:sys_enter_fdatasync",
    "syscalls:sys_enter_fsync",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_read",
)


def _thread_times(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``: ``/proc/<pid>/task/*/schedstat`` (ns, exact) where
    the kernel keeps it, else user + system from ``/proc/<pid>/task/*/stat`` (clock ticks)."""
    times: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                try:
                    ns = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0]
                    times[int(task)] = int(ns) / 1e9
                except FileNotFoundError:
                    fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1]
                    parts = fields.split()
                    times[int(task)] = (int(parts[11]) + int(parts[12])) / TICKS
    return times


def _children_time(pid: int) -> tuple[float, list[int]]:
    """CPU seconds of every descendant of ``pid`` alive now (all their threads), and their pids;
    a child that ended within the window is not counted (psutil finds the living)."""
    total, pids = 0.0, []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            total += sum(_thread_times(child.pid).values())
            pids.append(child.pid)
    return total, pids


class Window:
    """CPU per thread and per child, and kernel-counted syscalls, over one phase."""

    def __init__(self, pid: int, perf: bool, wake: str = "epoll") -> None:
        self.pid = pid
        self.wake = wake  # the main thread's syscall that counts as one wake-up
        self.threads0 = _thread_times(pid)
        self.children0, children = _children_time(pid)
        self.started = time.monotonic()
        self.perf: subprocess.Popen[str] | None = None
        if perf:
            targets = ",".join(str(p) for p in [pid, *children])
            self.perf = subprocess.Popen(
                ["perf", "stat", "--per-thread", "-x", ",", "-e", ",".join(PERF_EVENTS),
                 "-p", targets],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip

    def close(self, pulses: int) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        threads1 = _thread_times(self.pid)
        children1, _ = _children_time(self.pid)
        counts: dict[tuple[int, str], int] = {}
        if self.perf is not None:
            self.perf.send_signal(signal.SIGINT)
            _, err = self.perf.communicate(timeout=10)
            for line in err.splitlines():
                # comm-tid,count,unit,event,...
                match = re.match(r"^(.*)-(\d+),(\d+|<not counted>),[^,]*,([^,]+),", line)
                if match and match.group(3).isdigit():
                    counts[(int(match.group(2)), match.group(4))] = int(match.group(3))
        per_thread = {
            tid: threads1.get(tid, 0.0) - self.threads0.get(tid, 0.0)
            for tid in set(threads1) | set(self.threads0)
        }
        syncs: dict[int, int] = {}
        for (tid, event), n in counts.items():
            if event.endswith(("fdatasync", "fsync")):
                syncs[tid] = syncs.get(tid, 0) + n
        writer = max(syncs, key=lambda t: syncs[t]) if syncs and max(syncs.values()) else None
        loop_s = per_thread.pop(self.pid, 0.0)
        writer_s = per_thread.pop(writer, 0.0) if writer is not None else 0.0
        children_s = max(0.0, children1 - self.children0)
        total_s = loop_s + writer_s + sum(per_thread.values()) + children_s
        wakes = sum(
            n for (tid, event), n in counts.items() if tid == self.pid and self.wake in event
        )
        figures: dict[str, Any] = {
            "seconds": elapsed,
            "pulses": pulses,
            "rate": pulses / elapsed,
            "cpu_pct": 100 * total_s / elapsed,
            "us_per_pulse": 1e6 * total_s / pulses if pulses else None,
            "loop_pct": 100 * loop_s / elapsed,
            "writer_pct": 100 * writer_s / elapsed,
            "other_pct": 100 * sum(per_thread.values()) / elapsed,
            "children_pct": 100 * children_s / elapsed,
            "fsyncs_per_s": sum(syncs.values()) / elapsed if self.perf is not None else None,
            "wakes_per_s": wakes / elapsed if self.perf is not None else None,
        }
        return figures


async def _until(predicate: Any, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await asyncio.sleep(0.002)


async def run_design(
    name: str,
    tree: Path,
    interval_ms: int | None,
    *,
    mqtt_port: int | None,
    seconds: float,
    breaches: int,
    rates: tuple[int, ...],
    perf: bool,
    tmp: Path,
) -> list[dict[str, Any]]:
    """Every phase against one daemon from ``tree``; one result per phase."""
    work = Path(tempfile.mkdtemp(prefix=f"cpu-{name}-", dir=tmp))
    data = work / "data"
    data.mkdir()
    control = work / "ctl.sock"
    api = Requests(tree, control, data)
    (work / "policy.toml").write_text(POLICY)
    config = f'policy = "{work / "policy.toml"}"\n'
    if interval_ms is not None:
        config += f"log_commit_interval_ms = {interval_ms}\n"
    if mqtt_port is not None:
        site = re.sub(r"[^a-z0-9-]", "-", f"bench-{name}".lower())
        config += f'[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\nsite = "{site}"\n'
    (work / "devicectl.toml").write_text(config)
    env = os.environ | {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    label = f"{name}{' +mqtt' if mqtt_port is not None else ''}"
    results: list[dict[str, Any]] = []
    board = Board(max_rate_mhz=max((*rates, BREACH_RATE)) * 1000)
    probe = Probe(board, ENERGY_UJ)
    async with BoardRunner(board) as runner, PtyLink(runner) as link:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from devicectl.cli import main; main()", "run",
            "--config", str(work / "devicectl.toml"), "--port", link.path,
            "--data-dir", str(data), "--control", str(control),
            stdout=asyncio.subprocess.DEVNULL, stderr=(work / "daemon.log").open("w"), env=env,
            cwd=work,
        )  # fmt: skip
        try:
            try:
                await _until(control.exists, 30)
            except TimeoutError:
                log = (work / "daemon.log").read_text()[-400:]
                raise RuntimeError(f"{label}: the daemon did not start: {log}") from None
            await _until(lambda: board.status(runner.now_us())["state"] != "BOOT", 5)
            await asyncio.sleep(0.5)
            await api.start_session()
            await api.call("session_zone", zone="forehead")

            def count() -> int:
                return int(board.status(runner.now_us())["pulse_count"])  # type: ignore[call-overload]

            await asyncio.sleep(1.0)  # telemetry connected, start-up settled
            window = Window(daemon.pid, perf)
            await asyncio.sleep(seconds)
            results.append({"design": label, "phase": "idle"} | window.close(0))

            for rate in rates:
                board.footswitch(False, runner.now_us())
                runner.wake()
                status = await api.call("status")
                if status.get("armed"):
                    await api.call("disarm")
                await api.call(
                    "params_set", energy_uj=ENERGY_UJ, width_us=100, rate_hz=rate, spot_um=3000
                )
                await api.call("arm")
                probe.pulse_written_ns = {}
                watch = CommitWatch(data / "sessions.db")
                before = count()
                board.footswitch(True, runner.now_us())
                runner.wake()
                await asyncio.sleep(0.3)  # the train is running
                first = count()
                window = Window(daemon.pid, perf)
                await asyncio.sleep(seconds)
                figures = window.close(count() - first)
                board.footswitch(False, runner.now_us())
                runner.wake()
                await asyncio.sleep(0.3)
                commit = watch.stop(probe.pulse_written_ns)
                probe.pulse_written_ns = None
                status = await api.call("status")
                emitted = count() - before
                results.append(
                    {"design": label, "phase": f"{rate:,}/s"}
                    | figures
                    | commit
                    | {
                        "emitted": emitted,
                        "lost_events": status["link"].get("lost_events", 0),
                        "breach": (status.get("breach_latched") or {}).get("code"),
                    }
                )
                if status.get("breach_latched"):
                    board.clear_faults(runner.now_us())
                    await api.acknowledge()

            # Breach to STOP at the board's real rate.
            await api.call("disarm")
            await api.call(
                "params_set", energy_uj=ENERGY_UJ, width_us=100, rate_hz=BREACH_RATE, spot_um=3000
            )
            latencies: list[float] = []
            for _ in range(breaches):
                status = await api.call("status")
                if status["breach_latched"]:
                    board.clear_faults(runner.now_us())
                    await api.acknowledge()
                board.footswitch(False, runner.now_us())
                runner.wake()
                await api.call("arm")
                board.footswitch(True, runner.now_us())
                runner.wake()
                await asyncio.sleep(0.05)
                probe.arm()
                board.inject("energy-drift", 1.3, runner.now_us())
                await _until(lambda: probe.stop_received_ns != 0, 5)
                probe.watching = False
                latencies.append((probe.stop_received_ns - probe.breach_written_ns) / 1e3)
                board.clear_faults(runner.now_us())
            results[-1] |= _spread("stop", "breaches", "us", latencies)
            status = await api.call("status")
            results[-1]["log_commits"] = status.get("log_commits")
        finally:
            if daemon.returncode is None:
                daemon.terminate()
            await daemon.wait()
    return results


FLOOR_FRAME = bytes(20)  # the size of a PULSE frame on the wire; the floor decodes nothing
FLOOR_PROCESS = """
import os, sys, threading, time
from pathlib import Path
from devicectl.sessionlog import store
tty_path, db_path = sys.argv[1], Path(sys.argv[2])
interval, frame = float(sys.argv[3]), int(sys.argv[4])
conn = store.connect(db_path)  # WAL, synchronous=FULL, the session log's schema
frames = 0
def commit():
    done = 0
    while True:
        time.sleep(interval)
        now = frames
        if now > done:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO pulses (seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone,"
                " hash) VALUES (?, 1, ?, 0, 0, 500, 'forehead', zeroblob(32))",
                [(n, n) for n in range(done + 1, now + 1)],
            )
            conn.execute("COMMIT")
            done = now
threading.Thread(target=commit, daemon=True).start()
fd = os.open(tty_path, os.O_RDONLY | os.O_NOCTTY)
got = 0
while data := os.read(fd, 65536):
    got += len(data)
    frames = got // frame
"""


def _pace(master: int, rate: int, until: float) -> int:
    """Write one floor frame per 1/rate s to the pty master until ``until`` (monotonic), sleeping
    in whole milliseconds as the simulator's runner does (asyncio's timer granularity), so what
    came due meanwhile leaves in one write, as from the board. Returns the frames written."""
    period, due, written = 1.0 / rate, time.monotonic(), 0
    while (now := time.monotonic()) < until:
        if now < due:
            time.sleep(math.ceil((due - now) * 1e3) / 1e3)
            continue
        n = int((now - due) / period) + 1
        os.write(master, FLOOR_FRAME * n)
        written += n
        due += n * period
    return written


async def run_floor(
    interval_ms: int, *, seconds: float, rates: tuple[int, ...], perf: bool, tmp: Path
) -> list[dict[str, Any]]:
    """The floor's phases: idle, then each rate (see the module's docstring)."""
    import pty
    import tty

    name = f"floor@{interval_ms}"
    work = Path(tempfile.mkdtemp(prefix=f"cpu-{name}-", dir=tmp))
    master, slave = pty.openpty()
    tty.setraw(slave)
    env = os.environ | {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOR_PROCESS, os.ttyname(slave), str(work / "floor.db"),
        str(interval_ms / 1000), str(len(FLOOR_FRAME)),
        env=env, stderr=(work / "floor.log").open("w"),
    )  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(1.0)
        if process.returncode is not None:
            raise RuntimeError(f"{name}: {(work / 'floor.log').read_text()[-400:]}")
        window = Window(process.pid, perf, wake="enter_read")
        await asyncio.sleep(seconds)
        results.append({"design": name, "phase": "idle"} | window.close(0))
        for rate in rates:
            window = Window(process.pid, perf, wake="enter_read")
            until = time.monotonic() + seconds
            written = await asyncio.to_thread(_pace, master, rate, until)
            results.append({"design": name, "phase": f"{rate:,}/s"} | window.close(written))
            await asyncio.sleep(0.3)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        os.close(master)
        os.close(slave)
    return results


def _f(value: Any, spec: str, width: int) -> str:
    if value is None or value != value:  # None or nan
        return f"{'–':>{width}}"
    return f"{value:>{width}{spec}}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'design':<16}{'phase':<9}{'rate':>7}{'CPU %':>7}{'µs/pulse':>9}{'loop %':>7}"
        f"{'writer %':>9}{'other %':>8}{'child %':>8}{'fsync/s':>8}{'wake/s':>8}"
        f"{'commit p50':>11}{'p99 ms':>8}{'STOP p50':>9}{'p99 µs':>8}  notes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        notes = []
        if r.get("lost_events"):
            notes.append(f"{r['lost_events']} lost events")
        if r.get("breach"):
            notes.append(f"breach {r['breach']}")
        print(
            f"{r['design']:<16}{r['phase']:<9}{_f(r['rate'], ',.0f', 7)}"
            f"{_f(r['cpu_pct'], '.1f', 7)}"
            f"{_f(r['us_per_pulse'], '.1f', 9)}{_f(r['loop_pct'], '.1f', 7)}"
            f"{_f(r['writer_pct'], '.1f', 9)}{_f(r['other_pct'], '.1f', 8)}"
            f"{_f(r['children_pct'], '.1f', 8)}{_f(r['fsyncs_per_s'], ',.0f', 8)}"
            f"{_f(r['wakes_per_s'], ',.0f', 8)}{_f(r.get('commit_p50_ms'), '.1f', 11)}"
            f"{_f(r.get('commit_p99_ms'), '.1f', 8)}{_f(r.get('stop_p50_us'), ',.0f', 9)}"
            f"{_f(r.get('stop_p99_us'), ',.0f', 8)}  {', '.join(notes)}"
        )


@contextlib.contextmanager
def _broker(enabled: bool, tmp: Path) -> Iterator[int | None]:
    if not enabled:
        yield None
        return
    from tests.brokers import Broker  # a test mosquitto on a free port

    with Broker(tmp / "broker") as broker:
        yield broker.port


async def main_async(args: argparse.Namespace, designs: list[tuple[str, Path, int | None]]) -> None:
    perf = shutil.which("perf") is not None and not args.no_perf
    rows: list[dict[str, Any]] = []
    print(f"load before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="devicectl-cpu-") as directory:
        tmp = Path(directory)
        if args.floor:
            for ms in [10, *args.interval]:
                print(f"… floor@{ms}", file=sys.stderr, flush=True)
                rows += await run_floor(
                    ms, seconds=args.seconds, rates=args.rates, perf=perf, tmp=tmp
                )
        for telemetry in [False, True] if args.telemetry else [False]:
            with _broker(telemetry, tmp) as port:
                for name, tree, interval in designs:
                    print(f"… {name}{' +mqtt' if telemetry else ''}", file=sys.stderr, flush=True)
                    try:
                        rows += await run_design(
                            name, tree, interval, mqtt_port=port, seconds=args.seconds,
                            breaches=args.breaches, rates=args.rates, perf=perf, tmp=tmp,
                        )  # fmt: skip
                    except Exception as exc:  # one design failing ends no run
                        print(f"{name}: failed: {exc}", file=sys.stderr, flush=True)
    print(f"load after: {os.getloadavg()}")
    print_table(rows)
    for r in rows:
        if r.get("log_commits"):
            print(f"{r['design']}: status log_commits at the end: {r['log_commits']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", help="NAME=PATH: the daemon from that tree")
    parser.add_argument(
        "--interval", action="append", type=int, default=[],
        help="also run each tree that has log_commit_interval_ms with this interval (ms)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase")
    parser.add_argument(
        "--rates", default=",".join(map(str, RATES)),
        type=lambda text: tuple(int(r) for r in text.split(",") if r.strip()),
        help="pulse rates to run, comma-separated (empty: idle and the breaches only)",
    )  # fmt: skip
    parser.add_argument("--breaches", type=int, default=15)
    parser.add_argument("--telemetry", action="store_true", help="also with a real mosquitto")
    parser.add_argument("--no-perf", action="store_true", help="no fsync/wake-up counts")
    parser.add_argument(
        "--floor", action="store_true",
        help="also this machine's floor: a bare reader and committer (see the docstring)",
    )  # fmt: skip
    args = parser.parse_args()
    designs: list[tuple[str, Path, int | None]] = []
    for item in args.tree or [f"this={REPO}"]:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--tree {item!r}: NAME=PATH of a source tree")
        tree = Path(path).resolve()
        designs.append((name, tree, None))
        if "log_commit_interval_ms" in (tree / "devicectl" / "config.py").read_text():
            designs += [(f"{name}@{ms}", tree, ms) for ms in args.interval]
    asyncio.run(main_async(args, designs))


if __name__ == "__main__":
    main()
