"""One MQTT connection for the telemetry publisher: paho-mqtt driven on the running asyncio loop.

paho documents an external-event-loop mode: the application watches paho's socket and calls
``loop_read()``, ``loop_write()`` and ``loop_misc()``; paho tells it which socket to watch through
``on_socket_open``/``on_socket_close``/``on_socket_register_write``/``on_socket_unregister_write``.
This module is that, and nothing else of paho's is touched: no private attribute, no replaced
internal. (aiomqtt does the same inside, but offers no public way to pipeline publishes: its
``await publish()`` per message held throughput to about a third of paho's.)

::

    connect() ─ TCP, TLS, CONNECT (in an executor thread: paho connects blocking) ─▶ CONNACK
    publish()          one message, awaiting its PUBACK (availability, QoS 0 metrics)
    publish_nowait()   pipelined: the PUBACK goes to ``on_puback`` (the outbox's rows)
    burst()            publishes inside leave in one corked socket write, from the caller
    messages()         inbound PUBLISHes (``cmd/#``), at most INBOUND_MAX waiting (see there)
    disconnect()       a clean DISCONNECT (no Last Will); close() releases the socket anyway

A lost connection fails whatever waits on it with :class:`MqttLinkError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_SUCCESS
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicectl.errors import DevicectlError

# Inbound messages waiting for messages()' reader, at most: paho reads a flood faster than the
# reader takes it (15,000 messages/s grew the worker by ~700 MB). Beyond it a message is offered
# to ``take_now`` (a cmd/stop is obeyed there and then: it can neither wait nor be dropped), and
# otherwise dropped unread and counted (take_dropped).
INBOUND_MAX = 1000
# ... and in payload bytes, the same way: a message may be as large as the broker allows (256 MB
# by default), so a count alone bounds nothing. One message over it gets in when there is room
# (a command is a few hundred bytes; paho has read it whole already).
INBOUND_MAX_BYTES = 1 << 20

__all__ = [
    "INBOUND_MAX",
    "INBOUND_MAX_BYTES",
    "MqttConnection",
    "MqttLinkError",
    "MqttRefused",
    "Will",
]

_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux
_MISC_INTERVAL_S = 1.0  # keepalive PINGREQs and their timeouts are paho's loop_misc()


class MqttLinkError(DevicectlError):
    """The broker cannot be reached, did not answer in time, or the connection was lost."""


class MqttRefused(MqttLinkError):
    """The broker answered CONNECT with a refusal; ``rc`` is its reason code."""

    def __init__(self, rc: int, reason: str) -> None:
        self.rc = rc
        super().__init__(f"the broker refused the connection: {reason} (code {rc})")


class Will:
    """The Last Will: published by the broker if the connection ends without DISCONNECT."""

    __slots__ = ("payload", "properties", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = True,
        properties: Properties | None = None,
    ) -> None:
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.properties = properties


def _code(reason: Any) -> int:
    """A paho ReasonCode (or a plain int) as its integer value."""
    return reason if isinstance(reason, int) else int(reason.value)


class MqttConnection:
    """``async with MqttConnection(...) as mqtt:`` connected (CONNACK accepted) inside."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        v5: bool,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        will: Will | None = None,
        keepalive: int = 60,
        connect_timeout: float = 10.0,
        on_puback: Callable[[int, int], bool] | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        self._host, self._port, self._keepalive = host, port, keepalive
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._v5 = v5
        self._connect_timeout = connect_timeout
        self.on_puback = on_puback
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else clean_start,
        )
        # No limit inside paho: the publisher keeps its own window of publishes in flight, and
        # with a limit paho walks every in-flight message on each PUBACK.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = connect_timeout
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls)
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain, will.properties)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self.client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._connack: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._messages: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        # with INBOUND_MAX waiting: handles a message there and then, True when it did (a cmd/stop)
        self.take_now: Callable[[paho.MQTTMessage], bool] | None = None
        self._dropped = 0
        self._dropped_bytes = 0
        self._waiting_bytes = 0  # payload bytes in _messages
        self._misc: asyncio.Task[None] | None = None
        self._watched: socket.socket | None = None  # the socket registered with the loop
        self._writing = False
        self._closed = False
        self._deferring = False
        self._deferred = False
        self.connected = False

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self.connected:
                await self.disconnect()
        finally:
            self.close()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        options: dict[str, Any] = {"clean_start": MQTT_CLEAN_START_FIRST_ONLY}
        if self._v5:  # 3.1.1: clean_session, given to the client
            options["clean_start"] = self._clean_start
            if self._session_expiry_s:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self._session_expiry_s
                options["properties"] = properties
        connect = functools.partial(
            self.client.connect, self._host, self._port, self._keepalive, **options
        )
        connack = self._connack

        async def handshake() -> None:
            rc = await loop.run_in_executor(None, connect)
            if rc != MQTT_ERR_SUCCESS:
                raise MqttLinkError(f"cannot connect: {paho.error_string(rc)}")
            await connack

        try:
            async with asyncio.timeout(self._connect_timeout):
                await handshake()
        except TimeoutError:
            self.close()
            raise MqttLinkError("Operation timed out") from None
        except BaseException:
            self.close()
            raise
        self.connected = True
        self._misc = loop.create_task(self._misc_loop(), name="telemetry-mqtt-keepalive")

    async def disconnect(self, wait_s: float = 1.0) -> None:
        """A clean DISCONNECT: the broker publishes no Last Will."""
        self.connected = False
        self.client.disconnect()
        if self._lost is not None and not self._lost.done():
            with contextlib.suppress(TimeoutError, MqttLinkError):
                async with asyncio.timeout(wait_s):
                    await asyncio.shield(self._lost)

    def close(self) -> None:
        """Release the socket and the loop's watch on it, whatever state the connection is in
        (a failed attempt leaves paho's socket open until the client is collected)."""
        self.connected = False
        self._closed = True
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._unwatch()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.close()
        self._fail_waiting(MqttLinkError("the connection is closed"))

    # ------------------------------------------------------------------ traffic

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        wait_s: float = 10.0,
    ) -> None:
        """Publish one message; at QoS 1 return once the broker has acknowledged it."""
        info = self.publish_nowait(topic, payload, qos, retain, properties)
        if qos == 0:
            return
        await self._await_ack(info.mid, wait_s)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        properties: Properties | None,
    ) -> paho.MQTTMessageInfo:
        """Queue one PUBLISH; its PUBACK goes to ``on_puback(mid, reason)`` (unless awaited)."""
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc != MQTT_ERR_SUCCESS:
            raise MqttLinkError(f"could not publish: {paho.error_string(info.rc)}")
        return info

    async def subscribe(self, topic: str, qos: int = 1, wait_s: float = 10.0) -> None:
        rc, mid = self.client.subscribe(topic, qos)
        if rc != MQTT_ERR_SUCCESS or mid is None:
            raise MqttLinkError(f"could not subscribe: {paho.error_string(rc)}")
        await self._await_ack(mid, wait_s)

    async def messages(self) -> AsyncIterator[paho.MQTTMessage]:
        """Inbound messages until the connection is lost (then MqttLinkError)."""
        lost = self._lost
        assert lost is not None
        while True:
            getting = asyncio.ensure_future(self._messages.get())
            waiting: set[asyncio.Future[Any]] = {getting, lost}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getting.done():
                    getting.cancel()
            if getting.done() and not getting.cancelled():
                message = getting.result()
                self._waiting_bytes -= len(message.payload)
                yield message
                continue
            lost.result()  # raises MqttLinkError
            return

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Publishes made inside are written to the socket when the block ends, by the caller,
        in one corked write: one loop wake-up and full segments instead of one each."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._deferred:
                self._deferred = False
                self._write_now()

    # ------------------------------------------------------------------ internals

    async def _await_ack(self, mid: int, wait_s: float) -> None:
        loop, lost = self._loop, self._lost
        assert loop is not None
        assert lost is not None
        acked: asyncio.Future[int] = loop.create_future()
        self._acks[mid] = acked
        waiting: set[asyncio.Future[Any]] = {acked, lost}
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise MqttLinkError("Operation timed out") from None
        finally:
            self._acks.pop(mid, None)
        if not acked.done():
            lost.result()  # raises MqttLinkError
        code = acked.result()
        if code >= 0x80:
            raise MqttLinkError(f"the broker refused message {mid} (reason code {code})")

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(_MISC_INTERVAL_S)
            self.client.loop_misc()

    def _in_loop(self, function: Callable[..., None], *args: Any) -> None:
        """paho calls the socket callbacks from inside ``connect()``, in the executor thread."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            function(*args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    def _fail_waiting(self, error: MqttLinkError) -> None:
        for future in (self._connack, self._lost):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        for acked in self._acks.values():
            if not acked.done():
                acked.set_exception(error)
                acked.exception()
        self._acks.clear()

    def _write_now(self) -> None:
        client = self.client
        sock = client.socket()
        cork = _TCP_CORK if isinstance(sock, socket.socket) else None
        corked = False
        if cork is not None and isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
                corked = True
        try:
            rc = client.loop_write()
        finally:
            if corked and cork is not None and isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, cork, 0)
        if client.want_write():  # the kernel did not take everything: the loop's writer will
            self._watch_write()
        if rc != MQTT_ERR_SUCCESS:
            raise MqttLinkError(f"could not send: {paho.error_string(rc)}")

    # paho's callbacks -------------------------------------------------

    def _on_connect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        connack = self._connack
        if connack is None or connack.done():
            return
        if reason.is_failure:
            connack.set_exception(MqttRefused(_code(reason), str(reason)))
        else:
            connack.set_result(None)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self.connected = False
        self._fail_waiting(MqttLinkError(f"disconnected: {reason}"))

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason: Any, _props: Any
    ) -> None:
        code = _code(reason)
        acked = self._acks.pop(mid, None)
        if acked is not None:
            if not acked.done():
                acked.set_result(code)
        elif self.on_puback is not None:
            self.on_puback(mid, code)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: Any, _props: Any
    ) -> None:
        acked = self._acks.pop(mid, None)
        if acked is not None and not acked.done():
            codes = [_code(r) for r in reasons] if isinstance(reasons, list) else [0]
            acked.set_result(max(codes, default=0))

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if self._messages.qsize() >= INBOUND_MAX or self._waiting_bytes >= INBOUND_MAX_BYTES:
            if self.take_now is not None and self.take_now(message):
                return
            self._dropped += 1
            self._dropped_bytes += len(message.payload)
            return
        self._waiting_bytes += len(message.payload)
        self._messages.put_nowait(message)

    def take_dropped(self) -> tuple[int, int]:
        """Inbound messages dropped unread since the last call, and their payload bytes."""
        dropped = self._dropped, self._dropped_bytes
        self._dropped = self._dropped_bytes = 0
        return dropped

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            # Nagle would hold pipelined QoS 1 publishes back until the broker's ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(self._watch_read, sock)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        self._in_loop(self._unwatch)

    def _on_socket_register_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._deferring:
            self._deferred = True  # written at the end of the burst
            return
        self._in_loop(self._watch_write)

    def _on_socket_unregister_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        self._in_loop(self._unwatch_write)

    # the loop's watch on the socket ------------------------------------

    def _watch_read(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if self._closed:  # a connect() that outlived its timeout in the executor thread
            with contextlib.suppress(OSError):
                sock.close()
            return
        if self._watched is not None:
            self._unwatch()
        self._watched = sock
        self._loop.add_reader(sock, self._readable)
        if self.client.want_write():
            self._watch_write()

    def _readable(self) -> None:
        client = self.client
        rc = client.loop_read()
        # TLS may hold decrypted bytes the socket will not signal again: read them now
        sock = client.socket()
        while rc == MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = client.loop_read()
        if rc not in (MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            self._fail_waiting(MqttLinkError(f"connection lost: {paho.error_string(rc)}"))

    def _writable(self) -> None:
        rc = self.client.loop_write()
        if rc not in (MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            self._fail_waiting(MqttLinkError(f"connection lost: {paho.error_string(rc)}"))

    def _watch_write(self) -> None:
        if self._watched is None or self._writing or self._loop is None:
            return
        self._writing = True
        self._loop.add_writer(self._watched, self._writable)

    def _unwatch_write(self) -> None:
        if self._watched is not None and self._writing and self._loop is not None:
            self._loop.remove_writer(self._watched)
        self._writing = False

    def _unwatch(self) -> None:
        self._unwatch_write()
        if self._watched is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._watched)
        self._watched = None
