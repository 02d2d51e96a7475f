"""What the fleet's history asks the recorder's database: sessions, one session, a course,
gaps, checkpoints. Shared by ``devicectl fleet``, the dashboard's history view and the recorder's
course replies, so the three always agree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from devicectl.recorder.courses import Course, compute_course
from devicectl.recorder.store import RecorderStore, open_store

__all__ = [
    "SESSION_FACTS",
    "SessionRow",
    "course",
    "gaps",
    "list_sessions",
    "load_witnessed_checkpoints",
    "session_detail",
    "session_pulses",
    "stored_counts",
]

# The facts of :func:`session_detail` that `devicectl fleet session` and the dashboard's
# history page show, in this order (the zones and pulses follow them).
SESSION_FACTS = (
    "device",
    "session",
    "site",
    "patient",
    "operator",
    "skin_type",
    "started",
    "ended",
    "pulses",
    "recorded_pulses",
    "energy_uj",
    "faults",
)

_SESSION_SELECT = """
    SELECT s.device, s.session, s.site, s.patient, s.operator, s.skin_type, s.started,
           e.ended, e.pulses, e.energy_uj, e.faults,
           (SELECT COALESCE(SUM(p.pulse_count), 0) FROM pulse_batches p
             WHERE p.device = s.device AND p.session = s.session) AS batch_pulses,
           (SELECT COALESCE(SUM(p.energy_uj_sum), 0) FROM pulse_batches p
             WHERE p.device = s.device AND p.session = s.session) AS batch_energy
    FROM sessions s LEFT JOIN session_ends e ON e.device = s.device AND e.session = s.session
"""


@dataclass(frozen=True, slots=True)
class SessionRow:
    device: str
    session: str
    site: str
    patient: str | None
    operator: str | None
    skin_type: str | None
    started: str
    ended: str | None
    pulses: int  # the closing summary's, else the pulses recorded in batches so far
    energy_uj: int
    faults: int | None
    recorded_pulses: int  # pulses present in the recorded batches

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "session": self.session,
            "site": self.site,
            "patient": self.patient,
            "operator": self.operator,
            "skin_type": self.skin_type,
            "started": self.started,
            "ended": self.ended,
            "pulses": self.pulses,
            "energy_uj": self.energy_uj,
            "faults": self.faults,
            "recorded_pulses": self.recorded_pulses,
        }


def _session_row(row: tuple[Any, ...]) -> SessionRow:
    (device, session, site, patient, operator, skin, started, ended, pulses, energy, faults) = row[
        :11
    ]
    batch_pulses, batch_energy = int(row[11]), int(row[12])
    return SessionRow(
        device,
        session,
        site,
        patient,
        operator,
        skin,
        started,
        ended,
        int(pulses) if pulses is not None else batch_pulses,
        int(energy) if energy is not None else batch_energy,
        None if faults is None else int(faults),
        batch_pulses,
    )


async def list_sessions(
    store: RecorderStore,
    *,
    device: str | None = None,
    patient: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 200,
) -> list[SessionRow]:
    """Sessions newest first, filtered by device, patient key and start date (``YYYY-MM-DD``
    or RFC 3339; ``until`` is exclusive)."""
    where, params = [], []
    for column, value in (("s.device", device), ("s.patient", patient)):
        if value is not None:
            where.append(f"{column} = %s")
            params.append(value)
    if since is not None:
        where.append("s.started >= %s")
        params.append(since)
    if until is not None:
        where.append("s.started < %s")
        params.append(until)
    sql = _SESSION_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY s.started DESC, s.device, s.session LIMIT %s"
    rows = await store.fetch(sql, [*params, max(1, min(limit, 10_000))])
    return [_session_row(r) for r in rows]


async def session_detail(store: RecorderStore, device: str, session: str) -> dict[str, Any] | None:
    """One session: its row, its lifecycle events and alerts in order, its closing summary,
    and how its recorded pulses compare with the summary (a rebuilt report's facts)."""
    rows = await store.fetch(
        _SESSION_SELECT + " WHERE s.device = %s AND s.session = %s", [device, session]
    )
    if not rows:
        return None
    head = _session_row(rows[0])
    events = await store.fetch(
        "SELECT stream, ts, boot, seq, historical, payload FROM messages "
        "WHERE device = %s AND session = %s AND stream IN ('session-events', 'alerts') "
        "ORDER BY ts, seq",
        [device, session],
    )
    summary = await store.fetch(
        "SELECT summary FROM session_ends WHERE device = %s AND session = %s", [device, session]
    )
    timeline = []
    for stream, ts, boot, seq, historical, payload in events:
        body = json.loads(payload) if payload else {}
        timeline.append(
            {
                "stream": stream,
                "ts": ts,
                "boot": int(boot),
                "seq": int(seq),
                "historical": bool(historical),
                "event": body.get("event") if stream == "session-events" else body.get("code"),
                "details": body.get("details") if stream == "session-events" else body,
            }
        )
    batches = await store.fetch(
        "SELECT zone, COUNT(*), COALESCE(SUM(pulse_count), 0), COALESCE(SUM(energy_uj_sum), 0), "
        "COALESCE(SUM(dropped), 0) FROM pulse_batches WHERE device = %s AND session = %s "
        "GROUP BY zone ORDER BY zone",
        [device, session],
    )
    return {
        **head.as_dict(),
        "summary": json.loads(summary[0][0]) if summary else None,
        "events": timeline,
        "zones": [
            {
                "zone": zone,
                "batches": int(n),
                "pulses": int(pulses),
                "energy_uj": int(energy),
                "dropped": int(dropped),
            }
            for zone, n, pulses, energy, dropped in batches
        ],
    }


async def session_pulses(
    store: RecorderStore, device: str, session: str
) -> list[tuple[int, int, int, str | None]]:
    """Every recorded pulse of a session: (pulse_no, t_us, energy_uj, zone), pulse_no order,
    each once (batches are stored once per (device, topic, boot, seq))."""
    rows = await store.fetch(
        "SELECT zone, payload FROM pulse_batches WHERE device = %s AND session = %s "
        "ORDER BY first_pulse_no, boot, seq",
        [device, session],
    )
    pulses: dict[int, tuple[int, int, int, str | None]] = {}
    for zone, text in rows:
        for pulse_no, t_us, energy in json.loads(text)["pulses"]:
            pulses.setdefault(pulse_no, (pulse_no, t_us, energy, zone))
    return [pulses[n] for n in sorted(pulses)]


async def course(
    store: RecorderStore, patient: str, *, planned: int = 6, now: datetime | None = None
) -> Course:
    """The patient's course across every device (``now``: with the warnings for a new session)."""
    rows = await store.fetch(
        _SESSION_SELECT + " WHERE s.patient = %s ORDER BY s.started", [patient]
    )
    sessions = [_session_row(r) for r in rows]
    return compute_course(
        patient,
        [(s.device, s.session, s.started, s.ended, s.pulses) for s in sessions],
        planned=planned,
        now=now,
    )


async def gaps(store: RecorderStore, device: str | None = None) -> list[dict[str, Any]]:
    """Per-topic seq gaps in what is stored (QoS 1 streams; metrics are live-only)."""
    sql = "SELECT device, topic, previous_boot, previous_seq, boot, seq, missing FROM seq_gaps"
    params: list[Any] = []
    if device is not None:
        sql += " WHERE device = %s"
        params.append(device)
    rows = await store.fetch(sql + " ORDER BY device, topic, seq", params)
    keys = ("device", "topic", "previous_boot", "previous_seq", "boot", "seq", "missing")
    return [dict(zip(keys, row, strict=True)) for row in rows]


async def stored_counts(store: RecorderStore) -> dict[str, int]:
    """Rows per table (the benchmark's and the tests' view of what was stored)."""
    counts = {}
    for table in ("messages", "pulse_batches", "sessions", "checkpoints", "rejects"):
        rows = await store.fetch(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
        counts[table] = int(rows[0][0])
    rows = await store.fetch("SELECT COALESCE(SUM(pulse_count), 0) FROM pulse_batches")
    counts["pulses"] = int(rows[0][0])
    return counts


async def checkpoints(store: RecorderStore, device: str | None) -> list[dict[str, Any]]:
    if device is None:
        rows = await store.fetch("SELECT payload FROM checkpoints ORDER BY device, key_id, log_seq")
    else:
        rows = await store.fetch(
            "SELECT payload FROM checkpoints WHERE device = %s ORDER BY key_id, log_seq",
            [device],
        )
    return [json.loads(payload) for (payload,) in rows]


async def load_witnessed_checkpoints_async(db_url: str, device: str | None) -> list[dict[str, Any]]:
    store = await open_store(db_url, migrate=False)
    async with store:
        return await checkpoints(store, device)


def load_witnessed_checkpoints(db_url: str, device: str | None) -> list[dict[str, Any]]:
    """Every signed checkpoint the recorder archived for ``device`` (None: every device's,
    for :func:`~devicectl.sessionlog.verify.verify_against` to pick from), as the payload dicts the
    device published (envelope + ``log_seq``, ``hash``, ``time``, ``key_id``, ``public_key``,
    ``signature``), ordered by key and log_seq: what ``devicectl log verify --witness`` checks a
    device's log against."""
    import asyncio

    return asyncio.run(load_witnessed_checkpoints_async(db_url, device))


def utc_now() -> datetime:
    return datetime.now(UTC)
