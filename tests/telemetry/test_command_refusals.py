"""Refused MQTT commands cost a bounded amount whatever arrives: names capped, one report per
burst (plain synchronous tests of the aggregation; the flood over a real broker below)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicectl.telemetry import CommandRefusals, RefusedBurst, Telemetry
from devicectl.telemetry.commands import MAX_NAME_CHARS, cap_name
from devicectl.telemetry.connection import INBOUND_MAX, INBOUND_MAX_BYTES, MqttConnection
from tests.brokers import Broker
from tests.telemetry.helpers import config, flood_commands, recorder, until

BASE = "lasers/clinic1/SN42"


def test_a_short_name_is_kept_a_long_one_capped_with_a_marker() -> None:
    assert cap_name("arm") == "arm"
    assert cap_name("x" * MAX_NAME_CHARS) == "x" * MAX_NAME_CHARS
    capped = cap_name("y" * 60_000)
    assert capped.startswith("y" * MAX_NAME_CHARS)
    assert "59936 more chars" in capped
    assert len(capped) < MAX_NAME_CHARS + 30


def test_refusals_join_the_open_burst_until_it_is_taken() -> None:
    refusals = CommandRefusals(window_s=1.0)
    assert refusals.take() is None
    assert refusals.add("arm", 10, retained=False, now=5.0)  # opens a burst
    assert not refusals.add("arm", 20, retained=True, now=5.4)
    assert not refusals.add("set/params", 0, retained=False, now=5.9)
    assert refusals.pending == 3
    burst = refusals.take()
    assert burst == RefusedBurst(
        count=3,
        commands=("arm", "set/params"),
        unlisted=0,
        retained=1,
        payload_bytes=30,
        first_at=5.0,
        last_at=5.9,
    )
    assert refusals.pending == 0 and refusals.take() is None
    assert refusals.add("arm", 0, retained=False, now=6.0)  # the next one opens a new burst


def test_a_burst_lists_eight_names_and_counts_the_rest() -> None:
    refusals = CommandRefusals()
    for i in range(20):
        refusals.add(f"c{i}", 1, retained=False, now=float(i))
    refusals.add("c0", 1, retained=False, now=21.0)  # listed already
    burst = refusals.take()
    assert burst is not None
    assert burst.commands == tuple(f"c{i}" for i in range(8))
    assert (burst.count, burst.unlisted) == (21, 12)
    assert "21 MQTT commands refused" in burst.message()
    assert "and 12 more" in burst.message()


def test_a_lone_refusal_reads_like_one() -> None:
    refusals = CommandRefusals()
    refusals.add("arm", 2, retained=True, now=0.0)
    burst = refusals.take()
    assert burst is not None
    assert burst.message() == (
        "MQTT command 'arm' refused: only cmd/stop is accepted "
        "(retained messages on the broker: clear them)"
    )
    assert burst.audit_detail()["command"] == "arm"
    assert burst.audit_detail()["count"] == 1


@given(st.lists(st.tuples(st.text(max_size=3000), st.integers(0, 70_000)), min_size=1))
def test_a_report_is_bounded_whatever_the_names(refused: list[tuple[str, int]]) -> None:
    refusals = CommandRefusals()
    for name, size in refused:
        refusals.add(name, size, retained=False, now=0.0)
    burst = refusals.take()
    assert burst is not None
    assert burst.count == len(refused)
    assert len(burst.commands) <= 8
    listed = sum(1 for name, _ in refused if cap_name(name) in burst.commands)
    assert burst.unlisted == len(refused) - listed
    assert burst.payload_bytes == sum(size for _, size in refused)
    assert len(json.dumps(burst.audit_detail())) < 2_000
    assert len(burst.message()) < 2_000


class _Log:
    """A logger keeping every event it is given (structlog's call shape)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _keep(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    debug = info = warning = error = critical = exception = _keep


@pytest.mark.system
async def test_a_flood_of_long_named_commands_is_one_report(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """300 ``cmd/<60,000 characters>`` (18 MB of names) in one burst: one audit callback, one
    alert and one log line, with the count, each a few hundred bytes."""
    refused: list[RefusedBurst] = []
    log = _Log()
    with recorder(mosquitto.port, topic=f"{BASE}/alerts") as rec:
        async with Telemetry(
            config(mosquitto.url, tmp_path),
            on_refused_command=refused.append,
            refusal_window_s=3600.0,  # the whole flood is one burst, reported on closing
            log=log,
        ) as tm:
            await until(lambda: tm.connected)
            await asyncio.to_thread(flood_commands, "127.0.0.1", mosquitto.port, BASE, 300, 60_000)
            await until(lambda: tm.stats.commands_refused == 300, what="the flood received")
            assert refused == []  # still one open burst
        await until(lambda: len(rec.on("alerts")) == 1, what="the burst's alert")
    assert [b.count for b in refused] == [300]
    burst = refused[0]
    assert len(burst.commands) == 8 and burst.unlisted == 292
    assert all(len(name) < MAX_NAME_CHARS + 30 for name in burst.commands)
    assert len(json.dumps(burst.audit_detail())) < 2_000
    alert = rec.on("alerts")[0].json()
    assert alert["code"] == "command_refused" and "300 MQTT commands refused" in alert["message"]
    assert len(rec.on("alerts")[0].payload) < 2_000
    refusal_lines = [e for e, _ in log.events if e.startswith("mqtt_command")]
    assert refusal_lines == ["mqtt_commands_refused"]
    assert len(repr(log.events)) < 10_000


def test_commands_dropped_unread_join_the_burst_unnamed() -> None:
    refusals = CommandRefusals(window_s=1.0)
    assert refusals.add_unread(500, 9_000, now=2.0)  # opens a burst
    assert not refusals.add("arm", 18, retained=False, now=2.5)
    burst = refusals.take()
    assert burst is not None
    assert (burst.count, burst.commands, burst.unlisted, burst.payload_bytes) == (
        501,
        ("arm",),
        500,
        9_018,
    )


def _deliver(connection: MqttConnection, topic: str, payload: bytes = b"{}") -> None:
    """What paho does with each PUBLISH it reads: hand it to the client's on_message."""
    message = paho.MQTTMessage(topic=topic.encode())
    message.payload = payload
    assert connection.client.on_message is not None
    connection.client.on_message(connection.client, None, message)


def _stops_taken(connection: MqttConnection) -> list[str]:
    """Offer ``connection`` the publisher's way of taking a stop at once; what it took."""
    taken: list[str] = []

    def take_now(message: paho.MQTTMessage) -> bool:
        if not message.topic.endswith("/cmd/stop"):
            return False
        taken.append(message.topic)
        return True

    connection.take_now = take_now
    return taken


def test_a_flood_beyond_the_inbound_bound_is_dropped_unread_but_every_stop_is_taken() -> None:
    """paho reads a flood faster than the commands are handled: what waits is bounded
    (15,000 messages/s grew the worker by ~700 MB); a stop beyond the bound is handled there and
    then, never dropped, however many come (3,000 stops in a flood: every one obeyed and
    audited, none counted as a refused command)."""
    connection = MqttConnection("127.0.0.1", 1883, client_id="flood-test", v5=True)
    taken = _stops_taken(connection)
    for _ in range(INBOUND_MAX + 500):
        _deliver(connection, f"{BASE}/cmd/arm", b'{"lease_ms": 5000}')
    assert connection.take_dropped() == (500, 500 * 18)
    for _ in range(3 * INBOUND_MAX):
        _deliver(connection, f"{BASE}/cmd/stop")
    assert connection.take_dropped() == (0, 0), "a stop is never dropped for want of room"
    assert len(taken) == 3 * INBOUND_MAX


def test_what_waits_inbound_is_bounded_in_bytes_too() -> None:
    """A thousand messages is no bound on memory when each may be as large as the broker allows
    (256 MB by default): a flood of large commands is dropped unread well before that, and a
    stop still gets in."""
    connection = MqttConnection("127.0.0.1", 1883, client_id="flood-test", v5=True)
    taken = _stops_taken(connection)
    large = b"x" * (256 * 1024)
    for _ in range(100):  # 25 MiB of commands, a tenth of the count bound
        _deliver(connection, f"{BASE}/cmd/arm", large)
    dropped, dropped_bytes = connection.take_dropped()
    assert dropped > 0 and dropped_bytes == dropped * len(large)
    assert (100 - dropped) * len(large) <= INBOUND_MAX_BYTES + len(large)
    _deliver(connection, f"{BASE}/cmd/stop", large)
    assert connection.take_dropped() == (0, 0), "a stop is never dropped for want of room"
    assert len(taken) == 1
