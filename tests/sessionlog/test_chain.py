"""The hash chain: an untouched log always verifies; any single change to a stored record is found
and named (property tests over real log files, mutated with SQL as an attacker would)."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devicectl.sessionlog import verify_log
from tests.sessionlog.helpers import Clock, fill_session, open_log, session_info

COLUMNS = {
    "pulses": ("seq", "session_id", "pulse_no", "t_us", "host_ns", "energy_uj", "zone", "hash"),
    "records": ("seq", "session_id", "kind", "at_ns", "body", "hash"),
    "chain_head": ("seq", "hash"),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sessions: pulses, zones, params, STATUS samples, events, a gap, ends."""
    path = tmp_path_factory.mktemp("chain") / "sessions.db"
    clock = Clock()
    with open_log(path, clock) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        nxt = fill_session(slog, sid, first_pulse_no=1, pulses=12)
        slog.record_event(sid, "breach", "supervisor", {"rule": "energy"}, None)
        slog.record_event(sid, "ack", "op-anna", {}, "checked")
        slog.record_pulse_gap(sid, nxt, nxt, charged_energy_uj=60_000, zone="cheeks", cause="gap")
        slog.end_session(sid, actor="op-anna", post_care=["sunscreen"])
        clock.advance(days=8)
        sid = slog.start_session(session_info(course_session_number=2)).session_id
        fill_session(slog, sid, first_pulse_no=nxt + 1, pulses=8, zone="neck")
        slog.end_session(sid, actor="op-anna")
    return path


def _rows(conn: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(
        f"SELECT {', '.join(COLUMNS[table])} FROM {table} ORDER BY rowid"
    ).fetchall()


def _changed(value: object, data: st.DataObject) -> object:
    """The value with one byte (text, blob) or its integer changed."""
    if value is None:
        return data.draw(st.integers(-5, 5), label="new session id")
    if isinstance(value, int):
        return value + data.draw(st.integers(-3, 3).filter(bool), label="delta")
    assert isinstance(value, str | bytes), value
    raw = bytearray(value.encode() if isinstance(value, str) else value)
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[i] ^= data.draw(st.integers(1, 0x7F), label="xor")
    return raw.decode() if isinstance(value, str) else bytes(raw)


def _edit(conn: sqlite3.Connection, data: st.DataObject) -> str:
    table = data.draw(st.sampled_from(sorted(COLUMNS)), label="table")
    rows = _rows(conn, table)
    row = data.draw(st.sampled_from(rows), label="row")
    column = data.draw(st.sampled_from(range(len(COLUMNS[table]))), label="column")
    new = _changed(row[column], data)
    conn.execute(
        f"UPDATE {table} SET {COLUMNS[table][column]} = ? WHERE seq = ?", (new, row[0])
    ) if table != "chain_head" else conn.execute(
        f"UPDATE chain_head SET {COLUMNS[table][column]} = ?", (new,)
    )
    return f"edit {table}.{COLUMNS[table][column]} of seq {row[0]}"


def _delete(conn: sqlite3.Connection, data: st.DataObject) -> str:
    table = data.draw(st.sampled_from(sorted(COLUMNS)), label="table")
    seq = data.draw(st.sampled_from([r[0] for r in _rows(conn, table)]), label="seq")
    conn.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
    return f"delete {table} seq {seq}"


def _insert(conn: sqlite3.Connection, data: st.DataObject) -> str:
    table = data.draw(st.sampled_from(["pulses", "records"]), label="table")
    other = "records" if table == "pulses" else "pulses"
    row = list(data.draw(st.sampled_from(_rows(conn, table)), label="copied row"))
    (top,) = conn.execute("SELECT seq FROM chain_head").fetchone()
    taken = [r[0] for r in _rows(conn, other)]
    row[0] = data.draw(
        st.one_of(st.sampled_from(taken), st.integers(top + 1, top + 3), st.integers(-2, 0)),
        label="seq",
    )
    if data.draw(st.booleans(), label="alter a field too"):
        row[2] = _changed(row[2], data)
    placeholders = ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO {table} ({', '.join(COLUMNS[table])}) VALUES ({placeholders})", row)
    return f"insert into {table} at seq {row[0]}"


def _swap(conn: sqlite3.Connection, data: st.DataObject) -> str:
    table = data.draw(st.sampled_from(["pulses", "records"]), label="table")
    rows = _rows(conn, table)
    a, b = data.draw(
        st.lists(st.sampled_from(rows), min_size=2, max_size=2, unique=True), label="rows"
    )
    names = COLUMNS[table][1:]
    assume(a[1:] != b[1:])
    sets = ", ".join(f"{n} = ?" for n in names)
    conn.execute(f"UPDATE {table} SET {sets} WHERE seq = ?", (*b[1:], a[0]))
    conn.execute(f"UPDATE {table} SET {sets} WHERE seq = ?", (*a[1:], b[0]))
    return f"swap {table} seq {a[0]} and {b[0]}"


def _swap_across(conn: sqlite3.Connection, data: st.DataObject) -> str:
    p = data.draw(st.sampled_from(_rows(conn, "pulses")), label="pulse")
    r = data.draw(st.sampled_from(_rows(conn, "records")), label="record")
    conn.execute("UPDATE pulses SET seq = ? WHERE seq = ?", (r[0], p[0]))
    conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (p[0], r[0]))
    return f"swap the places of pulse seq {p[0]} and record seq {r[0]}"


MUTATIONS: dict[str, Callable[[sqlite3.Connection, st.DataObject], str]] = {
    "edit": _edit,
    "delete": _delete,
    "insert": _insert,
    "swap": _swap,
    "swap_across": _swap_across,
}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_change_is_detected(template: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sessions.db"
        shutil.copyfile(template, path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA synchronous = OFF")  # a scratch copy: no need to wait for the disk
        try:
            what = MUTATIONS[kind](conn, data)
        except sqlite3.IntegrityError:
            assume(False)  # the database itself refused the change (duplicate seq, type)
            raise
        finally:
            conn.close()
        report = verify_log(path)
    assert not report.ok, f"undetected: {what}"
    assert report.first_break is not None
    assert report.first_break.problem in {"altered", "inserted", "deleted"}
    brk = report.first_break
    assert str(brk.seq) in brk.message or brk.table == "chain_head"
    assert "\n" not in brk.message


def test_the_untouched_template_verifies(template: Path) -> None:
    report = verify_log(template)
    assert report.ok
    assert report.pulses == 20
    assert report.records == report.head_seq == report.pulses + _count(template, "records")


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    conn.close()
    return int(n)


def _mutated(template: Path, tmp_path: Path, *statements: str) -> Path:
    path = tmp_path / "sessions.db"
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in statements:
        conn.execute(statement)
    conn.close()
    return path


def test_an_edited_pulse_is_named_by_seq_and_pulse_no(template: Path, tmp_path: Path) -> None:
    seq, pulse_no = (
        sqlite3.connect(template)
        .execute("SELECT seq, pulse_no FROM pulses ORDER BY seq LIMIT 1 OFFSET 3")
        .fetchone()
    )
    path = _mutated(template, tmp_path, f"UPDATE pulses SET energy_uj = 1 WHERE seq = {seq}")
    brk = verify_log(path).first_break
    assert brk is not None
    assert (brk.seq, brk.table, brk.problem) == (seq, "pulses", "altered")
    assert f"record {seq} (pulse_no {pulse_no} of session 1) was altered" in brk.message


def test_a_deleted_row_in_the_middle_is_named(template: Path, tmp_path: Path) -> None:
    path = _mutated(template, tmp_path, "DELETE FROM records WHERE seq = 5")
    report = verify_log(path)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.problem) == (5, "deleted")
    assert report.records == 4


def test_a_deleted_tail_is_found_through_the_head(template: Path, tmp_path: Path) -> None:
    path = _mutated(
        template, tmp_path, "DELETE FROM records WHERE seq = (SELECT max(seq) FROM records)"
    )
    brk = verify_log(path).first_break
    assert brk is not None
    assert brk.problem == "deleted"
    assert "its head says" in brk.message


def test_an_inserted_row_taking_a_place_is_named(template: Path, tmp_path: Path) -> None:
    path = _mutated(
        template,
        tmp_path,
        "INSERT INTO records SELECT 7, session_id, kind, at_ns, body, hash FROM records "
        "WHERE seq = (SELECT min(seq) FROM records)",
    )
    conn = sqlite3.connect(path)
    pulse_at_7 = conn.execute("SELECT count(*) FROM pulses WHERE seq = 7").fetchone()
    conn.close()
    assert pulse_at_7 == (1,)  # the inserted record shares its seq with a genuine pulse
    brk = verify_log(path).first_break
    assert brk is not None
    assert (brk.seq, brk.table, brk.problem) == (7, "records", "inserted")


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("pulse"), st.integers(0, 2**32 - 1), st.text(max_size=12)),
        st.tuples(
            st.just("event"), st.sampled_from(["breach", "ack", "note"]), st.text(max_size=30)
        ),
        st.tuples(st.just("status"), st.integers(-3000, 9000), st.just("")),
        st.tuples(st.just("gap"), st.integers(1, 5), st.just("")),
        st.tuples(st.just("flush"), st.just(0), st.just("")),
        st.tuples(st.just("end"), st.just(0), st.just("")),
    ),
    max_size=80,
)


@settings(max_examples=25, deadline=None)
@given(ops=_OPS)
def test_an_untouched_log_always_verifies(ops: list[tuple[str, int, str]]) -> None:
    clock = Clock()
    pulses = 0
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sessions.db"
        with open_log(path, clock, status_interval_s=0) as slog:
            pulse_no = 1
            for op, number, text in ops:
                clock.advance(seconds=1)
                sid = slog.open_session()
                if sid is None:
                    course = {
                        "course_id": f"C-{clock.now}",
                        "session_number": 1,
                        "planned_sessions": 4,
                    }
                    sid = slog.start_session(session_info(course=course)).session_id
                if op == "pulse":
                    slog.record_pulse(sid, pulse_no, number, clock.now, number, text)
                    pulse_no, pulses = pulse_no + 1, pulses + 1
                elif op == "event":
                    slog.record_event(sid, number, "op-anna", {"text": text}, text or None)  # type: ignore[arg-type]
                elif op == "status":
                    slog.record_status(
                        sid,
                        state=3,
                        interlocks=0,
                        head_temp_cdeg=number,
                        skin_temp_cdeg=number,
                        pulse_count=pulse_no,
                    )
                elif op == "gap":
                    slog.record_pulse_gap(
                        sid,
                        pulse_no,
                        pulse_no + number - 1,
                        charged_energy_uj=60_000,
                        zone="neck",
                        cause=text,
                    )
                    pulse_no += number
                elif op == "flush":
                    slog.flush()
                else:
                    slog.end_session(sid, actor="op-anna")
        report = verify_log(path)
    assert report.ok, report.first_break
    assert report.pulses == pulses
