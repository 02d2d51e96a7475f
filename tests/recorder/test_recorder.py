"""The recorder end to end: a real mosquitto, recorders on one shared subscription, both engines.

Every QoS 1 message published is stored exactly once, whichever recorder took it; a recorder
killed without warning, a broker stopped and restarted, both recorders restarted: nothing lost,
nothing doubled (the broker redelivers what was not acknowledged; the store absorbs repeats).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from devicectl.recorder import Recorder, RecorderConfig, queries
from devicectl.recorder.store import open_store
from tests.brokers import Broker
from tests.recorder.helpers import T0, FakeDevice, patient_key, publisher

pytestmark = pytest.mark.system


def _fleet(devices: int, sessions: int) -> list[tuple[str, bytes]]:
    messages: list[tuple[str, bytes]] = []
    for d in range(devices):
        device = FakeDevice(f"laser-{d}")
        messages.append(device.state())
        for s in range(sessions):
            at = T0 + timedelta(days=10 * s, minutes=d)
            messages += device.treatment(str(s + 1), patient_key(f"PT-{d}"), at)
        messages.append(device.state())
    return messages


async def _until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await condition():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the recorder")
        await asyncio.sleep(0.05)


async def _stored(db_url: str) -> dict[str, int]:
    async with await open_store(db_url, migrate=False) as store:
        return await queries.stored_counts(store)


def _config(broker: Broker, db_url: str, name: str) -> RecorderConfig:
    return RecorderConfig(mqtt_url=broker.url, db_url=db_url, client_id=name, group="g1")


async def test_two_recorders_on_one_shared_subscription_store_each_message_once(
    mosquitto: Broker, db_url: str
) -> None:
    messages = _fleet(devices=4, sessions=3)
    async with AsyncExitStack() as stack:
        recorders = [
            await stack.enter_async_context(Recorder(_config(mosquitto, db_url, f"rec-{n}")))
            for n in range(2)
        ]
        for recorder in recorders:
            await asyncio.wait_for(recorder.wait_subscribed(), 10)
        with publisher(mosquitto.port) as pub:
            await asyncio.to_thread(pub.publish_all, messages)

        async def all_stored() -> bool:
            return sum(r.stats.stored for r in recorders) >= len(messages)

        await _until(all_stored)
        shares = [r.stats.stored for r in recorders]
    counts = await _stored(db_url)
    assert counts["messages"] == len(messages)
    assert counts["pulse_batches"] == 4 * 3 * 3
    assert counts["sessions"] == 4 * 3
    assert all(share > 0 for share in shares), f"the broker did not share the load: {shares}"
    assert sum(shares) == len(messages)  # nothing handed to both


async def test_a_bad_message_is_counted_and_the_reader_goes_on(
    mosquitto: Broker, db_url: str
) -> None:
    device = FakeDevice("laser-1")
    good = [device.state(), device.state()]
    hostile = [
        ("lasers/clinic1/laser-1/state", b"[" * 100_000),
        ("lasers/clinic1/laser-1/state", b'{"v": 1, "seq": NaN}'),
        ("lasers/clinic1/laser-1/pulses", b"\xff\xfe"),
        ("lasers/clinic1/laser-1/alerts", b"x" * 300_000),
        ("lasers/clinic1/laser-1/nonsense", b"{}"),
    ]
    async with Recorder(_config(mosquitto, db_url, "rec")) as recorder:
        await asyncio.wait_for(recorder.wait_subscribed(), 10)
        with publisher(mosquitto.port) as pub:
            await asyncio.to_thread(pub.publish_all, [good[0], *hostile, good[1]])

        async def done() -> bool:  # `stored` counts once the batch is committed
            return recorder.stats.stored + recorder.stats.refused >= len(hostile) + 2

        await _until(done)
        stats = recorder.stats
    assert stats.refused == len(hostile)
    assert stats.stored == 2
    counts = await _stored(db_url)
    assert counts["messages"] == 2
    assert counts["rejects"] == len(hostile)


# ---------------------------------------------------------------- killed, restarted


@contextmanager
def _recorder_process(
    broker: Broker, db_url: str, name: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from devicectl.cli import main; main()",
                "recorder",
                "--mqtt",
                broker.url,
                "--db",
                db_url,
                "--client-id",
                name,
                "--group",
                "g1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _subscribed(log: Path, times: int = 1) -> bool:
    return log.exists() and log.read_text(errors="replace").count("recorder_subscribed") >= times


async def _wait_log(log: Path, times: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not _subscribed(log, times):
        if time.monotonic() > deadline:
            raise AssertionError(f"recorder never subscribed (see {log})")
        await asyncio.sleep(0.05)


async def test_killed_recorder_and_broker_restart_lose_nothing_and_double_nothing(
    mosquitto: Broker, db_url: str, tmp_path: Path
) -> None:
    first, second, third = _fleet(6, 5), _fleet(2, 1), _fleet(1, 1)
    # Distinct devices per wave, so the waves add up: rename the later ones.
    second = [(t.replace("laser-", "wave2-"), p.replace(b"laser-", b"wave2-")) for t, p in second]
    third = [(t.replace("laser-", "wave3-"), p.replace(b"laser-", b"wave3-")) for t, p in third]
    logs = [tmp_path / "rec-a.log", tmp_path / "rec-b.log"]
    with (
        _recorder_process(mosquitto, db_url, "rec-a", logs[0]) as rec_a,
        _recorder_process(mosquitto, db_url, "rec-b", logs[1]),
    ):
        await _wait_log(logs[0])
        await _wait_log(logs[1])
        with publisher(mosquitto.port) as pub:
            publishing = asyncio.create_task(asyncio.to_thread(pub.publish_all, first))

            async def some_stored() -> bool:
                return (await _stored(db_url))["messages"] >= 20

            await _until(some_stored)
            rec_a.kill()  # SIGKILL mid-stream: whatever it held unacknowledged comes back
            rec_a.wait()
            await publishing
            await asyncio.to_thread(pub.publish_all, second)
        mosquitto.stop()  # persistence on: sessions and queued messages survive
        mosquitto.start()
        await _wait_log(logs[1], times=2)
    # Both recorders down; what is published now waits in their persistent sessions.
    with publisher(mosquitto.port) as pub:
        await asyncio.to_thread(pub.publish_all, third)
    with (
        _recorder_process(mosquitto, db_url, "rec-a", logs[0]),
        _recorder_process(mosquitto, db_url, "rec-b", logs[1]),
    ):
        expected = len(first) + len(second) + len(third)

        async def everything() -> bool:
            return (await _stored(db_url))["messages"] >= expected

        await _until(everything, timeout=60)
        await asyncio.sleep(0.5)  # a doubled message would show up now
    counts = await _stored(db_url)
    assert counts["messages"] == expected
    assert counts["pulse_batches"] == 6 * 5 * 3 + 2 * 3 + 3
    async with await open_store(db_url, migrate=False) as store:
        assert await queries.gaps(store) == []
