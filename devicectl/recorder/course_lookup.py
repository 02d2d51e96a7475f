"""Where a session's course came from: the fleet recorder's answer, or the device's own log and why.

Plain data, no network: the daemon's process imports this (the session log records
:meth:`CourseLookup.record`), while the exchange with the recorder, an MQTT client, lives in
:mod:`devicectl.recorder.course_client` and runs in the telemetry worker process. What the worker
hands back crosses as :meth:`CourseLookup.to_wire` (bounded, the course cut to what the log
keeps) and is read back, checked, with :meth:`CourseLookup.from_wire`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from devicectl.sessionlog.model import CourseWarning
    from devicectl.telemetry.config import TelemetryConfig

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NOT_ASKED",
    "NO_BROKER",
    "WORKER_NOT_RUNNING",
    "CourseLookup",
    "merge_warnings",
    "without_asking",
]

DEFAULT_TIMEOUT_S = 1.0  # the whole request, asked to answered; never longer for a session
# Warnings the recorder's whole-fleet view decides when it answers; the device's own log still
# decides the others (a course id of another patient, a session number that does not follow).
_FLEET_CODES = frozenset({"interval_short", "interval_long", "maintenance"})
NOT_ASKED = "not set to ask the recorder (mqtt.course_from_recorder)"
NO_BROKER = "no broker configured"
WORKER_NOT_RUNNING = "telemetry worker not running"  # it asks; the daemon's loop never does
# What crosses from the telemetry worker to the daemon: the course fields the session log keeps
# (CourseLookup.record), a reason cut to one line, warnings as the recorder words them.
_WIRE_COURSE_FIELDS = ("given", "planned", "devices")
_MAX_REASON_CHARS = 200
_MAX_WIRE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class CourseLookup:
    source: Literal["recorder", "local"]
    reason: str | None = None  # why the recorder was not used
    warnings: tuple[tuple[str, str], ...] = ()  # (code, message) from the recorder
    course: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What the session log keeps about where the course came from."""
        detail: dict[str, Any] = {"source": self.source}
        if self.source == "recorder":
            detail |= {
                "given": self.course.get("given"),
                "planned": self.course.get("planned"),
                "devices": self.course.get("devices"),
                "warnings": [code for code, _ in self.warnings],
            }
        else:
            detail["reason"] = self.reason
        return detail

    def to_wire(self) -> dict[str, Any]:
        """This lookup as the telemetry worker hands it to the daemon: JSON-ready, the course cut
        to what :meth:`record` keeps, and bounded (:data:`_MAX_WIRE_BYTES`): an answer that does
        not fit, or whose course fields are not what the contract says, is a fallback with that
        reason, never a frame the daemon cannot read."""
        course = {}
        if self.source == "recorder":
            course = {name: self.course.get(name) for name in _WIRE_COURSE_FIELDS}
            if not _course_fields_valid(course):
                return CourseLookup("local", "the recorder's answer is malformed").to_wire()
        wire = {
            "source": self.source,
            "reason": None if self.reason is None else _one_line(self.reason),
            "warnings": [list(pair) for pair in self.warnings],
            "course": course,
        }
        if len(json.dumps(wire, separators=(",", ":"))) > _MAX_WIRE_BYTES:
            return CourseLookup("local", "the recorder's answer is too large").to_wire()
        return wire

    @classmethod
    def from_wire(cls, body: object) -> CourseLookup:
        """:meth:`to_wire`'s output back, checked field by field (it comes from a process that
        handles what a broker sends). Raises ``ValueError`` for anything else."""
        if not isinstance(body, dict) or set(body) != {"source", "reason", "warnings", "course"}:
            raise ValueError("not a course lookup")
        source, reason, warnings, course = (
            body[k] for k in ("source", "reason", "warnings", "course")
        )
        if source not in ("recorder", "local") or not isinstance(reason, str | None):
            raise ValueError("not a course lookup: source or reason")
        if not isinstance(warnings, list) or not all(
            isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)
            for w in warnings
        ):
            raise ValueError("not a course lookup: warnings")
        if not isinstance(course, dict) or (
            source == "recorder"
            and (set(course) != set(_WIRE_COURSE_FIELDS) or not _course_fields_valid(course))
        ):
            raise ValueError("not a course lookup: course")
        if source == "local" and (course or reason is None):
            raise ValueError("not a course lookup: a fallback with a course or without a reason")
        return cls(
            source,
            None if reason is None else _one_line(reason),
            tuple((code, message) for code, message in warnings),
            course,
        )


def merge_warnings(local: tuple[CourseWarning, ...], lookup: CourseLookup) -> list[str]:
    """The warnings to show: the recorder's for the course rules when it answered (it sees every
    device, this one included), the device log's for everything else or when it did not."""
    if lookup.source != "recorder":
        return [w.message for w in local]
    return [w.message for w in local if w.code not in _FLEET_CODES] + [
        message for _code, message in lookup.warnings
    ]


def _one_line(reason: str) -> str:
    return " ".join(reason.split())[:_MAX_REASON_CHARS]


def _course_fields_valid(course: dict[str, Any]) -> bool:
    given, planned, devices = (course[name] for name in _WIRE_COURSE_FIELDS)
    return (
        all(isinstance(n, int) and not isinstance(n, bool) for n in (given, planned))
        and isinstance(devices, list)
        and all(isinstance(d, str) for d in devices)
    )


def without_asking(config: TelemetryConfig | None, patient: str | None) -> CourseLookup | None:
    """The fallback known before any exchange (not configured, no broker, no patient key), or
    None when the recorder is to be asked. Shared by :func:`ask_course` and the daemon's side of
    the telemetry worker, which then does not cross the process boundary for nothing."""
    if config is None:
        return CourseLookup("local", NOT_ASKED)
    if not config.has_broker:
        return CourseLookup("local", NO_BROKER)
    if patient is None:
        return CourseLookup("local", "no patient key is published (privacy.patient_key_secret)")
    return None
