"""Test helpers for telemetry: a plain paho subscriber that records everything, and polling."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from devicectl.telemetry import TelemetryConfig


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    user_properties: dict[str, str]
    expiry: int | None

    def json(self) -> dict[str, Any]:
        body = json.loads(self.payload)
        assert isinstance(body, dict)
        return body


class Recorder:
    """A paho MQTT 5 subscriber on ``topic`` (QoS 1) collecting every message in a list.

    ``persistent=True`` keeps its session on the broker across disconnections (clean_start
    false, long session expiry), so QoS 1 messages published while it is away are queued.
    ``retain_as_published`` keeps the publisher's retain flag on live messages.
    """

    def __init__(
        self,
        port: int,
        topic: str = "lasers/#",
        *,
        client_id: str = "recorder",
        persistent: bool = False,
        retain_as_published: bool = True,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topic = topic
        self._retain_as_published = retain_as_published
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # floats work
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", port, clean_start=not persistent, properties=properties, keepalive=5
        )
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("recorder could not subscribe")

    def _on_connect(self, client: paho.Client, *_args: object) -> None:
        options = SubscribeOptions(qos=1, retainAsPublished=self._retain_as_published)
        client.subscribe(self._topic, options=options)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        content_type = getattr(props, "ContentType", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        expiry = getattr(props, "MessageExpiryInterval", None)
        received = Received(
            msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), content_type, user, expiry
        )
        with self._lock:
            self.messages.append(received)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.snapshot() if m.topic.endswith("/" + suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho keeps loop_start()'s wake-up socketpair until the client is garbage collected
        self.client._reset_sockets()


@contextmanager
def recorder(port: int, **kwargs: Any) -> Iterator[Recorder]:
    rec = Recorder(port, **kwargs)
    try:
        yield rec
    finally:
        rec.close()


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` (a safety net,
    not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def config(url: str | None, data_dir: Path, **overrides: Any) -> TelemetryConfig:
    """A test config: fast reconnects and a short CONNACK wait."""
    values: dict[str, Any] = {
        "url": url,
        "site": "clinic1",
        "device": "SN42",
        "data_dir": data_dir,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
        "connect_timeout_s": 2.0,
        "keepalive_s": 5,
    }
    values.update(overrides)
    return TelemetryConfig(**values)


def flood_commands(host: str, port: int, base: str, count: int, name_chars: int) -> None:
    """Publish ``count`` QoS 1 messages to ``{base}/cmd/<name_chars characters>``, each name
    different, pipelined; return once the broker has acknowledged them all."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(host, port)
    try:
        sent = [
            client.publish(f"{base}/cmd/{i:06d}" + "x" * (name_chars - 6), b"{}", qos=1)
            for i in range(count)
        ]
        while not all(info.is_published() for info in sent):
            client.loop(0.05)
    finally:
        client.disconnect()


def stop_flood(host: str, port: int, base: str, count: int) -> None:
    """Publish ``count`` live QoS 1 ``{base}/cmd/stop`` messages, pipelined; return once the
    broker has acknowledged them all."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(host, port)
    try:
        sent = [client.publish(f"{base}/cmd/stop", b"{}", qos=1) for _ in range(count)]
        while not all(info.is_published() for info in sent):
            client.loop(0.05)
    finally:
        client.disconnect()
