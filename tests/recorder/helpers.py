"""Contract messages for the recorder's tests, built with the contract's own models, and a stand-in
recorder that answers course requests as the test says."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicectl.recorder.intake import Accepted, take, utc_text
from protocols.mqtt import (
    PulseBatchPayload,
    SessionEventPayload,
    SessionPayload,
    SessionSummary,
    StatePayload,
    Stream,
    TopicBase,
    encode_payload,
    pulse_batch_fields,
)
from tests.telemetry.helpers import recorder as subscriber

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def patient_key(reference: str) -> str:
    """A stand-in for the site's keyed pseudonym: 64 lowercase hex characters."""
    return hashlib.sha256(b"test-site-secret" + reference.encode()).hexdigest()


@dataclass
class FakeDevice:
    """One device's side of the contract: per-topic seq, boot, sessions, pulse batches."""

    device: str
    site: str = "clinic1"
    boot: int = 1
    seqs: dict[str, int] = field(default_factory=dict)
    pulse_no: int = 0

    @property
    def base(self) -> TopicBase:
        return TopicBase("lasers", self.site, self.device)

    def _next(self, topic: str) -> int:
        self.seqs[topic] = self.seqs.get(topic, 0) + 1
        return self.seqs[topic]

    def _envelope(self, topic: str, at: datetime) -> dict[str, Any]:
        return {
            "v": 1,
            "ts": at,
            "device": self.device,
            "seq": self._next(topic),
            "boot": self.boot,
        }

    def state(self, at: datetime = T0) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.STATE)
        payload = StatePayload(
            **self._envelope(topic, at),
            state="STANDBY",
            interlocks=[],
            faults=[],
            params=None,
            armed=False,
            session=None,
            daemon_version="test",
        )
        return topic, encode_payload(payload)

    def event(
        self,
        session: str,
        event: str,
        at: datetime = T0,
        *,
        summary: SessionSummary | None = None,
        **details: Any,
    ) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.SESSION_EVENTS, session)
        payload = SessionEventPayload(
            **self._envelope(topic, at),
            session=session,
            event=event,  # type: ignore[arg-type]
            details=details,
            summary=summary,
        )
        return topic, encode_payload(payload)

    def summary(
        self, session: str, patient: str | None, at: datetime, pulses: int, *, ended: bool = False
    ) -> SessionSummary:
        return SessionSummary(
            session=session,
            operator="OP-1",
            patient=patient,
            skin_type="III",
            zone="cheeks",
            started=at,
            ended=at + timedelta(minutes=20) if ended else None,
            pulses=pulses,
            energy_uj=pulses * 1000,
            energy_uj_by_zone={"cheeks": pulses * 1000} if pulses else {},
        )

    def session_summary(self, summary: SessionSummary, at: datetime) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.SESSION)
        return topic, encode_payload(SessionPayload(**self._envelope(topic, at), summary=summary))

    def pulses(self, session: str, count: int, at: datetime = T0) -> tuple[str, bytes]:
        topic = self.base.topic(Stream.PULSES)
        first = self.pulse_no + 1
        pulses = [(first + i, (first + i) * 2000, 1000 + i % 7) for i in range(count)]
        self.pulse_no += count
        payload = PulseBatchPayload(
            **self._envelope(topic, at),
            **pulse_batch_fields(pulses, session=session, zone="cheeks"),
        )
        return topic, encode_payload(payload)

    def treatment(
        self, session: str, patient: str, at: datetime, *, batches: int = 3, per_batch: int = 5
    ) -> list[tuple[str, bytes]]:
        """A whole session: started, pulse batches, a running summary, ended with its summary."""
        pulses = batches * per_batch
        messages = [self.event(session, "started", at, patient=patient, operator="OP-1")]
        messages += [self.pulses(session, per_batch, at) for _ in range(batches)]
        messages.append(self.session_summary(self.summary(session, patient, at, pulses), at))
        closing = self.summary(session, patient, at, pulses, ended=True)
        messages.append(self.event(session, "ended", at, summary=closing))
        return messages


def accepted(topic: str, payload: bytes, *, retained: bool = False) -> Accepted:
    outcome = take(topic, payload, retained=retained, boot_property=None, recorded=utc_text(T0))
    assert isinstance(outcome, Accepted), outcome
    return outcome


class Publisher:
    """A paho MQTT 5 client publishing at QoS 1 and waiting for every PUBACK."""

    def __init__(self, port: int, client_id: str = "test-publisher") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._connected = threading.Event()
        self.client.on_connect = lambda *_a: self._connected.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise RuntimeError("publisher could not connect")

    def publish_all(self, messages: list[tuple[str, bytes]], *, retain: bool = False) -> None:
        infos = [self.client.publish(t, p, qos=1, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho keeps loop_start()'s socketpair until collected


@contextmanager
def publisher(port: int, client_id: str = "test-publisher") -> Iterator[Publisher]:
    pub = Publisher(port, client_id)
    try:
        yield pub
    finally:
        pub.close()


def course(patient: str, planned: int, **overrides: Any) -> dict[str, Any]:
    """A recorder's answer to a course request (docs/recorder.md) that names the request it
    answers (its ``planned``, in the count and the device), so that a mix-up shows."""
    return {
        "ok": True,
        "patient": patient,
        "planned": planned,
        "given": 1,
        "complete": False,
        "next_number": 2,
        "maintenance": False,
        "devices": [f"laser-for-{planned}"],
        "sessions": [],
        "warnings": [{"code": "interval_short", "message": f"answer to planned={planned}"}],
    } | overrides


class StandInRecorder:
    """Subscribed to every course request; ``answer(request)`` gives the body to send back (None:
    no answer; bytes: sent as they are), on the request's response topic with its correlation
    data, as the recorder does."""

    def __init__(
        self, port: int, answer: Callable[[dict[str, Any]], dict[str, Any] | bytes | None]
    ):
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self._port = port

    @contextmanager
    def running(self) -> Iterator[StandInRecorder]:
        with subscriber(self._port, topic="lasers/+/+/course/request", client_id="stand-in") as rec:
            rec.client.on_message = self._on_request
            yield self

    def _on_request(self, client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        request = json.loads(msg.payload)
        self.requests.append(request)
        body = self.answer(request)
        if body is None:
            return
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = getattr(msg.properties, "CorrelationData", None)
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        assert response_topic, "a course request without a response topic"
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        client.publish(response_topic, payload, qos=1, properties=properties)
