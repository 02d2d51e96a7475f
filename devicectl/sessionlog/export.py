"""Exporting one session: JSON (the full record), CSV (its pulses).

The HTML report with plots is in :mod:`devicectl.sessionlog.report`; it starts from the same
:func:`session_document`, so the two carry the same facts. The JSON document is described by
:func:`export_schema` (``devicectl session schema``; docs/session-log.md explains each field).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from devicectl.errors import DevicectlError
from devicectl.sessionlog import reader

__all__ = [
    "EXPORT_FORMAT",
    "PULSE_CSV_COLUMNS",
    "SessionNotFound",
    "describe_event",
    "export_schema",
    "iso_time",
    "local_time",
    "session_document",
    "write_csv",
    "write_json",
]

EXPORT_FORMAT = "devicectl-session/2"
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
    "note": "notes",
    "reaction": "reactions",
    "adverse_event": "adverse_events",
}
# Events whose actor acted on another's authority: shown apart, in the sign-offs section.
SIGNOFF_EVENTS = frozenset({"override", "fault_ack"})


class SessionNotFound(DevicectlError):
    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        super().__init__(f"no session {session_id} in the log")


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with milliseconds, from nanoseconds since the epoch."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def local_time(ns: int, zone: str) -> str:
    """``YYYY-MM-DD HH:MM:SS ±HH:MM`` in the IANA ``zone`` (UTC if the name is unknown here)."""
    try:
        tz: Any = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        tz = UTC
    return datetime.fromtimestamp(ns / 1e9, tz).isoformat(sep=" ", timespec="seconds")


def session_document(
    conn: sqlite3.Connection,
    session_id: int,
    *,
    with_pulses: bool = True,
    time_zone: str | None = None,
) -> dict[str, Any]:
    """The full record of a session as JSON-ready data. Raises :class:`SessionNotFound`.
    ``time_zone`` overrides the clinic time zone recorded with the session for the ``*_local``
    fields (the stored times are UTC)."""
    record = reader.load_session(conn, session_id)
    if record is None:
        raise SessionNotFound(session_id)
    provenance = record.provenance
    zone = time_zone or (provenance or {}).get("time_zone") or "UTC"
    summary = None if record.summary is None else record.summary.to_dict()
    ended_ns = None if summary is None else int(summary["ended_ns"])
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "session_id": session_id,
        "time_zone": zone,
        "started": iso_time(record.started_ns),
        "started_ns": record.started_ns,
        "started_local": local_time(record.started_ns, zone),
        "ended": None if ended_ns is None else iso_time(ended_ns),
        "ended_local": None if ended_ns is None else local_time(ended_ns, zone),
        "outcome": record.outcome,
        "info": record.info,
        "provenance": provenance,
        "course_position": record.course_position,
        "course_warnings": record.warnings,
        "limits": record.limits,
        "summary": summary,
        "post_care": [],
        "post_care_declined": None,
        "ended_by": None,
        "ended_by_role": None,
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
            doc["post_care_declined"] = body.get("post_care_declined")
            doc["ended_by_role"] = body.get("role")
        elif kind == "session_interrupted":
            doc["note"] = body["cause"]
    # the signed checkpoint covering the session: keep it, and `log verify --checkpoints` on
    # this document proves the session is still in the log as signed
    doc["checkpoint"] = reader.covering_checkpoint(conn, session_id)
    doc["signoffs"] = [
        _signoff(e, record.info) for e in doc["events"] if e["event"] in SIGNOFF_EVENTS
    ]
    doc["breaches"] = [
        {
            "at": e["at"],
            "at_ns": e["at_ns"],
            "code": e["detail"].get("code") or e["detail"].get("rule"),
            "pulse_no": e["detail"].get("pulse_no"),
            "value": e["detail"].get("value"),
            "limit": e["detail"].get("limit"),
            "unit": e["detail"].get("unit"),
            "message": e["detail"].get("message"),
        }
        for e in doc["events"]
        if e["event"] == "breach"
    ]
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


def _signoff(event: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """An override or a breach acknowledgement: who acted, who signed it off, and why."""
    detail = event["detail"]
    legacy = event["event"] == "override" and "signed_off_by" not in detail
    return {
        "at": event["at"],
        "at_ns": event["at_ns"],
        "kind": event["event"],
        "actor": event["actor"],
        "role": event.get("role"),
        # Older logs: an override had only a reason and no sign-off; an ack only an operator.
        "signed_off_by": detail.get("signed_off_by"),
        "signed_off_role": detail.get("signed_off_role"),
        "reason_code": detail.get("reason_code"),
        "reason": event["reason"],
        "contraindications": detail.get("contraindications", []),
        "breach": detail.get("breach"),
        "pulse_no": detail.get("pulse_no"),
        "legacy_unsigned": legacy
        or (event["event"] == "fault_ack" and "reason_code" not in detail),
        "operator": info.get("operator"),
    }


_EVENT_WORDS = {
    "breach": "Safety breach: emission stopped",
    "fault_ack": "Breach acknowledged",
    "override": "Contraindication overridden",
    "armed": "Laser armed",
    "disarmed": "Laser disarmed",
    "stop": "Stop requested",
    "device_fault": "Device fault",
    "link_lost": "Link to the device lost",
    "link_restored": "Link to the device restored",
    "auth_refused": "Request refused: identity or sign-off not proven",
    "daemon_stopped": "Service stopped",
}


def describe_event(event: dict[str, Any]) -> str:
    """One readable line for an event record: no raw ``key=value`` text, no Python reprs."""
    kind: str = event["event"]
    detail: dict[str, Any] = event.get("detail") or {}
    head: str = _EVENT_WORDS.get(kind, kind.replace("_", " ").capitalize())
    parts: list[str] = []
    if kind == "breach":
        code = detail.get("code") or detail.get("rule")
        if code:
            parts.append(str(code).replace("_", " "))
        value, limit, unit = detail.get("value"), detail.get("limit"), detail.get("unit") or ""
        if value is not None and limit is not None:
            parts.append(f"{_number(value)} {unit} against a limit of {_number(limit)} {unit}")
        if detail.get("pulse_no") is not None:
            parts.append(f"at pulse {detail['pulse_no']}")
    elif kind == "override":
        names = ", ".join(str(c).replace("_", " ") for c in detail.get("contraindications", []))
        parts.append(names)
        if detail.get("signed_off_by"):
            parts.append(f"signed off by {detail['signed_off_by']} ({detail.get('reason_code')})")
    elif kind == "fault_ack":
        if detail.get("breach"):
            parts.append(str(detail["breach"]).replace("_", " "))
        if detail.get("signed_off_by"):
            parts.append(f"signed off by {detail['signed_off_by']} ({detail.get('reason_code')})")
    elif kind == "armed" and detail.get("lease_ms"):
        parts.append(f"lease {detail['lease_ms']} ms")
    else:
        for key, value in sorted(detail.items()):
            if value is None or value in ([], {}):
                continue
            parts.append(f"{key.replace('_', ' ')}: {_plain(value)}")
    return head + (": " + "; ".join(p for p in parts if p) if any(parts) else "")


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')} {_plain(v)}" for k, v in value.items())
    return _number(value)


def export_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of :func:`session_document`'s output (format
    ``devicectl-session/2``). Older records lack some facts: those fields are nullable."""
    text = {"type": "string"}
    ntext = {"type": ["string", "null"]}
    integer = {"type": "integer"}
    nint = {"type": ["integer", "null"]}
    nnum = {"type": ["number", "null"]}
    role = {"enum": ["operator", "supervisor", None]}

    def record(optional: dict[str, Any] | None = None, **props: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["seq", "at", "at_ns", *props],
            "properties": {
                "seq": integer,
                "at": text,
                "at_ns": integer,
                **props,
                **(optional or {}),
            },
        }

    fluence = {
        "type": ["object", "null"],
        "required": ["fluence_j_cm2", "max_fluence_j_cm2", "rule", "skin_type", "zone"],
        "properties": {
            "fluence_j_cm2": {"type": "number"},
            "max_fluence_j_cm2": {"type": "number"},
            "rule": text,
            "skin_type": text,
            "zone": ntext,
            "preset": ntext,
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:devicectl:session-export:2",
        "title": "devicectl treatment session export",
        "type": "object",
        "required": [
            "format",
            "session_id",
            "time_zone",
            "started",
            "started_ns",
            "started_local",
            "ended",
            "ended_local",
            "outcome",
            "info",
            "provenance",
            "course_position",
            "course_warnings",
            "limits",
            "summary",
            "post_care",
            "post_care_declined",
            "ended_by",
            "ended_by_role",
            "note",
            "zones",
            "params",
            "events",
            "status",
            "pulse_gaps",
            "recoveries",
            "notes",
            "reactions",
            "adverse_events",
            "signoffs",
            "breaches",
        ],
        "properties": {
            "format": {"const": EXPORT_FORMAT},
            "session_id": integer,
            "time_zone": text,
            "started": text,
            "started_ns": integer,
            "started_local": text,
            "ended": ntext,
            "ended_local": ntext,
            "outcome": {"enum": ["open", "completed", "interrupted"]},
            "info": {
                "type": "object",
                "required": [
                    "device_serial",
                    "operator",
                    "patient_ref",
                    "skin_type",
                    "concerns",
                    "course",
                    "checklist",
                    "active_ingredient",
                ],
                "properties": {
                    "device_serial": text,
                    "operator": text,
                    "operator_role": role,
                    "patient_ref": text,
                    "skin_type": {"type": "integer", "minimum": 1, "maximum": 6},
                    "concerns": {"type": "array", "items": text},
                    "course": {
                        "type": "object",
                        "required": ["course_id", "planned_sessions"],
                        "properties": {
                            "course_id": text,
                            "session_number": nint,
                            "planned_sessions": integer,
                        },
                    },
                    "checklist": {
                        "type": "object",
                        "required": ["consultation_done", "area_cleaned", "contraindications"],
                        "properties": {
                            "consultation_done": {"type": "boolean"},
                            "consent_given": {"type": ["boolean", "null"]},
                            "area_cleaned": {"type": "boolean"},
                            "numbing_applied": {"type": ["boolean", "null"]},
                            "numbing_agent": ntext,
                            "numbing_contact_min": nint,
                            "contraindications": {
                                "type": "object",
                                "additionalProperties": {"type": ["boolean", "null"]},
                            },
                        },
                    },
                    "active_ingredient": text,
                    "ingredient_amount": nnum,
                    "ingredient_unit": ntext,
                    "ingredient_lot": ntext,
                    "override": {
                        "type": ["object", "null"],
                        "required": ["signed_off_by", "role", "reason_code", "reason"],
                    },
                },
            },
            "provenance": {
                "type": ["object", "null"],
                "required": [
                    "software_version",
                    "firmware_version",
                    "device_serial",
                    "policy_name",
                    "policy_sha256",
                    "time_zone",
                ],
                "properties": {
                    "software_version": text,
                    "firmware_version": ntext,
                    "device_serial": text,
                    "policy_name": text,
                    "policy_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "time_zone": text,
                },
            },
            "course_position": {
                "type": ["object", "null"],
                "required": ["kind", "number", "planned", "counted_before", "days_since_last"],
                "properties": {
                    "kind": {"enum": ["course", "maintenance"]},
                    "number": integer,
                    "planned": integer,
                    "counted_before": integer,
                    "days_since_last": nnum,
                    "typed_number": nint,
                },
            },
            "course_warnings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": text, "message": text},
                },
            },
            "limits": {"type": ["object", "null"]},
            "summary": {
                "type": ["object", "null"],
                "required": [
                    "outcome",
                    "started_ns",
                    "ended_ns",
                    "duration_s",
                    "pulses",
                    "unlogged_pulses",
                    "energy_per_zone_uj",
                    "total_energy_uj",
                    "peak_fluence_j_cm2",
                    "faults",
                ],
            },
            "post_care": {"type": "array", "items": text},
            "post_care_declined": ntext,
            "ended_by": ntext,
            "ended_by_role": role,
            "note": ntext,
            "zones": {
                "type": "array",
                "items": record(zone=text, energy_limit_uj=nint, actor=text),
            },
            "params": {
                "type": "array",
                "items": record(
                    {"role": role, "fluence_limit": fluence},
                    energy_uj=integer,
                    width_us=integer,
                    rate_mhz=integer,
                    spot_um=integer,
                    actor=text,
                ),
            },
            "events": {
                "type": "array",
                "items": record(
                    {"role": role},
                    event=text,
                    actor=text,
                    detail={"type": "object"},
                    reason=ntext,
                ),
            },
            "status": {"type": "array", "items": record(skin_temp_cdeg=integer)},
            "pulse_gaps": {"type": "array", "items": record(count=integer, zone=text)},
            "recoveries": {"type": "array", "items": {"type": "object"}},
            "notes": {"type": "array", "items": record(actor=text, text=text)},
            "reactions": {"type": "array", "items": record(actor=text)},
            "adverse_events": {
                "type": "array",
                "items": record(actor=text, severity=text, text=text),
            },
            "signoffs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "at",
                        "kind",
                        "actor",
                        "role",
                        "signed_off_by",
                        "signed_off_role",
                        "reason_code",
                        "reason",
                    ],
                    "properties": {
                        "kind": {"enum": sorted(SIGNOFF_EVENTS)},
                        "actor": text,
                        "role": role,
                        "signed_off_by": ntext,
                        "signed_off_role": role,
                        "reason_code": ntext,
                        "reason": ntext,
                    },
                },
            },
            "breaches": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["at", "code", "pulse_no", "value", "limit"],
                },
            },
            "pulses": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["pulse_no", "t_us", "host_time_ns", "energy_uj", "zone"],
                },
            },
        },
    }


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
