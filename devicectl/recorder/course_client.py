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
of an answer as large as :data:`_MAX_ANSWER_BYTES` stay off it (it imports only
:mod:`devicectl.recorder.course_lookup`; a contract in pyproject.toml keeps it so). It hands the
request to its telemetry worker process
(:meth:`devicectl.telemetry.process.TelemetryProcess.ask_course`), which runs :func:`ask_course`
on its own loop and sends back the :class:`CourseLookup` reduced to what the daemon keeps
(:meth:`CourseLookup.to_wire`), a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import TYPE_CHECKING, Any

from devicectl.recorder.course_lookup import (
    DEFAULT_TIMEOUT_S,
    CourseLookup,
    merge_warnings,
    without_asking,
)

if TYPE_CHECKING:
    from devicectl.telemetry.config import TelemetryConfig

# CourseLookup and merge_warnings: here too, where callers of ask_course have always found them.
__all__ = ["DEFAULT_TIMEOUT_S", "CourseLookup", "ask_course", "merge_warnings"]

_MAX_ANSWER_BYTES = 1 << 20


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
    import aiomqtt  # here: importing this module does not pull the MQTT client in

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
