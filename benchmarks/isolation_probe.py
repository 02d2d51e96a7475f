"""Where should the safety loop run? A standalone measurement for issue 11's isolation design.

A "safety loop" (an asyncio loop that answers each byte arriving on a pty at once, and keeps a
periodic 10 ms timer, as the heartbeat task does) runs, in turn:

* ``main-loop``: in the main thread's event loop, which also runs two busy coroutines (2 ms of
  pure-Python work, then a 1 ms sleep, each: the loop ~80 % busy, as with telemetry, SQLite and
  report work on it);
* ``thread-5ms`` / ``thread-1ms`` / ``thread-0.2ms``: in a thread of its own with its own loop,
  while the main thread's loop is that busy; ``sys.setswitchinterval`` 5 ms (Python's default),
  1 ms, 0.2 ms;
* ``process``: in a process of its own, while the main process's loop is that busy;

each with and without SCHED_FIFO for the safety loop's thread (priority 40; where the system
refuses it, the row says so). A "board" process (SCHED_FIFO 60 when allowed) writes one byte to
the pty's master every 2 ms (500 Hz) and times the reply: **pty round trip**. The timer's
**wake-up lateness** is measured inside the safety loop. ``--load`` runs two CPU-bound processes
throughout (both cores of a 2-core machine busy).

    .venv/bin/python benchmarks/isolation_probe.py [--load] [--seconds 3] [--variants a,b]

Each variant takes ``--seconds``; the whole table ~10 × that. Figures on a shared machine are
noisy: compare rows within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any

PERIOD_S = 0.010  # the timer (a heartbeat every lease/3 is 83 ms; finer shows more)
BYTE_PERIOD_S = 0.002  # 500 Hz
VARIANTS = ("main-loop", "thread-5ms", "thread-1ms", "thread-0.2ms", "process")
SAFETY_PRIORITY, BOARD_PRIORITY = 40, 60


def _fifo(priority: int, tid: int = 0) -> str:
    """Put thread ``tid`` (0: the caller) under SCHED_FIFO; '' or why not."""
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return exc.strerror or repr(exc)
    return ""


def board(master: int, seconds: float, out: str) -> None:
    """Write a byte every 2 ms, time each reply; dump the round trips (µs) to ``out``."""
    refused = _fifo(BOARD_PRIORITY)
    sys.stdin.readline()  # go: the safety loop is listening
    rtts: list[float] = []
    pending: dict[int, float] = {}
    start = time.perf_counter()
    due, seq, sent = start, 0, 0
    while (now := time.perf_counter()) < start + seconds:
        ready, _, _ = select.select([master], [], [], max(0.0, due - now))
        if ready:
            data = os.read(master, 4096)
            at = time.perf_counter()
            for b in data:
                written = pending.pop(b, None)
                if written is not None:
                    rtts.append((at - written) * 1e6)
        if time.perf_counter() >= due:
            seq = (seq + 1) % 256
            pending[seq] = time.perf_counter()
            os.write(master, bytes([seq]))
            sent += 1
            due += BYTE_PERIOD_S
    Path(out).write_text(json.dumps({"rtt_us": rtts, "sent": sent, "fifo_refused": refused}))


async def safety(slave: int, seconds: float, ready: Any) -> list[float]:
    """Echo every byte from ``slave`` at once; keep a 10 ms timer; its lateness (µs).
    ``ready()`` is called once it listens."""
    loop = asyncio.get_running_loop()

    def echo() -> None:
        os.write(slave, os.read(slave, 4096))

    loop.add_reader(slave, echo)
    ready()
    late: list[float] = []
    try:
        start = time.perf_counter()
        due = start + PERIOD_S
        while time.perf_counter() < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            late.append((time.perf_counter() - due) * 1e6)
            due += PERIOD_S
    finally:
        loop.remove_reader(slave)
    return late


async def busy(seconds: float) -> None:
    """Two coroutines of pure-Python work, 2 ms at a time with 1 ms sleeps: a busy loop."""

    async def one() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.002:
                pass
            await asyncio.sleep(0.001)

    await asyncio.gather(one(), one())


def run_variant(variant: str, fifo: bool, seconds: float, workdir: Path) -> dict[str, Any]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line discipline: bytes as on a serial port
    tty.setraw(master)
    board_out = workdir / f"board-{variant}-{fifo}.json"
    board_proc = subprocess.Popen(
        [sys.executable, __file__, "--board", str(master), str(seconds), str(board_out)],
        pass_fds=[master],
        stdin=subprocess.PIPE,
        text=True,
    )

    def go() -> None:
        assert board_proc.stdin is not None
        board_proc.stdin.write("go\n")
        board_proc.stdin.flush()

    seconds += 0.3  # the safety loop outlives the board's run
    refused = ""
    late: list[float] = []
    try:
        if variant == "main-loop":

            async def both() -> list[float]:
                late, _ = await asyncio.gather(safety(slave, seconds, go), busy(seconds))
                return late

            if fifo:
                refused = _fifo(SAFETY_PRIORITY)
            try:
                late = asyncio.run(both())
            finally:
                _fifo_off()
        elif variant.startswith("thread-"):
            interval = float(variant.removeprefix("thread-").removesuffix("ms")) / 1000
            previous = sys.getswitchinterval()
            sys.setswitchinterval(interval)
            result: dict[str, Any] = {}

            def loop_thread() -> None:
                if fifo:
                    result["refused"] = _fifo(SAFETY_PRIORITY)
                result["late"] = asyncio.run(safety(slave, seconds, go))

            thread = threading.Thread(target=loop_thread, name="safety-loop")
            try:
                thread.start()
                asyncio.run(busy(seconds))
                thread.join()
            finally:
                sys.setswitchinterval(previous)
            late, refused = result["late"], result.get("refused", "")
        else:
            out = workdir / f"safety-{fifo}.json"
            child = subprocess.Popen(
                [sys.executable, __file__, "--safety", str(slave), str(seconds), str(int(fifo)),
                 str(out)],
                pass_fds=[slave],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert child.stdout is not None
            child.stdout.readline()  # listening
            go()
            asyncio.run(busy(seconds))
            child.wait()
            got = json.loads(out.read_text())
            late, refused = got["late_us"], got["fifo_refused"]
        board_proc.wait(timeout=seconds + 10)
    finally:
        if board_proc.poll() is None:
            board_proc.kill()
            board_proc.wait()
        os.close(master)
        os.close(slave)
    measured = json.loads(board_out.read_text())
    rtt = measured["rtt_us"]
    return {
        "variant": variant,
        "fifo": fifo,
        "fifo_refused": refused,
        "timer": _spread(late),
        "rtt": _spread(rtt),
        "replies": len(rtt),
        "sent": measured["sent"],
    }


def _fifo_off() -> None:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _spread(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values) or [float("nan")]
    return (
        ordered[len(ordered) // 2],
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        ordered[-1],
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--board":
        board(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--safety":
        refused = _fifo(SAFETY_PRIORITY) if sys.argv[4] == "1" else ""
        late = asyncio.run(
            safety(int(sys.argv[2]), float(sys.argv[3]), lambda: print("ready", flush=True))
        )
        Path(sys.argv[5]).write_text(json.dumps({"late_us": late, "fifo_refused": refused}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--load", action="store_true", help="two CPU-bound processes meanwhile")
    parser.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-fifo", action="store_true", help="skip the SCHED_FIFO rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    loads = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 if args.load else 0)
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="devicectl-isolation-") as directory:
            rows = [
                run_variant(variant, fifo, args.seconds, Path(directory))
                for variant in variants
                for fifo in ((False,) if args.no_fifo else (False, True))
            ]
    finally:
        for proc in loads:
            proc.kill()
            proc.wait()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"safety loop placement, {os.cpu_count()} cores, "
        f"{'both cores loaded by 2 CPU-bound processes' if args.load else 'no extra load'}; "
        "µs; the main loop ~80 % busy with Python work"
    )
    print(f"{'variant':<14}{'FIFO':<6}{'timer late p50':>15}{'p99':>9}{'max':>9}"
          f"{'pty rtt p50':>13}{'p99':>9}{'max':>9}{'replies':>9}")  # fmt: skip
    for r in rows:
        policy = ("refused" if r["fifo_refused"] else "yes") if r["fifo"] else "no"
        t, p = r["timer"], r["rtt"]
        print(
            f"{r['variant']:<14}{policy:<6}{t[0]:>15.0f}{t[1]:>9.0f}{t[2]:>9.0f}"
            f"{p[0]:>13.0f}{p[1]:>9.0f}{p[2]:>9.0f}{r['replies']:>5}/{r['sent']}"
        )


if __name__ == "__main__":
    main()
