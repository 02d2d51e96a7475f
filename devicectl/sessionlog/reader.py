"""Reading the log back: the state the writer resumes from, sessions, their pulses and summaries.

Every function takes an open :mod:`sqlite3` connection (see :func:`store.connect`); none writes.
Record kinds and their JSON bodies (all written by :class:`~devicectl.sessionlog.SessionLog`):

    session_started      {"info": SessionInfo, "warnings": [{"code", "message"}],
                          "course_position": CoursePosition, "device_pulse_count" | null,
                          "limits": LimitsInForce | null, "provenance": Provenance | null}
                         (older logs lack "limits", "provenance" and "course_position")
    zone                 {"zone", "energy_limit_uj" | null, "actor", "role"}
    params               {"energy_uj", "width_us", "rate_mhz", "spot_um", "actor", "role",
                          "fluence_limit": {"fluence_j_cm2", "max_fluence_j_cm2", "rule",
                                            "skin_type", "zone", "preset"} | null}
    status               {"state", "interlocks", "head_temp_cdeg", "skin_temp_cdeg", "pulse_count"}
    event                {"event", "actor", "role", "detail", "reason"}
    pulse_gap            {"first", "last", "count", "charged_energy_uj", "zone", "cause"}
    session_ended        {"summary", "post_care", "post_care_declined", "actor", "role", "note"}
    session_interrupted  {"summary", "cause"}
    recovery             {"device_pulse_count", "last_pulse_no", "unlogged", "charged_energy_uj"}
    note                 {"actor", "role", "text"}                     appended at or after the end
    reaction             {"actor", "role", "erythema", "oedema", "text"}
    adverse_event        {"actor", "role", "severity", "text", "action_taken"}

Older logs have no "role" keys (users were not registered then). docs/session-log.md describes
every field.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from devicectl.sessionlog.chain import MIN_SESSION_ID
from devicectl.sessionlog.model import FAULT_EVENT_KINDS, Summary, spot_area_cm2

__all__ = [
    "CourseEntry",
    "LogState",
    "PulseRow",
    "SessionListing",
    "SessionRecord",
    "covering_checkpoint",
    "iter_pulses",
    "list_sessions",
    "load_session",
    "log_state",
    "summarize",
]

_END_KINDS = ("session_ended", "session_interrupted")


@dataclass(frozen=True, slots=True)
class CourseEntry:
    session_id: int
    session_number: int
    patient_ref: str
    started_ns: int
    # Whether the session delivered pulses (only those count in a course); None while open.
    delivered: bool | None = None


@dataclass(slots=True)
class LogState:
    head_seq: int
    head_hash: bytes
    last_pulse_no: int | None
    next_session_id: int
    open_session: int | None
    courses: dict[str, list[CourseEntry]] = field(default_factory=dict)
    # The detail of the last ``breach`` event not followed by a ``fault_ack``: a latch that
    # survives a restart (only an operator's acknowledgement clears it).
    unacknowledged_breach: dict[str, Any] | None = None
    unacknowledged_breach_session: int | None = None  # the session it was recorded in


@dataclass(frozen=True, slots=True)
class PulseRow:
    seq: int
    pulse_no: int
    t_us: int
    host_ns: int
    energy_uj: int
    zone: str


@dataclass(frozen=True, slots=True)
class SessionListing:
    session_id: int
    started_ns: int
    device_serial: str
    operator: str
    patient_ref: str
    outcome: str  # "open" | "completed" | "interrupted"
    pulses: int | None  # from the summary; None while open


@dataclass(slots=True)
class SessionRecord:
    """Everything the log holds about one session, as plain data (JSON-ready)."""

    session_id: int
    started_ns: int
    info: dict[str, Any]
    warnings: list[dict[str, Any]]
    records: list[dict[str, Any]]  # every non-pulse record, in log order: seq, kind, at_ns, body
    summary: Summary | None
    outcome: str
    limits: dict[str, Any] | None = None  # LimitsInForce as recorded; None if not recorded
    provenance: dict[str, Any] | None = None  # Provenance as recorded; None in older logs
    course_position: dict[str, Any] | None = None  # CoursePosition; None in older logs


def log_state(conn: sqlite3.Connection) -> LogState:
    head_seq, head_hash = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    # The pulse_no accounted last (in log order): the last pulse row, a gap charged at maximum
    # energy, a reconciliation, or the device's counter noted when a session started (the
    # baseline of a first session). Latest wins, not largest: a replaced board restarts its count.
    latest: tuple[int, int] | None = conn.execute(
        "SELECT seq, pulse_no FROM pulses ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    keys = {"pulse_gap": "last", "recovery": "device_pulse_count"}
    for seq, kind, body in conn.execute(
        "SELECT seq, kind, body FROM records "
        "WHERE kind IN ('pulse_gap', 'recovery', 'session_started') ORDER BY seq"
    ):
        value = json.loads(body).get(keys.get(kind, "device_pulse_count"))
        if value is not None and (latest is None or seq > latest[0]):
            latest = (seq, int(value))
    max_session = conn.execute("SELECT max(session_id) FROM records").fetchone()[0]
    state = LogState(
        head_seq=int(head_seq),
        head_hash=bytes(head_hash),
        last_pulse_no=None if latest is None else latest[1],
        next_session_id=(int(max_session) + 1) if max_session is not None else MIN_SESSION_ID,
        open_session=None,
    )
    delivered: dict[int, bool] = {}
    for sid, body in conn.execute(
        "SELECT session_id, body FROM records WHERE kind IN (?, ?)", _END_KINDS
    ):
        summary = json.loads(body)["summary"]
        delivered[int(sid)] = int(summary["pulses"]) + int(summary["unlogged_pulses"]) > 0
    ended = set(delivered)
    for sid, at_ns, body in conn.execute(
        "SELECT session_id, at_ns, body FROM records WHERE kind = 'session_started' ORDER BY seq"
    ):
        started = json.loads(body)
        info = started["info"]
        course = info["course"]
        position = started.get("course_position") or {}
        number = position.get("number", course.get("session_number") or 0)
        entry = CourseEntry(
            int(sid), int(number), info["patient_ref"], at_ns, delivered.get(int(sid))
        )
        state.courses.setdefault(course["course_id"], []).append(entry)
        if int(sid) not in ended:
            state.open_session = int(sid)
    # The latched breach: the first since the last acknowledgement (later ones, recorded while it
    # was latched, did not replace it in the supervisor).
    latched = conn.execute(
        "SELECT body, session_id FROM records WHERE kind = 'event' "
        "AND json_extract(body, '$.event') = 'breach' AND seq > coalesce(("
        "SELECT max(seq) FROM records WHERE kind = 'event' "
        "AND json_extract(body, '$.event') = 'fault_ack'), -1) ORDER BY seq LIMIT 1"
    ).fetchone()
    if latched is not None:
        state.unacknowledged_breach = dict(json.loads(latched[0])["detail"])
        state.unacknowledged_breach_session = latched[1]
    return state


def iter_pulses(conn: sqlite3.Connection, session_id: int) -> Iterator[PulseRow]:
    rows = conn.execute(
        "SELECT seq, pulse_no, t_us, host_ns, energy_uj, zone FROM pulses "
        "WHERE session_id = ? ORDER BY seq",
        (session_id,),
    )
    for row in rows:
        yield PulseRow(*row)


def _records(conn: sqlite3.Connection, session_id: int) -> list[dict[str, Any]]:
    return [
        {"seq": seq, "kind": kind, "at_ns": at_ns, "body": json.loads(body)}
        for seq, kind, at_ns, body in conn.execute(
            "SELECT seq, kind, at_ns, body FROM records WHERE session_id = ? ORDER BY seq",
            (session_id,),
        )
    ]


def load_session(conn: sqlite3.Connection, session_id: int) -> SessionRecord | None:
    records = _records(conn, session_id)
    started = next((r for r in records if r["kind"] == "session_started"), None)
    if started is None:
        return None
    end = next((r for r in records if r["kind"] in _END_KINDS), None)
    summary = Summary.from_dict(end["body"]["summary"]) if end is not None else None
    return SessionRecord(
        session_id=session_id,
        started_ns=started["at_ns"],
        info=started["body"]["info"],
        warnings=started["body"].get("warnings", []),
        records=records,
        summary=summary,
        outcome="open" if summary is None else summary.outcome,
        limits=started["body"].get("limits"),
        provenance=started["body"].get("provenance"),
        course_position=started["body"].get("course_position"),
    )


def list_sessions(
    conn: sqlite3.Connection,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    operator: str | None = None,
    patient_ref: str | None = None,
    device_serial: str | None = None,
) -> list[SessionListing]:
    """Sessions started in ``[since_ns, until_ns)`` matching every given filter, oldest first."""
    summaries: dict[int, Summary] = {
        int(sid): Summary.from_dict(json.loads(body)["summary"])
        for sid, body in conn.execute(
            "SELECT session_id, body FROM records WHERE kind IN (?, ?)", _END_KINDS
        )
    }
    found: list[SessionListing] = []
    for sid, at_ns, body in conn.execute(
        "SELECT session_id, at_ns, body FROM records WHERE kind = 'session_started' ORDER BY seq"
    ):
        info = json.loads(body)["info"]
        if since_ns is not None and at_ns < since_ns:
            continue
        if until_ns is not None and at_ns >= until_ns:
            continue
        if operator is not None and info["operator"] != operator:
            continue
        if patient_ref is not None and info["patient_ref"] != patient_ref:
            continue
        if device_serial is not None and info["device_serial"] != device_serial:
            continue
        summary = summaries.get(int(sid))
        found.append(
            SessionListing(
                session_id=int(sid),
                started_ns=int(at_ns),
                device_serial=info["device_serial"],
                operator=info["operator"],
                patient_ref=info["patient_ref"],
                outcome="open" if summary is None else summary.outcome,
                pulses=None if summary is None else summary.pulses,
            )
        )
    return found


def summarize(
    conn: sqlite3.Connection, session_id: int, *, outcome: str, ended_ns: int | None = None
) -> Summary:
    """The summary of a session computed from what was committed (used after a crash, when the
    live totals are lost). ``ended_ns`` defaults to the session's last record or pulse."""
    records = _records(conn, session_id)
    started_ns = next(r["at_ns"] for r in records if r["kind"] == "session_started")
    energy: dict[str, int] = {}
    pulses = 0
    for zone, count, total in conn.execute(
        "SELECT zone, count(*), sum(energy_uj) FROM pulses WHERE session_id = ? GROUP BY zone",
        (session_id,),
    ):
        energy[zone] = int(total)
        pulses += int(count)
    peak = 0.0
    params = [r for r in records if r["kind"] == "params"]
    for i, rec in enumerate(params):
        upper = params[i + 1]["seq"] if i + 1 < len(params) else 2**62
        (top,) = conn.execute(
            "SELECT max(energy_uj) FROM pulses WHERE session_id = ? AND seq > ? AND seq < ?",
            (session_id, rec["seq"], upper),
        ).fetchone()
        if top is not None:
            peak = max(peak, top * 1e-6 / spot_area_cm2(int(rec["body"]["spot_um"])))
    unlogged = unlogged_energy = faults = 0
    for rec in records:
        if rec["kind"] == "pulse_gap":
            body = rec["body"]
            unlogged += int(body["count"])
            charge = int(body["count"]) * int(body["charged_energy_uj"])
            unlogged_energy += charge
            energy[body["zone"]] = energy.get(body["zone"], 0) + charge
            faults += 1
        elif rec["kind"] == "event" and rec["body"]["event"] in FAULT_EVENT_KINDS:
            faults += 1
    if ended_ns is None:
        (last_pulse_ns,) = conn.execute(
            "SELECT max(host_ns) FROM pulses WHERE session_id = ?", (session_id,)
        ).fetchone()
        ended_ns = max([r["at_ns"] for r in records] + [last_pulse_ns or 0])
    return Summary(
        session_id=session_id,
        outcome=outcome,
        started_ns=started_ns,
        ended_ns=ended_ns,
        pulses=pulses,
        unlogged_pulses=unlogged,
        unlogged_energy_uj=unlogged_energy,
        energy_per_zone_uj=energy,
        peak_fluence_j_cm2=peak,
        faults=faults,
    )


def covering_checkpoint(conn: sqlite3.Connection, session_id: int) -> dict[str, Any] | None:
    """The first signed checkpoint that covers every record of the session (its body, with
    ``record_seq``), or ``None`` if none does yet. Not verified here: ``log verify`` does that."""
    last = conn.execute(
        "SELECT max(seq) FROM (SELECT max(seq) AS seq FROM records WHERE session_id = ? "
        "UNION ALL SELECT max(seq) FROM pulses WHERE session_id = ?)",
        (session_id, session_id),
    ).fetchone()[0]
    if last is None:
        return None
    row = conn.execute(
        "SELECT seq, body FROM records WHERE kind = 'checkpoint' AND seq > ? ORDER BY seq LIMIT 1",
        (last,),
    ).fetchone()
    if row is None:
        return None
    return {**json.loads(row[1]), "record_seq": int(row[0])}
