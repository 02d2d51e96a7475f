"""The recorder's database on both engines: migrations, idempotent writes, sessions, courses,
gaps, checkpoints, refused rows. No broker here (test_recorder.py has the end-to-end tests)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import pytest

from devicectl.recorder import queries
from devicectl.recorder.intake import Refused, take, utc_text
from devicectl.recorder.schema import MIGRATIONS
from devicectl.recorder.store import open_store
from tests.recorder.helpers import T0, FakeDevice, accepted, patient_key

pytestmark = pytest.mark.system  # a PostgreSQL server for half of them


async def test_migrations_run_once_and_record_their_version(db_url: str) -> None:
    async with await open_store(db_url) as store:
        assert await store.schema_version() == MIGRATIONS[-1][0]
    async with await open_store(db_url) as store:  # a second start applies nothing again
        rows = await store.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == [m[0] for m in MIGRATIONS]


async def test_a_message_delivered_twice_is_stored_once(db_url: str) -> None:
    device = FakeDevice("laser-1")
    messages = device.treatment("1", patient_key("PT-1"), T0)
    batch = [accepted(t, p) for t, p in messages]
    async with await open_store(db_url) as store:
        await store.write(batch, [], utc_text(T0))
        await store.write(batch[2:], [], utc_text(T0))  # a redelivery after a lost PUBACK
        await store.write(batch + batch, [], utc_text(T0))  # the same message twice in a batch
        counts = await queries.stored_counts(store)
    assert counts["messages"] == len(messages)
    assert counts["pulse_batches"] == 3
    assert counts["pulses"] == 15
    assert counts["sessions"] == 1


async def test_a_large_batch_twice_is_stored_once(db_url: str) -> None:
    # Large enough for PostgreSQL's COPY-through-staging path, twice in one connection.
    devices = [FakeDevice(f"laser-{n}") for n in range(60)]
    batch = [accepted(*d.pulses("1", 20)) for d in devices for _ in range(3)]
    async with await open_store(db_url) as store:
        await store.write(batch, [], utc_text(T0))
        await store.write(batch[::-1], [], utc_text(T0))
        counts = await queries.stored_counts(store)
    assert counts["messages"] == counts["pulse_batches"] == 180
    assert counts["pulses"] == 180 * 20


async def test_a_sessions_pulses_are_rebuilt_from_its_batches(db_url: str) -> None:
    device = FakeDevice("laser-1")
    messages = device.treatment("7", patient_key("PT-1"), T0, batches=4, per_batch=6)
    async with await open_store(db_url) as store:
        # Out of order and repeated, as two recorders and a replay would deliver them.
        batch = [accepted(t, p) for t, p in reversed(messages)]
        await store.write(batch[:3], [], utc_text(T0))
        await store.write(batch, [], utc_text(T0))
        pulses = await queries.session_pulses(store, "laser-1", "7")
        detail = await queries.session_detail(store, "laser-1", "7")
    assert [p[0] for p in pulses] == list(range(1, 25))
    assert all(p[3] == "cheeks" for p in pulses)
    assert detail is not None
    assert detail["pulses"] == 24 == detail["recorded_pulses"]
    assert detail["patient"] == patient_key("PT-1")
    assert [e["event"] for e in detail["events"]] == ["started", "ended"]
    assert detail["summary"]["pulses"] == 24


async def test_sessions_are_listed_by_device_patient_and_date(db_url: str) -> None:
    a, b = FakeDevice("laser-a"), FakeDevice("laser-b")
    p1, p2 = patient_key("PT-1"), patient_key("PT-2")
    messages = a.treatment("1", p1, T0) + b.treatment("1", p1, T0 + timedelta(days=9))
    messages += a.treatment("2", p2, T0 + timedelta(days=1))
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in messages], [], utc_text(T0))
        by_device = await queries.list_sessions(store, device="laser-a")
        by_patient = await queries.list_sessions(store, patient=p1)
        by_date = await queries.list_sessions(store, since="2026-11-03", until="2026-11-04")
    assert [(s.device, s.session) for s in by_device] == [("laser-a", "2"), ("laser-a", "1")]
    assert [s.device for s in by_patient] == ["laser-b", "laser-a"]
    assert [(s.device, s.patient) for s in by_date] == [("laser-a", p2)]


async def test_a_course_spans_devices_and_skips_sessions_without_pulses(db_url: str) -> None:
    a, b = FakeDevice("laser-a"), FakeDevice("laser-b")
    key = patient_key("PT-9")
    messages = a.treatment("1", key, T0)
    messages += b.treatment("1", key, T0 + timedelta(days=8), batches=0)  # abandoned, no pulse
    messages += b.treatment("2", key, T0 + timedelta(days=9))
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in messages], [], utc_text(T0))
        soon = await queries.course(store, key, planned=4, now=T0 + timedelta(days=12))
        late = await queries.course(store, key, planned=4, now=T0 + timedelta(days=30))
    assert [s.kind for s in soon.sessions] == ["course", "not_counted", "course"]
    assert [s.number for s in soon.sessions] == [1, None, 2]
    assert soon.devices == ("laser-a", "laser-b")
    assert soon.given == 2
    assert soon.next_number == 3
    assert [w.code for w in soon.warnings] == ["interval_short"]
    assert [w.code for w in late.warnings] == ["interval_long"]


async def test_after_a_complete_course_sessions_are_maintenance(db_url: str) -> None:
    device = FakeDevice("laser-a")
    key = patient_key("PT-4")
    messages = []
    for n in range(6):
        messages += device.treatment(str(n + 1), key, T0 + timedelta(days=10 * n))
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in messages], [], utc_text(T0))
        course = await queries.course(store, key, planned=4, now=T0 + timedelta(days=90))
    assert [s.kind for s in course.sessions] == ["course"] * 4 + ["maintenance"] * 2
    assert course.complete
    assert course.maintenance == 2
    assert [w.code for w in course.warnings] == ["maintenance"]


async def test_seq_gaps_and_boot_changes_are_visible(db_url: str) -> None:
    device = FakeDevice("laser-1")
    first = [device.state() for _ in range(3)]
    device.seqs["lasers/clinic1/laser-1/state"] += 2  # two states lost on the way
    device.boot = 2
    after = [device.state() for _ in range(2)]
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in first + after], [], utc_text(T0))
        found = await queries.gaps(store, "laser-1")
        boots = await store.fetch(
            "SELECT boot, previous_boot FROM boot_changes WHERE device = %s ORDER BY boot",
            ["laser-1"],
        )
    assert found == [
        {
            "device": "laser-1",
            "topic": "lasers/clinic1/laser-1/state",
            "previous_boot": 1,
            "previous_seq": 3,
            "boot": 2,
            "seq": 6,
            "missing": 2,
        }
    ]
    assert [(int(b), p) for b, p in boots] == [(1, None), (2, 1)]


def _checkpoint(device: str, seq: int, log_seq: int) -> tuple[str, bytes]:
    body = {
        "v": 1,
        "ts": "2026-11-02T09:00:00Z",
        "device": device,
        "seq": seq,
        "boot": 1,
        "log_seq": log_seq,
        "hash": f"{log_seq:064x}",
        "time": "2026-11-02T09:00:00Z",
        "key_id": "ab12cd34" * 4,
        "public_key": base64.b64encode(b"k" * 32).decode(),
        "signature": base64.b64encode(b"s" * 64).decode(),
    }
    return f"lasers/clinic1/{device}/log/checkpoint", json.dumps(body).encode()


async def test_checkpoints_are_archived_once_each(db_url: str) -> None:
    messages = [_checkpoint("laser-1", 1, 10), _checkpoint("laser-1", 2, 20)]
    retained_again = _checkpoint("laser-1", 2, 20)  # the retained copy at a resubscription
    async with await open_store(db_url) as store:
        batch = [accepted(t, p, retained=True) for t, p in [*messages, retained_again]]
        await store.write(batch, [], utc_text(T0))
        await store.write(batch, [], utc_text(T0))
    # The synchronous entry point `devicectl log verify --witness` uses, from a plain thread.
    loaded = await asyncio.to_thread(queries.load_witnessed_checkpoints, db_url, "laser-1")
    assert [c["log_seq"] for c in loaded] == [10, 20]
    assert loaded[0]["hash"] == f"{10:064x}"
    assert {"key_id", "public_key", "signature", "time", "seq", "boot"} <= set(loaded[0])
    assert await asyncio.to_thread(queries.load_witnessed_checkpoints, db_url, "laser-2") == []


async def test_refused_messages_are_kept_for_inspection_not_stored(db_url: str) -> None:
    bad = take(
        "lasers/clinic1/laser-1/state",
        b'{"v":1}',
        retained=False,
        boot_property=None,
        recorded=utc_text(T0),
    )
    assert isinstance(bad, Refused)
    good = accepted(*FakeDevice("laser-1").state())
    async with await open_store(db_url) as store:
        result = await store.write([good], [bad], utc_text(T0))
        rows = await store.fetch("SELECT topic, reason, size FROM rejects")
        counts = await queries.stored_counts(store)
    assert result.refused == [bad]
    assert counts["messages"] == 1
    assert rows == [("lasers/clinic1/laser-1/state", bad.reason, 7)]


async def test_a_row_the_database_refuses_goes_to_rejects_and_the_rest_is_stored(
    db_url: str,
) -> None:
    device = FakeDevice("laser-1")
    good = [accepted(*device.state()) for _ in range(3)]
    bad = accepted(*device.state())
    row = list(bad.rows["messages"])
    row[7] = None  # ts is NOT NULL: the engine itself refuses this row
    bad.rows["messages"] = tuple(row)
    async with await open_store(db_url) as store:
        result = await store.write([good[0], bad, *good[1:]], [], utc_text(T0))
        counts = await queries.stored_counts(store)
        rejects = await store.fetch("SELECT topic, reason FROM rejects")
    assert counts["messages"] == 3
    assert len(result.refused) == 1
    assert rejects[0][0] == bad.topic
    assert "database refused" in rejects[0][1]
