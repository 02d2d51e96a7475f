"""The course request through the telemetry worker (TelemetryProcess.ask_course).

A real mosquitto, a real worker process, and a stand-in recorder on the broker that answers each
request with a course naming the request's ``planned``, so that an answer given to the wrong
request shows. What is pinned: the answer crosses; a worker not running, hung, killed during the
request or sent a recorder's answer too large for the daemon each end as ``local`` with the
reason, and the worker keeps serving; an answer that comes after the daemon gave up is dropped,
never handed to the next request.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from devicectl.recorder.course_lookup import WORKER_NOT_RUNNING
from devicectl.telemetry.process import WORKER_EXITED, TelemetryProcess
from tests.brokers import Broker
from tests.recorder.helpers import StandInRecorder, course, patient_key
from tests.telemetry.helpers import config, until

PATIENT = patient_key("PT-0042")

pytestmark = pytest.mark.system


def _process(url: str, data_dir: Path) -> TelemetryProcess:
    return TelemetryProcess(
        config(url, data_dir, flush_timeout_s=0.6),
        on_stop=lambda _count: None,
        on_refused_command=lambda _burst: None,
        on_ignored_command=lambda _command, _payload: None,
    )


async def test_the_worker_asks_and_the_answer_crosses(tmp_path: Path, mosquitto: Broker) -> None:
    with StandInRecorder(
        mosquitto.port, lambda r: course(PATIENT, r["planned"])
    ).running() as stand_in:
        async with _process(mosquitto.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            lookup = await tm.ask_course(PATIENT, 5)
    assert stand_in.requests == [{"v": 1, "patient": PATIENT, "planned": 5}]  # the contract
    assert lookup.source == "recorder"
    assert lookup.record() == {
        "source": "recorder",
        "given": 1,
        "planned": 5,
        "devices": ["laser-for-5"],
        "warnings": ["interval_short"],
    }
    assert lookup.warnings == (("interval_short", "answer to planned=5"),)


async def test_with_no_worker_running_the_course_is_local_and_says_so(
    tmp_path: Path, mosquitto: Broker
) -> None:
    async with _process(mosquitto.url, tmp_path / "data") as tm:
        await until(lambda: tm.connected, what="the worker connected")
        assert tm.pid is not None
        os.kill(tm.pid, signal.SIGKILL)
        await until(lambda: not tm.running, what="the worker seen gone")
        lookup = await tm.ask_course(PATIENT, 4)  # before the next one starts (1 s later)
        assert lookup.source == "local"
        assert lookup.reason == WORKER_NOT_RUNNING
    after = await tm.ask_course(PATIENT, 4)  # the block left: no worker either
    assert after.reason == WORKER_NOT_RUNNING


async def test_an_answer_after_the_daemon_gave_up_never_reaches_the_next_request(
    tmp_path: Path, mosquitto: Broker
) -> None:
    """The worker stopped (SIGSTOP) while the first request waits: the daemon gives up, saying
    the worker did not take it. Let go, the worker takes that stale request and answers it while
    the second request is under way: the second gets its own answer, the stale one is dropped."""
    with StandInRecorder(
        mosquitto.port, lambda r: course(PATIENT, r["planned"])
    ).running() as stand_in:
        async with _process(mosquitto.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            assert tm.pid is not None
            os.kill(tm.pid, signal.SIGSTOP)
            try:
                first = await tm.ask_course(PATIENT, 4, timeout_s=0.5)
            finally:
                os.kill(tm.pid, signal.SIGCONT)
            second = await tm.ask_course(PATIENT, 6, timeout_s=30)
            await until(lambda: tm.late_course_answers == 1, what="the stale answer dropped")
            third = await tm.ask_course(PATIENT, 5, timeout_s=30)
            assert tm.restarts == 0
    assert first.source == "local"
    assert first.reason == "telemetry worker did not take the request within 0.5 s"
    # the stale request was asked too, beside the second (in either order), then the third
    assert sorted(r["planned"] for r in stand_in.requests[:2]) == [4, 6]
    assert [r["planned"] for r in stand_in.requests[2:]] == [5]
    assert (second.source, second.course["planned"], second.course["devices"]) == (
        "recorder",
        6,
        ["laser-for-6"],
    )
    assert (third.source, third.course["planned"]) == ("recorder", 5)
    assert tm.late_course_answers == 1


async def test_a_worker_killed_during_the_request_ends_it_at_once(
    tmp_path: Path, mosquitto: Broker
) -> None:
    """The recorder never answers and the bound is long: only the worker's exit can end the
    request, and it does, with that reason; the next worker answers the next request."""
    killed: list[int] = []
    process: list[TelemetryProcess] = []

    def kill_the_worker(request: dict[str, Any]) -> dict[str, Any] | None:
        if not killed:
            pid = process[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return None
        return course(PATIENT, request["planned"])

    with StandInRecorder(mosquitto.port, kill_the_worker).running():
        async with _process(mosquitto.url, tmp_path / "data") as tm:
            process.append(tm)
            await until(lambda: tm.connected, what="the worker connected")
            lookup = await tm.ask_course(PATIENT, 4, timeout_s=60)
            assert lookup.source == "local"
            assert lookup.reason == WORKER_EXITED
            await until(lambda: tm.restarts == 1 and tm.connected, timeout=30, what="replaced")
            again = await tm.ask_course(PATIENT, 5, timeout_s=30)
    assert killed
    assert (again.source, again.course["planned"]) == ("recorder", 5)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (course(PATIENT, 4, devices=["d" * 60] * 10_000), "the recorder's answer is too large"),
        (
            course(PATIENT, 4, warnings=[{"code": "interval_short"}]),
            "the recorder's answer is malformed",
        ),
        ({"ok": False, "error": "database down"}, "the recorder could not answer: database down"),
    ],
    ids=["too-large", "malformed", "refused"],
)
async def test_a_bad_answer_is_local_with_its_reason_and_the_worker_serves_on(
    tmp_path: Path, mosquitto: Broker, answer: dict[str, Any], reason: str
) -> None:
    """Parsed in the worker; what crosses to the daemon stays small. (A recorder's answer of
    600 KB handed over whole would exceed what the daemon reads from its worker, and cost the
    worker its life.)"""
    with StandInRecorder(mosquitto.port, lambda _r: answer).running():
        async with _process(mosquitto.url, tmp_path / "data") as tm:
            await until(lambda: tm.connected, what="the worker connected")
            lookup = await tm.ask_course(PATIENT, 4, timeout_s=30)
            assert tm.stats is not None
            published = tm.stats.published
            tm.publish_alert("info", "after", "the worker still takes frames")
            await until(lambda: tm.stats and tm.stats.published > published, what="published")
            assert tm.restarts == 0
    assert lookup.source == "local"
    assert lookup.reason == reason
