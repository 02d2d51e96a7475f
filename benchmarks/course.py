"""The course request at ``session start``: what it costs the safety loop, asked on the loop (the
design before issue 11's move) or through the telemetry worker (``TelemetryProcess.ask_course``).

    .venv/bin/python benchmarks/course.py [--requests 200] [--tls] [--answer-kb 900]

A local mosquitto and a real recorder (embedded SQLite), both started here; the device asks over
plain MQTT or, with ``--tls``, over TLS with a client certificate (a handshake per request). With
``--answer-kb N`` a stand-in recorder answers instead, with a course padded to about N KB (the
contract allows up to 1 MiB: a patient with many recorded sessions), which the asking side reads
and parses. While
the requests run one after another, a probe on the asking loop sleeps 1 ms at a time and records
how late each wake-up is: that lateness is what a PULSE or a STOP waiting on this loop would have
suffered. Per design: the probe's lateness (p50/p99/max) and the request's round trip (p50/p99/max).
Compare the rows of one run; these machines are noisy.
"""

# ruff: noqa: ASYNC110  (polling the worker's public state is what a benchmark observes)
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devicectl.logs import configure_logging  # noqa: E402
from devicectl.recorder.course_client import ask_course  # noqa: E402
from devicectl.recorder.course_lookup import CourseLookup  # noqa: E402
from devicectl.telemetry import TelemetryConfig  # noqa: E402
from devicectl.telemetry.process import TelemetryProcess  # noqa: E402
from tests.brokers import Broker, make_pki  # noqa: E402
from tests.recorder.helpers import StandInRecorder, course  # noqa: E402

PATIENT = "ab" * 32
_TICK_S = 0.001


async def _probe(lateness: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + _TICK_S
        await asyncio.sleep(_TICK_S)
        lateness.append(loop.time() - due)


async def _measure(
    ask: Callable[[], Awaitable[CourseLookup]], requests: int
) -> tuple[list[float], list[float], set[str]]:
    """(probe lateness s, round trips s, the sources answered) over ``requests`` in a row."""
    lateness: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.get_running_loop().create_task(_probe(lateness, stop))
    trips: list[float] = []
    sources: set[str] = set()
    for _ in range(requests):
        began = time.perf_counter()
        lookup = await ask()
        trips.append(time.perf_counter() - began)
        sources.add(lookup.source if lookup.source == "recorder" else f"local: {lookup.reason}")
    stop.set()
    await probe
    return lateness, trips, sources


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1e3:7.2f} {p99 * 1e3:7.2f} {ordered[-1] * 1e3:7.2f}"


def _stand_in(port: int, answer_kb: int, ready: Any, stop: Any) -> None:
    """A stand-in recorder answering with a padded course, in a process of its own."""
    session = {"device": "laser-x", "session": "1", "started": "2026-11-02T09:00:00Z"}
    padding = [session] * (answer_kb * 1024 // len(str(session)))
    answer = json.dumps(course(PATIENT, 4, sessions=padding)).encode()  # encoded once
    with StandInRecorder(port, lambda _request: answer).running():
        ready.set()
        stop.wait()


@asynccontextmanager
async def _recorder(broker: Broker, tmp: Path, answer_kb: int) -> AsyncIterator[str]:
    """A recorder answering course requests, in another process (its work, and its interpreter
    lock, never this loop's), for as long as the block runs; its description."""
    if answer_kb:
        context = multiprocessing.get_context("spawn")
        ready, stop = context.Event(), context.Event()
        stand_in = context.Process(target=_stand_in, args=(broker.port, answer_kb, ready, stop))
        stand_in.start()
        try:
            if not await asyncio.to_thread(ready.wait, 30):
                raise RuntimeError("the stand-in recorder did not start")
            yield f"a stand-in recorder, answers of ~{answer_kb} KB"
        finally:
            stop.set()
            await asyncio.to_thread(stand_in.join, 10)
        return
    recorder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from devicectl.cli import main; main()",
        "recorder",
        "--mqtt",
        broker.url,
        "--db",
        f"sqlite:///{tmp / 'recorder.sqlite'}",
        "--group",
        "bench",
        "--client-id",
        "bench-recorder",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield "the recorder (`devicectl recorder`, SQLite)"
    finally:
        recorder.terminate()
        await recorder.wait()


Row = tuple[str, list[float], list[float] | None, set[str]]


async def main_async(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki") if args.tls else None
        with Broker(tmp / "broker", tls=pki) as broker:
            tls: dict[str, Any] = {}
            if pki is not None:
                tls = {"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key}
            config = TelemetryConfig(
                url=broker.tls_url if pki is not None else broker.url,
                site="bench",
                device="laser-bench",
                data_dir=tmp / "data",
                **tls,
            )
            async with _recorder(broker, tmp, args.answer_kb) as answering:
                deadline = time.monotonic() + 30
                while (await ask_course(config, PATIENT, 4)).source != "recorder":
                    if time.monotonic() > deadline:  # until the recorder is subscribed
                        raise RuntimeError("the recorder never answered")
                    await asyncio.sleep(0.1)
                idle, _, _ = await _measure(_idle, args.requests)
                rows.append(("idle (no request)", idle, None, set()))
                on_loop, trips, sources = await _measure(
                    lambda: ask_course(config, PATIENT, 4), args.requests
                )
                rows.append(("asked on the loop (before)", on_loop, trips, sources))
                async with TelemetryProcess(
                    config,
                    on_stop=lambda _n: None,
                    on_refused_command=lambda _b: None,
                    on_ignored_command=lambda _c, _p: None,
                ) as worker:
                    while not worker.connected:
                        await asyncio.sleep(0.05)
                    in_worker, trips, sources = await _measure(
                        lambda: worker.ask_course(PATIENT, 4), args.requests
                    )
                rows.append(("through the worker (now)", in_worker, trips, sources))
    transport = "TLS, client certificate" if args.tls else "plain MQTT"
    print(f"\n{args.requests} course requests in a row, {transport}, {answering}; times in ms")
    print(f"{'design':28} {'loop lateness p50/p99/max':>25}   {'round trip p50/p99/max':>23}")
    for name, late, trip, answered in rows:
        trip_text = _ms(trip) if trip else "-"
        print(f"{name:28} {_ms(late):>25}   {trip_text:>23}  {', '.join(sorted(answered))}")


async def _idle() -> CourseLookup:
    await asyncio.sleep(0.02)
    return CourseLookup("recorder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tls", action="store_true", help="the device asks over TLS")
    parser.add_argument(
        "--answer-kb", type=int, default=0, help="a stand-in recorder's answers, padded (KB)"
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
