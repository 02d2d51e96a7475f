"""The hash chain: an untouched log always verifies; any single change to a stored record is found
and named (property tests over real log files, mutated with SQL as an attacker would: in the STRICT
schema the writer creates, and in a copy whose tables were rewritten without column types)."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devicectl.sessionlog import InvalidSessionInfo, verify_log
from tests.sessionlog.helpers import Clock, fill_session, open_log, session_info

COLUMNS = {
    "pulses": ("seq", "session_id", "pulse_no", "t_us", "host_ns", "energy_uj", "zone", "hash"),
    "records": ("seq", "session_id", "kind", "at_ns", "body", "hash"),
    "chain_head": ("seq", "hash"),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sessions: pulses, zones, params, STATUS samples, events, a gap, ends; between them,
    records of no session (an idle STATUS, a lost link, a pulse with no session open, and the
    reconciliation after a restart)."""
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
        slog.record_status(
            None, state=1, interlocks=0, head_temp_cdeg=2400, skin_temp_cdeg=3000, pulse_count=nxt
        )
        slog.record_event(None, "link_lost", "devicectl", {"reason": "timeout"}, None)
        slog.record_pulse_gap(
            None, nxt + 1, nxt + 1, charged_energy_uj=900, zone="none", cause="no session"
        )
    with open_log(path, clock) as slog:
        assert slog.recover_interrupted(nxt + 3, 60_000).unlogged_pulses == 2
        sid = slog.start_session(session_info(course_session_number=2)).session_id
        fill_session(slog, sid, first_pulse_no=nxt + 4, pulses=8, zone="neck")
        slog.end_session(sid, actor="op-anna")
    return path


@pytest.fixture(scope="module")
def loose_template(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template with its tables rewritten without STRICT or column types, so that a value of
    any type can be stored in any column (what SQLite itself refuses in the writer's schema)."""
    path = tmp_path_factory.mktemp("loose") / "sessions.db"
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path, isolation_level=None)
    for table, columns in COLUMNS.items():
        key = "id INTEGER PRIMARY KEY" if table == "chain_head" else "seq INTEGER PRIMARY KEY"
        rest = [c for c in columns if c != "seq"] if table != "chain_head" else list(columns)
        everything = ["id", *columns] if table == "chain_head" else list(columns)
        conn.executescript(
            f"CREATE TABLE loose ({key}, {', '.join(rest)});"
            f"INSERT INTO loose ({', '.join(everything)}) "
            f"SELECT {', '.join(everything)} FROM {table};"
            f"DROP TABLE {table}; ALTER TABLE loose RENAME TO {table};"
        )
    conn.close()
    assert verify_log(path).ok
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


def _where(table: str, seq: object) -> tuple[str, tuple[object, ...]]:
    return ("", ()) if table == "chain_head" else (" WHERE seq = ?", (seq,))


def _stored(conn: sqlite3.Connection, table: str, column: str, seq: object) -> object:
    where, args = _where(table, seq)
    return conn.execute(
        f"SELECT typeof({column}), hex({column}) FROM {table}{where}", args
    ).fetchone()


def _edit(conn: sqlite3.Connection, data: st.DataObject) -> str:
    table = data.draw(st.sampled_from(sorted(COLUMNS)), label="table")
    rows = _rows(conn, table)
    row = data.draw(st.sampled_from(rows), label="row")
    column = data.draw(st.sampled_from(range(len(COLUMNS[table]))), label="column")
    new = _changed(row[column], data)
    where, args = _where(table, row[0])
    conn.execute(f"UPDATE {table} SET {COLUMNS[table][column]} = ?{where}", (new, *args))
    return f"edit {table}.{COLUMNS[table][column]} of seq {row[0]}"


def _nullable(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """(table, column, declared type) of every column the schema lets hold NULL."""
    return [
        (table, name, declared)
        for table in sorted(COLUMNS)
        for _, name, declared, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})")
        if name in COLUMNS[table] and not notnull and not pk
    ]


def _null_swap(conn: sqlite3.Connection, data: st.DataObject) -> str:
    """A NULL replaced by a value (the sentinels first) or a value by NULL, in a nullable column."""
    # The writer's schema: records.session_id only; the loose one: every column.
    table, column, declared = data.draw(st.sampled_from(_nullable(conn)), label="column")
    rows = _rows(conn, table)
    index = COLUMNS[table].index(column)
    nulls = [r for r in rows if r[index] is None]
    row = data.draw(st.sampled_from(nulls or rows), label="row")
    if row[index] is None:
        new: object = data.draw(
            {
                "INTEGER": st.sampled_from([-1, 0, 1, 2]) | st.integers(-(2**63), 2**63 - 1),
                "TEXT": st.sampled_from(["", "-1", "null", "None"]) | st.text(),
                "BLOB": st.binary(),
            }.get(declared, st.sampled_from([-1, 0, "", b""])),
            label="value for NULL",
        )
    else:
        new = None
    where, args = _where(table, row[0])
    conn.execute(f"UPDATE {table} SET {column} = ?{where}", (new, *args))
    return f"set {table}.{column} of seq {row[0]} from {row[index]!r} to {new!r}"


def _retype(conn: sqlite3.Connection, data: st.DataObject) -> str:
    """A value cast to another storage class: its bytes or number kept, its type changed."""
    table = data.draw(st.sampled_from(sorted(COLUMNS)), label="table")
    column = data.draw(st.sampled_from([c for c in COLUMNS[table] if c != "seq"]), label="column")
    row = data.draw(st.sampled_from(_rows(conn, table)), label="row")
    target = data.draw(st.sampled_from(["INTEGER", "REAL", "TEXT", "BLOB"]), label="type")
    where, args = _where(table, row[0])
    before = _stored(conn, table, column, row[0])
    conn.execute(f"UPDATE {table} SET {column} = CAST({column} AS {target}){where}", args)
    assume(_stored(conn, table, column, row[0]) != before)  # the schema coerced it back
    return f"cast {table}.{column} of seq {row[0]} to {target}"


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
    "null_swap": _null_swap,
    "retype": _retype,
    "delete": _delete,
    "insert": _insert,
    "swap": _swap,
    "swap_across": _swap_across,
}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_change_is_detected(
    template: Path, loose_template: Path, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    schema = data.draw(st.sampled_from(["strict", "loose"]), label="schema")
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sessions.db"
        shutil.copyfile(template if schema == "strict" else loose_template, path)
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


def test_a_record_of_no_session_given_the_sentinel_id_is_named(
    template: Path, tmp_path: Path
) -> None:
    """The chain encodes NULL as -1: a session_id edited from NULL to -1 hashes alike, so the
    verifier refuses ids no session can have."""
    (seq,) = (
        sqlite3.connect(template)
        .execute("SELECT min(seq) FROM records WHERE session_id IS NULL")
        .fetchone()
    )
    path = _mutated(template, tmp_path, f"UPDATE records SET session_id = -1 WHERE seq = {seq}")
    brk = verify_log(path).first_break
    assert brk is not None
    assert (brk.seq, brk.table, brk.problem) == (seq, "records", "altered")
    assert f"record {seq} (status of session -1) was altered: its session_id is -1" in brk.message


@pytest.mark.parametrize("session_id", [-1, 0, True, "1"])
def test_the_writer_refuses_an_id_no_session_has(tmp_path: Path, session_id: object) -> None:
    with open_log(tmp_path / "sessions.db") as slog:
        with pytest.raises(InvalidSessionInfo, match="session_id"):
            slog.record_event(session_id, "note", "op-anna", {})  # type: ignore[arg-type]
        with pytest.raises(InvalidSessionInfo, match="session_id"):
            slog.record_status(
                session_id,  # type: ignore[arg-type]
                state=1,
                interlocks=0,
                head_temp_cdeg=0,
                skin_temp_cdeg=0,
                pulse_count=0,
            )
        slog.flush()
    assert verify_log(tmp_path / "sessions.db").head_seq == 0


def test_text_that_is_not_utf8_is_named_not_unreadable(template: Path, tmp_path: Path) -> None:
    path = _mutated(
        template,
        tmp_path,
        "UPDATE pulses SET zone = CAST(x'6e65636bff' AS TEXT) WHERE seq = (SELECT max(seq) "
        "FROM pulses)",
    )
    brk = verify_log(path).first_break
    assert brk is not None
    assert (brk.table, brk.problem) == ("pulses", "altered")
    assert "its zone is stored as text that is not UTF-8" in brk.message


@pytest.mark.parametrize(
    ("table", "column", "value", "words"),
    [
        ("records", "session_id", "'1'", "its session_id is stored as text"),
        ("records", "at_ns", "CAST(at_ns AS REAL)", "its at_ns is stored as a real"),
        ("records", "kind", "CAST(kind AS BLOB)", "its kind is stored as a blob"),
        ("pulses", "zone", "7", "its zone is stored as an integer"),
        ("pulses", "energy_uj", "CAST(energy_uj AS TEXT)", "its energy_uj is stored as text"),
        ("pulses", "hash", "CAST(hash AS TEXT)", "its hash is stored as text"),
        ("chain_head", "seq", "CAST(seq AS TEXT)", "the chain head was altered: its seq"),
        ("chain_head", "hash", "CAST(hash AS TEXT)", "was altered: its hash is stored as text"),
    ],
)
def test_a_value_stored_with_another_type_is_named(
    loose_template: Path, tmp_path: Path, table: str, column: str, value: str, words: str
) -> None:
    """Once the STRICT tables are rewritten, SQLite no longer refuses '1' for 1: the verifier
    must, rather than coerce it (or crash on it)."""
    where = "" if table == "chain_head" else f" WHERE seq = (SELECT max(seq) FROM {table})"
    path = _mutated(loose_template, tmp_path, f"UPDATE {table} SET {column} = {value}{where}")
    brk = verify_log(path).first_break
    assert brk is not None
    assert (brk.table, brk.problem) == (table, "altered")
    assert words in brk.message


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
        st.tuples(st.just("idle"), st.integers(1, 3), st.text(max_size=30)),
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
        with open_log(path, clock, status_interval_s=0, idle_status_interval_s=0) as slog:
            pulse_no = 1
            for op, number, text in ops:
                clock.advance(seconds=1)
                sid = slog.open_session()
                if op == "idle":  # records of no session: between sessions
                    if sid is not None:
                        slog.end_session(sid, actor="op-anna")
                    slog.record_status(
                        None,
                        state=1,
                        interlocks=0,
                        head_temp_cdeg=2500,
                        skin_temp_cdeg=3000,
                        pulse_count=pulse_no - 1,
                    )
                    slog.record_event(None, "link_lost", "devicectl", {"text": text}, text or None)
                    slog.record_pulse_gap(
                        None,
                        pulse_no,
                        pulse_no + number - 1,
                        charged_energy_uj=900,
                        zone="none",
                        cause=text,
                    )
                    pulse_no += number
                    continue
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
