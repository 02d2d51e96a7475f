"""No log, no laser; crash recovery. Real failures: a file size limit (the full-disk stand-in) and
a process killed with SIGKILL mid-session, each in a child process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devicectl.errors import LogUnavailable
from devicectl.sessionlog import SessionLog, SessionRefused, verify_log
from devicectl.sessionlog.reader import list_sessions
from devicectl.sessionlog.store import SCHEMA_VERSION, connect
from tests.sessionlog.helpers import fill_session, open_log, session_info

REPO = Path(__file__).resolve().parents[2]


def _child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_corrupt_file_is_refused_naming_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not a database, it was overwritten" * 100)
    with pytest.raises(LogUnavailable) as caught:
        SessionLog.open(path)
    assert str(caught.value) == f"session log {path} is unusable: file is not a database"


def test_an_unwritable_place_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(LogUnavailable) as caught:
        SessionLog.open(blocker / "sessions.db")
    assert str(caught.value) == (
        f"session log {blocker / 'sessions.db'} cannot be opened: File exists ({blocker})"
    )


def test_a_log_from_a_newer_devicectl_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LogUnavailable, match="newer than this devicectl"):
        SessionLog.open(path)


def test_the_schema_is_versioned_and_reopening_migrates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path):
        pass
    conn = connect(path, readonly=True)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    with open_log(path) as slog:
        assert slog.healthy


_FULL_DISK = """
    import json, resource, signal, sys
    from pathlib import Path
    from devicectl.errors import LogUnavailable
    from devicectl.logs import configure_logging
    from tests.sessionlog.helpers import open_log, session_info

    configure_logging(json=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    path = Path(sys.argv[1])
    reported = []
    slog = open_log(path, on_unavailable=reported.append)
    sid = slog.start_session(session_info()).session_id
    slog.flush()
    sizes = [p.stat().st_size for p in path.parent.iterdir()]
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 256 * 1024, resource.RLIM_INFINITY))
    out = {"healthy_before": slog.healthy}
    pulse_no = 1
    for _ in range(2000):
        for _ in range(500):
            slog.record_pulse(sid, pulse_no, pulse_no, pulse_no, 2000, "cheeks")
            pulse_no += 1
        try:
            slog.flush()
        except LogUnavailable as exc:
            out["flush_error"] = str(exc)
            break
    out["healthy"] = slog.healthy
    out["failure"] = str(slog.failure)
    out["reported"] = [str(e) for e in reported]
    try:
        slog.start_session(session_info())
    except LogUnavailable as exc:
        out["start_error"] = str(exc)
    slog.record_pulse(sid, pulse_no, 0, 0, 2000, "cheeks")  # never raises on the pulse path
    slog.close()
    out["dropped"] = slog.dropped
    print(json.dumps(out))
"""


def test_a_full_disk_makes_the_writer_report_log_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    done = _child(_FULL_DISK, str(path))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["healthy_before"] is True
    assert out["healthy"] is False
    cause = f"session log {path} cannot be written: "
    assert out["failure"].startswith(cause)
    assert out["flush_error"] == out["failure"]
    assert out["reported"] == [out["failure"]]  # the callback ran exactly once
    assert out["start_error"] == out["failure"]  # no log, no new session
    assert out["dropped"] >= 1
    assert "session_log_unavailable" in done.stderr
    # What was committed before the failure is intact.
    report = verify_log(path)
    assert report.ok, report.first_break
    assert report.pulses > 0


_FULL_DISK_AT_CHECKPOINT = """
    import json, resource, signal, sys
    from pathlib import Path
    from devicectl.errors import LogUnavailable
    from devicectl.logs import configure_logging
    from tests.sessionlog.helpers import fill_session, open_log, session_info

    configure_logging(json=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    path = Path(sys.argv[1])
    with open_log(path) as slog:  # a database file larger than a WAL of 100 small commits
        sid = slog.start_session(session_info()).session_id
        pulse_no = fill_session(slog, sid, first_pulse_no=1, pulses=30_000)
    reported = []
    slog = open_log(path, commit_interval_s=0.0, on_unavailable=reported.append)
    # The database file cannot grow, the WAL can: commits go on, the first WAL checkpoint fails.
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size, resource.RLIM_INFINITY))
    out = {}
    for _ in range(1000):
        slog.record_pulse(sid, pulse_no, pulse_no, pulse_no, 2000, "cheeks")
        try:
            slog.flush()  # one commit each
        except LogUnavailable as exc:
            out["flush_error"] = str(exc)
            break
        pulse_no += 1
    out.update(
        last_recorded=pulse_no, committed_pulse_no=slog.committed_pulse_no, commits=slog.commits,
        reported=[str(e) for e in reported], healthy=slog.healthy,
    )
    slog.close()
    out["dropped"] = slog.dropped
    print(json.dumps(out))
"""


def test_a_wal_checkpoint_that_fails_latches_without_counting_the_commit_as_dropped(
    tmp_path: Path,
) -> None:
    """The writer's own WAL checkpoint runs after a commit: when it fails (here the database file
    cannot grow), the log latches, but the commit before it is durable, not dropped."""
    path = tmp_path / "sessions.db"
    done = _child(_FULL_DISK_AT_CHECKPOINT, str(path))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["healthy"] is False
    assert out["reported"] == [out["flush_error"]]
    assert out["commits"] >= 100  # the failure came with a WAL checkpoint, not with a commit
    assert out["committed_pulse_no"] == out["last_recorded"]
    assert out["dropped"] == 0
    report = verify_log(path)
    assert report.ok, report.first_break
    assert report.pulses == out["last_recorded"]


_CRASH = """
    import os, signal, sys
    from pathlib import Path
    from tests.sessionlog.helpers import fill_session, open_log, session_info

    path, flushed, more = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    slog = open_log(path)
    sid = slog.start_session(session_info(), device_pulse_count=1000).session_id
    pulse_no = fill_session(slog, sid, first_pulse_no=1001, pulses=flushed)
    slog.flush()
    for i in range(more):
        slog.record_pulse(sid, pulse_no + i, 0, 0, 2000, "cheeks")
    os.kill(os.getpid(), signal.SIGKILL)  # power cut: no close, no flush
"""


def _committed_pulses(path: Path, session_id: int) -> int:
    conn = connect(path, readonly=True)
    (count,) = conn.execute(
        "SELECT count(*) FROM pulses WHERE session_id = ?", (session_id,)
    ).fetchone()
    conn.close()
    return int(count)


@pytest.mark.parametrize(("flushed", "more", "never_seen"), [(40, 3000, 25), (10, 0, 0), (0, 0, 4)])
def test_a_crash_is_recovered_and_every_pulse_accounted(
    tmp_path: Path, flushed: int, more: int, never_seen: int
) -> None:
    path = tmp_path / "sessions.db"
    crashed = _child(_CRASH, str(path), str(flushed), str(more))
    assert crashed.returncode == -9, crashed.stderr
    device_pulse_count = 1000 + flushed + more + never_seen  # the board's counter after the crash

    with open_log(path) as slog:
        assert slog.open_session() == 1
        with pytest.raises(SessionRefused, match="recover_interrupted"):
            slog.start_session(session_info(course_session_number=2))
        recovery = slog.recover_interrupted(device_pulse_count, max_energy_uj=60_000)
        assert slog.open_session() is None
        assert slog.last_pulse_no() == device_pulse_count
        slog.flush()
        committed = _committed_pulses(path, 1)
        assert flushed <= committed <= flushed + more
        assert recovery.interrupted_session == 1
        assert committed + recovery.unlogged_pulses == device_pulse_count - 1000
        assert recovery.charged_energy_uj == recovery.unlogged_pulses * 60_000
        assert recovery.summary is not None
        assert recovery.summary.outcome == "interrupted"
        assert recovery.summary.pulses == committed
        assert recovery.summary.unlogged_pulses == recovery.unlogged_pulses
        assert recovery.summary.faults == (1 if recovery.unlogged_pulses else 0)
        assert slog.start_session(session_info(course_session_number=2)).session_id == 2

    assert verify_log(path).ok
    conn = connect(path, readonly=True)
    outcomes = [(s.session_id, s.outcome) for s in list_sessions(conn)]
    conn.close()
    assert outcomes == [(1, "interrupted"), (2, "open")]


def test_reconciling_a_clean_stop_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=500).session_id
        nxt = fill_session(slog, sid, first_pulse_no=501, pulses=5)
        slog.end_session(sid, actor="op-anna")
    with open_log(path) as slog:
        assert slog.last_pulse_no() == nxt - 1
        recovery = slog.recover_interrupted(nxt - 1, max_energy_uj=60_000)
        assert (recovery.interrupted_session, recovery.unlogged_pulses) == (None, 0)
        # Pulses fired outside any session while the daemon was down are still charged.
        later = slog.recover_interrupted(nxt + 2, max_energy_uj=60_000)
        assert (later.interrupted_session, later.unlogged_pulses) == (None, 3)
    with open_log(path) as slog:
        assert slog.last_pulse_no() == nxt + 2


def test_a_counter_behind_the_log_is_flagged_not_charged(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    with open_log(path) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=500).session_id
        fill_session(slog, sid, first_pulse_no=501, pulses=5)
        slog.end_session(sid, actor="op-anna")
    with open_log(path) as slog:
        recovery = slog.recover_interrupted(3, max_energy_uj=60_000)  # a replaced board
        assert recovery.counter_mismatch
        assert recovery.unlogged_pulses == 0
        assert slog.last_pulse_no() == 3
