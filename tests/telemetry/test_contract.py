"""The MQTT contract (docs/mqtt.md) against a real mosquitto: every topic, retain flag, QoS,
properties, schema, seq contiguous per topic; seen by a plain paho subscriber on ``lasers/#``."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from devicectl.sessionlog.checkpoint import Checkpoint, make_checkpoint
from devicectl.sessionlog.keys import DeviceKey
from devicectl.telemetry import Telemetry
from protocols.messages import DeviceState, FaultCode, Interlock
from protocols.mqtt import Stream, json_schemas, schema_id
from tests.brokers import Broker
from tests.telemetry.helpers import Received, config, recorder, until

pytestmark = pytest.mark.system

BASE = "lasers/clinic1/SN42"
SUMMARY = {
    "session": "S-001",
    "operator": "op-7",
    "patient": "P-19",
    "skin_type": "III",
    "zone": "cheeks",
    "pulses": 3,
    "energy_uj": 3000,
    "energy_uj_by_zone": {"cheeks": 3000},
}


KEY = DeviceKey.generate()
CHECKPOINT = make_checkpoint(KEY, "SN42", 41, bytes(range(32)), 1_796_000_000_123_456_789, "x")


def _stream_of(topic: str) -> str:
    rest = topic.removeprefix(BASE + "/")
    if rest == "log/checkpoint":
        return "log-checkpoint"
    return "session-events" if rest.startswith("sessions/") else rest


def _validate(message: Received, schemas: dict[str, dict[str, object]]) -> None:
    stream = _stream_of(message.topic)
    if stream == "availability":
        jsonschema.validate(message.payload.decode(), schemas[stream])
        return
    if stream == "session" and message.payload == b"":
        return  # the documented empty retained message: no session
    jsonschema.validate(json.loads(message.payload), schemas[stream])


async def test_every_topic_matches_the_contract(mosquitto: Broker, tmp_path: Path) -> None:
    schemas = json_schemas()
    stops: list[int] = []
    with recorder(mosquitto.port) as rec:
        async with Telemetry(
            config(mosquitto.url, tmp_path), on_stop=lambda: stops.append(1)
        ) as tm:
            await until(lambda: tm.connected, what="connection")
            tm.publish_state(
                state=DeviceState.READY,
                interlocks=int(Interlock.CONTACT),
                faults=FaultCode.LEASE_EXPIRED.bit,
                params={"energy_uj": 1000, "width_us": 500, "rate_mhz": 20000, "spot_um": 300},
                armed=True,
                session="S-001",
            )
            tm.publish_session(SUMMARY)
            tm.publish_session_event("S-001", "started", operator="op-7", skin_type="III")
            tm.publish_session_event("S-001", "zone", zone="cheeks")
            for n in range(1, 4):
                tm.offer_pulse(n, n * 50_000, 1000, "cheeks", "S-001")
            tm.publish_metrics(rate_hz=20.0, avg_power_w=0.02, skin_temp_c=33.1, head_temp_c=30.0)
            tm.publish_alert(
                "critical", "energy_out_of_band", "pulse 3 energy +25 %", 1250, 1200, "S-001"
            )
            tm.publish_checkpoint(CHECKPOINT.wire())
            tm.publish_session_event(
                "S-001", "ended", summary={**SUMMARY, "pulses": 3}, checkpoint=CHECKPOINT.wire()
            )
            tm.publish_session(None)
            await until(lambda: len(rec.on("session")) >= 2 and rec.on("pulses"), what="messages")
        await until(
            lambda: rec.on("availability")[-1:] and rec.on("availability")[-1].payload == b"offline"
        )
        messages = rec.snapshot()

    streams = {_stream_of(m.topic) for m in messages}
    assert streams == {
        "availability", "state", "session", "session-events", "pulses", "metrics", "alerts",
        "log-checkpoint",
    }  # fmt: skip
    expected_flags = {
        "availability": (1, True), "state": (1, True), "session": (1, True),
        "session-events": (1, False), "pulses": (1, False), "metrics": (0, False),
        "alerts": (1, False), "log-checkpoint": (1, True),
    }  # fmt: skip
    seqs: dict[str, list[int]] = {}
    for message in messages:
        stream = _stream_of(message.topic)
        assert (message.qos, message.retain) == expected_flags[stream], message
        _validate(message, schemas)
        if stream == "availability":
            # plain text payload; the run it belongs to rides in MQTT 5 user properties
            assert message.content_type == "text/plain"
            assert message.user_properties == {
                "schema": schema_id(Stream.AVAILABILITY), "boot": "1"
            }  # fmt: skip
            continue
        if not message.payload:
            continue
        assert message.content_type == "application/json"
        assert message.user_properties == {"schema": schema_id(Stream(stream))}
        body = message.json()
        assert body["v"] == 1
        assert body["device"] == "SN42"
        assert body["boot"] == 1
        assert body["ts"].endswith("Z")
        assert "historical" not in body
        seqs.setdefault(message.topic, []).append(body["seq"])
    for topic, values in seqs.items():
        assert values == list(range(1, len(values) + 1)), topic
    assert rec.on("metrics")[0].expiry == 10

    state = rec.on("state")[0].json()
    assert state["state"] == "READY"
    assert state["armed"] is True
    assert state["interlocks"] == ["contact"]
    assert state["faults"] == ["LEASE_EXPIRED"]
    assert state["params"]["rate_mhz"] == 20000
    assert state["session"] == "S-001"
    batch = rec.on("pulses")[0].json()
    assert (batch["first_pulse_no"], batch["last_pulse_no"], batch["count"]) == (1, 3, 3)
    assert batch["pulses"] == [[1, 50_000, 1000], [2, 100_000, 1000], [3, 150_000, 1000]]
    assert batch["energy_uj_sum"] == 3000
    assert batch["zone"] == "cheeks"
    events = [m.json()["event"] for m in rec.on("events")]
    assert events == ["started", "zone", "ended"]
    assert rec.on("events")[-1].json()["summary"]["pulses"] == 3
    # the checkpoint as the agreed flat fields, in log/checkpoint and in the ended event; the
    # signature verifies over the published fields with the envelope's device
    published = rec.on("log/checkpoint")[0].json()
    assert set(published) == {
        "v", "ts", "device", "seq", "boot",
        "log_seq", "hash", "time", "key_id", "public_key", "signature",
    }  # fmt: skip
    assert {k: published[k] for k in CHECKPOINT.wire()} == CHECKPOINT.wire()
    assert Checkpoint.from_mapping(published).signature_valid_with(KEY.public_raw)
    assert rec.on("events")[-1].json()["checkpoint"] == CHECKPOINT.wire()
    assert rec.on("session")[-1].payload == b""
    assert [m.payload for m in rec.on("availability")] == [b"online", b"offline"]
    assert stops == []


async def test_under_3_1_1_availability_is_bare_and_boot_is_in_state(
    mosquitto: Broker, tmp_path: Path
) -> None:
    with recorder(mosquitto.port) as rec:
        async with Telemetry(config(mosquitto.url, tmp_path, protocol="3.1.1")) as tm:
            await until(lambda: tm.connected)
            assert tm.stats.protocol == "3.1.1"
            tm.publish_state(state="STANDBY")
            await until(lambda: bool(rec.on("state")), what="state")
        await until(lambda: len(rec.on("availability")) >= 2, what="online and offline")
    assert [m.payload for m in rec.on("availability")] == [b"online", b"offline"]
    for message in (*rec.on("availability"), *rec.on("state")):
        assert (message.content_type, message.user_properties) == (None, {})
    assert rec.on("state")[0].json()["boot"] == 1


async def test_retained_topics_greet_a_late_subscriber(mosquitto: Broker, tmp_path: Path) -> None:
    async with Telemetry(config(mosquitto.url, tmp_path)) as tm:
        await until(lambda: tm.connected)
        tm.publish_state(state="STANDBY")
        tm.publish_session(SUMMARY)
        tm.publish_alert("info", "note", "not retained")
        await until(lambda: tm.stats.outbox_depth == 0 and tm.stats.published >= 3)
        with recorder(mosquitto.port, retain_as_published=False) as late:
            await until(lambda: len(late.snapshot()) >= 3, what="retained messages")
            retained = {_stream_of(m.topic): m for m in late.snapshot()}
    assert set(retained) == {"availability", "state", "session"}
    assert all(m.retain for m in retained.values())
    assert retained["availability"].payload == b"online"
    assert retained["session"].json()["summary"]["session"] == "S-001"


async def test_session_summary_repeats_every_second(mosquitto: Broker, tmp_path: Path) -> None:
    with recorder(mosquitto.port) as rec:
        async with Telemetry(config(mosquitto.url, tmp_path)) as tm:
            await until(lambda: tm.connected)
            tm.publish_session(SUMMARY)
            await until(lambda: len(rec.on("session")) >= 3, what="repeated summaries")
            tm.publish_session(None)
            count = len(rec.on("session"))
            await until(lambda: rec.on("session")[-1].payload == b"")
    bodies = [m.json() for m in rec.on("session")[: count - 1] if m.payload]
    assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))
    assert all(b["summary"] == {**bodies[0]["summary"]} for b in bodies)


def test_schema_cli_writes_one_schema_per_topic(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devicectl.cli import app

    result = CliRunner().invoke(app, ["schema", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == sorted(f"{name}.schema.json" for name in json_schemas())
    state = json.loads((tmp_path / "s" / "state.schema.json").read_text())
    assert state["$id"] == schema_id(Stream.STATE)
    assert {"v", "ts", "device", "seq", "boot"} <= set(state["required"])
    jsonschema.Draft202012Validator.check_schema(state)
