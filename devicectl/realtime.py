"""Real-time scheduling for the daemon's process: the safety loop runs before anything else.

The daemon's process holds the device link, the treatment core, the STOP path and the heartbeat
(its event loop), the session log's writer and the control socket; MQTT telemetry runs in a
process of its own (:mod:`devicectl.telemetry.process`), so nothing a broker or a flood of
messages does takes this process's CPU. :func:`enter_realtime` asks the kernel for

* ``SCHED_FIFO`` at ``priority`` for the process's threads (inherited by the threads it starts
  afterwards: the log writer too, so that a thread holding the interpreter's lock is never
  preempted by an ordinary process while the loop waits for it; the control socket's thread then
  steps two below, :func:`step_below`, under the kernel's tty workers). A process of ours
  started later (the telemetry worker) is given ``SCHED_OTHER`` back at spawn;
* ``mlockall(MCL_CURRENT | MCL_FUTURE)`` when the memory-lock limit allows all of it (a page
  fault on a swapped-out page would cost milliseconds): unlimited, or root;
* a short interpreter switch interval (:func:`sys.setswitchinterval`), so that the loop waits at
  most that long for the interpreter's lock when the log writer holds it.

Each one is best effort: what the system refuses is logged once, with the reason and the unit
setting that grants it (``LimitRTPRIO``, ``LimitMEMLOCK``; examples/devicectl.service), and the
daemon runs on. The kernel's tty workers, which every serial byte waits for, are another
process's business (:class:`KernelWorkers`, ``devicectl kernel-workers``, a root job); the daemon
only says at start when they are still ordinary (``kernel_workers_ordinary``). Measured in
docs/reliability.md ("Where the safety loop should run", "Interference").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from structlog.typing import FilteringBoundLogger

__all__ = [
    "KernelWorkers",
    "RealtimeReport",
    "enter_realtime",
    "kernel_workers",
    "ordinary_scheduler",
    "scheduling",
    "step_below",
]

_MCL_CURRENT = 1
_MCL_FUTURE = 2


@dataclass(frozen=True, slots=True)
class RealtimeReport:
    """What :func:`enter_realtime` obtained; ``None`` reasons mean granted."""

    priority: int  # the SCHED_FIFO priority in force, 0 if none
    fifo_refused: str | None
    memory_locked: bool
    lock_refused: str | None
    switch_interval_s: float
    # the kernel's tty workers still under ordinary scheduling at start (see KernelWorkers)
    kernel_workers_ordinary: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "priority": self.priority,
            "fifo_refused": self.fifo_refused,
            "memory_locked": self.memory_locked,
            "lock_refused": self.lock_refused,
            "switch_interval_ms": round(self.switch_interval_s * 1000, 3),
            "kernel_workers_ordinary": self.kernel_workers_ordinary,
        }


def enter_realtime(
    priority: int,
    *,
    lock_memory: bool,
    switch_interval_s: float,
    log: FilteringBoundLogger,
    tty: bool = True,
) -> RealtimeReport:
    """Ask for each; log one line saying what was granted and, for what was not, why.
    ``tty``: the device is behind a tty (a serial port or a pty, not the in-process simulator or
    a TCP socket): then say so too when the kernel's tty workers are still ordinary."""
    sys.setswitchinterval(switch_interval_s)
    fifo_refused = _enter_fifo(priority) if priority > 0 else "disabled by realtime.priority = 0"
    granted = 0 if fifo_refused else priority
    lock_refused = _lock_memory() if lock_memory else "disabled by realtime.lock_memory"
    ordinary = _ordinary_kernel_workers() if granted and tty else 0
    report = RealtimeReport(
        granted,
        fifo_refused,
        lock_refused is None,
        lock_refused,
        sys.getswitchinterval(),
        ordinary,
    )
    if fifo_refused is None and lock_refused is None:
        log.info("realtime", **report.as_dict())
    else:
        log.warning("realtime_partly_refused", **report.as_dict())
    if ordinary:
        log.warning(
            "kernel_workers_ordinary",
            workers=ordinary,
            why="every byte from the device waits for them when ordinary processes load the CPUs",
            fix="run `devicectl kernel-workers` as root: examples/devicectl-kernel-workers.service",
        )
    return report


def scheduling() -> dict[str, object]:
    """How this process runs now (``devicectl status``): policy, priority, memory locked."""
    policy = os.sched_getscheduler(0)
    locked_kib = 0
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmLck:"):
                    locked_kib = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return {
        "policy": "fifo" if policy == os.SCHED_FIFO else "ordinary",
        "priority": os.sched_getparam(0).sched_priority,
        "memory_locked_kib": locked_kib,
        "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
    }


def ordinary_scheduler() -> tuple[int, os.sched_param]:
    """The scheduling a child process of ours is given at spawn (``os.posix_spawn``'s
    ``scheduler``): ordinary time sharing, whatever this process runs under."""
    return os.SCHED_OTHER, os.sched_param(0)


def step_below(steps: int = 1) -> int:
    """Run the calling thread ``steps`` below the thread that started it (not below the lowest
    priority), when that one is ``SCHED_FIFO`` (a thread inherits its creator's scheduling):
    the safety loop then preempts it, and it still runs before every ordinary process, so that
    it never holds the interpreter's lock while preempted by one (the loop would wait for that
    lock behind the ordinary process). Lowering one's own priority needs no privilege. Returns
    the thread's SCHED_FIFO priority now, 0 when it runs under ordinary scheduling."""
    if not hasattr(os, "sched_getscheduler") or os.sched_getscheduler(0) != os.SCHED_FIFO:
        return 0
    current = os.sched_getparam(0).sched_priority
    priority = max(current - steps, os.sched_get_priority_min(os.SCHED_FIFO))
    if priority != current:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    return priority


def _enter_fifo(priority: int) -> str | None:
    if not hasattr(os, "sched_setscheduler"):
        return "this system has no POSIX real-time scheduling"
    try:
        top = os.sched_get_priority_max(os.SCHED_FIFO)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(min(priority, top)))
    except PermissionError:
        soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
        return (
            f"not permitted (RLIMIT_RTPRIO is {soft}, below {priority}, and no CAP_SYS_NICE): "
            f"set LimitRTPRIO={priority} in the unit"
        )
    except OSError as exc:
        return f"refused by the kernel: {exc.strerror or exc}"
    return None


def _lock_memory() -> str | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        # MCL_FUTURE under a finite limit would turn a later allocation into a failure.
        return f"RLIMIT_MEMLOCK is {soft} bytes, not unlimited: set LimitMEMLOCK=infinity"
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return "no C library to call mlockall in"
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        errno = ctypes.get_errno()
        return f"mlockall failed: {os.strerror(errno)}"
    return None


# ---------------------------------------------------------------- the kernel's tty workers

# The kernel's workers of its unbound workqueues: the tty layer's flip-buffer work
# (flush_to_ldisc) runs there, so every byte between a serial port (or a pty) and its reader, in
# either direction, waits for one of these threads. They run under ordinary scheduling: with the
# CPUs loaded by ordinary processes, a real-time daemon still waits for them (measured: PULSE
# handling 30-100 ms late, pulses fired after a breach; docs/reliability.md, "Interference").
KERNEL_WORKER_PREFIX = "kworker/u"
# A task's flags (/proc/PID/stat): set for the kernel's own threads only. Any process may name
# itself kworker/u... (prctl PR_SET_NAME, /proc/self/comm): the name alone would hand an ordinary
# user's process SCHED_FIFO from a root job.
_PF_KTHREAD = 0x00200000


def kernel_workers(proc: Path = Path("/proc")) -> list[int]:
    """The pids of the kernel's unbound workqueue workers that exist now."""
    pids = []
    for task in proc.iterdir():
        if not task.name.isdigit():
            continue
        try:
            if _is_kernel_worker(task):
                pids.append(int(task.name))
        except OSError:  # gone meanwhile
            continue
    return pids


def _is_kernel_worker(task: Path) -> bool:
    """Whether ``task`` (/proc/PID) is one of the kernel's unbound workqueue workers: by its
    name, and by its flags (one of the kernel's own threads), since any process may take the
    name. Raises OSError when it is gone."""
    if not (task / "comm").read_text().startswith(KERNEL_WORKER_PREFIX):
        return False
    stat_line = (task / "stat").read_text()
    # "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold spaces and ")"
    fields = stat_line[stat_line.rindex(")") + 1 :].split()
    return bool(int(fields[6]) & _PF_KTHREAD)


def _ordinary_kernel_workers() -> int:
    ordinary = 0
    for pid in kernel_workers():
        try:
            ordinary += os.sched_getscheduler(pid) != os.SCHED_FIFO
        except ProcessLookupError:
            continue
    return ordinary


@dataclass
class KernelWorkers:
    """Keeps the kernel's unbound workqueue workers at SCHED_FIFO ``priority``.

    Workers come and go (the kernel starts one when all are busy and retires idle ones), so
    :meth:`apply` is meant to be called again every few seconds (``devicectl kernel-workers``
    does); a new worker is ordinary until then. Needs CAP_SYS_NICE: a root job of the device
    image's, never the daemon, which runs without capabilities. Below the daemon's own priority
    by default: the loop still preempts them, and every ordinary process waits for them."""

    priority: int
    raised: set[int] = field(default_factory=set)  # pids this object raised, alive or not
    # whether a change was allowed once: until then, a worker already at ``priority`` (another
    # instance's doing) is set again, unchanged, so that a run without the privilege is refused
    # at once rather than at the first new worker
    permitted: bool = False

    def apply(self) -> list[int]:
        """Raise every worker not already at ``priority``; the pids raised now. Raises
        PermissionError when not permitted (the first change tried)."""
        now = []
        wanted = os.sched_param(self.priority)
        for pid in kernel_workers():
            try:
                if self._holds(pid):
                    if not self.permitted:
                        os.sched_setscheduler(pid, os.SCHED_FIFO, wanted)  # no change
                        self.permitted = True
                    continue
                os.sched_setscheduler(pid, os.SCHED_FIFO, wanted)
                self.permitted = True
            except ProcessLookupError:
                continue
            now.append(pid)
            self.raised.add(pid)
        return now

    def restore(self) -> int:
        """Ordinary scheduling again for those this object raised and that are still at
        ``priority``; how many."""
        restored = 0
        for pid in sorted(self.raised):
            try:
                if not _is_kernel_worker(Path(f"/proc/{pid}")):
                    continue  # that worker is gone, and its pid is another process's now
                if self._holds(pid):
                    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
                    restored += 1
            except (ProcessLookupError, FileNotFoundError):  # gone meanwhile
                continue
        self.raised.clear()
        return restored

    def _holds(self, pid: int) -> bool:
        """Whether ``pid`` runs at SCHED_FIFO ``priority``."""
        return (
            os.sched_getscheduler(pid) == os.SCHED_FIFO
            and os.sched_getparam(pid).sched_priority == self.priority
        )
