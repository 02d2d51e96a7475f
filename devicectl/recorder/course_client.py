"""A daemon asks the fleet recorder for a patient's course at ``session start``.

MQTT 5 request/response on the daemon's own broker: the request goes to
``{prefix}/{site}/{device}/course/request`` (``{"v": 1, "patient": KEY, "planned": N}``) with a
response topic ``{prefix}/{site}/{device}/course/response/{token}`` and the token as correlation
data; whichever recorder the shared subscription hands it to answers there. The whole exchange is
bounded by a short timeout (1 s by default). Any failure — no broker configured, broker down,
no recorder, a slow database, a malformed answer — returns a :class:`CourseLookup` with
``source="local"`` and the reason: the session then goes on with the warnings from the device's
own log, never blocked, and the session record says which source was used.

The daemon never runs this itself: its process is the safety loop's, and MQTT, TLS and the parsing
of an answer as large as :data:`_MAX_ANSWER_BYTES` stay off it. It hands the request to its
telemetry worker process (:meth:`devicectl.telemetry.process.TelemetryProcess.ask_course`), which
runs :func:`ask_course` on its own loop and sends back the :class:`CourseLookup` reduced to what
the daemon keeps (:meth:`CourseLookup.to_wire`), a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
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
    "ask_course",
    "merge_warnings",
    "without_asking",
]

DEFAULT_TIMEOUT_S = 1.0
# Warnings the recorder's whole-fleet view decides when it answers; the device's own log still
# decides the others (a course id of another patient, a session number that does not follow).
_FLEET_CODES = frozenset({"interval_short", "interval_long", "maintenance"})
_MAX_ANSWER_BYTES = 1 << 20
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


async def ask_course(
    config: TelemetryConfig | None,
    patient: str | None,
    planned: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CourseLookup:
    """The patient's course from the recorder, or ``source="local"`` and why not. Never raises
    for a network or recorder problem; returns within about ``timeout_s``. Runs an MQTT client:
    the telemetry worker calls it, never the daemon's loop (see the module's docstring)."""
    unasked = without_asking(config, patient)
    if unasked is not None:
        return unasked
    assert config is not None
    assert patient is not None
    import aiomqtt  # here: the daemon imports this module (CourseLookup), never the MQTT client

    try:
        async with asyncio.timeout(timeout_s):
            answer = await _exchange(config, patient, planned)
    except TimeoutError:
        return CourseLookup("local", f"no answer from a recorder within {timeout_s:g} s")
    except (aiomqtt.MqttError, OSError) as exc:
        return CourseLookup("local", f"broker unreachable: {exc}"[:200])
    if answer.get("ok") is not True:
        return CourseLookup("local", f"the recorder could not answer: {answer.get('error')}")
    try:
        warnings = tuple((str(w["code"]), str(w["message"])) for w in answer["warnings"])
    except (KeyError, TypeError):
        return CourseLookup("local", "the recorder's answer is malformed")
    return CourseLookup("recorder", None, warnings, answer)


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


async def _exchange(config: TelemetryConfig, patient: str, planned: int) -> dict[str, Any]:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    address = config.address()
    base = config.topics.base
    token = secrets.token_hex(8)
    response_topic = f"{base}/course/response/{token}"
    async with aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=f"{config.client_id}-course-{token}"[:64],
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=config.tls_context(),
        keepalive=10,
    ) as client:
        await client.subscribe(response_topic, qos=1)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = response_topic
        properties.CorrelationData = token.encode()
        request = {"v": 1, "patient": patient, "planned": planned}
        await client.publish(
            f"{base}/course/request",
            json.dumps(request, separators=(",", ":")).encode(),
            qos=1,
            properties=properties,
        )
        async for message in client.messages:
            correlation = getattr(message.properties, "CorrelationData", None)
            if correlation != token.encode() or not isinstance(message.payload, bytes):
                continue
            if len(message.payload) > _MAX_ANSWER_BYTES:
                return {"ok": False, "error": "answer too large"}
            try:
                answer = json.loads(message.payload)
            except ValueError:
                return {"ok": False, "error": "answer is not JSON"}
            return answer if isinstance(answer, dict) else {"ok": False, "error": "not an object"}
    return {"ok": False, "error": "the connection closed"}
