"""MQTT commands (only cmd/stop), TLS, and the MQTT 3.1.1 fallback, against real brokers."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from devicectl.telemetry import CommandAction, RefusedBurst, Telemetry, classify_command
from devicectl.telemetry.connection import MqttLinkError, MqttRefused
from tests.brokers import Broker, free_port, make_pki
from tests.telemetry.helpers import config, recorder, until

pytestmark = pytest.mark.system

BASE = "lasers/clinic1/SN42"


def _send(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        while not info.is_published():
            client.loop(0.05)
    finally:
        client.disconnect()


def test_only_stop_is_obeyed() -> None:
    assert classify_command(BASE, f"{BASE}/cmd/stop", retained=False).action is CommandAction.STOP
    refused = classify_command(BASE, f"{BASE}/cmd/arm", retained=False)
    assert (refused.action, refused.command) == (CommandAction.REFUSE, "arm")
    stale = classify_command(BASE, f"{BASE}/cmd/stop", retained=True)
    assert (stale.action, stale.command, stale.ours) == (CommandAction.IGNORE, "stop", True)
    for command in ("arm", "stop/now", "", "set/params"):
        retained = classify_command(BASE, f"{BASE}/cmd/{command}", retained=True)
        assert (retained.action, retained.command) == (CommandAction.REFUSE, command)
    foreign = classify_command(BASE, "lasers/x/y/cmd/stop", retained=False)
    assert (foreign.action, foreign.ours) == (CommandAction.IGNORE, False)


async def test_stop_calls_back_and_other_commands_are_refused(
    mosquitto: Broker, tmp_path: Path
) -> None:
    stops: list[str] = []
    refused: list[RefusedBurst] = []
    with recorder(mosquitto.port, topic=f"{BASE}/alerts") as rec:
        async with Telemetry(
            config(mosquitto.url, tmp_path),
            on_stop=lambda: stops.append("stop"),
            on_refused_command=refused.append,
            refusal_window_s=0.3,
        ) as tm:
            await until(lambda: tm.connected)
            _send(mosquitto.port, f"{BASE}/cmd/stop", b"")
            await until(lambda: stops == ["stop"], what="the stop callback")
            _send(mosquitto.port, f"{BASE}/cmd/arm", b'{"lease_ms": 5000}')
            await until(lambda: len(refused) == 1, what="the refusal audit callback")
            # random payloads, odd topics: nothing crashes, nothing else is obeyed
            for junk in (b"\xff\xfe\x00garbage", b"{" * 5000, "é".encode() * 100):
                _send(mosquitto.port, f"{BASE}/cmd/stop", junk)
                _send(mosquitto.port, f"{BASE}/cmd/set/params", junk)
            await until(
                lambda: len(stops) == 4 and sum(b.count for b in refused) == 4,
                what="all commands",
            )
            # one alert per burst of refusals, each burst audited once
            await until(lambda: len(rec.on("alerts")) == len(refused), what="refusal alerts")
            assert tm.connected
            assert tm.stats.commands_refused == 4
            assert tm.stats.commands_stop == 4
    assert (refused[0].count, refused[0].commands, refused[0].payload_bytes) == (1, ("arm",), 18)
    assert all(b.commands == ("set/params",) for b in refused[1:]), refused
    alert = rec.on("alerts")[0].json()
    assert alert["code"] == "command_refused"
    assert "arm" in alert["message"]


async def test_a_retained_stop_is_not_obeyed_but_audited_as_ignored(
    mosquitto: Broker, tmp_path: Path
) -> None:
    stops: list[int] = []
    refused: list[RefusedBurst] = []
    ignored: list[tuple[str, bytes]] = []
    # not empty: an empty retained publish would only clear the topic, leaving nothing retained
    _send(mosquitto.port, f"{BASE}/cmd/stop", b"stale", retain=True)
    try:
        async with Telemetry(
            config(mosquitto.url, tmp_path),
            on_stop=lambda: stops.append(1),
            on_refused_command=refused.append,
            on_ignored_command=lambda command, payload: ignored.append((command, payload)),
        ) as tm:
            await until(lambda: tm.connected)
            await until(lambda: ignored == [("stop", b"stale")], what="the ignored-command audit")
            tm.publish_alert("info", "probe", "sync point")
            await until(lambda: tm.stats.published >= 1)
            assert stops == []
            assert refused == []
            assert (tm.stats.commands_ignored, tm.stats.commands_stop) == (1, 0)
    finally:
        _send(mosquitto.port, f"{BASE}/cmd/stop", b"", retain=True)  # clear (empty retained)


async def test_a_retained_command_other_than_stop_is_refused_audited_and_alerted(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """A retained ``cmd/arm`` found at subscription is not dropped silently: it is refused like
    a live one (audit callback, alert), and nothing is obeyed."""
    refused: list[RefusedBurst] = []
    stops: list[int] = []
    _send(mosquitto.port, f"{BASE}/cmd/arm", b'{"lease_ms": 5000}', retain=True)
    try:
        with recorder(mosquitto.port, topic=f"{BASE}/alerts") as rec:
            async with Telemetry(
                config(mosquitto.url, tmp_path),
                on_stop=lambda: stops.append(1),
                on_refused_command=refused.append,
                refusal_window_s=0.1,
            ) as tm:
                await until(lambda: tm.connected)
                await until(lambda: len(refused) == 1, what="the refusal audit callback")
                await until(lambda: len(rec.on("alerts")) == 1, what="the refusal alert")
                assert tm.stats.commands_refused == 1
    finally:
        _send(mosquitto.port, f"{BASE}/cmd/arm", b"", retain=True)  # clear (empty retained)
    assert [(b.count, b.commands, b.retained) for b in refused] == [(1, ("arm",), 1)]
    assert stops == []
    alert = rec.on("alerts")[0].json()
    assert alert["code"] == "command_refused"
    assert "arm" in alert["message"] and "retained" in alert["message"]


async def test_tls_with_the_right_ca_connects(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with (
        Broker(tmp_path / "broker", tls=pki, require_client_cert=True) as broker,
        recorder(broker.port) as rec,
    ):
        tls_config = config(
            broker.tls_url,
            tmp_path / "data",
            ca_file=pki.ca,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
        )
        async with Telemetry(tls_config) as tm:
            await until(lambda: tm.connected, what="TLS connection")
            tm.publish_alert("info", "tls", "over TLS")
            await until(lambda: bool(rec.on("alerts")))
    assert rec.on("alerts")[0].json()["code"] == "tls"


async def test_tls_with_a_wrong_ca_is_refused_clearly(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", name="someone-else")
    with Broker(tmp_path / "broker", tls=pki) as broker:
        async with Telemetry(config(broker.tls_url, tmp_path / "data", ca_file=other.ca)) as tm:
            tm.publish_alert("info", "kept", "waits in the outbox")
            await until(lambda: tm.stats.connect_failures >= 1, what="a refused connection")
            assert not tm.connected
            assert "certificate verify failed" in (tm.stats.last_error or "")
            assert tm.stats.outbox_depth == 1


def test_unreadable_ca_is_a_config_error(tmp_path: Path) -> None:
    from devicectl.errors import ConfigError

    bad = config("mqtts://127.0.0.1:8883", tmp_path, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file"):
        Telemetry(bad)
    assert isinstance(ssl.create_default_context(), ssl.SSLContext)


@contextlib.asynccontextmanager
async def _amqtt(port: int) -> AsyncIterator[None]:
    """amqtt, a real 3.1.1-only broker (a dependency already), on ``port``. It never answers an
    MQTT 5 CONNECT that carries a Will (it misreads the v5 payload and waits for bytes that never
    come): the case of a broker that does not refuse MQTT 5 explicitly."""
    from amqtt.broker import Broker as AmqttBroker

    broker = AmqttBroker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield
    finally:
        await broker.shutdown()


async def test_protocol_3_1_1_connects_to_a_3_1_1_only_broker(tmp_path: Path) -> None:
    port = free_port()
    async with _amqtt(port):
        cfg = config(f"mqtt://127.0.0.1:{port}", tmp_path, protocol="3.1.1")
        async with Telemetry(cfg) as tm:
            await until(lambda: tm.connected, what="a 3.1.1 connection")
            assert tm.stats.protocol == "3.1.1"
            tm.publish_alert("info", "v311", "no properties under 3.1.1")
            await until(lambda: tm.stats.outbox_depth == 0 and tm.stats.published >= 1)


async def test_auto_does_not_guess_3_1_1_from_a_connack_timeout(tmp_path: Path) -> None:
    """No CONNACK is a connection failure, retried with backoff on MQTT 5; only an explicit
    refusal of the protocol version makes ``auto`` fall back."""
    port = free_port()
    async with _amqtt(port):
        cfg = config(f"mqtt://127.0.0.1:{port}", tmp_path, connect_timeout_s=0.3)
        async with Telemetry(cfg) as tm:
            await until(lambda: tm.stats.connect_failures >= 2, what="two timed-out attempts")
            assert not tm.connected
            assert tm.stats.protocol == "5"
            assert tm.stats.last_error == "Operation timed out"


async def test_a_connack_timeout_after_an_mqtt_5_session_keeps_mqtt_5(tmp_path: Path) -> None:
    """Connected with MQTT 5, the broker goes; whatever then listens on its port never answers
    (amqtt): the publisher keeps retrying MQTT 5, and when mosquitto is back the messages still
    carry their MQTT 5 properties."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        async with Telemetry(config(broker.url, tmp_path / "data", connect_timeout_s=0.3)) as tm:
            await until(lambda: tm.connected, what="the MQTT 5 connection")
            assert tm.stats.protocol == "5"
            broker.stop()
            await until(lambda: not tm.connected, what="the lost connection")
            failures = tm.stats.connect_failures
            async with _amqtt(broker.port):
                await until(
                    lambda: tm.stats.connect_failures >= failures + 2,
                    what="timed-out attempts on the silent broker",
                )
                assert not tm.connected
                assert tm.stats.protocol == "5"
            broker.start()
            with recorder(broker.port, topic=f"{BASE}/alerts") as rec:
                await until(lambda: tm.connected, what="reconnection to mosquitto")
                assert tm.stats.protocol == "5"
                tm.publish_alert("info", "back", "on MQTT 5 again")
                await until(lambda: bool(rec.on("alerts")), what="the alert")
        assert rec.on("alerts")[0].content_type == "application/json"
    finally:
        broker.stop()


def test_only_an_explicit_protocol_refusal_means_3_1_1(tmp_path: Path) -> None:
    """The decision itself, for the CONNACKs no broker at hand sends (mosquitto speaks MQTT 5;
    amqtt, refusing only a Will-less v5 CONNECT, never refuses ours)."""
    unsupported = ReasonCode(PacketTypes.CONNACK, identifier=0x84)
    not_authorized = ReasonCode(PacketTypes.CONNACK, identifier=0x87)
    auto = Telemetry(config("mqtt://127.0.0.1:1", tmp_path))
    assert auto._protocol_refused(MqttRefused(unsupported.value, str(unsupported)))
    assert auto._protocol_refused(MqttRefused(1, "unacceptable protocol version"))  # 3.1.1
    assert not auto._protocol_refused(MqttRefused(not_authorized.value, str(not_authorized)))
    assert not auto._protocol_refused(MqttRefused(5, "not authorised"))
    assert not auto._protocol_refused(MqttLinkError("Operation timed out"))
    assert not auto._protocol_refused(MqttLinkError("could not publish: out of memory"))
    forced = Telemetry(config("mqtt://127.0.0.1:1", tmp_path, protocol="5"))
    assert not forced._protocol_refused(MqttRefused(unsupported.value, str(unsupported)))


async def test_a_publish_denied_by_the_broker_acl_is_counted_not_retried(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(
        "topic readwrite lasers/+/+/availability\n"
        "topic readwrite lasers/+/+/cmd/#\n"
        "topic readwrite lasers/+/+/state\n"
    )
    with Broker(tmp_path / "broker", extra_config=(f"acl_file {acl}",)) as broker:
        async with Telemetry(config(broker.url, tmp_path / "data")) as tm:
            await until(lambda: tm.connected)
            tm.publish_alert("info", "denied", "alerts are not in the ACL")
            tm.publish_state(state="STANDBY")
            await until(lambda: tm.stats.outbox_depth == 0, what="both settled")
            assert tm.stats.rejected == 1
            assert tm.stats.published == 1
