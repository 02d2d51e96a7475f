"""What a treatment session is (docs/session-log.md): who, for whom, which skin, which course.

:class:`SessionInfo` is validated with pydantic at the edge (the control socket, the CLI); the
per-pulse path never touches these models. Two errors come out of here, both one line a clinician
can act on: :class:`InvalidSessionInfo` (a field is malformed, e.g. a patient reference that looks
like a name) and :class:`SessionRefused` (the checklist is incomplete or a contraindication is
present: no treatment). Skin types, zones and concerns are the policy's own enums
(:mod:`devicectl.policy`), re-exported here, so limits and records name them alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, ValidationError

from devicectl.errors import DevicectlError
from devicectl.policy import Concern, Policy, SkinType, Zone, spot_area_cm2

__all__ = [
    "DEFAULT_PATIENT_REF_PATTERN",
    "FAULT_EVENT_KINDS",
    "MAX_DAYS_BETWEEN_SESSIONS",
    "MIN_DAYS_BETWEEN_SESSIONS",
    "Checklist",
    "Concern",
    "Contraindications",
    "Course",
    "CoursePosition",
    "CourseWarning",
    "InvalidSessionInfo",
    "LimitsInForce",
    "Override",
    "PostCare",
    "Provenance",
    "SessionInfo",
    "SessionOpened",
    "SessionRefused",
    "SkinType",
    "Summary",
    "Zone",
    "check_patient_ref",
    "checklist_problems",
    "parse_session_info",
    "spot_area_cm2",
]

DEFAULT_PATIENT_REF_PATTERN = r"^[A-Z0-9-]{4,32}$"
MIN_DAYS_BETWEEN_SESSIONS = 7
MAX_DAYS_BETWEEN_SESSIONS = 14
# Event kinds that count as faults in a session's closing summary (each pulse gap counts too).
FAULT_EVENT_KINDS = frozenset({"breach", "device_fault", "link_lost"})


class PostCare(StrEnum):
    """The post-care advice given (older logs may hold other words: shown as recorded)."""

    SERUM_OR_MOISTURISER = "serum_or_moisturiser"
    AVOID_SUN = "avoid_sun"
    SUNSCREEN = "sunscreen"
    GENTLE_SKINCARE = "gentle_skincare"


Role = Literal["operator", "supervisor"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Contraindications(_Model):
    """Each question must be answered (``None`` = not asked); any ``True`` forbids treatment."""

    recent_sun_exposure_or_tan: bool | None = None
    photosensitising_medication: bool | None = None
    active_skin_infection_or_inflammation: bool | None = None
    pregnancy: bool | None = None
    allergy_to_active_ingredient: bool | None = None


class Checklist(_Model):
    consultation_done: bool = False
    consent_given: bool | None = None  # the patient's informed consent; required
    area_cleaned: bool = False
    numbing_applied: bool | None = None
    # With numbing applied: which agent, and how long it stayed on the skin.
    numbing_agent: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    numbing_contact_min: Annotated[int, Field(ge=1, le=180)] | None = None
    contraindications: Contraindications = Contraindications()


class Course(_Model):
    """Session ``session_number`` of a course of ``planned_sessions`` (4-6) for one patient."""

    course_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    # As typed by the operator (None: not given). The log's history decides the real position
    # (:class:`CoursePosition`); a typed number that disagrees is a recorded warning.
    session_number: Annotated[int, Field(ge=1, le=99)] | None = None
    planned_sessions: Annotated[int, Field(ge=4, le=6)]


class Override(_Model):
    """A contraindication answered yes, treated anyway: who signed it off (a supervisor), the
    reason code from the list (:data:`devicectl.users.OVERRIDE_REASON_CODES`) and why."""

    signed_off_by: Annotated[str, Field(min_length=1, max_length=64)]
    role: Role
    reason_code: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Annotated[str, Field(min_length=10, max_length=500)]


class SessionInfo(_Model):
    device_serial: Annotated[str, Field(min_length=1, max_length=64)]
    operator: Annotated[str, Field(min_length=1, max_length=64)]  # a registered user's id
    operator_role: Role | None = None
    patient_ref: Annotated[str, Field(min_length=1, max_length=64)]
    skin_type: Annotated[SkinType, BeforeValidator(SkinType.parse)]
    concerns: tuple[Concern, ...] = ()
    course: Course
    checklist: Checklist
    active_ingredient: Annotated[str, Field(min_length=1, max_length=120)]
    ingredient_amount: Annotated[FiniteFloat, Field(gt=0, le=1000)] | None = None
    ingredient_unit: Literal["ml", "mg"] | None = None
    ingredient_lot: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # Treating despite a contraindication answered yes: a supervisor's sign-off, never implied.
    override: Override | None = None


class Provenance(_Model):
    """What the session ran on: software, firmware, device, the policy file (name and SHA-256
    of its bytes), and the clinic's time zone for showing its (UTC-stored) times."""

    software_version: str
    firmware_version: str | None = None
    device_serial: str
    policy_name: str
    policy_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    time_zone: str = "UTC"


class LimitsInForce(_Model):
    """The supervisor's limits a session runs under, recorded when it starts so that its report
    draws these, not the defaults or whatever the policy says on the day the report is made.
    (Each zone's energy limit is recorded with the zone, when the operator moves to it.)"""

    energy_tolerance_pct: Annotated[int, Field(gt=0, le=100)]  # measured vs setpoint, per pulse
    skin_temp_max_c: FiniteFloat
    head_temp_max_c: FiniteFloat | None = None
    session_energy_j: Annotated[FiniteFloat, Field(gt=0)] | None = None

    @classmethod
    def from_policy(cls, policy: Policy) -> LimitsInForce:
        return cls(
            energy_tolerance_pct=policy.energy_tolerance_pct,
            skin_temp_max_c=policy.skin_temp_max_c,
            head_temp_max_c=policy.head_temp_max_c,
            session_energy_j=policy.session_energy_j,
        )


class InvalidSessionInfo(DevicectlError):
    """A session field is malformed. ``field`` names it, ``allowed`` says what is accepted."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"session {field}={value!r} is not accepted: {allowed}")


class SessionRefused(DevicectlError):
    """The session may not start: ``rule`` is the checklist item or contraindication at fault."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule, self.detail = rule, detail
        super().__init__(f"session refused by {rule}: {detail}")


def parse_session_info(
    data: Mapping[str, Any], *, patient_ref_pattern: str = DEFAULT_PATIENT_REF_PATTERN
) -> SessionInfo:
    """Validate ``data`` into a :class:`SessionInfo`; raise :class:`InvalidSessionInfo` on the
    first bad field. The patient reference must match ``patient_ref_pattern`` so that a name
    typed by mistake is refused (the log must stay pseudonymous)."""
    try:
        info = SessionInfo.model_validate(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "info"
        raise InvalidSessionInfo(where, first.get("input"), first["msg"]) from None
    check_patient_ref(info.patient_ref, patient_ref_pattern)
    return info


def check_patient_ref(patient_ref: str, pattern: str) -> None:
    if re.fullmatch(pattern, patient_ref) is None:
        raise InvalidSessionInfo(
            "patient_ref",
            patient_ref,
            f"a pseudonymous reference matching {pattern} (never a name)",
        )


def checklist_problems(checklist: Checklist) -> list[tuple[str, str]]:
    """Every reason the pre-treatment checklist forbids starting, as ``(rule, detail)``."""
    problems: list[tuple[str, str]] = []
    if not checklist.consultation_done:
        problems.append(("checklist.consultation_done", "the consultation is not recorded as done"))
    if checklist.consent_given is not True:
        problems.append(("checklist.consent_given", "the patient's consent is not recorded"))
    if not checklist.area_cleaned:
        problems.append(("checklist.area_cleaned", "the treatment area is not recorded as cleaned"))
    if checklist.numbing_applied is None:
        problems.append(("checklist.numbing_applied", "say whether numbing cream was applied"))
    elif checklist.numbing_applied and (
        checklist.numbing_agent is None or checklist.numbing_contact_min is None
    ):
        problems.append(
            ("checklist.numbing_agent", "name the numbing agent and its contact time (minutes)")
        )
    answers = checklist.contraindications.model_dump()
    for name, answer in answers.items():
        label = name.replace("_", " ")
        if answer is None:
            problems.append((f"contraindication.{name}", f"not answered: {label}"))
        elif answer:
            problems.append((f"contraindication.{name}", f"present: {label}"))
    return problems


@dataclass(frozen=True, slots=True)
class CourseWarning:
    """Something about the course the operator should see before treating; never blocking."""

    # "interval_short" | "interval_long" | "clock_behind" | "session_number" | "maintenance"
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class CoursePosition:
    """Where a session stands in its course, from the log's history (never from what was typed).
    Only sessions that delivered pulses count; once ``planned`` have, later sessions are
    maintenance (``kind="maintenance"``, ``number`` = the maintenance visit)."""

    kind: str  # "course" | "maintenance"
    number: int
    planned: int
    counted_before: int  # earlier sessions of the course that delivered pulses
    days_since_last: float | None  # since the last counted session
    typed_number: int | None  # what the operator typed, if anything

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "number": self.number,
            "planned": self.planned,
            "counted_before": self.counted_before,
            "days_since_last": None
            if self.days_since_last is None
            else round(self.days_since_last, 2),
            "typed_number": self.typed_number,
        }


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """What :meth:`SessionLog.start_session` returns: the id and the course warnings."""

    session_id: int
    warnings: tuple[CourseWarning, ...] = ()
    position: CoursePosition | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """The closing summary of a session. Energies in µJ; unlogged pulses (crash, gap) are charged
    at the device's maximum energy and included in ``energy_per_zone_uj``."""

    session_id: int
    outcome: str  # "completed" | "interrupted" | "open" (a running summary)
    started_ns: int
    ended_ns: int
    pulses: int
    unlogged_pulses: int
    unlogged_energy_uj: int
    energy_per_zone_uj: dict[str, int] = field(default_factory=dict)
    peak_fluence_j_cm2: float = 0.0
    faults: int = 0

    @property
    def total_energy_uj(self) -> int:
        return sum(self.energy_per_zone_uj.values())

    @property
    def duration_s(self) -> float:
        return max(0, self.ended_ns - self.started_ns) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "outcome": self.outcome,
            "started_ns": self.started_ns,
            "ended_ns": self.ended_ns,
            "duration_s": self.duration_s,
            "pulses": self.pulses,
            "unlogged_pulses": self.unlogged_pulses,
            "unlogged_energy_uj": self.unlogged_energy_uj,
            "energy_per_zone_uj": dict(sorted(self.energy_per_zone_uj.items())),
            "total_energy_uj": self.total_energy_uj,
            "peak_fluence_j_cm2": self.peak_fluence_j_cm2,
            "faults": self.faults,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        return cls(
            session_id=int(data["session_id"]),
            outcome=str(data["outcome"]),
            started_ns=int(data["started_ns"]),
            ended_ns=int(data["ended_ns"]),
            pulses=int(data["pulses"]),
            unlogged_pulses=int(data["unlogged_pulses"]),
            unlogged_energy_uj=int(data["unlogged_energy_uj"]),
            energy_per_zone_uj={str(k): int(v) for k, v in data["energy_per_zone_uj"].items()},
            peak_fluence_j_cm2=float(data["peak_fluence_j_cm2"]),
            faults=int(data["faults"]),
        )
