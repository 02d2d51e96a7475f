"""The telemetry publisher: docs/mqtt.md over paho-mqtt, behind a durable outbox.

    daemon ──publish_*()──▶ Outbox (SQLite, seq assigned) ──"telemetry-link"──▶ broker
           ──offer_pulse()─▶ hand-off list ──"telemetry-pulses" (100 ms)──▶ Outbox
           ──publish_metrics()─▶ live queue (QoS 0, dropped while offline) ──▶ broker
    broker ──{base}/cmd/#──▶ "telemetry-commands" ──▶ on_stop() | on_ignored_command() (retained)
                                                        | CommandRefusals ──(one per burst)──▶
                                                          on_refused_command() + alert

None of the ``publish_*``/``offer_pulse`` methods awaits or touches the network, so the broker
going away never slows or fails the caller. One connection at a time; QoS 1 publishes are
pipelined (``in_flight`` at once, in outbox order, so per-topic order holds); anything not yet
acknowledged when the connection drops is sent again, from the outbox, after reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, IntFlag
from typing import Any, Self

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicectl import __version__
from devicectl.telemetry.commands import (
    CommandAction,
    CommandRefusals,
    RefusedBurst,
    cap_name,
    classify_command,
)
from devicectl.telemetry.config import TelemetryConfig
from devicectl.telemetry.connection import MqttConnection, MqttLinkError, MqttRefused, Will
from devicectl.telemetry.outbox import Outbox, OutboxRow, OverflowReport
from protocols.messages import fault_names, interlock_names
from protocols.mqtt import (
    AVAILABILITY_OFFLINE,
    AVAILABILITY_ONLINE,
    CONTENT_TYPE,
    METRICS_EXPIRY_S,
    SCHEMA_VERSION,
    STREAMS,
    AlertPayload,
    CheckpointPayload,
    MetricsPayload,
    ParamsModel,
    PulseBatchPayload,
    SessionEventKind,
    SessionEventPayload,
    SessionPayload,
    SessionSummary,
    Severity,
    StatePayload,
    Stream,
    encode_payload,
    mark_historical,
    pulse_batch_fields,
    schema_id,
)

__all__ = ["Telemetry", "TelemetryStats"]

# MQTT 5 "Unsupported Protocol Version" (0x84) and 3.1.1 "unacceptable protocol version" (1).
_PROTOCOL_REFUSED = frozenset({0x84, 1})
_MAX_PULSES_PER_BATCH = 1000
# How long the broker keeps this device's session (its cmd/# subscription and the stops queued
# on it) while no worker is connected: longer than a worker's replacement (~6 s when hung), short
# enough that a stop is never obeyed long after it was sent.
COMMAND_SESSION_EXPIRY_S = 30
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _now() -> float:
    """The running loop's clock: the refused bursts' times."""
    return asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class TelemetryStats:
    """A snapshot of the publisher's counters (``Telemetry.stats``)."""

    connected: bool
    protocol: str  # "5" or "3.1.1": the version of the current or last connection
    connects: int
    connect_failures: int
    last_error: str | None
    published: int  # QoS 1 publishes acknowledged by the broker
    rejected: int  # acknowledged with an error reason (e.g. denied by the broker's ACL)
    live_published: int  # QoS 0 metrics sent
    live_dropped: int  # metrics discarded while offline
    outbox_depth: int
    outbox_bytes: int
    outbox_dropped: int  # messages dropped to honour the outbox bound
    pulses_offered: int
    pulses_dropped: int  # the hand-off was full
    pulse_batches: int
    commands_stop: int
    commands_refused: int
    commands_ignored: int  # retained cmd/stop found at subscription: stale, not obeyed
    boot: int


PulseTuple = tuple[int, int, int, str | None, str | None]


class Telemetry:
    """MQTT telemetry for one device; an async context manager owning its tasks.

    ``on_stop()`` is called (synchronously, on the event loop) for a live ``cmd/stop``;
    ``on_refused_command(burst)`` once per burst of other ``cmd/*`` messages, retained or not
    (:class:`~devicectl.telemetry.commands.CommandRefusals`: at most one report per
    ``refusal_window_s``, with the count and the first names, capped), which is also refused
    with one ``alerts`` message; ``on_ignored_command(command, payload)`` for a retained
    ``cmd/stop``, stale and not obeyed. ``command`` is the topic below ``{base}/cmd/``,
    ``payload`` at most its first 256 bytes. On exit: pending pulses are batched, the outbox is
    flushed for at most ``flush_timeout_s``, ``offline`` is published (retained) and the
    connection closed.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        on_stop: Callable[[], None] | None = None,
        on_refused_command: Callable[[RefusedBurst], None] | None = None,
        on_ignored_command: Callable[[str, bytes], None] | None = None,
        refusal_window_s: float = 1.0,
        log: Any = None,
        clock: Callable[[], datetime] = _utc_now,
        daemon_version: str = __version__,
    ) -> None:
        self._config = config
        self._topics = config.topics
        self._address = config.address() if config.has_broker else None
        self._tls = config.tls_context()
        self._on_stop = on_stop
        self._on_refused_command = on_refused_command
        self._on_ignored_command = on_ignored_command
        self._refusals = CommandRefusals(refusal_window_s)
        self._refusal_report: asyncio.TimerHandle | None = None
        self._log = log if log is not None else structlog.get_logger("devicectl.telemetry")
        self._clock = clock
        self._daemon_version = daemon_version
        self._outbox: Outbox | None = None
        self._running = False
        self._boot = 0
        self._pulse_buf: list[PulseTuple] = []
        self._pulse_cap = config.handoff_capacity
        self._pulses_offered_flushed = 0
        self._pulses_dropped = 0
        self._pulses_dropped_unreported = 0
        self._live: deque[tuple[str, bytes]] = deque(maxlen=16)
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()
        self._close_deadline = float("inf")
        self._historical_upto = 0  # outbox rows up to this id are delivered late: historical
        self._outage = False  # a connection attempt failed, or a connection was lost, this run
        self._connected = False
        self._v5 = config.protocol != "3.1.1"
        self._tasks: asyncio.TaskGroup | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._helpers: tuple[asyncio.Task[None], ...] = ()
        self._session_summary: SessionSummary | None = None
        self._session_sent_at = 0.0
        self._overflow_alerted = False
        self._unwritable_reported = False  # the outbox disk refusing writes was reported
        self._counts = dict.fromkeys(
            (
                "connects", "connect_failures", "published", "live_published", "live_dropped",
                "outbox_dropped", "rejected", "pulse_batches", "commands_stop", "commands_refused",
                "commands_ignored",
            ),
            0,
        )  # fmt: skip
        self._last_error: str | None = None
        self._properties = {
            spec.stream: self._make_properties(spec.stream) for spec in STREAMS.values()
        }

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._outbox = Outbox(self._config.outbox_path, max_bytes=self._config.outbox_max_bytes)
        resume = self._config.resume_boot
        self._boot = self._outbox.resume_boot(resume) if resume else self._outbox.start_boot()
        self._running = True
        self._log.info(
            "telemetry_starting",
            broker=self._broker_name,
            tls=self._tls is not None,
            base=self._topics.base,
            boot=self._boot,
            outbox_depth=self._outbox.depth,
        )
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        if self._address is not None:
            self._link_task = self._tasks.create_task(self._link(), name="telemetry-link")
        self._helpers = (
            self._tasks.create_task(self._batch_pulses(), name="telemetry-pulses"),
            self._tasks.create_task(self._repeat_session(), name="telemetry-session-repeat"),
            self._tasks.create_task(self._checkpoint(), name="telemetry-checkpoint"),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._tasks is not None
        assert self._outbox is not None
        loop = asyncio.get_running_loop()
        for task in self._helpers:
            task.cancel()
        self._report_refusals()  # a burst still open
        try:
            self._flush_pulses()
        except Exception as exc:  # noqa: BLE001 - still flush and say offline
            self._log.error("telemetry_pulse_batch_failed", error=repr(exc))
        self._close_deadline = loop.time() + self._config.flush_timeout_s
        self._closing.set()
        self._wakeup.set()
        link = self._link_task
        if link is not None and not link.done():
            if self._connected:
                # the link drains the outbox until the deadline, then publishes offline
                done, _ = await asyncio.wait({link}, timeout=self._config.flush_timeout_s + 2.0)
                if not done:
                    link.cancel()
            else:
                link.cancel()
        try:
            await self._tasks.__aexit__(None, None, None)
        finally:
            self._running = False
            if self._outbox.in_memory:
                self._log.error(
                    "telemetry_messages_lost",
                    count=self._outbox.in_memory,
                    cause="held in memory: the outbox's disk refused them",
                )
            self._outbox.close()
            self._log.info("telemetry_stopped", outbox_depth=self._outbox.depth)

    @property
    def config(self) -> TelemetryConfig:
        """The broker, credentials and topics in use (the recorder's course client reuses them)."""
        return self._config

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def boot(self) -> int:
        return self._boot

    @property
    def stats(self) -> TelemetryStats:
        outbox = self._outbox
        c = self._counts
        return TelemetryStats(
            connected=self._connected,
            protocol="5" if self._v5 else "3.1.1",
            connects=c["connects"],
            connect_failures=c["connect_failures"],
            last_error=self._last_error,
            published=c["published"],
            rejected=c["rejected"],
            live_published=c["live_published"],
            live_dropped=c["live_dropped"],
            outbox_depth=outbox.depth if outbox else 0,
            outbox_bytes=outbox.size_bytes if outbox else 0,
            outbox_dropped=c["outbox_dropped"],
            pulses_offered=self._pulses_offered_flushed + len(self._pulse_buf),
            pulses_dropped=self._pulses_dropped,
            pulse_batches=c["pulse_batches"],
            commands_stop=c["commands_stop"],
            commands_refused=c["commands_refused"],
            commands_ignored=c["commands_ignored"],
            boot=self._boot,
        )

    # -- what the daemon calls (none of these awaits or touches the network) -----------------

    def offer_pulse(
        self, pulse_no: int, t_us: int, energy_uj: int, zone: str | None, session: str | None
    ) -> None:
        """Hand one pulse over for the next batch. Per-pulse path: an append, nothing else."""
        buf = self._pulse_buf
        if len(buf) < self._pulse_cap:
            buf.append((pulse_no, t_us, energy_uj, zone, session))
        else:
            self._pulses_dropped += 1

    def publish_state(
        self,
        *,
        state: str | IntEnum,
        interlocks: int | Iterable[str] = (),
        faults: int | Iterable[str] = (),
        params: ParamsModel | Mapping[str, int] | None = None,
        armed: bool = False,
        session: str | None = None,
    ) -> None:
        """Queue a ``state`` message (retained). ``interlocks``/``faults`` take STATUS bitmasks
        or names; ``state`` a :class:`protocols.messages.DeviceState` or its name."""
        fields: dict[str, Any] = {
            "state": state.name if isinstance(state, IntEnum) else str(state),
            "interlocks": _interlock_names(interlocks),
            "faults": _fault_names(faults),
            "params": params,
            "armed": armed,
            "session": session,
            "daemon_version": self._daemon_version,
        }
        StatePayload.model_validate({**self._envelope(1), **fields})  # fail here, not in the task
        self._enqueue(Stream.STATE, lambda seq: encode_payload(
            StatePayload.model_validate({**self._envelope(seq), **fields})
        ))  # fmt: skip

    def publish_session(self, summary: SessionSummary | Mapping[str, Any] | None) -> None:
        """Queue the current session summary (retained), or the empty message when ``None``.

        Call it on every change; while a session is open the last summary is also repeated every
        second (the contract's heartbeat) without the daemon's help.
        """
        if summary is None:
            self._session_summary = None
            self._enqueue(Stream.SESSION, lambda _seq: b"", numbered=False)
            return
        self._session_summary = _as_summary(summary)
        self._send_session_summary(self._session_summary)

    def refresh_session(self, summary: SessionSummary | Mapping[str, Any]) -> None:
        """Give the summary the once-a-second repeat will send next (running totals, duration)
        without sending it now: one ``session`` message a second, not two."""
        self._session_summary = _as_summary(summary)

    def publish_session_event(self, session_id: str, kind: SessionEventKind, **fields: Any) -> None:
        """Queue a ``sessions/{id}/events`` message; ``summary=`` (for ``ended``) is a
        :class:`SessionSummary` or its mapping, ``checkpoint=`` (for ``ended``) the signed log
        checkpoint's fields, any other keyword goes into ``details``."""
        summary = fields.pop("summary", None)
        checkpoint = fields.pop("checkpoint", None)
        body = {"session": session_id, "event": kind, "details": fields, "summary": summary}
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        SessionEventPayload.model_validate({**self._envelope(1), **body})
        topic = self._topics.topic(Stream.SESSION_EVENTS, session_id)
        self._enqueue(Stream.SESSION_EVENTS, lambda seq: encode_payload(
            SessionEventPayload.model_validate({**self._envelope(seq), **body})
        ), topic=topic)  # fmt: skip

    def publish_alert(
        self,
        severity: Severity,
        code: str,
        message: str,
        value: float | None = None,
        limit: float | None = None,
        session: str | None = None,
    ) -> None:
        """Queue an ``alerts`` message (never dropped from the outbox)."""
        body = {
            "severity": severity, "code": code, "message": message,
            "value": value, "limit": limit, "session": session,
        }  # fmt: skip
        AlertPayload.model_validate({**self._envelope(1), **body})
        self._enqueue(Stream.ALERTS, lambda seq: encode_payload(
            AlertPayload.model_validate({**self._envelope(seq), **body})
        ))  # fmt: skip

    def publish_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Queue a ``log/checkpoint`` message (retained, never dropped from the outbox):
        ``checkpoint`` holds ``log_seq``, ``hash``, ``time``, ``key_id``, ``public_key`` and
        ``signature``, signed for this device's id (the envelope's ``device``)."""
        fields = dict(checkpoint)
        CheckpointPayload.model_validate({**self._envelope(1), **fields})
        self._enqueue(Stream.LOG_CHECKPOINT, lambda seq: encode_payload(
            CheckpointPayload.model_validate({**self._envelope(seq), **fields})
        ))  # fmt: skip

    def publish_metrics(
        self,
        *,
        rate_hz: float | None = None,
        avg_power_w: float | None = None,
        skin_temp_c: float | None = None,
        head_temp_c: float | None = None,
        counters: Mapping[str, int] | None = None,
        log_commits_per_s: int | None = None,
        log_commit_p99_ms: float | None = None,
        log_fsyncs_per_s: float | None = None,
    ) -> None:
        """Send a ``metrics`` message if connected (QoS 0, expiry 10 s); dropped when offline."""
        if not self._connected or self._outbox is None or not self._running:
            self._counts["live_dropped"] += 1
            return
        topic = self._topics.topic(Stream.METRICS)
        payload = MetricsPayload(
            **self._envelope(self._outbox.next_seq(topic)),
            rate_hz=rate_hz,
            avg_power_w=avg_power_w,
            skin_temp_c=skin_temp_c,
            head_temp_c=head_temp_c,
            counters=dict(counters or {}),
            log_commits_per_s=log_commits_per_s,
            log_commit_p99_ms=log_commit_p99_ms,
            log_fsyncs_per_s=log_fsyncs_per_s,
        )
        if len(self._live) == self._live.maxlen:
            self._counts["live_dropped"] += 1
        self._live.append((topic, encode_payload(payload)))
        self._wakeup.set()

    # -- internals: queueing ------------------------------------------------------------------

    def _envelope(self, seq: int) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "ts": self._clock(),
            "device": self._topics.device,
            "seq": seq,
            "boot": self._boot,
        }

    def _enqueue(
        self,
        stream: Stream,
        build: Callable[[int], bytes],
        *,
        topic: str | None = None,
        numbered: bool = True,
    ) -> None:
        if self._outbox is None or not self._running:
            raise RuntimeError("Telemetry is not running (use it as an async context manager)")
        spec = STREAMS[stream]
        topic = topic if topic is not None else self._topics.topic(stream)
        _seq, report = self._outbox.enqueue(
            topic, stream.value, build, qos=spec.qos, retain=spec.retain, numbered=numbered
        )
        self._wakeup.set()
        if (self._outbox.unwritable is not None) != self._unwritable_reported:
            self._on_unwritable(self._outbox.unwritable)
        if report is not None:
            self._on_overflow(report)
        elif self._overflow_alerted and self._outbox.size_bytes < self._outbox.max_bytes // 2:
            self._overflow_alerted = False

    def _on_unwritable(self, cause: str | None) -> None:
        """The outbox's disk refused a write (kept in memory from now), or accepts them again."""
        assert self._outbox is not None
        self._unwritable_reported = cause is not None
        if cause is None:
            self._log.info("telemetry_outbox_writable")
            return
        self._log.error("telemetry_outbox_unwritable", cause=cause, path=str(self._outbox.path))
        self.publish_alert(
            "critical",
            "telemetry_outbox_unwritable",
            f"telemetry outbox {self._outbox.path} cannot be written ({cause}): messages are kept "
            "in memory and still delivered, but lost if the daemon stops before the disk recovers",
        )

    def _on_overflow(self, report: OverflowReport) -> None:
        assert self._outbox is not None
        self._counts["outbox_dropped"] += report.dropped_messages
        if self._overflow_alerted:
            return
        self._overflow_alerted = True
        self._log.warning(
            "telemetry_outbox_full",
            max_bytes=self._outbox.max_bytes,
            dropped_messages=report.dropped_messages,
            still_over=report.still_over,
        )
        self.publish_alert(
            "warning",
            "telemetry_outbox_full",
            "telemetry outbox reached its bound while the broker is unreachable: oldest pulse "
            "batches are being dropped (alerts and session events are kept)",
            value=float(self._outbox.size_bytes),
            limit=float(self._outbox.max_bytes),
        )

    def _send_session_summary(self, summary: SessionSummary) -> None:
        self._session_sent_at = asyncio.get_running_loop().time()
        self._enqueue(Stream.SESSION, lambda seq: encode_payload(
            SessionPayload(**self._envelope(seq), summary=summary)
        ))  # fmt: skip

    def _flush_pulses(self) -> None:
        buf, self._pulse_buf = self._pulse_buf, []
        dropped = self._pulses_dropped - self._pulses_dropped_unreported
        if not buf:
            return
        self._pulses_offered_flushed += len(buf)
        start = 0
        while start < len(buf):
            first = buf[start]
            key_zone, key_session = first[3], first[4]
            end = start + 1
            limit = min(len(buf), start + _MAX_PULSES_PER_BATCH)
            while end < limit and buf[end][3] == key_zone and buf[end][4] == key_session:
                end += 1
            self._enqueue_batch(buf[start:end], key_zone, key_session, dropped)
            dropped = 0
            start = end
        self._pulses_dropped_unreported = self._pulses_dropped

    def _enqueue_batch(
        self, run: list[PulseTuple], zone: str | None, session: str | None, dropped: int
    ) -> None:
        body = pulse_batch_fields(
            [p[:3] for p in run], session=_label(session), zone=_label(zone), dropped=dropped
        )
        self._counts["pulse_batches"] += 1
        self._enqueue(Stream.PULSES, lambda seq: encode_payload(
            PulseBatchPayload.model_validate({**self._envelope(seq), **body})
        ))  # fmt: skip

    # -- internals: tasks ----------------------------------------------------------------------

    async def _batch_pulses(self) -> None:
        while True:
            await asyncio.sleep(self._config.batch_interval_s)
            if self._pulse_buf:
                try:
                    self._flush_pulses()
                except Exception as exc:  # noqa: BLE001 - keep batching; the log has the pulses
                    self._log.error("telemetry_pulse_batch_failed", error=repr(exc))

    async def _repeat_session(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            summary = self._session_summary
            if summary is not None and loop.time() - self._session_sent_at >= 1.0:
                try:
                    self._send_session_summary(summary)
                except Exception as exc:  # noqa: BLE001 - a repeat is not worth a crash
                    self._log.error("telemetry_session_repeat_failed", error=repr(exc))

    async def _checkpoint(self) -> None:
        """Fold the outbox's WAL into its database off the event loop (it fsyncs)."""
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            await asyncio.sleep(5.0)
            try:
                await asyncio.to_thread(outbox.checkpoint)
            except Exception as exc:  # noqa: BLE001 - retried in 5 s; the WAL just grows
                self._log.warning("telemetry_outbox_checkpoint_failed", error=repr(exc))

    @property
    def _broker_name(self) -> str:
        address = self._address
        return f"{address.host}:{address.port}" if address else "none (outbox only)"

    def _make_client(self) -> MqttConnection:
        assert self._address is not None
        availability = self._topics.topic(Stream.AVAILABILITY)
        return MqttConnection(
            self._address.host,
            self._address.port,
            username=self._address.username,
            password=self._address.password,
            client_id=self._config.client_id,
            v5=self._v5,
            will=Will(
                availability,
                AVAILABILITY_OFFLINE,
                qos=1,
                retain=True,
                properties=self._availability_properties(PacketTypes.WILLMESSAGE),
            ),
            keepalive=self._config.keepalive_s,
            tls=self._tls,
            connect_timeout=self._config.connect_timeout_s,  # to CONNACK; publishes get 10 s
            # One MQTT session for the daemon's run: a cmd/stop the broker accepted while this
            # worker was reconnecting, or while an earlier worker of the run was hung or being
            # replaced, is delivered when the session resumes. A new run starts clean: a stop
            # from before it is not a live request.
            clean_start=self._config.resume_boot is None and not self._counts["connects"],
            session_expiry_s=COMMAND_SESSION_EXPIRY_S,
        )

    async def _link(self) -> None:
        """Connect, deliver, reconnect with jittered exponential backoff; never raises."""
        attempt = 0
        while not self._closing.is_set():
            client: MqttConnection | None = None
            fall_back = False
            try:
                client = self._make_client()
                async with client:
                    attempt = 0
                    await self._session(client)
            except* MqttLinkError as group:
                error = group.exceptions[0]
                if self._protocol_refused(error):
                    self._log.warning("mqtt_v5_refused_falling_back_to_3_1_1", error=str(error))
                    self._v5 = False
                    fall_back = True
                else:
                    self._note_failure(error)
            except* (OSError, ssl.SSLError) as group:
                self._note_failure(group.exceptions[0])
            except* Exception as group:  # noqa: BLE001 - a telemetry bug must not stop the device
                self._log.error("telemetry_link_crashed", error=repr(group.exceptions[0]))
                self._note_failure(group.exceptions[0])
            finally:
                self._connected = False
                if client is not None:
                    client.close()
            if fall_back:
                continue
            if self._closing.is_set():
                return
            attempt += 1
            cap = min(
                self._config.backoff_max_s, self._config.backoff_initial_s * 2 ** (attempt - 1)
            )
            delay = random.uniform(cap / 2, cap)  # noqa: S311 - jitter, not cryptography
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()

    def _protocol_refused(self, error: BaseException) -> bool:
        """Whether a failed MQTT 5 attempt means "try 3.1.1": only a CONNACK that refuses the
        protocol version (MQTT 5 reason 0x84, 3.1.1 return code 1), and only with
        ``protocol = "auto"``. Anything else, a CONNACK timeout included, is a connection failure
        retried with backoff on the same protocol: a broker that accepted MQTT 5 a minute ago and
        is now slow to answer has not forgotten MQTT 5, and a guess would cost the properties
        (content type, schema, metrics expiry) for the rest of the run."""
        if not self._v5 or self._connected or self._config.protocol != "auto":
            return False
        if not isinstance(error, MqttRefused):  # a CONNACK's refusal
            return False
        return error.rc in _PROTOCOL_REFUSED

    def _note_failure(self, error: BaseException) -> None:
        _drop_frames(error)
        was_connected = self._connected
        self._outage = True
        self._last_error = str(error) or type(error).__name__
        if not was_connected:
            self._counts["connect_failures"] += 1
        extra: dict[str, str] = {}
        if (
            not was_connected
            and self._v5
            and self._config.protocol == "auto"
            and self._counts["connects"] == 0
            and type(error) is MqttLinkError
            and str(error) == "Operation timed out"
        ):
            # some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT instead of refusing
            extra["hint"] = 'no CONNACK: if the broker speaks only 3.1.1, set mqtt.protocol "3.1.1"'
        self._log.warning(
            "mqtt_disconnected" if was_connected else "mqtt_connect_failed",
            broker=self._broker_name,
            error=self._last_error,
            protocol="5" if self._v5 else "3.1.1",
            **extra,
        )

    async def _session(self, client: MqttConnection) -> None:
        assert self._outbox is not None
        if self._outage:
            # connected after a failed attempt or a lost connection: everything queued until
            # now waited through an outage and is delivered late. Without one (the first
            # attempt succeeded, a protocol fallback aside) only earlier boots' rows are late.
            self._historical_upto = self._outbox.last_id()
        availability = self._topics.topic(Stream.AVAILABILITY)
        availability_properties = self._availability_properties(PacketTypes.PUBLISH)
        await client.publish(
            availability,
            AVAILABILITY_ONLINE,
            qos=1,
            retain=True,
            properties=availability_properties,
        )
        await client.subscribe(self._topics.topic(Stream.CMD), qos=1)
        self._counts["connects"] += 1
        self._connected = True
        self._last_error = None
        self._log.info(
            "mqtt_connected",
            protocol="5" if self._v5 else "3.1.1",
            outbox_depth=self._outbox.depth,
            client_id=self._config.client_id,
        )
        async with asyncio.TaskGroup() as group:
            receiver = group.create_task(self._receive(client), name="telemetry-commands")
            await self._deliver(client)
            receiver.cancel()
        # a clean close (the daemon is stopping): say so, since a clean DISCONNECT sends no Will
        with contextlib.suppress(MqttLinkError):
            await client.publish(
                availability,
                AVAILABILITY_OFFLINE,
                qos=1,
                retain=True,
                properties=availability_properties,
                wait_s=1.0,
            )
        self._connected = False

    async def _deliver(self, client: MqttConnection) -> None:
        """Send the outbox in order, ``in_flight`` QoS 1 publishes outstanding; return once
        closing and drained (or past the flush deadline); raise if a publish cannot be sent.

        Outbox rows are published without awaiting each (``publish_nowait``), their PUBACKs
        handed to :meth:`_on_puback`: an await per message costs a future and a loop iteration
        each. The window is refilled in bursts once half of it is free, and a burst is written to
        the socket at once, by this task (:meth:`MqttConnection.burst`).
        """
        assert self._outbox is not None
        outbox = self._outbox
        loop = asyncio.get_running_loop()
        awaiting: dict[int, OutboxRow] = {}  # MQTT packet id -> the outbox row it carries
        live: set[asyncio.Task[None]] = set()
        client.on_puback = lambda mid, code: self._on_puback(awaiting, mid, code)
        cursor = 0
        queued: deque[OutboxRow] = deque()
        window = self._config.in_flight
        by_stream = {stream.value: props for stream, props in self._properties.items()}
        v5 = self._v5
        counts = self._counts
        try:
            while True:
                if self._closing.is_set() and loop.time() >= self._close_deadline:
                    return
                while self._live:
                    topic, payload = self._live.popleft()
                    properties = self._properties[Stream.METRICS] if v5 else None
                    task = asyncio.create_task(
                        client.publish(topic, payload, qos=0, properties=properties)
                    )
                    live.add(task)
                    task.add_done_callback(live.discard)
                    counts["live_published"] += 1
                if not queued:
                    queued.extend(outbox.fetch(cursor, 256))
                    if queued:
                        cursor = queued[-1].id
                # refill only once half the window is free: publishes then leave in bursts, one
                # loop wake-up and one socket write for several, instead of one each
                if queued and len(awaiting) <= window // 2:
                    boot, historical_upto = self._boot, self._historical_upto
                    with client.burst():
                        for _ in range(min(window - len(awaiting), len(queued))):
                            row = queued.popleft()
                            payload = row.payload
                            if row.boot != boot or row.id <= historical_upto:
                                payload = mark_historical(payload)
                            properties = by_stream[row.stream] if v5 and payload else None
                            info = client.publish_nowait(
                                row.topic, payload, row.qos, row.retain, properties
                            )
                            if row.qos == 0:
                                outbox.ack(row.id, len(row.payload))
                                counts["published"] += 1
                            else:
                                # no PUBACK can have been handled yet: paho reads the socket
                                # only from the event loop, never inside publish()
                                awaiting[info.mid] = row
                    if not queued:
                        continue  # fetch the next rows now, while the window is still open
                elif not queued:
                    outbox.flush_acks()
                    if self._closing.is_set() and not awaiting:
                        return
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._wakeup.wait()
        finally:
            client.on_puback = None
            for task in live:
                task.cancel()
            outbox.flush_acks()

    def _on_puback(self, awaiting: dict[int, OutboxRow], mid: int, reason: int) -> bool:
        """A PUBACK arrived: ack the outbox row it was for. False if not one of ours."""
        row = awaiting.pop(mid, None)
        if row is None or self._outbox is None:
            return False  # one of aiomqtt's own publishes (availability)
        if reason >= 0x80:
            # refused by the broker (e.g. 0x87 not authorised by its ACL): resending cannot help
            self._counts["rejected"] += 1
            self._log.warning("mqtt_publish_rejected", reason_code=reason)
        else:
            self._counts["published"] += 1
        self._outbox.ack(row.id, len(row.payload))
        if len(awaiting) <= self._config.in_flight // 2:
            self._wakeup.set()  # the sender refills once half the window is free
        return True

    async def _receive(self, client: MqttConnection) -> None:
        base = self._topics.base

        def take_now(message: paho.MQTTMessage) -> bool:
            """Beyond the inbound bound: a live cmd/stop is obeyed (and counted, and audited)
            at once, never dropped with the flood around it."""
            retained = bool(message.retain)
            if classify_command(base, message.topic, retained=retained).action is not (
                CommandAction.STOP
            ):
                return False
            self._handle_command(message.topic, message.payload, retained=retained)
            return True

        client.take_now = take_now
        async for message in client.messages():
            unread, unread_bytes = client.take_dropped()
            if unread:  # a flood beyond what is read: refused unread, in the same burst
                self._counts["commands_refused"] += unread
                self._refused(self._refusals.add_unread(unread, unread_bytes, now=_now()))
            self._handle_command(message.topic, message.payload, retained=bool(message.retain))

    def _handle_command(self, topic: str, raw: object, *, retained: bool) -> None:
        payload = raw if isinstance(raw, bytes) else str(raw if raw is not None else "").encode()
        decision = classify_command(self._topics.base, topic, retained=retained)
        if decision.action is CommandAction.STOP:
            self._counts["commands_stop"] += 1
            self._log.warning("mqtt_command_stop", topic=topic)
            if self._on_stop is not None:
                try:
                    self._on_stop()
                except Exception as exc:  # noqa: BLE001 - a callback bug must not kill telemetry
                    self._log.error("mqtt_stop_callback_failed", error=repr(exc))
            return
        if decision.action is CommandAction.IGNORE:
            self._log.info(
                "mqtt_command_ignored",
                topic=cap_name(topic),
                reason=decision.reason,
                bytes=len(payload),
            )
            if decision.ours:
                self._counts["commands_ignored"] += 1
                if self._on_ignored_command is not None:
                    try:
                        self._on_ignored_command(decision.command, payload[:256])
                    except Exception as exc:  # noqa: BLE001 - the audit hook must not kill it
                        self._log.error("mqtt_audit_callback_failed", error=repr(exc))
            return
        self._counts["commands_refused"] += 1
        # aggregated: a flood costs one log line, one audit record and one alert per burst
        opened = self._refusals.add(decision.command, len(payload), retained=retained, now=_now())
        self._refused(opened)

    def _refused(self, opened: bool) -> None:
        """A refusal joined the burst; ``opened``: it opened one, to be reported in a window."""
        if opened:
            self._refusal_report = asyncio.get_running_loop().call_later(
                self._refusals.window_s, self._report_refusals
            )

    def _report_refusals(self) -> None:
        """Report the burst of refused commands: its window has passed, or telemetry is closing."""
        if self._refusal_report is not None:
            self._refusal_report.cancel()
            self._refusal_report = None
        burst = self._refusals.take()
        if burst is None:
            return
        self._log.warning(
            "mqtt_commands_refused",
            count=burst.count,
            commands=list(burst.commands),
            unlisted=burst.unlisted,
            retained=burst.retained,
            bytes=burst.payload_bytes,
        )
        if self._on_refused_command is not None:
            try:
                self._on_refused_command(burst)
            except Exception as exc:  # noqa: BLE001 - the audit hook must not kill telemetry
                self._log.error("mqtt_audit_callback_failed", error=repr(exc))
        self.publish_alert("warning", "command_refused", burst.message())

    def _availability_properties(self, packet_type: int) -> Properties | None:
        """MQTT 5 properties of ``online``/``offline`` (a PUBLISH or the Last Will): the payload
        stays the contract's plain string, the properties say which run it belongs to, so a late
        Last Will can be placed. None under 3.1.1 (read ``boot`` from the next ``state``)."""
        if not self._v5:
            return None
        properties = Properties(packet_type)  # type: ignore[no-untyped-call]
        properties.ContentType = "text/plain"
        properties.UserProperty = [
            ("schema", schema_id(Stream.AVAILABILITY)),
            ("boot", str(self._boot)),
        ]
        return properties

    def _make_properties(self, stream: Stream) -> Properties:
        properties = _PackedProperties()
        if STREAMS[stream].model is not None:
            properties.ContentType = CONTENT_TYPE
            properties.UserProperty = [("schema", schema_id(stream))]
        else:
            properties.ContentType = "text/plain"
        if stream is Stream.METRICS:
            properties.MessageExpiryInterval = METRICS_EXPIRY_S
        properties.freeze()
        return properties


class _PackedProperties(Properties):
    """PUBLISH properties packed once: paho packs them again for every message otherwise, which
    cost about a third of a publish. Set the properties, then ``freeze()``."""

    _frozen: bytes | None

    def __init__(self) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_frozen", None)

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", super().pack())  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        frozen: bytes | None = self._frozen
        return frozen if frozen is not None else super().pack()  # type: ignore[no-untyped-call]


def _as_summary(summary: SessionSummary | Mapping[str, Any]) -> SessionSummary:
    if isinstance(summary, SessionSummary):
        return summary
    return SessionSummary.model_validate(summary)


def _drop_frames(error: BaseException) -> None:
    """Clear the locals of a failed connect's traceback: a TLS handshake failure leaves the
    half-open SSL socket referenced only from there, closed at once when released."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _label(value: object) -> str | None:
    """A zone or session id as text: enums by value (``Zone.NECK`` -> ``neck``), ids by str."""
    if value is None or isinstance(value, str):
        return value
    return str(getattr(value, "value", value))


def _interlock_names(interlocks: int | Iterable[str]) -> list[str]:
    if isinstance(interlocks, int):
        return interlock_names(interlocks)
    return [str(name) for name in interlocks]


def _fault_names(faults: int | Iterable[str]) -> list[str]:
    if isinstance(faults, IntFlag | int):
        return [name.upper() for name in fault_names(int(faults))]  # the contract's spelling
    return [str(name) for name in faults]
