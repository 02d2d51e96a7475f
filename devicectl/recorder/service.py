"""The fleet recorder: every device's telemetry from the broker into the database, nothing lost.

:class:`Recorder` is an async context manager owning a TaskGroup with one named task, the
ingest loop, and an MQTT 5 client subscribed to ``$share/{group}/{prefix}/#`` at QoS 1 with a
persistent session (clean start off, a session expiry interval), so that several recorders split
the fleet's messages and one can die without loss: the broker keeps what is unacknowledged in the
session and hands it to the next one to connect.

Acknowledged only once committed. The client is paho-mqtt 2.x with ``manual_ack=True``: a QoS 1
message is acknowledged (PUBACK) only after the batch holding it is committed, so a recorder killed
at any moment has acknowledged nothing it has not stored, and the broker redelivers the rest
(stored once: the database keys rows on (device, topic, boot, seq)). aiomqtt 2.5, the newest 2.x,
acknowledges every message itself before the application sees it and has no public switch for
this (aiomqtt issue #345), so this one client uses paho's public API: its network thread
(``loop_start``) receives, and hands messages to the event loop with ``call_soon_threadsafe``;
acknowledgements from the event loop go through paho's thread-safe ``ack()``. A message received
on an earlier connection is not acknowledged on a later one (the broker redelivers it anyway).

Batching needs no timer: while one batch is being written, the next accumulates; a batch is
everything waiting, up to ``batch_max`` messages. A database that is down stops the loop (nothing
acknowledged, the broker holds the rest up to the client's receive maximum) and it retries with
backoff. A message that fails the intake (see ``intake``) is counted, kept in ``rejects`` and
acknowledged: one bad message never stops the reader.

Course requests (``{prefix}/{site}/{device}/course/request``, MQTT 5 request/response: response
topic and correlation data) are answered from the database by whichever recorder the shared
subscription hands them to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from structlog.typing import FilteringBoundLogger

from devicectl.errors import ConfigError
from devicectl.recorder import queries
from devicectl.recorder.intake import (
    Accepted,
    CourseRequest,
    Ignored,
    Refused,
    take,
    utc_text,
)
from devicectl.recorder.store import RecorderStore, StoreUnavailable, describe_url, open_store
from devicectl.telemetry.config import parse_broker_url, tls_context_for

__all__ = ["Recorder", "RecorderConfig", "RecorderStats", "course_request_topic"]

COURSE_CONTENT_TYPE = "application/json"


def course_request_topic(prefix: str, site: str, device: str) -> str:
    return f"{prefix}/{site}/{device}/course/request"


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    """What a recorder needs. ``client_id`` must be stable across restarts: the broker keeps the
    persistent session (and what it has not acknowledged) under that id."""

    mqtt_url: str
    db_url: str
    group: str = "devicectl-recorders"
    client_id: str = field(default_factory=lambda: f"devicectl-recorder-{socket.gethostname()}")
    prefix: str = "lasers"
    ca_file: Path | None = None
    session_expiry_s: int = 7 * 86400
    receive_maximum: int = 2000
    batch_max: int = 1000
    keepalive_s: int = 15
    # "3.1.1" for a broker without MQTT 5 (the demo's embedded amqtt): a plain persistent
    # subscription, so one recorder only, and no course replies (they need MQTT 5 properties).
    protocol: Literal["5", "3.1.1"] = "5"

    def __post_init__(self) -> None:
        for name, value in (("--group", self.group), ("--prefix", self.prefix)):
            if not value or any(c in value for c in "/#+"):
                raise ConfigError(name, value, "a topic level without / # +")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("receive_maximum", str(self.receive_maximum), "1 to 65535")

    @property
    def subscription(self) -> str:
        if self.protocol == "3.1.1":
            return f"{self.prefix}/#"
        return f"$share/{self.group}/{self.prefix}/#"


@dataclass(slots=True)
class RecorderStats:
    received: int = 0
    stored: int = 0  # messages committed (a redelivered one is counted again, stored once)
    refused: int = 0
    ignored: int = 0
    course_requests: int = 0
    batches: int = 0
    acked: int = 0
    not_acked_stale: int = 0  # received on an earlier connection: the broker redelivers them
    connects: int = 0
    store_errors: int = 0
    last_error: str | None = None
    refusals: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class _Received:
    generation: int
    topic: str
    payload: bytes
    qos: int
    retained: bool
    mid: int
    properties: Properties | None


def _user_property(properties: Properties | None, name: str) -> str | None:
    for key, value in getattr(properties, "UserProperty", None) or ():
        if key == name:
            return str(value)
    return None


class Recorder:
    """``async with Recorder(config) as recorder: await recorder.wait_closed()``."""

    def __init__(
        self,
        config: RecorderConfig,
        *,
        store: RecorderStore | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        self.address = parse_broker_url(config.mqtt_url)
        self.tls: ssl.SSLContext | None = tls_context_for(config.mqtt_url, config.ca_file)
        self.log: FilteringBoundLogger = log or structlog.get_logger("devicectl.recorder")
        self.stats = RecorderStats()
        self.store = store
        self._owns_store = store is None
        self._queue: asyncio.Queue[_Received] = asyncio.Queue()
        self._generation = 0
        self._connected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._replies: set[asyncio.Task[None]] = set()
        self._ingest_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Recorder:
        self._loop = asyncio.get_running_loop()
        if self.store is None:
            self.store = await open_store(self.config.db_url)
        try:
            self._client = self._make_client()
            if self.config.protocol == "5":
                self._client.connect_async(
                    self.address.host,
                    self.address.port,
                    keepalive=self.config.keepalive_s,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            else:
                self._client.connect_async(
                    self.address.host, self.address.port, keepalive=self.config.keepalive_s
                )
            self._client.loop_start()
            self._tasks = asyncio.TaskGroup()
            await self._tasks.__aenter__()
            self._ingest_task = self._tasks.create_task(self._ingest(), name="recorder-ingest")
        except BaseException:
            await self._release()
            raise
        self.log.info(
            "recorder_started",
            broker=f"{self.address.host}:{self.address.port}",
            db=describe_url(self.config.db_url),
            subscription=self.config.subscription,
            client_id=self.config.client_id,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, None
        try:
            if tasks is not None:
                for task in (*self._replies, self._ingest_task):
                    if task is not None:
                        task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks.__aexit__(None, None, None)
        finally:
            await self._release()
            self.log.info("recorder_stopped", **self.stats.as_dict())

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # No DISCONNECT with "will" semantics needed; the session stays for the next start.
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        if self._owns_store and self.store is not None:
            await self.store.close()
            self.store = None

    async def wait_subscribed(self) -> None:
        """Until the shared subscription is in place (tests and the demo wait for this)."""
        await self._subscribed.wait()

    # ---------------------------------------------------------------- the MQTT client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = self.config.receive_maximum
        return properties

    def _make_client(self) -> paho.Client:
        if self.config.protocol == "5":
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.config.client_id,
                protocol=paho.MQTTv5,
                manual_ack=True,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.config.client_id,
                protocol=paho.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # paho's network thread calls these; they only hand facts to the event loop.

    @staticmethod
    def _on_socket_open(_client: paho.Client, _userdata: Any, sock: Any) -> None:
        # Acknowledgements are tiny and many: Nagle would hold them back (see docs/mqtt.md).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._call(self._note_error, f"broker refused the connection: {reason}")
            return
        self._generation += 1
        client.subscribe(self.config.subscription, qos=1)
        self._call(self._note_connected, self._generation)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._call(self._note_disconnected, str(reason))

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        self._call(self._note_subscribed, failed)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        received = _Received(
            self._generation,
            message.topic,
            bytes(message.payload),
            message.qos,
            bool(message.retain),
            message.mid,
            getattr(message, "properties", None),
        )
        self._call(self._queue.put_nowait, received)

    def _call(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(function, *args)

    # On the event loop:

    def _note_connected(self, generation: int) -> None:
        self.stats.connects += 1
        self._connected.set()
        self.log.info("recorder_connected", generation=generation)

    def _note_disconnected(self, reason: str) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self.log.warning("recorder_disconnected", reason=reason)

    def _note_subscribed(self, failed: list[str]) -> None:
        if failed:
            self._note_error(f"subscription {self.config.subscription} refused: {failed[0]}")
            return
        self._subscribed.set()
        self.log.info("recorder_subscribed", subscription=self.config.subscription)

    def _note_error(self, error: str) -> None:
        self.stats.last_error = error
        self.log.error("recorder_mqtt_error", error=error)

    # ---------------------------------------------------------------- ingest

    async def _ingest(self) -> None:
        backoff = 0.25
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            accepted, refused, done = self._sort(batch)
            while True:
                try:
                    assert self.store is not None
                    result = await self.store.write(accepted, refused, utc_text(_now()))
                    break
                except StoreUnavailable as exc:
                    self.stats.store_errors += 1
                    self.stats.last_error = str(exc)
                    self.log.warning("recorder_store_unavailable", error=str(exc), retry_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
            backoff = 0.25
            self.stats.batches += 1
            self.stats.stored += len(accepted)
            for extra in result.refused[len(refused) :]:
                self._count_refusal(extra)
            self._ack(done)

    def _sort(
        self, batch: list[_Received]
    ) -> tuple[list[Accepted], list[Refused], list[_Received]]:
        recorded = utc_text(_now())
        accepted: list[Accepted] = []
        refused: list[Refused] = []
        for message in batch:
            self.stats.received += 1
            outcome = take(
                message.topic,
                bytes(message.payload),
                retained=message.retained,
                boot_property=_user_property(message.properties, "boot"),
                recorded=recorded,
            )
            match outcome:
                case Accepted():
                    accepted.append(outcome)
                case Refused():
                    refused.append(outcome)
                    self._count_refusal(outcome)
                case Ignored():
                    self.stats.ignored += 1
                case CourseRequest():
                    self._answer_course(outcome, message)
        return accepted, refused, batch

    def _count_refusal(self, refused: Refused) -> None:
        self.stats.refused += 1
        key = refused.reason.split(":")[0][:60]
        self.stats.refusals[key] = self.stats.refusals.get(key, 0) + 1
        self.log.warning("recorder_message_refused", topic=refused.topic, reason=refused.reason)

    def _ack(self, messages: list[_Received]) -> None:
        client = self._client
        if client is None:
            return
        for message in messages:
            if message.qos == 0:
                continue
            if message.generation != self._generation:
                self.stats.not_acked_stale += 1
                continue
            client.ack(message.mid, message.qos)
            self.stats.acked += 1

    # ---------------------------------------------------------------- course requests

    def _answer_course(self, request: CourseRequest, message: _Received) -> None:
        self.stats.course_requests += 1
        response_topic = getattr(message.properties, "ResponseTopic", None)
        if not response_topic:
            self._count_refusal(
                Refused(message.topic, "a course request without a response topic", b"")
            )
            return
        correlation = getattr(message.properties, "CorrelationData", None)
        task = asyncio.get_running_loop().create_task(
            self._reply_course(request, str(response_topic), correlation),
            name="recorder-course-reply",
        )
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _reply_course(
        self, request: CourseRequest, response_topic: str, correlation: bytes | None
    ) -> None:
        assert self.store is not None
        try:
            course = await queries.course(
                self.store, request.patient, planned=request.planned, now=_now()
            )
            body: dict[str, Any] = {"ok": True, **course.as_dict()}
        except (StoreUnavailable, ValueError) as exc:
            body = {"ok": False, "error": str(exc)[:200]}
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = COURSE_CONTENT_TYPE
        if correlation is not None:
            properties.CorrelationData = correlation
        client = self._client
        if client is not None:
            client.publish(
                response_topic,
                json.dumps(body, separators=(",", ":")).encode(),
                qos=1,
                properties=properties,
            )
        self.log.info(
            "recorder_course_answered",
            device=request.device,
            sessions=len(body.get("sessions", ())),
            ok=body["ok"],
        )


def _now() -> datetime:
    return datetime.now(UTC)
