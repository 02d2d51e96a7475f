"""The dashboard's MQTT side: the subscriber that feeds the view, and the one command it may send.

:class:`TelemetrySubscriber` subscribes to ``{prefix}/#`` and feeds every message to the
:class:`~devicectl.dashboard.fleet.Fleet`, pushing what changed to the browsers. When the broker is
unreachable it retries with jittered exponential backoff, and the page says the broker is down.

:func:`publish_stop` sends ``cmd/stop`` to one device (DESIGN.md section 6: the only command
accepted over MQTT; stopping is always safe), on a connection of its own made with the stop
credentials, so that the telemetry connection never holds a right to command anything.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog
from structlog.typing import FilteringBoundLogger

from devicectl.dashboard.fleet import Fleet
from devicectl.dashboard.hub import UpdateHub
from devicectl.errors import ConfigError, LinkError

__all__ = [
    "Backoff",
    "BrokerEndpoint",
    "StopFailed",
    "TelemetrySubscriber",
    "parse_broker_url",
    "publish_stop",
]

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def display(self) -> str:
        """The URL without its credentials, for the page and the logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerEndpoint:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` (TLS, 8883 by default)."""
    allowed = "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("--mqtt", url, allowed) from exc
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname or parts.path not in {"", "/"}:
        raise ConfigError("--mqtt", url, allowed)
    tls = parts.scheme == "mqtts"
    return BrokerEndpoint(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


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
    endpoint: BrokerEndpoint,
    *,
    username: str | None,
    password: str | None,
    identifier: str | None,
    timeout_s: float,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=username,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=ssl.create_default_context() if endpoint.tls else None,
        timeout=timeout_s,
        keepalive=15,
        socket_options=_NODELAY,
    )


class TelemetrySubscriber:
    """Keeps ``fleet`` in step with the broker and ``hub`` informed; :meth:`run` until cancelled."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        fleet: Fleet,
        hub: UpdateHub,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.fleet = fleet
        self.hub = hub
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.log: FilteringBoundLogger = log or structlog.get_logger("devicectl.dashboard")
        # Set while subscribed: the broker's retained messages are on their way.
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        topic = f"{self.fleet.prefix}/#"
        while True:
            try:
                async with _client(
                    self.endpoint,
                    username=self.endpoint.username,
                    password=self.endpoint.password,
                    identifier=None,
                    timeout_s=10.0,
                ) as client:
                    self.hub.publish(self.fleet.broker_link(True, self.clock()))
                    await client.subscribe(topic, qos=1)
                    self.subscribed.set()
                    self.log.info("broker_connected", broker=self.endpoint.display(), topic=topic)
                    attempt = 0
                    async for message in client.messages:
                        payload = message.payload
                        data = (
                            payload if isinstance(payload, bytes) else str(payload or "").encode()
                        )
                        self.hub.publish(self.fleet.apply(str(message.topic), data, self.clock()))
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                delay = self.backoff.delay(attempt)
                attempt += 1
                self.hub.publish(self.fleet.broker_link(False, self.clock(), str(exc)))
                self.log.warning(
                    "broker_unreachable",
                    broker=self.endpoint.display(),
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
    endpoint: BrokerEndpoint,
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
            endpoint,
            username=username,
            password=password,
            identifier=None,
            timeout_s=timeout_s,
        ) as client:
            await client.publish(topic, payload, qos=1, timeout=timeout_s)
    except aiomqtt.MqttError as exc:
        raise StopFailed(topic, str(exc) or type(exc).__name__) from exc
