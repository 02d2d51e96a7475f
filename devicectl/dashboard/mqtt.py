"""The dashboard's MQTT side: the subscriber that feeds the view, and the one command it may send.

:class:`TelemetrySubscriber` subscribes to ``{prefix}/#`` and feeds every message to the
:class:`~devicectl.dashboard.fleet.Fleet`, pushing what changed to the browsers. When the broker is
unreachable it retries with jittered exponential backoff, and the page says the broker is down.
No message can stop it: the fleet refuses what it cannot read, and should reading a message still
fail, that message is counted and logged, and the reader goes on. :meth:`health` is what
``/healthz`` and the page report: whether the reader runs, is subscribed, and when it last read.

:func:`publish_stop` sends ``cmd/stop`` to one device (docs/mqtt.md: the only command
accepted over MQTT; stopping is always safe), on a connection of its own made with the stop
credentials, so that the telemetry connection never holds a right to command anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiomqtt
import structlog
from structlog.typing import FilteringBoundLogger

from devicectl.dashboard.fleet import Fleet
from devicectl.dashboard.hub import UpdateHub
from devicectl.errors import LinkError
from devicectl.telemetry.config import BrokerAddress

__all__ = ["Backoff", "StopFailed", "TelemetrySubscriber", "display_url", "publish_stop"]

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def display_url(address: BrokerAddress) -> str:
    """The broker's URL without credentials, for the page and the logs."""
    return f"{'mqtts' if address.tls else 'mqtt'}://{address.host}:{address.port}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff: attempt n waits a random time in [d/2, d].

    d = min(cap, base·2ⁿ); the jitter keeps a clinic's dashboards from reconnecting in step.
    """

    base_s: float = 0.25
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 30))
        return ceiling * (0.5 + 0.5 * rng())


def _client(
    address: BrokerAddress,
    tls: ssl.SSLContext | None,
    *,
    username: str | None,
    password: str | None,
    timeout_s: float,
) -> aiomqtt.Client:
    # MQTT 3.1.1: every broker speaks it (the demo's embedded amqtt speaks nothing newer), and
    # the dashboard needs nothing from MQTT 5.
    return aiomqtt.Client(
        address.host,
        address.port,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V311,
        tls_context=tls,
        timeout=timeout_s,
        keepalive=15,
        socket_options=_NODELAY,
    )


class TelemetrySubscriber:
    """Keeps ``fleet`` in step with the broker and ``hub`` informed; :meth:`run` until cancelled."""

    def __init__(
        self,
        address: BrokerAddress,
        tls: ssl.SSLContext | None,
        fleet: Fleet,
        hub: UpdateHub,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.address, self.tls = address, tls
        self.fleet = fleet
        self.hub = hub
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.log: FilteringBoundLogger = log or structlog.get_logger("devicectl.dashboard")
        # Set while subscribed: the broker's retained messages are on their way.
        self.subscribed = asyncio.Event()
        self.running = False
        self.messages = 0
        self.failed = 0  # messages whose handling raised: a bug, counted, never fatal
        self.last_message_at: float | None = None

    def health(self) -> dict[str, object]:
        return {
            "running": self.running,
            "connected": self.running and self.subscribed.is_set(),
            "messages": self.messages,
            "unreadable": self.fleet.unreadable_total,
            "failed": self.failed,
            "last_message_at": self.last_message_at,
        }

    def _take(self, topic: str, payload: bytes) -> None:
        now = self.clock()
        self.messages += 1
        self.last_message_at = now
        try:
            updates = self.fleet.apply(topic, payload, now)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the reader
            self.failed += 1
            self.log.error(  # noqa: TRY400 - one line per message, not a traceback each
                "telemetry_message_failed",
                topic=topic[:120],
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )
            return
        self.hub.publish(updates)

    async def run(self) -> None:
        self.running = True
        try:
            await self._run()
        finally:
            self.running = False
            self.subscribed.clear()
            with contextlib.suppress(Exception):
                self.hub.publish(
                    self.fleet.broker_link(False, self.clock(), "the telemetry reader stopped")
                )

    async def _run(self) -> None:
        attempt = 0
        topic = f"{self.fleet.prefix}/#"
        while True:
            try:
                async with _client(
                    self.address,
                    self.tls,
                    username=self.address.username,
                    password=self.address.password,
                    timeout_s=10.0,
                ) as client:
                    self.hub.publish(self.fleet.broker_link(True, self.clock()))
                    await client.subscribe(topic, qos=1)
                    self.subscribed.set()
                    self.log.info("broker_connected", broker=display_url(self.address), topic=topic)
                    attempt = 0
                    async for message in client.messages:
                        payload = message.payload
                        data = (
                            payload if isinstance(payload, bytes) else str(payload or "").encode()
                        )
                        self._take(str(message.topic), data)
            except (aiomqtt.MqttError, OSError, ValueError) as exc:  # ValueError: a bad address
                self.subscribed.clear()
                delay = self.backoff.delay(attempt)
                attempt += 1
                self.hub.publish(self.fleet.broker_link(False, self.clock(), str(exc)))
                self.log.warning(
                    "broker_unreachable",
                    broker=display_url(self.address),
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)


class StopFailed(LinkError):
    """``cmd/stop`` could not be handed to the broker."""

    def __init__(self, device: str, reason: str) -> None:
        self.device, self.reason = device, reason
        super().__init__(f"stop for {device} was not sent: {reason}")


async def publish_stop(
    address: BrokerAddress,
    tls: ssl.SSLContext | None,
    topic: str,
    *,
    username: str,
    password: str,
    requested_by: str,
    timeout_s: float = 5.0,
) -> None:
    """Publish ``cmd/stop`` (QoS 1) and return once the broker has acknowledged it.

    The broker's acknowledgement is not the device's: the page shows the stop took effect when
    the device's ``state`` stops saying EMITTING. Raises StopFailed.
    """
    payload = json.dumps(
        {
            "v": 1,
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "source": "dashboard",
            "requested_by": requested_by,
        }
    )
    try:
        async with _client(
            address, tls, username=username, password=password, timeout_s=timeout_s
        ) as client:
            await client.publish(topic, payload, qos=1, timeout=timeout_s)
    except aiomqtt.MqttError as exc:
        raise StopFailed(topic, str(exc) or type(exc).__name__) from exc
