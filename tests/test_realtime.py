"""devicectl/realtime.py: what `devicectl run` asks of the scheduler, in a process of its own (the
test process must not become real-time)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from devicectl.realtime import KernelWorkers
from tests.conftest import IN_CI

PROBE = """
import json, os, sys, structlog
from devicectl.realtime import enter_realtime
lines = []
structlog.configure(processors=[lambda _l, _m, event: lines.append(event) or ""])
report = enter_realtime(int(sys.argv[1]), lock_memory=sys.argv[2] == "1",
                        switch_interval_s=0.0005, log=structlog.get_logger())
print(json.dumps({"report": report.as_dict(), "policy": os.sched_getscheduler(0),
                  "switch": sys.getswitchinterval(), "events": [e["event"] for e in lines]}))
"""


def probe(priority: int, *, lock: bool, rtprio: int | None = None) -> dict[str, object]:
    def limit() -> None:
        if rtprio is not None:
            resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))

    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(priority), "1" if lock else "0"],
        capture_output=True, text=True, timeout=60, check=True, preexec_fn=limit,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_disabled_means_ordinary_scheduling_and_says_so() -> None:
    result = probe(0, lock=False)
    report = result["report"]
    assert isinstance(report, dict)
    assert result["policy"] == os.SCHED_OTHER
    assert report["priority"] == 0
    assert report["fifo_refused"] == "disabled by realtime.priority = 0"
    assert result["switch"] == pytest.approx(0.0005)
    assert result["events"] == ["realtime_partly_refused"]


@pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="granting SCHED_FIFO needs root (CI runs as root)"
)
def test_granted_as_root() -> None:
    result = probe(40, lock=True)
    report = result["report"]
    assert isinstance(report, dict)
    assert result["policy"] == os.SCHED_FIFO
    ordinary = report.pop("kernel_workers_ordinary")
    assert report == {
        "priority": 40,
        "fifo_refused": None,
        "memory_locked": True,
        "lock_refused": None,
        "switch_interval_ms": 0.5,
    }
    # the kernel's tty workers, still ordinary unless `devicectl kernel-workers` runs: said once
    assert isinstance(ordinary, int)
    assert result["events"] == ["realtime"] + (["kernel_workers_ordinary"] if ordinary else [])


@pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="changing kernel threads needs root (CI runs as root)"
)
def test_a_daemon_started_with_the_kernel_workers_raised_does_not_warn() -> None:
    workers = KernelWorkers(41)
    workers.apply()
    try:
        result = probe(40, lock=False)
    finally:
        workers.restore()
    report = result["report"]
    assert isinstance(report, dict)
    assert report["kernel_workers_ordinary"] == 0
    assert "kernel_workers_ordinary" not in result["events"]


def test_refused_names_the_unit_setting_that_grants_it() -> None:
    """A 0 RLIMIT_RTPRIO and no CAP_SYS_NICE (dropped from the bounding set with util-linux's
    setpriv when running as root), as a unit without LimitRTPRIO gives."""
    command = [sys.executable, "-c", PROBE, "40", "1"]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-sys_nice,-ipc_lock", *command]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0)),
    )  # fmt: skip
    result = json.loads(out.stdout)
    report = result["report"]
    assert result["policy"] == os.SCHED_OTHER
    assert report["priority"] == 0
    assert "set LimitRTPRIO=40 in the unit" in report["fifo_refused"]
    assert result["events"] == ["realtime_partly_refused"]


STEP = """
import json, os, sys, threading
from devicectl.realtime import step_below
if sys.argv[1] != "0":
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(sys.argv[1])))
seen = {}
def thread():
    seen["returned"] = step_below(int(sys.argv[2]))
    seen["policy"] = os.sched_getscheduler(0)
    seen["priority"] = os.sched_getparam(0).sched_priority
worker = threading.Thread(target=thread)
worker.start(); worker.join()
seen["own"] = os.sched_getparam(0).sched_priority
print(json.dumps(seen))
"""


def step_below_in(priority: int, steps: int = 1) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(priority), str(steps)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, int] = json.loads(out.stdout)
    return result


def test_a_thread_of_an_ordinary_process_stays_ordinary() -> None:
    assert step_below_in(0) == {"returned": 0, "policy": os.SCHED_OTHER, "priority": 0, "own": 0}


@pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="granting SCHED_FIFO needs root (CI runs as root)"
)
def test_a_thread_steps_one_below_the_real_time_loop_that_started_it() -> None:
    """The control thread: preempted by the safety loop, still ahead of ordinary processes."""
    assert step_below_in(40) == {
        "returned": 39,
        "policy": os.SCHED_FIFO,
        "priority": 39,
        "own": 40,
    }
    # the control thread: two below, under the kernel's tty workers (one below)
    assert step_below_in(40, steps=2)["priority"] == 38
    lowest = os.sched_get_priority_min(os.SCHED_FIFO)
    assert step_below_in(lowest)["priority"] == lowest  # nowhere lower to go: stays FIFO
    assert step_below_in(lowest + 1, steps=2)["priority"] == lowest
