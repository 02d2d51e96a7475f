"""`devicectl kernel-workers`: the kernel's tty workers kept ahead of ordinary processes by a root
job of the device's (the daemon itself has no capability to do it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from devicectl.realtime import KERNEL_WORKER_PREFIX, KernelWorkers, kernel_workers
from tests.conftest import IN_CI

DEVICECTL = [sys.executable, "-c", "from devicectl.cli import main; main()"]
PRIORITY = 23  # one no other job of this machine uses: the test can tell its own changes

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="changing kernel threads needs root (CI runs as root)"
)


def _at_priority() -> set[int]:
    found = set()
    for pid in kernel_workers():
        try:
            if (
                os.sched_getscheduler(pid) == os.SCHED_FIFO
                and os.sched_getparam(pid).sched_priority == PRIORITY
            ):
                found.add(pid)
        except ProcessLookupError:
            continue
    return found


def test_the_workers_are_the_kernels_unbound_workqueue_threads() -> None:
    workers = kernel_workers()
    assert workers, "a Linux kernel always has unbound workqueue workers"
    for pid in workers:
        with open(f"/proc/{pid}/comm") as comm:
            assert comm.read().startswith(KERNEL_WORKER_PREFIX)
    assert os.getpid() not in workers


@needs_root
def test_once_raises_every_worker_and_restore_puts_back_only_those_it_raised() -> None:
    out = subprocess.run(
        [*DEVICECTL, "kernel-workers", "--priority", str(PRIORITY), "--every", "0"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    raised = _at_priority()
    try:
        line = json.loads(out.stderr.strip().splitlines()[-1])  # the log, as under systemd
        assert line["event"] == "kernel_workers_raised" and line["priority"] == PRIORITY
        assert raised, "no worker raised"
        assert line["workers"] >= len(raised)
    finally:
        KernelWorkers(PRIORITY, raised=set(raised)).restore()
    assert not _at_priority()


@needs_root
def test_the_watch_raises_new_workers_and_restores_them_when_stopped() -> None:
    watch = subprocess.Popen(
        [*DEVICECTL, "kernel-workers", "--priority", str(PRIORITY), "--every", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert first["event"] == "kernel_workers_raised"
        raised = _at_priority()
        assert raised
        # one of them lowered behind its back (as a new, ordinary worker would be): raised again
        victim = min(raised)
        os.sched_setscheduler(victim, os.SCHED_OTHER, os.sched_param(0))
        deadline = time.monotonic() + 10
        while victim not in _at_priority() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim in _at_priority(), "a worker back at ordinary scheduling was not raised"
    finally:
        watch.send_signal(signal.SIGTERM)
        rest, _ = watch.communicate(timeout=30)
    assert watch.returncode == 0
    assert json.loads(rest.strip().splitlines()[-1])["event"] == "kernel_workers_restored"
    assert not _at_priority()


def test_refused_without_the_capability_says_what_grants_it() -> None:
    command = [*DEVICECTL, "kernel-workers", "--every", "0"]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-sys_nice", *command]
    out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines() == [
        "error: changing the kernel workers' scheduling needs root or CAP_SYS_NICE (see "
        "examples/devicectl-kernel-workers.service)"
    ]


def test_a_process_named_like_a_worker_is_not_one() -> None:
    """Any process may name itself kworker/u... (/proc/self/comm): it is no kernel thread, and
    a root job raising it would give an ordinary user SCHED_FIFO."""
    read_fd, write_fd = os.pipe()
    impostor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "open('/proc/self/comm', 'w').write('kworker/u9:9')\n"
            "os.write(int(sys.argv[1]), b'named')\n"
            "sys.stdin.read()\n",
            str(write_fd),
        ],
        stdin=subprocess.PIPE,
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    try:
        assert os.read(read_fd, 16) == b"named"
        with open(f"/proc/{impostor.pid}/comm") as comm:
            assert comm.read().startswith(KERNEL_WORKER_PREFIX)
        assert impostor.pid not in kernel_workers()
        if os.geteuid() == 0:
            workers = KernelWorkers(PRIORITY)
            try:
                assert impostor.pid not in workers.apply()
                assert os.sched_getscheduler(impostor.pid) != os.SCHED_FIFO
            finally:
                workers.restore()
    finally:
        os.close(read_fd)
        assert impostor.stdin is not None
        impostor.stdin.close()
        impostor.wait(10)


@needs_root
def test_refused_without_the_capability_even_when_the_workers_are_raised_already() -> None:
    """Another instance raised them (or one that was killed, under Restart=always): with nothing
    left to change, a run without the capability must still say it cannot do its job, not
    report success and fail at the first new worker."""
    raised = KernelWorkers(PRIORITY)
    raised.apply()
    try:
        out = subprocess.run(
            ["setpriv", "--bounding-set=-sys_nice", *DEVICECTL, "kernel-workers",
             "--priority", str(PRIORITY), "--every", "0"],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        raised.restore()
    assert out.returncode == 1, out
    assert "needs root or CAP_SYS_NICE" in out.stderr
