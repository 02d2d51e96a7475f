"""MQTT telemetry in a process of its own: nothing MQTT does can take the safety loop's time.

    daemon process (safety loop, SCHED_FIFO when granted)      worker process (SCHED_OTHER)
      publish_*() / offer_pulse() ──frames──▶ socketpair ──▶  Telemetry: outbox, paho, cmd/#
      on_stop() / on_refused_command() ◀──── replies ─────────  (devicectl.telemetry.worker)

A flood of ``cmd/*`` messages, a broker outage's replay, TLS handshakes and the outbox's SQLite
all run in the worker; the daemon's loop only writes frames to a local socket, never waits for
the worker, and reads back a stop, a refused burst once a second at most, and counters.

Frames are a 4-byte big-endian length and a payload: daemon → worker a pickled ``(method, args,
kwargs)`` (the worker only runs :data:`CALLS`); worker → daemon a JSON object, bounded
(:data:`MAX_REPLY_BYTES`) and parsed as untrusted (the worker handles what a broker sends).

Nothing is lost to the hand-off: the worker acknowledges each frame once :class:`Telemetry` has
taken it (QoS 1 messages are then in its durable outbox), and the daemon keeps every frame not yet
acknowledged (bounded: :data:`PENDING_MAX_FRAMES`; beyond, the oldest are dropped and counted, as
the outbox does). If the worker dies it is started again (1 s, then up to 10 s apart), the
unacknowledged frames are sent again and the retained state and session re-published
(``on_restart``); if the block is left while none runs, one is started at once to take what is
pending (a session's end, alerts) and close. A worker alive but not taking frames (stopped,
deadlocked: none taken for :data:`HUNG_AFTER_S`, or :data:`WRITE_BUFFER_MAX_BYTES` unread) is
killed and started again.
The worker ignores SIGINT and SIGTERM: it ends when the daemon says so (after the
laser is made safe: pending pulses batched, the outbox flushed, ``offline`` published), or when
the daemon's end of the socket closes (a daemon killed: it flushes and exits on its own).

The course request at ``session start`` (:meth:`TelemetryProcess.ask_course`) crosses the same
socket out of band: not numbered, not acknowledged, never sent to a later worker. The daemon gives
it an id and waits at most its bound (1 s); the worker says it took it (``course_taken``), runs
the MQTT 5 exchange with the recorder on its own loop
(:func:`devicectl.recorder.course_client.ask_course`) and answers with the id (``course``). An
answer for an id no longer waited on (the daemon gave up) is dropped and counted, never given to
another request; a worker gone or restarting ends every request waiting at once, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self

import structlog
from structlog.typing import FilteringBoundLogger

from devicectl.realtime import ordinary_scheduler
from devicectl.recorder.course_lookup import (
    DEFAULT_TIMEOUT_S,
    WORKER_NOT_RUNNING,
    CourseLookup,
    without_asking,
)
from devicectl.telemetry.commands import RefusedBurst
from devicectl.telemetry.config import TelemetryConfig
from devicectl.telemetry.publisher import TelemetryStats
from protocols.messages import DeviceState
from protocols.mqtt import SessionEventKind, Severity

__all__ = [
    "CALLS",
    "COURSES_WAITING_MAX",
    "MAX_REPLY_BYTES",
    "PENDING_MAX_FRAMES",
    "WORKER_EXITED",
    "TelemetryProcess",
]

HEADER: Final = struct.Struct(">I")
MAX_REPLY_BYTES: Final = 64 * 1024  # worker → daemon: a stats object or a refused burst
MAX_CALL_BYTES: Final = 64 * 1024 * 1024  # daemon → worker: a checkpoint, a batch of pulses
PENDING_MAX_FRAMES: Final = 20_000
WRITE_BUFFER_MAX_BYTES: Final = 32 * 1024 * 1024  # unread by the worker: it is hung
HUNG_AFTER_S: Final = 5.0  # frames waiting and none taken for this long: it is hung
# What the worker may be asked to do: Telemetry's publishing methods, and pulses by the batch.
CALLS: Final = frozenset(
    {
        "offer_pulses",
        "publish_state",
        "publish_session",
        "refresh_session",
        "publish_session_event",
        "publish_alert",
        "publish_checkpoint",
        "publish_metrics",
    }
)
# Out of band (not in CALLS, not numbered): the course request, answered by "course" with its id.
ASK_COURSE: Final = "ask_course"
COURSES_WAITING_MAX: Final = 8  # course requests waited on at once; beyond, local at once
WORKER_EXITED: Final = "telemetry worker exited during the request"
_RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0)
_LOG_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


class TelemetryProcess:
    """The daemon's telemetry sink (``TelemetrySink``), run in a worker process.

    ``async with TelemetryProcess(config, ...) as telemetry:`` starts the worker; leaving the
    block asks it to flush and say ``offline`` (at most ``config.flush_timeout_s`` plus its
    start-up), then waits for it to exit, and kills it if it does not within ``exit_budget_s``.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        on_stop: Callable[[int], None],
        on_refused_command: Callable[[RefusedBurst], None],
        on_ignored_command: Callable[[str, bytes], None],
        on_restart: Callable[[], None] | None = None,
        log: FilteringBoundLogger | None = None,
        log_level: str = "info",
        exit_budget_s: float = 3.0,
    ) -> None:
        self._config = config
        self._on_stop = on_stop
        self._on_refused = on_refused_command
        self._on_ignored = on_ignored_command
        self._on_restart = on_restart
        self._log: FilteringBoundLogger = log or structlog.get_logger("devicectl.telemetry")
        self._log_level = log_level
        self._boot: int | None = None  # this run's, once the first worker reported it
        self._exit_budget_s = exit_budget_s
        self._pending: deque[tuple[int, bytes]] = deque()  # (number, frame), not acknowledged
        self._sent = 0  # frames numbered so far
        self._ack_offset = 0  # the current worker's count of frames taken, to our numbers
        self._dropped = 0
        self._pulses: list[tuple[int, int, int, str | None, str | None]] = []
        self._pulse_flush: asyncio.Handle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stats: TelemetryStats | None = None
        self._pid: int | None = None
        self._restarts = 0
        self._closing: asyncio.Event = asyncio.Event()  # the block is being left
        self._reaped = True  # no worker process of ours to signal
        self._handed_over = False  # a worker started while leaving, for what was pending
        self._done: asyncio.Event = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._progress_at = 0.0  # when the worker last took a frame, or frames began waiting
        self._courses: dict[int, _CourseRequest] = {}  # by id: asked, not yet answered
        self._course_ids = 0
        self._late_course_answers = 0

    # -- the sink ---------------------------------------------------------------------------

    @property
    def config(self) -> TelemetryConfig:
        return self._config

    @property
    def stats(self) -> TelemetryStats | None:
        """The worker's counters, as it last reported them (every change, within 0.1 s)."""
        return self._stats

    @property
    def connected(self) -> bool:
        return self._stats is not None and self._stats.connected

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        """A worker is up and being handed frames (False while one is restarted, or after the
        block is left)."""
        return self._writer is not None and not self._closing.is_set()

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def dropped(self) -> int:
        """Frames dropped because the worker was away too long (the oldest first)."""
        return self._dropped

    @property
    def late_course_answers(self) -> int:
        """Course answers that came after :meth:`ask_course` had given up on them (dropped)."""
        return self._late_course_answers

    async def ask_course(
        self, patient: str | None, planned: int, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> CourseLookup:
        """The patient's course from the fleet recorder, asked by the worker: the exchange
        (MQTT 5 request/response, :func:`devicectl.recorder.course_client.ask_course`) runs on
        its loop, never on this one, which only writes a frame and waits for a small answer.
        Returns within ``timeout_s`` whatever the worker, the broker or the recorder do, and never
        raises for them: ``source="local"`` and why (the worker not running, restarting, not
        taking the request, exiting during it; the worker's own reasons: broker, recorder,
        timeout, malformed answer)."""
        unasked = without_asking(self._config, patient)
        if unasked is not None:
            return unasked
        if len(self._courses) >= COURSES_WAITING_MAX:
            return CourseLookup("local", f"{COURSES_WAITING_MAX} course requests already waiting")
        if not self.running:
            return CourseLookup("local", WORKER_NOT_RUNNING)
        self._course_ids += 1
        ident = self._course_ids
        request = _CourseRequest(asyncio.get_running_loop().create_future())
        self._courses[ident] = request
        try:
            self._write(_frame((ASK_COURSE, (ident, patient, planned, timeout_s), {})))
            if self._writer is None:  # the write found the worker gone or hung
                return CourseLookup("local", WORKER_NOT_RUNNING)
            async with asyncio.timeout(timeout_s):
                return await request.answer
        except TimeoutError:
            if not request.taken:
                why = f"telemetry worker did not take the request within {timeout_s:g} s"
                return CourseLookup("local", why)
            return CourseLookup("local", f"no answer from a recorder within {timeout_s:g} s")
        finally:
            del self._courses[ident]

    def offer_pulse(
        self, pulse_no: int, t_us: int, energy_uj: int, zone: str | None, session: str | None
    ) -> None:
        """Hot: one append; the pulses of a loop iteration leave as one frame."""
        self._pulses.append((pulse_no, t_us, energy_uj, zone, session))
        if self._pulse_flush is None:
            self._pulse_flush = asyncio.get_running_loop().call_soon(self._flush_pulses)

    def publish_state(
        self,
        *,
        state: str | DeviceState,
        interlocks: int = 0,
        faults: int = 0,
        params: Mapping[str, int] | None = None,
        armed: bool = False,
        session: str | None = None,
    ) -> None:
        self._call(
            "publish_state",
            state=state,
            interlocks=interlocks,
            faults=faults,
            params=dict(params) if params is not None else None,
            armed=armed,
            session=session,
        )

    def publish_session(self, summary: Mapping[str, Any] | None) -> None:
        self._call("publish_session", dict(summary) if summary is not None else None)

    def refresh_session(self, summary: Mapping[str, Any]) -> None:
        self._call("refresh_session", dict(summary))

    def publish_session_event(self, session_id: str, kind: SessionEventKind, **fields: Any) -> None:
        self._call("publish_session_event", session_id, kind, **fields)

    def publish_alert(
        self,
        severity: Severity,
        code: str,
        message: str,
        value: float | None = None,
        limit: float | None = None,
        session: str | None = None,
    ) -> None:
        self._call("publish_alert", severity, code, message, value, limit, session)

    def publish_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        self._call("publish_checkpoint", dict(checkpoint))

    def publish_metrics(self, **fields: Any) -> None:
        self._call("publish_metrics", **fields)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._spawn()
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run(), name="telemetry-process")
        self._watcher = loop.create_task(self._watch(), name="telemetry-process-watch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._flush_pulses()
        self._closing.set()
        self._end_courses("telemetry worker closing")
        if self._writer is not None:
            self._write(_frame(("close", (), {})))
        budget = self._config.flush_timeout_s + self._exit_budget_s
        assert self._runner is not None
        try:
            async with asyncio.timeout(budget):
                await self._done.wait()
        except TimeoutError:
            self._log.error("telemetry_process_unresponsive", pid=self._pid, waited_s=budget)
            self._kill()
        finally:
            for task in (self._runner, self._watcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if self._pending:
            self._log.error(
                "telemetry_frames_lost",
                count=len(self._pending),
                cause="the telemetry worker did not take them before it exited",
            )

    # -- internals --------------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._flush_pulses()  # pulses stay in order with the messages around them
        self._queue(_frame((method, args, kwargs)))

    def _flush_pulses(self) -> None:
        self._pulse_flush = None
        if self._pulses:
            pulses, self._pulses = self._pulses, []
            self._queue(_frame(("offer_pulses", (pulses,), {})))

    def _queue(self, frame: bytes) -> None:
        if not self._pending:
            self._progress_at = asyncio.get_running_loop().time()
        self._sent += 1
        self._pending.append((self._sent, frame))
        if len(self._pending) > PENDING_MAX_FRAMES:
            self._pending.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                self._log.error(
                    "telemetry_frames_dropped",
                    dropped=self._dropped,
                    cause=f"the telemetry worker took none of the last {PENDING_MAX_FRAMES}",
                )
        if self._writer is not None:
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        writer = self._writer
        assert writer is not None
        try:
            writer.write(frame)
        except (ConnectionError, RuntimeError):
            self._writer = None  # the runner sees the worker go and starts another
            return
        if writer.transport.get_write_buffer_size() > WRITE_BUFFER_MAX_BYTES:
            self._hung(f"{writer.transport.get_write_buffer_size()} bytes it has not read")

    def _hung(self, why: str) -> None:
        """Alive but not taking what it is sent (stopped, deadlocked): killed, and the runner
        starts another, which is sent what is pending."""
        writer, self._writer = self._writer, None
        self._log.error("telemetry_process_hung", pid=self._pid, why=why)
        if writer is not None:
            writer.transport.abort()
        self._kill()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            if self._writer is None or not self._pending:
                continue
            waited = loop.time() - self._progress_at
            if waited > HUNG_AFTER_S:
                self._hung(f"no frame taken for {waited:.1f} s, {len(self._pending)} waiting")

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            os.set_inheritable(theirs.fileno(), True)
            self._pid = os.posix_spawn(  # noqa: ASYNC221 - fork+exec, returns at once
                sys.executable,
                # -P: not the current directory first on sys.path, where anyone may have left a
                # json.py or structlog.py that would run with our MQTT credentials
                [sys.executable, "-P", "-m", "devicectl.telemetry.worker", str(theirs.fileno())],
                dict(os.environ),
                scheduler=ordinary_scheduler(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._reaped = False
        # The worker counts the frames it took, its start frame first; ours are numbered across
        # workers: its count k acknowledges our frame number k + offset.
        first = self._pending[0][0] if self._pending else self._sent + 1
        self._ack_offset = first - 2
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._reader, self._writer = reader, writer
        self._progress_at = asyncio.get_running_loop().time()
        # a worker started again is the same daemon run: the same boot (docs/mqtt.md)
        config = self._config
        if self._boot is not None:
            config = config.model_copy(update={"resume_boot": self._boot})
        self._write(_frame(("start", (config, self._log_level), {})))
        for _, frame in self._pending:  # what the last worker had not taken
            self._write(frame)
        self._log.info("telemetry_process_started", pid=self._pid, resent=len(self._pending))

    async def _run(self) -> None:
        while True:
            code = await self._serve_worker()
            if self._closing.is_set() and not self._pending:
                self._done.set()
                return
            self._stats = None
            self._log.error(
                "telemetry_process_exited",
                pid=self._pid,
                exit=code,
                restart_in_s=0 if self._closing.is_set() else self._restart_delay(),
                unacknowledged=len(self._pending),
            )
            if not await self._respawn():
                self._done.set()
                return
            if self._closing.is_set():  # frames the last worker had not taken: this one takes them
                self._write(_frame(("close", (), {})))
            elif self._on_restart is not None:
                self._on_restart()

    def _restart_delay(self) -> float:
        return _RESTART_DELAYS_S[min(self._restarts, len(_RESTART_DELAYS_S) - 1)]

    async def _respawn(self) -> bool:
        """Start a worker again after the restart delay, or at once when the block is left
        meanwhile (what the last one had not taken: alerts, a session's end, must still reach
        the outbox); False when leaving with nothing to hand over."""
        while True:
            if not self._closing.is_set():
                delay = self._restart_delay()
                self._restarts += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
            if self._closing.is_set() and (not self._pending or self._handed_over):
                return False  # once at most: a worker that dies at every start takes no more
            self._handed_over = self._closing.is_set()
            try:
                await self._spawn()
            except OSError as exc:  # tried again after the next delay (none when closing)
                self._log.error("telemetry_process_not_started", error=str(exc))
                if self._closing.is_set():
                    return False
                continue
            return True

    async def _serve_worker(self) -> int | str:
        """Read the worker's replies until it goes; its exit status."""
        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                (size,) = HEADER.unpack(header)
                if size > MAX_REPLY_BYTES:
                    self._log.error("telemetry_reply_too_large", size=size)
                    break
                self._on_reply(await reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._end_courses(WORKER_EXITED)  # its answers can no longer come: now, not once reaped
        return await self._reap()

    def _on_reply(self, raw: bytes) -> None:
        try:
            reply = json.loads(raw)
            if isinstance(reply, dict) and len(reply) == 1:
                ((kind, body),) = reply.items()
                if self._dispatch(kind, body):
                    return
            error = f"not a known one-key object: {raw[:60]!r}"
        except (ValueError, TypeError, KeyError) as exc:
            error = str(exc)[:200]
        self._log.error("telemetry_reply_unreadable", error=error)

    def _dispatch(self, kind: str, body: Any) -> bool:
        if kind == "ack":
            acked = int(body) + self._ack_offset
            while self._pending and self._pending[0][0] <= acked:
                self._pending.popleft()
                self._progress_at = asyncio.get_running_loop().time()
        elif kind == "stats":
            self._stats = TelemetryStats(**body)
            self._boot = self._stats.boot or self._boot
        elif kind == "stop":
            count = int(body)
            if count < 1:
                return False
            self._on_stop(count)
        elif kind == "refused":
            self._on_refused(RefusedBurst(**(body | {"commands": tuple(body["commands"])})))
        elif kind == "ignored":
            command, payload = body
            self._on_ignored(str(command), bytes.fromhex(payload))
        elif kind == "course_taken":
            request = self._courses.get(int(body))
            if request is not None:
                request.taken = True
        elif kind == "course":
            self._course_answered(int(body["id"]), body["lookup"])
        elif kind == "log":
            level = body.pop("level")
            if level not in _LOG_LEVELS:
                return False
            getattr(self._log, level)(str(body.pop("event", "?")), worker=self._pid, **body)
        else:
            return False
        return True

    def _course_answered(self, ident: int, lookup: object) -> None:
        request = self._courses.get(ident)
        if request is None or request.answer.done():
            self._late_course_answers += 1
            self._log.debug("telemetry_course_answer_late", request=ident)
            return
        try:
            answer = CourseLookup.from_wire(lookup)
        except ValueError as exc:
            self._log.error("telemetry_course_answer_unreadable", error=str(exc)[:200])
            answer = CourseLookup("local", "the telemetry worker's answer is malformed")
        request.answer.set_result(answer)

    def _end_courses(self, why: str) -> None:
        """Every course request still waiting ends now, ``local`` with ``why``: the worker that
        took it is gone (its answer can no longer come), or the block is being left."""
        for request in self._courses.values():
            if not request.answer.done():
                request.answer.set_result(CourseLookup("local", why))

    async def _reap(self) -> int | str:
        pid = self._pid
        if pid is None or self._reaped:
            return "never started"
        loop = asyncio.get_running_loop()
        for _ in range(200):  # the socket closes as the worker exits: 2 s at most
            done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - never blocks
            if done:
                self._reaped = True
                return os.waitstatus_to_exitcode(status)
            await asyncio.sleep(0.01)
        self._kill()
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        self._reaped = True
        return os.waitstatus_to_exitcode(status)

    def _kill(self) -> None:
        """SIGKILL to the worker, never to a process id already reaped (it may be another's)."""
        if self._pid is not None and not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, 9)


class _CourseRequest:
    """One course request waited on: its answer, and whether the worker said it took it (a
    timeout then means the recorder's silence, not the worker's)."""

    __slots__ = ("answer", "taken")

    def __init__(self, answer: asyncio.Future[CourseLookup]) -> None:
        self.answer = answer
        self.taken = False


def _frame(call: tuple[str, tuple[Any, ...], dict[str, Any]]) -> bytes:
    body = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body
