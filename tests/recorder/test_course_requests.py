"""Courses across devices: two daemons on the simulator, one broker, one recorder.

A patient treated on device A and, the same day, on device B: B's `session start` asks the
recorder (MQTT 5 request/response) and warns that the interval is under 7 days, which B's own log
could not know. Without a recorder the session still opens at once, from the local log, and the
session record says which source was used.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devicectl.privacy import published_patient
from devicectl.recorder import Recorder, RecorderConfig, queries
from devicectl.recorder.store import open_store
from devicectl.simlink import compose
from devicectl.telemetry.process import WORKER_EXITED, TelemetryProcess
from tests.brokers import Broker
from tests.daemon.conftest import SESSION, TEST_POLICY, Driver, _settings
from tests.recorder.helpers import FakeDevice, StandInRecorder, course, publisher

pytestmark = pytest.mark.system

_SITE_SECRET = "site-secret-for-tests"  # courses key on the pseudonym


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(TEST_POLICY)
    return path


@asynccontextmanager
async def _daemon(
    tmp_path: Path, policy_file: Path, broker: Broker, name: str
) -> AsyncIterator[Driver]:
    settings = _settings(
        tmp_path / name,
        policy_file,
        "sim",
        mqtt__url=broker.url,
        mqtt__site="clinic1",
        mqtt__device=name,
        mqtt__course_from_recorder=True,
        privacy__patient_key_secret=_SITE_SECRET,
    )
    async with compose(settings) as daemon:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.telemetry is not None and daemon.telemetry.connected)
        await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        yield drv


async def _treat(drv: Driver, pulses: int = 5) -> dict[str, object]:
    started = await drv.ok(**SESSION)
    await drv.ok("session_zone", zone="forehead")
    await drv.ok("params_set", energy_uj=2000, width_us=500, rate_hz=50.0, spot_um=300)
    await drv.ok("arm")
    drv.sim("footswitch down")
    await drv.until(lambda: drv.daemon.treatment and drv.daemon.treatment.pulses >= pulses)
    drv.sim("footswitch up")
    await drv.ok("disarm")
    await drv.ok("session_end", post_care=["sunscreen"])
    return started


def _course_sources(data_dir: Path) -> list[dict[str, object]]:
    import json

    with sqlite3.connect(data_dir / "sessions.db") as conn:
        rows = conn.execute("SELECT body FROM records WHERE kind = 'event'").fetchall()
    bodies = [json.loads(body) for (body,) in rows]
    return [b["detail"] for b in bodies if b["event"] == "course_source"]


async def test_a_course_over_two_devices_warns_on_the_second(
    tmp_path: Path, policy_file: Path, mosquitto: Broker, db_url: str
) -> None:
    config = RecorderConfig(mqtt_url=mosquitto.url, db_url=db_url, client_id="rec", group="g")
    async with Recorder(config) as recorder:
        await asyncio.wait_for(recorder.wait_subscribed(), 10)
        async with _daemon(tmp_path, policy_file, mosquitto, "laser-a") as a:
            first = await _treat(a)
        assert first["course_source"] == "recorder"  # asked; nothing recorded yet: no warning
        assert not any("days since" in w for w in first["warnings"])  # type: ignore[attr-defined]

        async def recorded() -> bool:
            async with await open_store(db_url, migrate=False) as store:
                rows = await queries.list_sessions(store, device="laser-a")
            return bool(rows) and rows[0].ended is not None and rows[0].pulses >= 5

        deadline = asyncio.get_running_loop().time() + 20
        while not await recorded():
            assert asyncio.get_running_loop().time() < deadline, "session A never recorded"
            await asyncio.sleep(0.1)

        async with _daemon(tmp_path, policy_file, mosquitto, "laser-b") as b:
            second = await b.ok(**SESSION)
        assert second["course_source"] == "recorder"
        warnings = second["warnings"]
        assert any("days since session 1 of the course" in w for w in warnings), warnings
        assert recorder.stats.course_requests == 2
    sources = _course_sources(tmp_path / "laser-b" / "data")
    assert sources[0]["source"] == "recorder"
    assert sources[0]["devices"] == ["laser-a"]
    assert sources[0]["warnings"] == ["interval_short"]


async def test_without_a_recorder_the_session_opens_from_the_local_log(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> None:
    async with _daemon(tmp_path, policy_file, mosquitto, "laser-c") as c:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        started = await c.ok(**SESSION)
        waited = loop.time() - begun
    assert started["course_source"] == "local"
    assert waited < 5  # bounded by the 1 s request timeout, not by the recorder's absence
    sources = _course_sources(tmp_path / "laser-c" / "data")
    assert sources[0]["source"] == "local"
    assert "within 1 s" in str(sources[0]["reason"])


async def test_daemons_on_the_simulator_are_recorded_exactly_once_by_two_recorders(
    tmp_path: Path, policy_file: Path, mosquitto: Broker, db_url: str
) -> None:
    """Three daemons treat at once; a plain subscriber witnesses what they published; two
    recorders on one shared subscription store each QoS 1 message exactly once."""
    import json

    from tests.telemetry.helpers import recorder as witness_of

    configs = [
        RecorderConfig(mqtt_url=mosquitto.url, db_url=db_url, client_id=f"rec-{n}", group="g")
        for n in range(2)
    ]
    with witness_of(mosquitto.port, client_id="witness") as witness:
        async with Recorder(configs[0]) as first, Recorder(configs[1]) as second:
            await asyncio.wait_for(first.wait_subscribed(), 10)
            await asyncio.wait_for(second.wait_subscribed(), 10)
            async with (
                _daemon(tmp_path, policy_file, mosquitto, "laser-1") as one,
                _daemon(tmp_path, policy_file, mosquitto, "laser-2") as two,
                _daemon(tmp_path, policy_file, mosquitto, "laser-3") as three,
            ):
                await asyncio.gather(_treat(one, 20), _treat(two, 20), _treat(three, 20))
            # The daemons have stopped: everything they published is at the broker.
            keys = set()
            for message in witness.snapshot():
                if message.qos != 1 or not message.payload or "/course/" in message.topic:
                    continue  # metrics, availability, empty sessions, course requests/answers
                if message.topic.endswith("/availability"):
                    continue
                body = json.loads(message.payload)
                keys.add((body["device"], message.topic, body["boot"], body["seq"]))

            async def stored() -> set[tuple[str, str, int, int]]:
                async with await open_store(db_url, migrate=False) as store:
                    rows = await store.fetch(
                        "SELECT device, topic, boot, seq FROM messages WHERE stream <> 'metrics'"
                    )
                return {(d, t, int(b), int(s)) for d, t, b, s in rows}

            deadline = asyncio.get_running_loop().time() + 20
            while not keys <= (found := await stored()):
                assert asyncio.get_running_loop().time() < deadline, keys - found
                await asyncio.sleep(0.1)
            shares = (first.stats.stored, second.stats.stored)
    assert found == keys  # every QoS 1 message, nothing else
    assert {k[0] for k in keys} == {"laser-1", "laser-2", "laser-3"}
    async with await open_store(db_url, migrate=False) as store:
        sessions = await queries.list_sessions(store)
        rows = await store.fetch("SELECT COUNT(*) FROM messages WHERE stream <> 'metrics'")
    assert int(rows[0][0]) == len(keys)  # stored once each
    assert sorted(s.device for s in sessions) == ["laser-1", "laser-2", "laser-3"]
    assert all(s.ended is not None and s.pulses == s.recorded_pulses >= 20 for s in sessions)
    assert all(share > 0 for share in shares), shares


async def test_the_daemons_own_process_runs_no_mqtt_client_for_the_course(
    tmp_path: Path, policy_file: Path, mosquitto: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A course recorded on laser-a (published as a device would), asked for by a daemon on
    laser-b: the recorder's answer reaches the session, through the telemetry worker. The daemon
    runs in this process; an aiomqtt client built here would be one on its safety loop."""
    built: list[object] = []

    class Recorded(aiomqtt.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(kwargs.get("identifier"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(aiomqtt, "Client", Recorded)
    key = published_patient(SESSION["patient_ref"], secret=_SITE_SECRET, publish_ref=False)
    assert key is not None
    db_url = f"sqlite:///{tmp_path / 'recorder.sqlite'}"
    config = RecorderConfig(mqtt_url=mosquitto.url, db_url=db_url, client_id="rec", group="g")
    async with Recorder(config) as recorder:
        await asyncio.wait_for(recorder.wait_subscribed(), 10)
        laser_a = FakeDevice("laser-a")
        with publisher(mosquitto.port) as pub:
            earlier = datetime.now(UTC) - timedelta(days=2)
            await asyncio.to_thread(pub.publish_all, laser_a.treatment("1", key, earlier))

        async def recorded() -> bool:
            async with await open_store(db_url, migrate=False) as store:
                rows = await queries.list_sessions(store, device="laser-a")
            return bool(rows) and rows[0].ended is not None

        deadline = asyncio.get_running_loop().time() + 20
        while not await recorded():
            assert asyncio.get_running_loop().time() < deadline, "laser-a's session not recorded"
            await asyncio.sleep(0.1)
        async with _daemon(tmp_path, policy_file, mosquitto, "laser-b") as b:
            started = await b.ok(**SESSION)
    assert built == []
    assert started["course_source"] == "recorder"
    assert any("days since session 1 of the course" in w for w in started["warnings"])
    (source,) = _course_sources(tmp_path / "laser-b" / "data")
    assert source == {
        "source": "recorder",
        "given": 1,
        "planned": 4,
        "devices": ["laser-a"],
        "warnings": ["interval_short"],
    }


async def test_a_telemetry_worker_killed_during_the_request_does_not_hold_the_session(
    tmp_path: Path, policy_file: Path, mosquitto: Broker
) -> None:
    """The request reaches the broker, and the worker that sent it dies: the session opens from
    the local log, saying why, and the next worker answers the next session's request."""
    workers: list[TelemetryProcess] = []
    killed: list[int] = []

    def answer(request: dict[str, Any]) -> dict[str, Any] | None:
        if not killed:
            pid = workers[0].pid
            assert pid is not None
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
            return None
        return course(request["patient"], request["planned"])

    with StandInRecorder(mosquitto.port, answer).running():
        async with _daemon(tmp_path, policy_file, mosquitto, "laser-d") as d:
            telemetry = d.daemon.telemetry
            assert isinstance(telemetry, TelemetryProcess)
            workers.append(telemetry)
            first = await d.ok(**SESSION)
            await d.ok("session_end", post_care=["sunscreen"])
            await d.until(lambda: telemetry.restarts == 1 and telemetry.connected)
            second = await d.ok(**SESSION)
    assert killed
    assert first["course_source"] == "local"
    assert second["course_source"] == "recorder"
    assert second["session"] == first["session"] + 1
    sources = _course_sources(tmp_path / "laser-d" / "data")
    assert sources[0] == {"source": "local", "reason": WORKER_EXITED}
    assert sources[1]["devices"] == ["laser-for-4"]
