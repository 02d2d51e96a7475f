"""The writer as the daemon uses it: group commits, flush, asyncio use, health, STATUS sampling."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import count, takewhile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devicectl.sessionlog import SessionLog, verify_log
from devicectl.sessionlog.store import connect
from tests.sessionlog.helpers import T0, Clock, fill_session, open_log, session_info


def test_pulses_are_committed_in_batches_and_findable_by_pulse_no(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    commits: list[tuple[int, int | None]] = []
    with open_log(path, on_commit=lambda n, last: commits.append((n, last))) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        for pulse_no in range(1, 5001):
            slog.record_pulse(
                sid, pulse_no, pulse_no * 50, T0 + pulse_no, 2000 + pulse_no % 3, "neck"
            )
        slog.flush()
        assert slog.committed_pulse_no == 5000
        conn = connect(path, readonly=True)
        row = conn.execute(
            "SELECT session_id, energy_uj, zone FROM pulses WHERE pulse_no = 4242"
        ).fetchone()
        plan = " ".join(
            r[-1]
            for r in conn.execute("EXPLAIN QUERY PLAN SELECT * FROM pulses WHERE pulse_no = 1")
        )
        conn.close()
    assert row == (sid, 2000 + 4242 % 3, "neck")
    assert "pulses_by_pulse_no" in plan
    assert sum(n for n, _ in commits) == 5000
    assert len(commits) < 5000  # grouped, not one commit per pulse
    assert commits[-1][1] is None or commits[-1][1] == 5000


def test_flush_waits_for_the_commit_and_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    slog = open_log(path)
    sid = slog.start_session(session_info()).session_id
    fill_session(slog, sid, first_pulse_no=1, pulses=30)
    slog.flush()
    assert verify_log(path).pulses == 30  # visible to another reader at once
    slog.close()
    slog.close()
    assert not slog.healthy
    assert "is closed" in str(slog.failure)


async def test_from_a_running_loop_flush_and_close_do_not_block(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    async with open_log(path) as slog:
        sid = slog.start_session(session_info()).session_id
        fill_session(slog, sid, first_pulse_no=1, pulses=20)
        await slog.flush_async()
        assert slog.committed_pulse_no == 20
        slog.end_session(sid, actor="op-anna")
    assert verify_log(path).ok


def test_status_is_sampled_once_per_interval_in_a_session(tmp_path: Path) -> None:
    clock = Clock()
    with open_log(
        tmp_path / "s.db", clock, status_interval_s=1.0, idle_status_interval_s=60
    ) as slog:
        sid = slog.start_session(session_info()).session_id
        kept = []
        for _ in range(50):  # STATUS every 100 ms for 5 s
            kept.append(
                slog.record_status(
                    sid,
                    state=3,
                    interlocks=0,
                    head_temp_cdeg=2600,
                    skin_temp_cdeg=3300,
                    pulse_count=0,
                )
            )
            clock.advance(seconds=0.1)
        idle = []
        for _ in range(1200):  # two minutes outside a session
            idle.append(
                slog.record_status(
                    None,
                    state=1,
                    interlocks=0,
                    head_temp_cdeg=2500,
                    skin_temp_cdeg=0,
                    pulse_count=0,
                )
            )
            clock.advance(seconds=0.1)
    assert sum(kept) == 5
    assert sum(idle) == 2


@contextmanager
def _write_lock_held(path: Path) -> Iterator[None]:
    """Another connection holds the log's write lock: the writer waits, like a stuck disk."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def _until_unhealthy(slog: SessionLog) -> None:
    deadline = time.monotonic() + 3
    while slog.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not slog.healthy


def test_a_stalled_commit_makes_the_log_unhealthy_until_it_completes(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path, stall_timeout_s=0.05) as slog:
        sid = slog.start_session(session_info()).session_id
        slog.flush()
        with _write_lock_held(path):
            slog.record_pulse(sid, 1, 0, T0, 2000, "neck")
            _until_unhealthy(slog)
            assert "stuck for more than 0.05 s" in str(slog.failure)
        slog.flush()
        assert slog.healthy


def test_the_daemon_is_told_once_through_the_callback(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    told = threading.Event()
    slog = SessionLog.open(path, synchronous="NORMAL", on_unavailable=lambda exc: told.set())
    try:
        sid = slog.start_session(session_info()).session_id
        slog.flush()
        # A pulse the database cannot take (out of 64-bit range): the writer fails, latches, tells.
        slog.record_pulse(sid, 2**64, 0, T0, 2000, "neck")
        assert told.wait(5)
        assert not slog.healthy
        assert str(slog.failure).startswith(f"session log {path} cannot be written: ")
    finally:
        slog.close()


# ── group commit (issue 16) ──────────────────────────────────────────────────────────────────


def test_group_commit_starts_commits_at_least_the_interval_apart(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    interval = 0.03
    commits: list[int] = []
    began = time.monotonic()
    with open_log(
        path, commit_interval_s=interval, on_commit=lambda n, last: commits.append(n)
    ) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        for pulse_no in range(1, 301):
            slog.record_pulse(sid, pulse_no, pulse_no * 50, T0 + pulse_no, 2000, "neck")
            time.sleep(0.001)
        slog.flush()
        elapsed = time.monotonic() - began
        stats = slog.commit_stats()
    # however slow the machine, commits cannot start more often than once per interval
    assert len(commits) <= elapsed / interval + 1
    assert sum(commits) == 300
    assert stats["commits"] >= len(commits) and stats["commit_interval_ms"] == 30
    report = verify_log(path)
    assert report.ok and report.pulses == 300
    conn = connect(path, readonly=True)
    order = [row[0] for row in conn.execute("SELECT pulse_no FROM pulses ORDER BY seq")]
    conn.close()
    assert order == list(range(1, 301))  # the chain keeps the order the pulses were recorded in


def _record(slog: SessionLog, sid: int, pulse_no: int) -> None:
    slog.record_pulse(sid, pulse_no, pulse_no * 50, T0 + pulse_no, 2000, "neck")


def _commit_each(slog: SessionLog, sid: int, pulse_nos: Iterable[int]) -> int:
    """Each pulse in a commit of its own (recorded, then flushed); the last one's number (0:
    none)."""
    pulse_no = 0
    for pulse_no in pulse_nos:
        _record(slog, sid, pulse_no)
        slog.flush()
    return pulse_no


def _commit_until(slog: SessionLog, sid: int, after: int, done: Callable[[], bool]) -> int:
    """From pulse ``after`` + 1 on, each in a commit of its own, until ``done()``; the last."""
    return _commit_each(slog, sid, takewhile(lambda _: not done(), count(after + 1))) or after


@contextmanager
def _snapshot_held(path: Path) -> Iterator[None]:
    """A reader holding a snapshot of the log (a long report, ``devicectl log`` in a session)."""
    held = connect(path, readonly=True)
    held.execute("BEGIN")
    held.execute("SELECT count(*) FROM pulses").fetchone()
    try:
        yield
    finally:
        held.rollback()
        held.close()


def test_the_writer_checkpoints_the_wal_itself_and_counts_every_sync(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path, commit_interval_s=0.0) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        # A reader holding a snapshot the whole time: a PASSIVE checkpoint never waits for it.
        with _snapshot_held(path):
            _commit_each(slog, sid, range(1, 121))
        _commit_each(slog, sid, range(121, 241))
        assert slog.healthy
        stats = slog.commit_stats()
        assert slog.commits >= 240
        assert stats["wal_checkpoints"] == slog.wal_checkpoints >= 1
        # every fdatasync the log causes is counted: one per commit, three per checkpoint
        assert slog.syncs == slog.commits + 3 * slog.wal_checkpoints
    report = verify_log(path)
    assert report.ok and report.pulses == 240


def test_a_stuck_wal_checkpoint_runs_into_the_stall_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's WAL checkpoint runs while it is marked busy: one that hangs (a dead disk)
    makes the log unhealthy within the deadline, like a stuck commit, and healthy once done."""
    path = tmp_path / "sessions.db"
    release = threading.Event()
    with open_log(path, commit_interval_s=0.0, stall_timeout_s=0.1) as slog:
        checkpoint = slog._checkpoint_wal

        def stuck() -> None:
            release.wait(5)
            checkpoint()

        monkeypatch.setattr(slog, "_checkpoint_wal", stuck)
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        pulse_no = _commit_until(slog, sid, 0, lambda: slog.commits >= 99) + 1
        _record(slog, sid, pulse_no)  # the 100th commit, then the checkpoint: it hangs
        _until_unhealthy(slog)
        assert "a WAL checkpoint has been stuck for more than 0.1 s" in str(slog.failure)
        release.set()
        slog.flush()
        assert slog.healthy and slog.wal_checkpoints == 1
    assert verify_log(path).pulses == pulse_no


_HOLD_CHECKPOINT_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 121)  # the WAL index's checkpointer lock
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_blocked_wal_checkpoint_is_told_once_and_the_next_one_catches_up(tmp_path: Path) -> None:
    """Another process holding the checkpoint lock: the writer's checkpoint is refused (SQLite
    answers busy), which is logged once, not hidden; the log goes on and the next checkpoint
    after the lock is let go copies the backlog."""
    path = tmp_path / "sessions.db"
    pulse_no = 0
    with capture_logs() as logs, open_log(path, commit_interval_s=0.0) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.flush()
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_CHECKPOINT_LOCK, f"{path}-shm"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            pulse_no = _commit_until(slog, sid, 0, lambda: slog.commits >= 250)  # 2 refused
            assert slog.healthy and slog.wal_checkpoints == 0
        finally:
            holder.communicate("\n", timeout=10)
        pulse_no = _commit_until(slog, sid, pulse_no, lambda: slog.wal_checkpoints > 0)
        assert slog.healthy
    events = [entry["event"] for entry in logs if "wal_checkpoint" in entry["event"]]
    assert events == ["session_log_wal_checkpoint_blocked", "session_log_wal_checkpoint_resumed"]
    assert verify_log(path).pulses == pulse_no


def test_a_wal_checkpoint_a_reader_holds_back_entirely_is_not_counted(tmp_path: Path) -> None:
    """A reader's snapshot (a long report, ``devicectl log`` during a session) keeps what came
    after it in the WAL: the checkpoints meanwhile copy nothing and sync nothing, so they count
    neither as WAL checkpoints nor as syncs. SQLite reports the pages copied since the WAL began,
    not by this checkpoint."""
    path = tmp_path / "sessions.db"
    with open_log(path, commit_interval_s=0.0) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.flush()
        with _snapshot_held(path):
            commits0 = slog.commits
            # three checkpoints: the first copies what came before
            _commit_each(slog, sid, range(1, 301))
            assert slog.commits - commits0 == 300
            assert slog.wal_checkpoints == 1
            assert slog.syncs == slog.commits + 3
        _commit_each(slog, sid, range(301, 401))  # the reader gone, the next copies everything
        assert slog.wal_checkpoints == 2
        assert slog.syncs == slog.commits + 2 * 3
    assert verify_log(path).pulses == 400


def test_a_long_interval_at_a_high_rate_checkpoints_the_wal_before_it_grows_large(
    tmp_path: Path,
) -> None:
    """The WAL checkpoint runs while the writer is busy, against the stall deadline: after 100
    commits of a long interval at a high rate (1 s at 9,900 pulses/s: ~1 M rows, ~100 MB of WAL)
    one checkpoint would copy more than a slow disk writes in the deadline. So it also comes after
    40,000 rows (~4 MB, SQLite's own default), whatever the number of commits."""
    path = tmp_path / "sessions.db"
    with open_log(path, commit_interval_s=0.5) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        for pulse_no in range(1, 45_001):
            _record(slog, sid, pulse_no)
        slog.flush()
        assert slog.commits < 100
        assert slog.wal_checkpoints == 1
        assert slog.syncs == slog.commits + 3
    assert verify_log(path).pulses == 45_000


def test_commits_and_wal_checkpoints_together_keep_to_one_sync_per_interval(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sessions.db"
    interval = 0.004
    with open_log(path, commit_interval_s=interval) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        began, syncs0 = time.monotonic(), slog.syncs
        pulse_no = 0
        while slog.wal_checkpoints < 2:
            pulse_no += 1
            _record(slog, sid, pulse_no)
            time.sleep(0.0005)
            assert time.monotonic() - began < 30, "the writer never checkpointed the WAL"
        slog.flush()
        elapsed = time.monotonic() - began
        syncs = slog.syncs - syncs0
    # however slow the machine: the checkpoints' syncs are paid for by a longer commit period
    assert syncs <= elapsed / interval + 2
    assert verify_log(path).pulses == pulse_no


def test_commit_stats_count_commits_and_the_wait_of_each(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    commits: list[int] = []
    with open_log(
        path, commit_interval_s=0.01, on_commit=lambda n, last: commits.append(n)
    ) as slog:
        assert slog.commit_stats()["commit_delay_p99_ms"] is None  # no pulse committed yet
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        for pulse_no in range(1, 51):
            slog.record_pulse(sid, pulse_no, pulse_no * 50, time.time_ns(), 2000, "neck")
        slog.flush()
        stats = slog.commit_stats()
        assert stats["commits"] == slog.commits == len(commits)
        assert isinstance(stats["commit_delay_p99_ms"], float)
        assert stats["commit_delay_p99_ms"] >= stats["commit_delay_p50_ms"] >= 0  # type: ignore[operator]
        assert 0 <= slog.commits_per_s <= slog.commits
        # from the first commits on, not only once a whole ten-second window has passed
        assert stats["fsyncs_per_s"] > 0 and slog.syncs_per_s > 0


def test_the_deadline_still_stops_the_log_with_group_commit_on(tmp_path: Path) -> None:
    """No log, no laser, unchanged: a pulse held back by a stuck disk past the deadline makes the
    log unhealthy, although the writer also waits out its commit interval."""
    path = tmp_path / "sessions.db"
    with open_log(path, stall_timeout_s=0.1, commit_interval_s=0.05) as slog:
        sid = slog.start_session(session_info()).session_id
        slog.flush()
        with _write_lock_held(path):
            slog.record_pulse(sid, 1, 0, T0, 2000, "neck")
            _until_unhealthy(slog)
            assert "stuck for more than 0.1 s" in str(slog.failure)
        slog.flush()
        assert slog.healthy
        assert slog.committed_pulse_no == 1


def test_a_commit_interval_at_or_beyond_the_deadline_is_refused(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="must be at least 0 and below the stall timeout"):
        open_log(tmp_path / "sessions.db", stall_timeout_s=0.5, commit_interval_s=0.5)
    with pytest.raises(ValueError, match="must be at least 0"):
        open_log(tmp_path / "sessions.db", commit_interval_s=-0.01)
    # The writer stretches the period by 3 % to pay for its WAL checkpoints' syncs: an interval
    # just below the deadline would make every group wait alone outlast it (no log, no laser,
    # with nothing wrong with the disk).
    with pytest.raises(ValueError, match="below the stall timeout"):
        open_log(tmp_path / "sessions.db", stall_timeout_s=0.2, commit_interval_s=0.199)


def test_a_commit_of_many_pulses_stores_each_once_in_order(tmp_path: Path) -> None:
    """Pulses go in several rows per INSERT: a commit holding more than one such group and a
    remainder (here 1,000 pulses of one chunk, then 5) still stores every pulse once, in the
    order recorded, each with the fields it was recorded with and a chain that verifies."""
    path = tmp_path / "sessions.db"
    with open_log(path) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        for pulse_no in range(1, 1001):
            slog.record_pulse_held(
                sid, pulse_no, pulse_no * 50, T0 + pulse_no, 2000 + pulse_no, "neck"
            )
        slog.release_pulses()
        for pulse_no in range(1001, 1006):
            slog.record_pulse(sid, pulse_no, pulse_no * 50, T0 + pulse_no, 2000 + pulse_no, "chin")
        slog.flush()
        assert slog.committed_pulse_no == 1005
    conn = connect(path, readonly=True)
    rows = conn.execute(
        "SELECT pulse_no, t_us, host_ns, energy_uj, zone FROM pulses ORDER BY seq"
    ).fetchall()
    conn.close()
    assert rows == [
        (n, n * 50, T0 + n, 2000 + n, "neck" if n <= 1000 else "chin") for n in range(1, 1006)
    ]
    report = verify_log(path)
    assert report.ok and report.pulses == 1005


def test_held_pulses_keep_the_order_of_the_calls_in_the_chain(tmp_path: Path) -> None:
    """One hand-off per received chunk: anything recorded mid-chunk releases the held pulses
    first, so the chain's order is the order of the calls."""
    path = tmp_path / "sessions.db"
    with open_log(path) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.record_pulse_held(sid, 1, 50, T0 + 1, 2000, "neck")
        slog.record_pulse_held(sid, 2, 100, T0 + 2, 2000, "neck")
        slog.record_event(sid, "breach", "supervisor", {"code": "energy"})
        slog.record_pulse_held(sid, 3, 150, T0 + 3, 2000, "neck")
        slog.record_pulse(sid, 4, 200, T0 + 4, 2000, "neck")
        slog.record_pulse_held(sid, 5, 250, T0 + 5, 2100, "neck")
        slog.release_pulses()
        slog.release_pulses()  # nothing held: nothing handed over
        slog.flush()
        assert slog.committed_pulse_no == 5
        summary = slog.current_summary()
    assert summary is not None and summary.pulses == 5
    assert summary.energy_per_zone_uj == {"neck": 4 * 2000 + 2100}
    conn = connect(path, readonly=True)
    rows = conn.execute(
        "SELECT seq, 'pulse', pulse_no FROM pulses WHERE session_id = ? UNION ALL "
        "SELECT seq, kind, NULL FROM records WHERE session_id = ? AND kind = 'event' ORDER BY 1",
        (sid, sid),
    ).fetchall()
    conn.close()
    assert [(kind, no) for _, kind, no in rows] == [
        ("pulse", 1), ("pulse", 2), ("event", None), ("pulse", 3), ("pulse", 4), ("pulse", 5),
    ]  # fmt: skip
    assert verify_log(path).ok
