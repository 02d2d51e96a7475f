"""The telemetry worker process (:mod:`devicectl.telemetry.process`): ``python -m
devicectl.telemetry.worker FD``, started by the daemon with one end of a socket pair as ``FD``.

It runs :class:`~devicectl.telemetry.Telemetry` on what the daemon sends, acknowledges each frame
once taken, hands its log lines to the daemon (which writes them as its own), reports a live
``cmd/stop``, refused bursts, ignored retained stops and its counters back, and ends when asked
(``close``: pulses batched, outbox flushed, ``offline`` published) or when the daemon's end
closes. It also asks the fleet recorder for a patient's course when the daemon says so
(:func:`devicectl.recorder.course_client.ask_course`: MQTT 5 request/response on a short-lived
client beside the publishing one) and answers with the request's id.
SIGINT and SIGTERM are ignored: the daemon decides when telemetry ends, after the laser is made
safe, and a Ctrl-C or systemd's stop reaches the daemon too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import pickle
import signal
import socket
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from devicectl.recorder.course_client import ask_course
from devicectl.recorder.course_lookup import CourseLookup
from devicectl.telemetry.commands import RefusedBurst
from devicectl.telemetry.config import TelemetryConfig
from devicectl.telemetry.outbox import OutboxBusy
from devicectl.telemetry.process import (
    ASK_COURSE,
    CALLS,
    COURSES_WAITING_MAX,
    HEADER,
    MAX_CALL_BYTES,
)
from devicectl.telemetry.publisher import Telemetry

_STATS_EVERY_S = 0.1
_ACK_EVERY_S = 0.02
STOP_WINDOW_S = 0.02
# Course exchanges running at once: the daemon waits on at most COURSES_WAITING_MAX, and one it
# gave up on still runs out its own timeout here.
_COURSES_RUNNING_MAX = 2 * COURSES_WAITING_MAX


class _Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._taken = 0
        self._ack: asyncio.TimerHandle | None = None
        self._stops = 0  # live cmd/stop not yet handed to the daemon
        self._stop_window: asyncio.TimerHandle | None = None
        self._log = structlog.get_logger("devicectl.telemetry")
        self._courses: set[asyncio.Task[None]] = set()

    def send(self, kind: str, body: Any) -> None:
        raw = json.dumps({kind: body}, separators=(",", ":")).encode()
        if not self._writer.is_closing():
            self._writer.write(HEADER.pack(len(raw)) + raw)

    async def read_call(self) -> tuple[str, tuple[Any, ...], dict[str, Any]] | None:
        try:
            (size,) = HEADER.unpack(await self._reader.readexactly(HEADER.size))
            if size > MAX_CALL_BYTES:
                self._log.error("telemetry_call_too_large", size=size)
                return None
            call: tuple[str, tuple[Any, ...], dict[str, Any]] = pickle.loads(  # noqa: S301
                await self._reader.readexactly(size)  # our own daemon's end of a socket pair
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if call[0] != ASK_COURSE:  # out of band: the daemon does not number it
            self._taken += 1
        return call

    async def run(self) -> int:
        first = await self.read_call()
        if first is None or first[0] != "start":
            return 2
        config, level = first[1]
        self._forward_logs(level)  # self._log, a lazy proxy, follows the new configuration
        telemetry = Telemetry(
            config,
            on_stop=self._stop,
            on_refused_command=self._refused,
            on_ignored_command=lambda command, payload: self.send(
                "ignored", [command, payload.hex()]
            ),
            log=self._log,
        )
        try:
            async with telemetry:
                stats = asyncio.get_running_loop().create_task(self._report(telemetry))
                try:
                    await self._serve(telemetry)
                finally:
                    stats.cancel()
                    for course in self._courses:  # the daemon no longer waits on any
                        course.cancel()
        except OutboxBusy as exc:  # the daemon starts another worker a little later
            self._log.error("telemetry_outbox_busy", error=str(exc))
            await self._drain()
            return 3
        self.send("stats", dataclasses.asdict(telemetry.stats))
        await self._drain()
        return 0

    async def _serve(self, telemetry: Telemetry) -> None:
        while True:
            call = await self.read_call()
            if call is None or call[0] == "close":
                self.send("ack", self._taken)
                return
            method, args, kwargs = call
            if method == ASK_COURSE:
                self._ask_course(telemetry.config, *args)
                continue
            if method not in CALLS:
                self._log.error("telemetry_call_unknown", method=str(method)[:40])
            elif method == "offer_pulses":
                for pulse in args[0]:
                    telemetry.offer_pulse(*pulse)
            else:
                try:
                    getattr(telemetry, method)(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - one bad message never ends telemetry
                    self._log.error("telemetry_failed", method=method, error=str(exc)[:300])
            if self._ack is None:  # at most one acknowledgement every _ACK_EVERY_S
                self._ack = asyncio.get_running_loop().call_later(_ACK_EVERY_S, self._send_ack)

    def _ask_course(
        self, config: TelemetryConfig, ident: int, patient: str, planned: int, timeout_s: float
    ) -> None:
        """Say the request is taken (the daemon then knows a timeout is the recorder's silence),
        and run the exchange beside the publishing, on this loop."""
        self.send("course_taken", ident)
        if len(self._courses) >= _COURSES_RUNNING_MAX:
            busy = CourseLookup("local", f"{_COURSES_RUNNING_MAX} course requests already running")
            self.send("course", {"id": ident, "lookup": busy.to_wire()})
            return
        task = asyncio.get_running_loop().create_task(
            self._answer_course(config, ident, patient, planned, timeout_s),
            name=f"course-request-{ident}",
        )
        self._courses.add(task)
        task.add_done_callback(self._courses.discard)

    async def _answer_course(
        self, config: TelemetryConfig, ident: int, patient: str, planned: int, timeout_s: float
    ) -> None:
        try:
            lookup = await ask_course(config, patient, planned, timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed request is a fallback, never our end
            self._log.error("course_request_failed", error=str(exc)[:300])
            lookup = CourseLookup("local", f"the course request failed: {exc}")
        self.send("course", {"id": ident, "lookup": lookup.to_wire()})

    def _send_ack(self) -> None:
        self._ack = None
        self.send("ack", self._taken)

    async def _report(self, telemetry: Telemetry) -> None:
        last: dict[str, Any] | None = None
        while True:
            now = dataclasses.asdict(telemetry.stats)
            if now != last:
                self.send("stats", now)
                last = now
            await asyncio.sleep(_STATS_EVERY_S)

    def _forward_logs(self, level: str) -> None:
        """Every log line of this process goes to the daemon, which writes it as its own (one
        log, one rate limit, one format: the journal's, or a demo's file)."""

        def forward(_logger: object, method: str, event: MutableMapping[str, Any]) -> str:
            event.pop("level", None)
            fields = {k: v if isinstance(v, _JSON_SCALARS) else str(v) for k, v in event.items()}
            self.send("log", {"level": method, **fields})
            raise structlog.DropEvent

        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.format_exc_info,
                forward,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level.upper()]
            ),
            cache_logger_on_first_use=False,
        )
        libraries = logging.getLogger()
        libraries.handlers[:] = [_ForwardLibraryLogs()]
        libraries.setLevel(logging.WARNING)

    def _stop(self) -> None:
        """A live ``cmd/stop``. The first of a burst goes to the daemon at once; those that
        follow within :data:`STOP_WINDOW_S` go as one, with their count, at the window's end: every
        stop is followed by a STOP within that window, and a flood of them costs the safety loop
        at most one message per window."""
        self._stops += 1
        if self._stop_window is None:
            self._hand_over_stops()

    def _hand_over_stops(self) -> None:
        self._stop_window = None
        if self._stops:
            self.send("stop", self._stops)
            self._stops = 0
            self._stop_window = asyncio.get_running_loop().call_later(
                STOP_WINDOW_S, self._hand_over_stops
            )

    def _refused(self, burst: RefusedBurst) -> None:
        self.send("refused", dataclasses.asdict(burst))

    async def _drain(self) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self._writer.drain(), 1.0)
        self._writer.close()


_JSON_SCALARS = (str, int, float, bool, type(None))


class _ForwardLibraryLogs(logging.Handler):
    """The libraries' own warnings (paho's, sqlite's), through structlog to the daemon."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(
            record.levelno, "library_log", logger=record.name, message=record.getMessage()
        )


async def _main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return await _Worker(reader, writer).run()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m devicectl.telemetry.worker FD", file=sys.stderr)
        return 2
    return asyncio.run(_main(int(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
