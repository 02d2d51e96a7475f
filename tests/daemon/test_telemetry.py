"""The MQTT contract as a dashboard sees it: the daemon runs a scripted session with a breach while
a plain paho client subscribed to ``lasers/#`` records everything (a real mosquitto, never mocked).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicectl.sessionlog import verify_against
from devicectl.sessionlog.keys import DeviceKey
from devicectl.simlink import compose
from protocols.mqtt import STREAMS, Stream, json_schemas, parse_topic
from tests.brokers import Broker
from tests.daemon.conftest import ACK, END, Driver, _settings
from tests.telemetry.helpers import Recorder, recorder, until

SCHEMA_BY_STREAM = {
    Stream.STATE: "state",
    Stream.SESSION: "session",
    Stream.SESSION_EVENTS: "session-events",
    Stream.PULSES: "pulses",
    Stream.METRICS: "metrics",
    Stream.ALERTS: "alerts",
    Stream.LOG_CHECKPOINT: "log-checkpoint",
}


@pytest.fixture
async def mqtt_driver(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> AsyncIterator[Driver]:
    settings = _settings(
        tmp_path, policy_file, "sim", mqtt__url=mosquitto.url, mqtt__site="clinic1"
    )
    async with compose(settings) as daemon:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.telemetry is not None and daemon.telemetry.connected)
        yield drv


def _publish(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="operator-console")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()


def _check_contract(messages: list, schemas: dict) -> set[Stream]:  # type: ignore[type-arg]
    seen: set[Stream] = set()
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        parsed = parse_topic(m.topic)
        assert parsed is not None, m.topic
        prefix, site, device, stream, _extra = parsed
        assert (prefix, site) == ("lasers", "clinic1")
        if stream is Stream.CMD:
            continue
        seen.add(stream)
        spec = STREAMS[stream]
        assert m.qos == spec.qos, (m.topic, m.qos)
        assert m.retain == spec.retain, (m.topic, m.retain)  # the subscriber keeps the flag
        if stream is Stream.AVAILABILITY:
            assert m.payload in (b"online", b"offline")
            assert m.retain
            continue
        if stream is Stream.SESSION and m.payload == b"":
            assert m.retain  # "no session": an empty retained message
            continue
        assert m.content_type == "application/json", m.topic
        assert "schema" in m.user_properties, m.topic
        body = m.json()
        jsonschema.validate(body, schemas[SCHEMA_BY_STREAM[stream]])
        assert body["v"] == 1
        assert body["boot"] >= 1
        assert body["ts"].endswith("Z"), body["ts"]  # RFC 3339, UTC
        assert datetime.fromisoformat(body["ts"]).utcoffset() == timedelta(0)
        assert body["device"] == device, body
        if stream is Stream.METRICS:
            assert m.expiry == 10, m  # MQTT 5 message expiry: live only
        seqs[m.topic].append(body["seq"])
    for topic, values in seqs.items():
        assert values == list(range(values[0], values[0] + len(values))), (topic, values)
    return seen


async def test_a_session_with_a_breach_unfolds_on_mqtt(
    mqtt_driver: Driver, mosquitto: Broker
) -> None:
    schemas = json_schemas()
    with recorder(mosquitto.port, client_id="dashboard") as rec:
        await mqtt_driver.emitting_session()
        mqtt_driver.sim("fault energy-drift 1.3")
        await mqtt_driver.until(lambda: mqtt_driver.daemon.supervisor.latched is not None)
        mqtt_driver.sim("clear-faults")
        await mqtt_driver.ok("fault_ack", **ACK)
        await until(lambda: rec.on("metrics"), what="a metrics message")
        await mqtt_driver.ok("session_end", **END)
        await until(lambda: rec.on("alerts") and _ended(rec), what="alert and ended event")
        await until(lambda: any(m.payload == b"" for m in rec.on("session")), what="empty session")
        messages = rec.snapshot()

    seen = _check_contract(messages, schemas)
    expected = {Stream.AVAILABILITY, Stream.STATE, Stream.SESSION, Stream.SESSION_EVENTS}
    assert expected | {Stream.PULSES, Stream.ALERTS, Stream.METRICS} <= seen
    alert = next(m.json() for m in messages if m.topic.endswith("/alerts"))
    assert alert["code"] == "energy_out_of_tolerance"
    assert alert["severity"] == "critical"
    assert alert["value"] > alert["limit"]
    kinds = [m.json()["event"] for m in messages if m.topic.endswith("/events")]
    for kind in ("started", "zone", "params", "armed", "fault", "ack", "ended"):
        assert kind in kinds, kinds
    logged = mqtt_driver.daemon.sessionlog.committed_pulse_no  # type: ignore[union-attr]
    published = max(m.json()["last_pulse_no"] for m in messages if m.topic.endswith("/pulses"))
    assert published <= (logged or 0)


def _ended(rec: Recorder) -> bool:
    return any(json.loads(m.payload).get("event") == "ended" for m in rec.on("events"))


async def test_cmd_stop_stops_and_other_commands_are_refused(
    mqtt_driver: Driver, mosquitto: Broker
) -> None:
    base = f"lasers/clinic1/{mqtt_driver.daemon.ident.serial:08X}"  # type: ignore[union-attr]
    with recorder(mosquitto.port, client_id="dashboard") as rec:
        await mqtt_driver.emitting_session()
        _publish(mosquitto.port, f"{base}/cmd/arm", b"{}")
        await until(lambda: rec.on("alerts"), what="refusal alert")
        assert mqtt_driver.daemon.armed  # a refused command changes nothing
        _publish(mosquitto.port, f"{base}/cmd/stop", b"")
        await mqtt_driver.until(lambda: not mqtt_driver.daemon.armed)
        status = await mqtt_driver.ok("status")
        assert status["state"] == "standby"
    refusal = rec.on("alerts")[0].json()
    assert "arm" in refusal["message"]
    # ... and audited in the session log, the stop too
    log = mqtt_driver.daemon.sessionlog
    assert log is not None
    await log.flush_async()
    db = sqlite3.connect(f"{log.path.as_uri()}?mode=ro", uri=True)
    try:
        events = [
            json.loads(body)
            for (body,) in db.execute("SELECT body FROM records WHERE kind = 'event'")
        ]
    finally:
        db.close()
    refused = [e for e in events if e["event"] == "remote_command_refused"]
    assert refused and refused[0]["detail"]["command"] == "arm", refused
    assert any(e["event"] == "stop" and e["actor"] == "mqtt" for e in events), events


async def test_availability_goes_offline_on_a_clean_stop(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> None:
    settings = _settings(tmp_path, policy_file, "sim", mqtt__url=mosquitto.url)
    with recorder(mosquitto.port, client_id="dashboard") as rec:
        async with compose(settings) as daemon:
            await Driver(daemon).until(lambda: daemon.telemetry and daemon.telemetry.connected)
            await until(lambda: rec.on("availability"), what="online")
        await until(lambda: rec.on("availability")[-1].payload == b"offline", what="offline")
    assert [m.payload for m in rec.on("availability")] == [b"online", b"offline"]


async def test_the_session_summary_is_refreshed_once_a_second(
    mqtt_driver: Driver, mosquitto: Broker
) -> None:
    """Section 6: ``session`` is updated on change and every second — one message a second
    with the running totals, not a second stale copy beside it."""
    await mqtt_driver.emitting_session()
    with recorder(mosquitto.port, client_id="dashboard", retain_as_published=True) as rec:
        await until(lambda: rec.on("session"), what="the retained summary")
        start = len(rec.on("session"))
        await asyncio.sleep(4.0)
        window = rec.on("session")[start:]
    assert 3 <= len(window) <= 5, [m.json()["summary"]["pulses"] for m in window]
    pulses = [m.json()["summary"]["pulses"] for m in window]
    assert pulses == sorted(pulses) and pulses[-1] > pulses[0], pulses


async def test_signed_checkpoints_leave_the_device_and_prove_its_log(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> None:
    """A session's checkpoints go out on log/checkpoint (retained) and in its ended event; one
    more at shutdown, before offline. With them, and the key from the data dir, log verify
    proves the whole log; after a truncation behind them it names the checkpoint that shows it."""
    settings = _settings(
        tmp_path, policy_file, "sim", mqtt__url=mosquitto.url, mqtt__site="clinic1",
        checkpoints={"interval_s": 0.2},
    )  # fmt: skip
    schemas = json_schemas()
    with recorder(mosquitto.port, client_id="witness") as rec:
        async with compose(settings) as daemon:
            drv = Driver(daemon)
            await drv.until(lambda: daemon.telemetry is not None and daemon.telemetry.connected)
            await drv.emitting_session(rate_hz=50.0)
            await until(lambda: rec.on("log/checkpoint"), what="a checkpoint during the session")
            await drv.ok("session_end", post_care=["sunscreen"])
            await until(lambda: _ended(rec), what="the ended event")
        await until(lambda: rec.on("availability")[-1].payload == b"offline", what="offline")
        messages = rec.snapshot()
    assert Stream.LOG_CHECKPOINT in _check_contract(messages, schemas)
    checkpoints = [m.json() for m in rec.on("log/checkpoint")]
    assert all(m.retain and m.qos == 1 for m in rec.on("log/checkpoint"))
    ended = next(m.json() for m in rec.on("events") if m.json()["event"] == "ended")
    assert ended["checkpoint"] in [{k: c[k] for k in ended["checkpoint"]} for c in checkpoints]
    key_file = settings.data_dir / "log-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    log_path = settings.session_log_path
    conn = sqlite3.connect(log_path)
    last_record = conn.execute("SELECT seq FROM chain_head").fetchone()[0]
    conn.close()
    assert checkpoints[-1]["log_seq"] == last_record - 1  # the shutdown one covers everything
    public = DeviceKey.from_pem(key_file.read_bytes()).public_raw
    proved = verify_against(log_path, checkpoints, public)
    assert proved.ok, proved.findings
    assert proved.proven_seq == last_record - 1  # the checkpoint's own record is not signed
    keep = checkpoints[0]["log_seq"] - 1
    conn = sqlite3.connect(log_path)
    conn.execute("DELETE FROM pulses WHERE seq > ?", (keep,))
    conn.execute("DELETE FROM records WHERE seq > ?", (keep,))
    conn.execute(
        "UPDATE chain_head SET seq = ?, hash = (SELECT hash FROM pulses WHERE seq = ? UNION ALL "
        "SELECT hash FROM records WHERE seq = ?)",
        (keep, keep, keep),
    )
    conn.commit()
    conn.close()
    caught = verify_against(log_path, checkpoints, public)
    assert not caught.ok
    assert {f.problem for f in caught.findings} == {"truncated"}
