"""The writer as the daemon uses it: group commits, flush, asyncio use, health, STATUS sampling."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

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


def test_a_stalled_commit_makes_the_log_unhealthy_until_it_completes(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path, stall_timeout_s=0.05) as slog:
        sid = slog.start_session(session_info()).session_id
        slog.flush()
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute(
            "BEGIN IMMEDIATE"
        )  # holds the write lock: the writer waits, like a stuck disk
        try:
            slog.record_pulse(sid, 1, 0, T0, 2000, "neck")
            deadline = time.monotonic() + 3
            while slog.healthy and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not slog.healthy
            assert "stuck for more than 0.05 s" in str(slog.failure)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
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
