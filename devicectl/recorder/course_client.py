"""A daemon asks the fleet recorder for a patient's course at ``session start``.

MQTT 5 request/response on the daemon's own broker: the request goes to
``{prefix}/{site}/{device}/course/request`` (``{"v": 1, "patient": KEY, "planned": N}``) with a
response topic ``{prefix}/{site}/{device}/course/response/{token}`` and the token as correlation
data; whichever recorder the shared subscription hands it to answers there. The whole exchange is
bounded by a short timeout (1 s by default). Any failure — no broker configured, broker down,
no recorder, a slow database, a malformed answer — returns a :class:`CourseLookup` with
``source="local"`` and the reason: the session then goes on with the warnings from the device's
own log, never blocked, and the session record says which source was used.
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

__all__ = ["DEFAULT_TIMEOUT_S", "CourseLookup", "ask_course", "merge_warnings"]

DEFAULT_TIMEOUT_S = 1.0
# Warnings the recorder's whole-fleet view decides when it answers; the device's own log still
# decides the others (a course id of another patient, a session number that does not follow).
_FLEET_CODES = frozenset({"interval_short", "interval_long", "maintenance"})
_MAX_ANSWER_BYTES = 1 << 20


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
    for a network or recorder problem; returns within about ``timeout_s``."""
    if config is None:
        return CourseLookup("local", "not set to ask the recorder (mqtt.course_from_recorder)")
    if not config.has_broker:
        return CourseLookup("local", "no broker configured")
    if patient is None:
        return CourseLookup("local", "no patient key is published (privacy.patient_key_secret)")
    import aiomqtt  # here: importing the daemon does not pull the MQTT client in

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
