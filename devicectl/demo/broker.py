"""An embedded MQTT broker for the demo: amqtt, pure Python, on a free loopback port.

amqtt 0.12 speaks MQTT 3.1.1 only: the daemon's telemetry falls back to 3.1.1 when a broker refuses
MQTT 5. It binds the port itself, so the demo picks a free one first (bind to port 0, read it,
close) and retries on the rare race where another program takes it in between.
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any, Self

from devicectl.demo.script import DemoError

__all__ = ["EmbeddedBroker"]

_ATTEMPTS = 3


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class EmbeddedBroker:
    """``async with EmbeddedBroker() as broker: broker.url`` (``mqtt://127.0.0.1:PORT``)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise DemoError("the embedded MQTT broker is not running")
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        from amqtt.broker import Broker
        from amqtt.errors import BrokerError

        cause = "no attempt"
        for _ in range(_ATTEMPTS):
            port = _free_port(self.host)
            broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
                    # Only anonymous access on loopback: no $SYS topics, no packet logging.
                    "plugins": {
                        "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                            "allow_anonymous": True
                        }
                    },
                }
            )
            try:
                await broker.start()
            except BrokerError as exc:
                cause = str(exc.__cause__ or exc)
                continue
            self._broker, self.port = broker, port
            return self
        raise DemoError(f"the embedded MQTT broker (amqtt) could not start: {cause}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        broker, self._broker, self.port = self._broker, None, None
        if broker is not None:
            await broker.shutdown()
