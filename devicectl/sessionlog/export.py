"""Exporting one session: JSON (the full record), CSV (its pulses).

The HTML report with plots is in :mod:`devicectl.sessionlog.report`; it starts from the same
:func:`session_document`.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devicectl.errors import DevicectlError
from devicectl.sessionlog import reader

__all__ = [
    "EXPORT_FORMAT",
    "PULSE_CSV_COLUMNS",
    "SessionNotFound",
    "iso_time",
    "session_document",
    "write_csv",
    "write_json",
]

EXPORT_FORMAT = "devicectl-session/1"
PULSE_CSV_COLUMNS = (
    "session_id",
    "pulse_no",
    "t_us",
    "host_time",
    "host_time_ns",
    "energy_uj",
    "zone",
)
# Record kinds exported as lists under these names (the rest are fields of the session).
_LISTS = {
    "zone": "zones",
    "params": "params",
    "event": "events",
    "status": "status",
    "pulse_gap": "pulse_gaps",
    "recovery": "recoveries",
}


class SessionNotFound(DevicectlError):
    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        super().__init__(f"no session {session_id} in the log")


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with milliseconds, from nanoseconds since the epoch."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def session_document(
    conn: sqlite3.Connection, session_id: int, *, with_pulses: bool = True
) -> dict[str, Any]:
    """The full record of a session as JSON-ready data. Raises :class:`SessionNotFound`."""
    record = reader.load_session(conn, session_id)
    if record is None:
        raise SessionNotFound(session_id)
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "session_id": session_id,
        "started": iso_time(record.started_ns),
        "started_ns": record.started_ns,
        "outcome": record.outcome,
        "info": record.info,
        "course_warnings": record.warnings,
        "limits": record.limits,
        "summary": None if record.summary is None else record.summary.to_dict(),
        "post_care": [],
        "ended_by": None,
        "note": None,
    }
    for name in _LISTS.values():
        doc[name] = []
    for rec in record.records:
        kind, body = rec["kind"], rec["body"]
        if kind in _LISTS:
            doc[_LISTS[kind]].append(
                {"seq": rec["seq"], "at": iso_time(rec["at_ns"]), "at_ns": rec["at_ns"], **body}
            )
        elif kind == "session_ended":
            doc["post_care"], doc["ended_by"], doc["note"] = (
                body["post_care"],
                body["actor"],
                body["note"],
            )
        elif kind == "session_interrupted":
            doc["note"] = body["cause"]
    # the signed checkpoint covering the session: keep it, and `log verify --checkpoints` on
    # this document proves the session is still in the log as signed
    doc["checkpoint"] = reader.covering_checkpoint(conn, session_id)
    if with_pulses:
        doc["pulses"] = [
            {
                "pulse_no": p.pulse_no,
                "t_us": p.t_us,
                "host_time_ns": p.host_ns,
                "energy_uj": p.energy_uj,
                "zone": p.zone,
            }
            for p in reader.iter_pulses(conn, session_id)
        ]
    return doc


def write_json(conn: sqlite3.Connection, session_id: int, out: Path) -> None:
    doc = session_document(conn, session_id)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(conn: sqlite3.Connection, session_id: int, out: Path) -> int:
    """One row per logged pulse (header :data:`PULSE_CSV_COLUMNS`); returns the row count."""
    if reader.load_session(conn, session_id) is None:
        raise SessionNotFound(session_id)
    count = 0
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PULSE_CSV_COLUMNS)
        for p in reader.iter_pulses(conn, session_id):
            writer.writerow(
                (
                    session_id,
                    p.pulse_no,
                    p.t_us,
                    iso_time(p.host_ns),
                    p.host_ns,
                    p.energy_uj,
                    p.zone,
                )
            )
            count += 1
    return count
