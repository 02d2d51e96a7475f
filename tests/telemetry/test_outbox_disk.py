"""The outbox when its disk refuses writes: nothing silenced, nothing reordered, no seq skipped."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from devicectl.telemetry import Outbox


class RefusingDisk:
    """Stands in for the outbox's SQLite connection: while ``full``, any write fails as SQLite
    does on a full disk; reads go through."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql.split(maxsplit=1)[0].upper() in {"INSERT", "DELETE", "UPDATE"}:
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __enter__(self) -> Any:
        return self.db.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.db.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _put(outbox: Outbox, text: str, topic: str = "t/alerts", stream: str = "alerts") -> int:
    seq, _ = outbox.enqueue(topic, stream, lambda n: f'{{"seq":{n},"m":"{text}"}}'.encode())
    return seq


def test_a_refusing_disk_keeps_messages_in_memory_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    disk = RefusingDisk(outbox._db)
    outbox._db = disk  # type: ignore[assignment]
    assert [_put(outbox, "a"), _put(outbox, "b")] == [1, 2]
    disk.full = True
    assert [_put(outbox, "c"), _put(outbox, "d")] == [3, 4]  # no seq skipped, none refused
    assert outbox.unwritable is not None and "full" in outbox.unwritable
    assert outbox.in_memory == 2 and outbox.depth == 4
    rows = outbox.fetch(0, 10)
    assert [r.payload for r in rows] == [
        b'{"seq":1,"m":"a"}', b'{"seq":2,"m":"b"}', b'{"seq":3,"m":"c"}', b'{"seq":4,"m":"d"}'
    ]  # fmt: skip
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert [r.id for r in outbox.fetch(rows[1].id, 10)] == [rows[2].id, rows[3].id]
    # Delivered: stored rows' deletes wait for the disk, memory rows go at once.
    for row in rows:
        outbox.ack(row.id, len(row.payload))
    outbox.flush_acks()
    assert outbox.in_memory == 0
    disk.full = False
    assert _put(outbox, "e") == 5  # stored again, after everything kept in memory
    assert outbox.unwritable is None
    later = outbox.fetch(rows[-1].id, 10)
    assert [r.payload for r in later] == [b'{"seq":5,"m":"e"}']
    outbox.flush_acks()  # the deletes that waited go through now
    outbox.close()

    again = Outbox(tmp_path / "outbox.sqlite")  # a restart: the counter came through
    assert again.peek_seq("t/alerts") == 5
    assert [r.payload for r in again.fetch(0, 10)] == [b'{"seq":5,"m":"e"}']
    again.close()


def test_counters_advanced_in_memory_are_written_with_the_next_stored_message(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    disk = RefusingDisk(outbox._db)
    outbox._db = disk  # type: ignore[assignment]
    disk.full = True
    assert outbox.next_seq("t/metrics") == 1  # live-only topics keep counting too
    _put(outbox, "x", topic="t/state", stream="state")
    for row in outbox.fetch(0, 10):
        outbox.ack(row.id, len(row.payload))
    disk.full = False
    _put(outbox, "y")
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite")
    assert (again.peek_seq("t/metrics"), again.peek_seq("t/state")) == (1, 1)
    again.close()
