"""The embedded broker: a free loopback port, MQTT 3.1.1 round trip with retain, closed on exit."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path

import aiomqtt
import pytest

from devicectl.demo import DemoError, EmbeddedBroker, default_demo_dir


async def test_embedded_broker_serves_on_a_free_port_and_closes_it() -> None:
    async with EmbeddedBroker() as broker:
        assert broker.port is not None
        port = broker.port
        assert broker.url == f"mqtt://127.0.0.1:{port}"
        async with aiomqtt.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311
        ) as publisher:
            await publisher.publish("lasers/site/dev/availability", b"online", qos=1, retain=True)
        async with aiomqtt.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311
        ) as subscriber:
            await subscriber.subscribe("lasers/#", qos=1)
            async for message in subscriber.messages:
                assert str(message.topic) == "lasers/site/dev/availability"
                assert message.payload == b"online"
                assert message.retain
                break
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    with pytest.raises(DemoError, match="not running"):
        _ = broker.url


def test_default_data_dirs_never_reuse_a_directory(tmp_path: Path) -> None:
    now = datetime(2026, 11, 25, 10, 45, 12)
    first = default_demo_dir(tmp_path, now)
    assert first == tmp_path / "devicectl-demo" / "20261125-104512"
    first.mkdir(parents=True)
    second = default_demo_dir(tmp_path, now)
    assert second == tmp_path / "devicectl-demo" / "20261125-104512-2"
