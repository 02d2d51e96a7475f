"""A patient's course across every device, from the sessions the recorder holds (no I/O).

Rules (the clinic's protocol, as the device applies it to its own log): a course is the first
``planned`` (4-6) sessions that delivered pulses, spaced 7 to 14 days apart; a session that
delivered no pulse (opened, then abandoned) is listed but not counted; once the course is
complete, every further session is maintenance, its own kind, with no interval rule. Before a new
session: under 7 days since the last counted one warns ``interval_short``, over 14 days
``interval_long``; a complete course warns ``maintenance`` (the session is maintenance).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from devicectl.sessionlog.model import MAX_DAYS_BETWEEN_SESSIONS, MIN_DAYS_BETWEEN_SESSIONS

__all__ = [
    "MAX_DAYS_BETWEEN_SESSIONS",
    "Course",
    "CourseSession",
    "CourseWarningText",
    "compute_course",
    "parse_time",
]

_DAY_S = 86400.0

SessionKind = Literal["course", "maintenance", "not_counted"]


@dataclass(frozen=True, slots=True)
class CourseSession:
    device: str
    session: str
    started: str
    ended: str | None
    pulses: int
    kind: SessionKind
    number: int | None  # n of the course; None for maintenance and not counted
    days_since_previous: float | None  # since the previous counted session


@dataclass(frozen=True, slots=True)
class CourseWarningText:
    code: str  # interval_short | interval_long | maintenance
    message: str


@dataclass(frozen=True, slots=True)
class Course:
    patient: str
    planned: int
    sessions: tuple[CourseSession, ...]
    given: int  # counted course sessions (at most planned)
    maintenance: int
    devices: tuple[str, ...]
    warnings: tuple[CourseWarningText, ...] = field(default=())

    @property
    def complete(self) -> bool:
        return self.given >= self.planned

    @property
    def next_number(self) -> int | None:
        """The number the next session has in the course; None when it is maintenance."""
        return None if self.complete else self.given + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "planned": self.planned,
            "given": self.given,
            "complete": self.complete,
            "next_number": self.next_number,
            "maintenance": self.maintenance,
            "devices": list(self.devices),
            "sessions": [
                {
                    "device": s.device,
                    "session": s.session,
                    "started": s.started,
                    "ended": s.ended,
                    "pulses": s.pulses,
                    "kind": s.kind,
                    "number": s.number,
                    "days_since_previous": (
                        None if s.days_since_previous is None else round(s.days_since_previous, 2)
                    ),
                }
                for s in self.sessions
            ],
            "warnings": [{"code": w.code, "message": w.message} for w in self.warnings],
        }


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def compute_course(
    patient: str,
    rows: Iterable[tuple[str, str, str, str | None, int]],
    *,
    planned: int,
    now: datetime | None = None,
) -> Course:
    """The course of ``patient`` from (device, session, started, ended, pulses) rows; with
    ``now``, the warnings a session starting then should show."""
    if not 4 <= planned <= 6:
        raise ValueError(f"a course is planned for 4 to 6 sessions, not {planned}")
    sessions: list[CourseSession] = []
    given = maintenance = 0
    last_counted: datetime | None = None
    for device, session, started, ended, pulses in sorted(rows, key=lambda r: r[2]):
        at = parse_time(started)
        days = None if last_counted is None else (at - last_counted).total_seconds() / _DAY_S
        kind: SessionKind
        number: int | None = None
        if pulses <= 0:
            kind, days = "not_counted", None
        elif given < planned:
            given += 1
            kind, number = "course", given
            last_counted = at
        else:
            maintenance += 1
            kind = "maintenance"
            last_counted = at
        sessions.append(CourseSession(device, session, started, ended, pulses, kind, number, days))
    warnings: list[CourseWarningText] = []
    if now is not None:
        if given >= planned:
            warnings.append(
                CourseWarningText(
                    "maintenance",
                    f"the course is complete: {given} of {planned} planned sessions already "
                    "given (this session is maintenance)",
                )
            )
        elif last_counted is not None:
            days = (now - last_counted).total_seconds() / _DAY_S
            if days < MIN_DAYS_BETWEEN_SESSIONS:
                warnings.append(
                    CourseWarningText(
                        "interval_short",
                        f"only {days:.1f} days since session {given} of the course "
                        f"(at least {MIN_DAYS_BETWEEN_SESSIONS} advised)",
                    )
                )
            elif days > MAX_DAYS_BETWEEN_SESSIONS:
                warnings.append(
                    CourseWarningText(
                        "interval_long",
                        f"{days:.1f} days since session {given} of the course "
                        f"(at most {MAX_DAYS_BETWEEN_SESSIONS} advised)",
                    )
                )
    devices = tuple(sorted({s.device for s in sessions}))
    return Course(patient, planned, tuple(sessions), given, maintenance, devices, tuple(warnings))
