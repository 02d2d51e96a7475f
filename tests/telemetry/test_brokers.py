"""The broker fixture itself: starts, restarts on the same port, keeps a persistent session."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokers import Broker, Pki

pytestmark = pytest.mark.system


def _connect(port: int, **tls: object) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if tls:
        client.tls_set(**tls)  # type: ignore[arg-type]
    client.connect("127.0.0.1", port)
    return client


def test_broker_restarts_on_the_same_port(mosquitto: Broker) -> None:
    port = mosquitto.port
    mosquitto.stop()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.port == port
    client = _connect(port)
    try:
        assert client.loop(1.0) == paho.MQTT_ERR_SUCCESS
    finally:
        client.disconnect()


def test_tls_listener_accepts_its_ca(tmp_path: Path, pki: Pki) -> None:
    with Broker(tmp_path / "b", tls=pki) as broker:
        assert broker.tls_port is not None
        client = _connect(broker.tls_port, ca_certs=str(pki.ca))
        try:
            deadline = time.monotonic() + 5
            while not client.is_connected() and time.monotonic() < deadline:
                client.loop(0.1)
            assert client.is_connected()
        finally:
            client.disconnect()
        with pytest.raises(ssl.SSLError):
            _connect(broker.tls_port, ca_certs=str(pki.server_cert))
