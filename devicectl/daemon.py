"""The daemon: the shell around the treatment core — it owns the tasks and the I/O, no state.

Data flow (README, "Architecture")::

    transport bytes ─▶ DeviceLink (codec, SEQ, retries) ─▶ Daemon._on_event ─▶ TreatmentCore
                                                             │ (SafetySupervisor's verdict)
                                                             │ STOP: link.stop_now() FIRST
                                                             ├─▶ SessionLog.record_pulse (queue)
                                                             └─▶ TelemetrySink.offer_pulse (queue)
    control socket ─▶ Daemon.handle ─▶ TreatmentCore.begin ─▶ effects ─▶ link / log / telemetry

Every fact of the treatment (armed, the parameters the device acknowledged, the zone, the limits
in force, the latch, the dose ledger) lives in :class:`~devicectl.core.TreatmentCore`. The daemon
feeds it device events in wire order (synchronously, inside the transport's receive callback) and
operator requests one at a time (a lock queues them; the core refuses any overlap by its own
state), and carries out the effects it returns in order — a STOP always first. For a PULSE the
core's answer is a few flags, not a list: write STOP, carry out follow-up effects, record the
pulse. Nothing in that path awaits, logs or validates.

Shut-down (SIGTERM/SIGINT): STOP, then DISARM, record it (a session left open is marked interrupted
at the next start), flush the log and the outbox, publish ``offline``, exit 0 — within 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import structlog
from structlog.typing import FilteringBoundLogger

from devicectl import __version__
from devicectl.config import Settings
from devicectl.control import (
    ArmRequest,
    ControlError,
    ControlServer,
    ControlThread,
    DaemonLoop,
    DisarmRequest,
    FaultAckRequest,
    ParamsSetRequest,
    SessionEndRequest,
    SessionNoteRequest,
    SessionStartRequest,
    SessionZoneRequest,
    StatusRequest,
    StopRequest,
)
from devicectl.core import (
    ACK_COMMAND,
    PULSE_FOLLOW,
    PULSE_RECORD,
    PULSE_STOP,
    STOP,
    AckFault,
    Alert,
    ArmLaser,
    ChangeZone,
    CloseSession,
    DisarmLaser,
    Effect,
    EndSession,
    Heartbeats,
    Ledger,
    LogLine,
    OpenSession,
    PublishSession,
    PublishState,
    Reconcile,
    RecordEvent,
    RecordGap,
    RecordParams,
    RecordZone,
    Refuse,
    Refused,
    Reply,
    Request,
    Send,
    SessionEvent,
    SetParams,
    StartSession,
    TreatmentCore,
    params_dict,
)
from devicectl.errors import ConfigError, DevicectlError, LinkError, LogUnavailable
from devicectl.link import DeviceLink
from devicectl.logs import redact_url
from devicectl.policy import Concern, Policy, PulseParams, SkinType, Zone, load_policy_with_source
from devicectl.privacy import published_patient
from devicectl.realtime import scheduling
from devicectl.recorder.course_lookup import (
    NO_BROKER,
    NOT_ASKED,
    WORKER_NOT_RUNNING,
    CourseLookup,
    merge_warnings,
)
from devicectl.safety import Breach, BreachCode, SafetySupervisor, check_params
from devicectl.sessionlog import LimitsInForce, SessionLog
from devicectl.sessionlog.checkpoint import Checkpoint
from devicectl.sessionlog.keys import key_source
from devicectl.sessionlog.model import Override, Provenance, Summary, check_patient_ref
from devicectl.systemd import SystemdNotifier
from devicectl.users import Actor, Authenticator, AuthRefused, UserStore
from drivers import TransportFactory, open_serial
from protocols import (
    Boot,
    DeviceState,
    Disarm,
    FaultEvent,
    Ident,
    InputEvent,
    Message,
    MessageType,
    Pulse,
    StatusEvent,
    StatusReport,
    fault_names,
    interlock_names,
)
from protocols.mqtt import SessionEventKind, Severity

if TYPE_CHECKING:
    from devicectl.telemetry.commands import RefusedBurst
    from devicectl.telemetry.config import TelemetryConfig
    from devicectl.telemetry.process import TelemetryProcess

__all__ = ["Daemon", "DeviceSource", "SerialDevice", "TelemetrySink", "run_daemon"]

SHUTDOWN_BUDGET_S = 1.8  # SIGTERM to exit 0 within 2 s, all included
_BACKLOG_MAX = 10_000  # bounded; start-up raises a handful
_AUTH_AUDIT_BURST = 20  # refused identities recorded at once, then ...
_AUTH_AUDIT_PER_S = 2.0  # ... this many a second
_STOP_AUDIT_WINDOW_S = 1.0  # live MQTT stops: at most one audit record per window, with a count


class TelemetrySink(Protocol):
    """What the daemon hands to telemetry (:class:`devicectl.telemetry.Telemetry`)."""

    @property
    def config(self) -> TelemetryConfig: ...

    def offer_pulse(
        self, pulse_no: int, t_us: int, energy_uj: int, zone: str | None, session: str | None
    ) -> None: ...

    def publish_state(
        self,
        *,
        state: str | DeviceState,
        interlocks: int = 0,
        faults: int = 0,
        params: Mapping[str, int] | None = None,
        armed: bool = False,
        session: str | None = None,
    ) -> None: ...

    def publish_session(self, summary: Mapping[str, Any] | None) -> None: ...

    def refresh_session(self, summary: Mapping[str, Any]) -> None: ...

    def publish_session_event(
        self, session_id: str, kind: SessionEventKind, **fields: Any
    ) -> None: ...

    def publish_alert(
        self,
        severity: Severity,
        code: str,
        message: str,
        value: float | None = None,
        limit: float | None = None,
        session: str | None = None,
    ) -> None: ...

    def publish_checkpoint(self, checkpoint: Mapping[str, Any]) -> None: ...

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
    ) -> None: ...


class DeviceSource(Protocol):
    """Where the device link's bytes come from: a serial port, or (composed elsewhere, see
    :mod:`devicectl.simlink`) the in-process simulator."""

    control_path: Path | None  # a simulator's control socket, when there is one

    async def open(
        self, stack: contextlib.AsyncExitStack, settings: Settings, log: FilteringBoundLogger
    ) -> tuple[TransportFactory, str]: ...

    def tick(self) -> None: ...


class SerialDevice:
    """The device on ``settings.port`` (a serial port or a pty), at ``settings.baudrate``."""

    control_path: Path | None = None

    async def open(
        self, stack: contextlib.AsyncExitStack, settings: Settings, log: FilteringBoundLogger
    ) -> tuple[TransportFactory, str]:
        if settings.port == "sim":
            raise ConfigError(
                "port", "sim", "the in-process simulator is wired in by `devicectl run`"
            )
        return functools.partial(open_serial, settings.port, baudrate=settings.baudrate), (
            settings.port
        )

    def tick(self) -> None:
        return None


class Daemon:
    """``async with Daemon(settings, device=...) as daemon: await daemon.wait_stopped()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        device: DeviceSource | None = None,
        log: FilteringBoundLogger | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.device: DeviceSource = device or SerialDevice()
        self._log: FilteringBoundLogger = log or structlog.get_logger("devicectl.daemon")
        self._notifier = notifier or SystemdNotifier()
        self.data_dir = Path(settings.data_dir)
        self.policy: Policy
        self.policy, self.policy_source = load_policy_with_source(settings.policy)
        self.core = TreatmentCore(self.policy)
        # A registered user's role, by user id (fixed at registration): the records carry it.
        self._roles: dict[str, str] = {}
        self._stack = contextlib.AsyncExitStack()
        self._stopped = asyncio.Event()
        self._failure: str | None = None  # why it stopped of its own accord
        self._identified = asyncio.Event()
        self._telemetry_release = asyncio.Event()
        self._turn = asyncio.Lock()  # operator requests, one at a time, in arrival order

        self.sessionlog: SessionLog | None = None
        self.telemetry: TelemetrySink | None = None
        self._worker: TelemetryProcess | None = None  # the same, as the worker process it is
        self.link: DeviceLink | None = None
        self._log_failure_reported = False
        # Alerts and session events raised before telemetry could start (it needs the device's
        # serial for its topics): handed over, in order, the moment it does.
        self._telemetry_backlog: list[Callable[[TelemetrySink], None]] = []
        self._pulses_since_metrics = 0
        self._energy_since_metrics = 0
        self._now_ns = 0  # the time the request in progress began
        self._auth_audit = (float(_AUTH_AUDIT_BURST), 0.0)  # refused identities: tokens, when
        self._auth_held_back = 0
        self._stop_audited_at = -_STOP_AUDIT_WINDOW_S  # live MQTT stops: audited once a second
        self._stops_held = 0
        self._stop_audit: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ views of the core

    @property
    def armed(self) -> bool:
        return self.core.armed

    @property
    def supervisor(self) -> SafetySupervisor | None:
        return self.core.supervisor

    @property
    def ident(self) -> Ident | None:
        return self.core.ident

    @property
    def status(self) -> StatusReport | None:
        return self.core.status

    @property
    def treatment(self) -> Ledger | None:
        """The open session's ledger (``.id``, ``.pulses``, ...), or None."""
        return self.core.ledger

    @property
    def sim_control(self) -> Path | None:
        return self.device.control_path

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        settings = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stack = self._stack
        loop = asyncio.get_running_loop()
        # Entered in the reverse of the shut-down order (the stack unwinds LIFO): tasks stop, the
        # control socket closes, the laser is made safe, the link closes, telemetry flushes and
        # says offline, the log is flushed and closed, the device source (a simulator) stops.
        connect, port_name = await self.device.open(stack, settings, self._log)

        checkpoints = settings.checkpoints
        self.sessionlog = SessionLog.open(
            settings.session_log_path,
            log=self._log,
            patient_ref_pattern=settings.patient_ref_pattern,
            on_unavailable=lambda exc: self._log_failed_threadsafe(loop, exc),
            signing_key=key_source(checkpoints.key_file, self.data_dir, os.environ),
            on_checkpoint=lambda cp: loop.call_soon_threadsafe(self._on_checkpoint, cp),
            checkpoint_every=checkpoints.every_records,
            checkpoint_interval_s=checkpoints.interval_s,
            idle_checkpoint_interval_s=checkpoints.idle_interval_s,
            commit_interval_s=settings.log_commit_interval_ms / 1000,
        )
        stack.callback(self.sessionlog.close)
        self._restore_latch(self.sessionlog.unacknowledged_breach)

        if settings.mqtt.url:
            telemetry_tasks = await stack.enter_async_context(asyncio.TaskGroup())
            telemetry_tasks.create_task(self._run_telemetry(), name="daemon-telemetry")
            stack.callback(self._telemetry_release.set)

        self.link = await stack.enter_async_context(
            DeviceLink(
                connect,
                port=port_name,
                on_event=self._on_event,
                on_pulse=self._on_pulse,
                on_chunk_end=self._on_chunk_end,
                on_reply=self._on_reply,
                on_link_lost=self._on_link_lost,
                on_connected=self._on_connected,
                status_period_ms=settings.status_period_ms,
                log=self._log,
            )
        )
        stack.push_async_callback(self._make_safe)

        def control_server(daemon_loop: DaemonLoop) -> ControlServer:
            """Built on the control thread: only validated requests (and the audit of a
            refused identity) come to this loop."""
            authenticator = Authenticator(
                UserStore.in_data_dir(self.data_dir),
                on_refused=daemon_loop.call(self._auth_refused),
                log=self._log,
            )
            return ControlServer(
                Path(settings.control),
                daemon_loop.handler(self.handle),
                group=settings.control_group,
                authenticator=authenticator,
                log=self._log,
                received=lambda: self.core.stops,
            )

        await stack.enter_async_context(
            ControlThread(control_server, on_died=self._fail, log=self._log)
        )
        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        own = [tasks.create_task(self._periodic(), name="daemon-periodic")]
        if self._notifier.watchdog_interval_s:
            own.append(tasks.create_task(self._watchdog(), name="daemon-watchdog"))
        stack.callback(lambda: [task.cancel() for task in own])
        self._log.info(
            "daemon_started",
            version=__version__,
            port=port_name,
            control=str(settings.control),
            data_dir=str(self.data_dir),
            mqtt=redact_url(settings.mqtt.url) if settings.mqtt.url else None,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._notifier.stopping()
        self._stopped.set()
        try:
            async with asyncio.timeout(SHUTDOWN_BUDGET_S):
                await self._stack.aclose()
        except TimeoutError:
            self._log.error("shutdown_over_budget", budget_s=SHUTDOWN_BUDGET_S)

    def request_stop(self) -> None:
        self._stopped.set()

    @property
    def failure(self) -> str | None:
        """Why the daemon stopped of its own accord (its exit is then a failure), or None."""
        return self._failure

    def _fail(self, cause: str) -> None:
        """Something the daemon cannot run without has gone: stop (the laser made safe on the
        way out) and exit with an error, so that the service manager restarts it."""
        if self._failure is None:
            self._failure = cause
            self._log.error("daemon_failed", cause=cause)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _make_safe(self) -> None:
        """Shut-down, first step: STOP, then DISARM; record it; flush the log."""
        link = self.link
        assert link is not None
        if link.connected.is_set():
            link.stop_now()
            with contextlib.suppress(DevicectlError, TimeoutError):
                async with asyncio.timeout(0.3):
                    await link.stop()
            with contextlib.suppress(DevicectlError, TimeoutError):
                async with asyncio.timeout(0.2):
                    await link.request(Disarm())
        if self._stop_audit is not None:  # live MQTT stops held for their audit record
            self._stop_audit.cancel()
            self._audit_held_stops()
        self._carry_out(self.core.on_shutdown())
        if self.sessionlog is not None:  # flushed, and signed: published before "offline"
            with contextlib.suppress(DevicectlError, TimeoutError):
                await asyncio.wait_for(self.sessionlog.checkpoint_async("shutdown"), 0.3)

    async def _run_telemetry(self) -> None:
        """Telemetry needs the device id for its topics: start once it is known, run until the
        daemon lets go of it (after the laser was made safe), then flush and say offline."""
        from devicectl.telemetry.config import TelemetryConfig
        from devicectl.telemetry.process import TelemetryProcess

        mqtt = self.settings.mqtt
        device = mqtt.device
        if device is None:
            await self._identified.wait()
            assert self.core.ident is not None
            device = f"{self.core.ident.serial:08X}"
        config = TelemetryConfig(
            url=mqtt.url or "",
            prefix=mqtt.prefix,
            site=mqtt.site,
            device=device,
            data_dir=self.data_dir,
            ca_file=mqtt.ca_file,
            cert_file=mqtt.cert_file,
            key_file=mqtt.key_file,
            username=mqtt.username,
            password=mqtt.password,
            outbox_max_bytes=mqtt.outbox_max_bytes,
            protocol=mqtt.protocol,
            flush_timeout_s=0.6,
        )
        # In a process of its own: nothing MQTT does (a flood of commands, a replay, TLS) takes
        # this process's time, which is the safety loop's (devicectl/realtime.py).
        async with TelemetryProcess(
            config,
            on_stop=self._remote_stop,
            on_refused_command=self._remote_refused,
            on_ignored_command=self._remote_ignored,
            on_restart=self._telemetry_restarted,
            log=self._log,
            log_level=self.settings.log_level,
        ) as telemetry:
            self.telemetry = self._worker = telemetry
            self._publish_state()
            backlog, self._telemetry_backlog = self._telemetry_backlog, []
            for call in backlog:
                self._telemetry(call)
            telemetry.publish_session(self._session_summary())
            await self._telemetry_release.wait()
            self._publish_state()
        self.telemetry = self._worker = None

    def _telemetry_restarted(self) -> None:
        """A new telemetry worker: its retained state and session afresh (alerts and events not
        taken by the last one were sent to it again)."""
        self._publish_state()
        self._publish_session()

    async def _watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        assert interval is not None
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ device events (hot)

    def _on_pulse(self, _seq: int, pulse_no: int, t_us: int, energy_uj: int) -> None:
        """The link's PULSE fast path: plain ints, in wire order, STOP written before returning."""
        core = self.core
        flags = core.on_pulse(pulse_no, t_us, energy_uj)
        if flags & PULSE_STOP:
            self.link.stop_now()  # type: ignore[union-attr]
        if flags & PULSE_FOLLOW:
            self._carry_out(core.take_effects())
        self._pulses_since_metrics += 1
        self._energy_since_metrics += energy_uj
        if flags & PULSE_RECORD:
            self._record_pulse(pulse_no, t_us, energy_uj)

    def _on_chunk_end(self) -> None:
        """A received chunk is handed over: its pulses go to the log's writer in one piece."""
        if self.sessionlog is not None:
            self.sessionlog.release_pulses()

    def _on_event(self, seq: int, message: Message) -> None:
        kind = type(message)
        if kind is Pulse:  # only from a link without the fast path
            pulse: Pulse = message  # type: ignore[assignment]
            self._on_pulse(seq, pulse.pulse_no, pulse.t_us, pulse.energy_uj)
            self._on_chunk_end()
            return
        core = self.core
        if kind is StatusEvent:
            self._on_status(message)  # type: ignore[arg-type]
        elif kind is FaultEvent:
            fault: FaultEvent = message  # type: ignore[assignment]
            self._carry_out(core.on_fault(fault.code, fault.detail))
        elif kind is InputEvent:
            event: InputEvent = message  # type: ignore[assignment]
            self._carry_out(core.on_input(bool(event.footswitch), event.interlocks))
        elif kind is Boot:
            self._carry_out(core.on_boot(message.reason))  # type: ignore[attr-defined]

    def _record_pulse(self, pulse_no: int, t_us: int, energy_uj: int) -> None:
        ledger = self.core.ledger  # PULSE_RECORD: a session is open, charged to ledger.zone_key
        assert ledger is not None
        session, zone = ledger.id, ledger.zone_key
        if self.sessionlog is not None:  # handed to the writer at the chunk's end, in order
            self.sessionlog.record_pulse_held(
                session, pulse_no, t_us, time.time_ns(), energy_uj, zone
            )
        if self.telemetry is not None:
            self.telemetry.offer_pulse(pulse_no, t_us, energy_uj, zone, str(session))

    def _on_reply(self, command: int, reply: Message) -> None:
        """Every command's reply, synchronously, in wire order: the core flips "armed" and the
        limits in force exactly at the ACK."""
        self._carry_out(self.core.on_reply(command, reply.TYPE == MessageType.ACK))

    def _on_status(self, status: StatusReport) -> None:
        self._carry_out(self.core.on_status(status))
        self._check_log()
        if self.sessionlog is not None:
            self.sessionlog.record_status(
                self.core.session_id,
                state=status.state,
                interlocks=status.interlocks,
                head_temp_cdeg=status.head_temp_cdeg,
                skin_temp_cdeg=status.skin_temp_cdeg,
                pulse_count=status.pulse_count,
            )

    def _on_link_lost(self, reason: str) -> None:
        self._carry_out(self.core.on_link_lost(reason, time.time()))

    async def _on_connected(self, ident: Ident, status: StatusReport) -> None:
        if self.sessionlog is not None:  # checkpoints are signed for the id telemetry uses
            self.sessionlog.set_device(self.settings.mqtt.device or f"{ident.serial:08X}")
        self._carry_out(self.core.on_connected(ident, status, time.time()))
        self._identified.set()
        self._log.info(
            "device_connected",
            serial=f"{ident.serial:08X}",
            fw=".".join(map(str, ident.fw)),
            pulse_count=status.pulse_count,
            state=DeviceState(status.state).name,
        )

    def _restore_latch(self, record: dict[str, Any] | None) -> None:
        """The breach the log says was never acknowledged (the daemon stopped, or was killed,
        while it was latched): arming stays refused until it is."""
        if record is None:
            return
        try:
            breach = Breach.from_record(record)
        except ValueError:
            # A breach the log holds but this version cannot read: latch it as what it was.
            breach = Breach(
                BreachCode.DEVICE_FAULT, 0.0, 0.0, "", f"a breach the log holds: {record!r}"
            )
        session = record.get("session")
        self.core.restore_latch(breach, session if isinstance(session, int) else None)
        self._log.warning("breach_latch_restored", breach=breach.message, session=session)

    # ------------------------------------------------------------------ effects

    def _carry_out(self, effects: list[Effect]) -> Effect | None:
        """Carry out the core's effects in order, a STOP first of all; return the one that asks
        the caller to go on (Send, OpenSession, CloseSession) or ends a request (Reply, Refuse)."""
        if STOP in effects and self.link is not None:
            self.link.stop_now()
        log = self.sessionlog
        outcome: Effect | None = None
        for effect in effects:
            match effect:
                case RecordEvent(session, kind, actor, detail, reason):
                    if log is not None:
                        log.record_event(
                            session, kind, actor, detail, reason, role=self._roles.get(actor)
                        )
                case RecordGap(session, first, last, charged, zone, cause):
                    if log is not None:
                        log.record_pulse_gap(
                            session, first, last, charged_energy_uj=charged, zone=zone, cause=cause
                        )
                case RecordZone(session, zone, actor, limit):
                    if log is not None:
                        log.record_zone(
                            session,
                            zone,
                            actor=actor,
                            role=self._roles.get(actor),
                            energy_limit_uj=limit,
                        )
                        if self.core.chosen is not None:  # the same parameters, this zone's cap
                            self._record_params(session, self.core.chosen, actor, zone)
                case RecordParams(session, params, actor):
                    if log is not None:
                        self._record_params(session, params, actor, self.core.zone)
                case Heartbeats(lease_ms):
                    if self.link is not None:
                        if lease_ms:
                            with contextlib.suppress(LinkError):
                                self.link.start_heartbeats(lease_ms)
                        else:
                            self.link.stop_heartbeats()
                case Alert():
                    self._alert(effect)
                case SessionEvent(session, kind, fields):
                    self._session_event(session, kind, fields)
                case PublishState():
                    self._publish_state()
                case PublishSession():
                    self._publish_session()
                case LogLine("error", event, fields):
                    self._log.error(event, **fields)
                case LogLine("warning", event, fields):
                    self._log.warning(event, **fields)
                case LogLine(_, event, fields):
                    self._log.info(event, **fields)
                case Reconcile(count, max_energy):
                    self._reconcile(count, max_energy)
                case Send() | OpenSession() | CloseSession() | Reply() | Refuse():
                    outcome = effect
        return outcome

    def _reconcile(self, device_pulse_count: int, max_energy_uj: int) -> None:
        """First contact since start-up: the log accounts for pulses fired while no daemon ran."""
        log = self.sessionlog
        if log is None:
            return
        recovery = log.recover_interrupted(device_pulse_count, max_energy_uj)
        if recovery.interrupted_session is None and not recovery.unlogged_pulses:
            return
        self._log.warning(
            "session_recovered",
            session=recovery.interrupted_session,
            unlogged_pulses=recovery.unlogged_pulses,
            counter_mismatch=recovery.counter_mismatch,
        )
        message = (
            f"session {recovery.interrupted_session} was interrupted; "
            f"{recovery.unlogged_pulses} unlogged pulse(s) charged at maximum energy"
        )
        self._telemetry(
            lambda t: t.publish_alert("warning", "session_interrupted", message), backlog=True
        )
        if recovery.interrupted_session is not None and recovery.summary is not None:
            # Its subscribers saw it start: they see it end, as interrupted.
            self._session_event(
                recovery.interrupted_session,
                "ended",
                {
                    "outcome": "interrupted",
                    "unlogged_pulses": recovery.unlogged_pulses,
                    "summary": _interrupted_summary(recovery.summary),
                },
            )

    # ------------------------------------------------------------------ control requests

    async def handle(self, request: Any) -> dict[str, Any]:
        match request:
            case StatusRequest():
                return self.describe()
            case StopRequest():
                return await self.stop_emission("operator")
            case SessionStartRequest():
                return await self.start_session(request)
            case ArmRequest():
                # A STOP answered since the request was read (its PIN checked, its turn awaited)
                # refuses it: the STOP came after the arm.
                stops = self.core.stops if request.received is None else request.received
                return await self._operate(ArmLaser(self._actor(request), stops))
            case DisarmRequest():
                # Disarming needs no identity (it is always safe): without a proven one it is
                # recorded as nobody's.
                actor = request.actor
                who = self._actor(request) if actor is not None else "unidentified"
                return await self._operate(DisarmLaser(who))
            case ParamsSetRequest():
                rate = None if request.rate_hz is None else round(request.rate_hz * 1000)
                preset = Concern(request.preset) if request.preset else None
                return await self._operate(
                    SetParams(
                        self._actor(request),
                        request.energy_uj,
                        request.width_us,
                        rate,
                        request.spot_um,
                        preset,
                    )
                )
            case SessionZoneRequest():
                return await self._operate(ChangeZone(self._actor(request), Zone(request.zone)))
            case SessionEndRequest():
                return await self._end_session(request)
            case FaultAckRequest():
                return await self._operate(_ack_fault(self._actor(request), request))
            case SessionNoteRequest():
                return self.append_clinical(request)
        raise ControlError("usage", f"unknown request {request!r}")

    def _actor(self, request: Any) -> str:
        """The verified user the control layer put on ``request`` (it refuses one without);
        their role is remembered for the records."""
        actor = _verified(request)
        self._roles[actor.user] = actor.role.value
        if actor.signoff is not None:
            self._roles[actor.signoff.user] = actor.signoff.role.value
        return actor.user

    def _record_params(
        self, session: int, params: PulseParams, actor: str, zone: Zone | None
    ) -> None:
        """The parameters in force with the fluence cap they were checked against, the rule that
        set it (skin type or zone) and the preset they are, if they are one."""
        log, ident, ledger = self.sessionlog, self.core.ident, self.core.ledger
        if log is None:
            return
        fluence_limit: dict[str, Any] | None = None
        if ident is not None and ledger is not None and zone is not None:
            try:
                limits = check_params(ident, self.policy, ledger.skin_type, zone, params)
            except DevicectlError:
                limits = None  # not allowed in this zone: the core refuses to arm with them
            if limits is not None:
                fluence_limit = {
                    "fluence_j_cm2": round(limits.fluence_j_cm2, 4),
                    "max_fluence_j_cm2": limits.max_fluence_j_cm2,
                    "rule": limits.fluence_rule,
                    "skin_type": ledger.skin_type.name,
                    "zone": zone.value,
                    "preset": _preset_of(self.policy, params),
                }
        log.record_params(
            session,
            energy_uj=params.energy_uj,
            width_us=params.width_us,
            rate_mhz=params.rate_mhz,
            spot_um=params.spot_um,
            actor=actor,
            role=self._roles.get(actor),
            fluence_limit=fluence_limit,
        )

    async def start_session(self, request: SessionStartRequest) -> dict[str, Any]:
        extra: dict[str, Any] = {}

        actor = _verified(request)
        user = self._actor(request)

        def open_session(step: OpenSession) -> int:
            log = self._require_log()
            ident = self.core.ident
            assert ident is not None
            # First among the log's checks, so that a name typed by mistake is refused as such.
            check_patient_ref(request.patient_ref, self.settings.patient_ref_pattern)
            status = self.core.status
            opened = log.start_session(
                _session_info(request, ident, step.active_ingredient, actor),
                device_pulse_count=status.pulse_count if status else None,
                limits=LimitsInForce.from_policy(self.policy),
                host_time_ns=self._now_ns,
                provenance=Provenance(
                    software_version=__version__,
                    firmware_version=".".join(str(part) for part in ident.fw),
                    device_serial=f"{ident.serial:08X}",
                    policy_name=self.policy_source.name,
                    policy_sha256=self.policy_source.sha256,
                    time_zone=self.settings.clinic.time_zone,
                ),
            )
            log.record_event(opened.session_id, "course_source", user, course.record())
            position = opened.position
            extra["course"] = position.to_dict() if position is not None else None
            extra["warnings"] = merge_warnings(opened.warnings, course)
            extra["course_source"] = course.source
            extra["active_ingredient"] = step.active_ingredient
            extra["preset"] = request.preset
            return opened.session_id

        privacy = self.settings.privacy
        secret = privacy.patient_key_secret
        # what leaves the device: a keyed pseudonym, nothing, or (configured) the reference
        patient = published_patient(
            request.patient_ref,
            secret=secret.get_secret_value() if secret is not None else None,
            publish_ref=privacy.publish_patient_ref,
        )
        # The course across the fleet, from the recorder (1 s at most, asked before the request
        # takes its turn; an unreachable recorder never blocks a treatment: the log's own then).
        # The telemetry worker runs the MQTT exchange; this loop only waits for its small answer.
        mqtt = self.settings.mqtt
        if not mqtt.course_from_recorder:
            course = CourseLookup("local", NOT_ASKED)
        elif self._worker is not None:
            course = await self._worker.ask_course(patient, request.course_planned)
        else:  # no broker, or its worker not started yet (the device unidentified) or any more
            course = CourseLookup("local", WORKER_NOT_RUNNING if mqtt.url else NO_BROKER)
        start = StartSession(
            user,
            patient,
            SkinType.parse(request.skin_type),
            Concern(request.preset) if request.preset else None,
            request.ingredient.name,
            tuple(request.concerns),
        )
        result = await self._operate(start, open_session=open_session)
        return result | extra

    async def _operate(
        self, request: Request, *, open_session: Callable[[OpenSession], int] | None = None
    ) -> dict[str, Any]:
        """One operator request, start to reply, while no other runs: the core decides, this
        carries out (commands to the device, the log's open and close) and reports back."""
        core = self.core
        async with self._turn:
            self._require_log()  # no log, no laser: never report what the log could not record
            self._now_ns = time.time_ns()
            outcome = self._carry_out(core.begin(request, self._now_ns))
            try:
                while True:
                    match outcome:
                        case Reply(result):
                            return dict(result)
                        case Refuse(error):
                            if isinstance(error, Refused):
                                raise ControlError(error.kind, str(error), rule=error.rule)
                            raise error
                        case Send(command):
                            failure: DevicectlError | None = None
                            try:
                                await self._link().request(command)
                            except DevicectlError as exc:
                                failure = exc
                            outcome = self._carry_out(
                                core.settled(command.TYPE, failure, time.time_ns())
                            )
                        case OpenSession():
                            assert open_session is not None
                            try:
                                session_id = open_session(outcome)
                            except DevicectlError as exc:
                                outcome = self._carry_out(core.abandon(exc))
                            else:
                                outcome = self._carry_out(
                                    core.session_opened(session_id, self._now_ns)
                                )
                        case CloseSession(session, actor, post_care, declined):
                            now = time.time_ns()
                            try:
                                self._require_log().end_session(
                                    session,
                                    actor=actor,
                                    role=self._roles.get(actor),
                                    post_care=list(post_care),
                                    post_care_declined=declined,
                                    host_time_ns=now,
                                )
                            except DevicectlError as exc:
                                outcome = self._carry_out(core.abandon(exc))
                            else:
                                outcome = await self._session_closed(now)
                        case _:
                            raise AssertionError(f"a request ended without a reply: {outcome!r}")
            finally:
                if core.busy is not None:  # cancelled mid-request: the core must not stay busy
                    self._carry_out(core.abandon(LinkError("the request was cancelled")))

    async def _end_session(self, request: SessionEndRequest) -> dict[str, Any]:
        end = EndSession(self._actor(request), tuple(request.post_care), request.post_care_declined)
        return await self._operate(end)

    async def _session_closed(self, now_ns: int) -> Effect | None:
        """The core closes its ledger; the ``ended`` event waits for the signed checkpoint that
        covers the session (one commit away), so that it carries it (docs/session-log.md)."""
        effects = self.core.session_closed(now_ns)
        ended = [e for e in effects if isinstance(e, SessionEvent) and e.kind == "ended"]
        outcome = self._carry_out([e for e in effects if not any(e is x for x in ended)])
        checkpoint: Checkpoint | None = None
        log = self.sessionlog
        if log is not None:
            with contextlib.suppress(DevicectlError, TimeoutError):  # the end is recorded
                checkpoint = await asyncio.wait_for(log.checkpoint_async("session_end"), 1.0)
        wire = None if checkpoint is None else checkpoint.wire()
        self._carry_out(
            [SessionEvent(e.session, e.kind, {**e.fields, "checkpoint": wire}) for e in ended]
        )
        return outcome

    def _on_checkpoint(self, checkpoint: Checkpoint) -> None:
        """A signed checkpoint was committed (handed over from the log's writer thread)."""
        wire = checkpoint.wire()
        self._telemetry(lambda t: t.publish_checkpoint(wire), backlog=True)

    def append_clinical(self, request: SessionNoteRequest) -> dict[str, Any]:
        """A note, the immediate reaction or an adverse event: appended to the open session, or
        to ``request.session`` (ended), as a record of its own; nothing is ever edited."""
        actor = _verified(request)
        log = self._require_log()
        session = request.session
        if session is None:
            session = self.core.session_id
            if session is None:
                raise ControlError("usage", "no session is open: name one with --session ID")
        kind = request.command.removeprefix("session_")
        entry = request.model_dump(
            exclude={"command", "session", "auth", "actor", "received"}, exclude_none=True
        )
        log.record_clinical(session, kind, actor=actor.user, role=actor.role, entry=entry)
        return {"session": session, "recorded": kind, "by": actor.user}

    def _auth_refused(self, user: str | None, command: str, exc: AuthRefused) -> None:
        """A request whose identity did not hold: audited (never the PIN), at most
        :data:`_AUTH_AUDIT_BURST` at once and :data:`_AUTH_AUDIT_PER_S` a second after that, so
        that a local flood cannot fill the disk (no log, no laser); those held back are counted
        on the next one recorded."""
        now = time.monotonic()
        tokens, at = self._auth_audit
        tokens = min(float(_AUTH_AUDIT_BURST), tokens + (now - at) * _AUTH_AUDIT_PER_S)
        if tokens < 1.0:
            self._auth_audit = (tokens, now)
            self._auth_held_back += 1
            return
        self._auth_audit = (tokens - 1.0, now)
        detail: dict[str, Any] = {"command": command, "rule": exc.rule}
        if self._auth_held_back:
            detail["held_back_before"], self._auth_held_back = self._auth_held_back, 0
        self._carry_out([RecordEvent(
            self.core.session_id, "auth_refused", user or "unidentified", detail,
        )])  # fmt: skip

    def _link(self) -> DeviceLink:
        link = self.link
        if link is None or not link.connected.is_set():
            raise LinkError(f"the device on {self.settings.port} is not connected")
        return link

    def _require_log(self) -> SessionLog:
        log = self.sessionlog
        assert log is not None
        log.check()  # raises LogUnavailable: no log, no laser
        return log

    async def stop_emission(self, actor: str) -> dict[str, Any]:
        """STOP now, whatever request is in progress (never queued). Not connected, or not
        acknowledged in 1 s: the STOP stays wanted (re-sent until acknowledged, first thing
        after IDENT on a reconnection) and the caller is told the truth: it cannot be confirmed
        (exit 3), never "stopped"."""
        link = self.link
        assert link is not None
        link.stop_now()
        self.core.on_stop_requested()
        self._carry_out([RecordEvent(self.core.session_id, "stop", actor, {})])
        port = self.settings.port
        if not link.connected.is_set():
            raise LinkError(
                f"the device on {port} is not connected: STOP is sent first thing when it "
                "reconnects; if it is emitting, use the emergency stop"
            )
        try:
            await asyncio.wait_for(link.stop(), 1.0)
        except (TimeoutError, LinkError) as exc:
            raise LinkError(
                f"the device on {port} did not acknowledge STOP within 1 s ({exc or 'timeout'}); "
                "it is re-sent until acknowledged; if it is emitting, use the emergency stop"
            ) from exc
        return {"stopped": True, "state": self._state_name()}

    def _remote_stop(self, count: int = 1) -> None:
        """``count`` live ``cmd/stop`` over MQTT (the worker hands over a burst as one): stopping
        is always safe, so it needs no authority here. Not connected: it goes out first thing
        after IDENT on the reconnection. Every one is obeyed; the audit is one record per second
        at most, with the count, so a flood of stops cannot fill the log."""
        if self.link is not None:
            self.link.stop_now()
        self.core.on_stop_requested()
        now = time.monotonic()
        if self._stop_audit is None and now - self._stop_audited_at >= _STOP_AUDIT_WINDOW_S:
            self._stop_audited_at = now
            detail = {"count": count} if count > 1 else {}
            self._carry_out([RecordEvent(self.core.session_id, "stop", "mqtt", detail)])
            return
        self._stops_held += count
        if self._stop_audit is None:
            self._stop_audit = asyncio.get_running_loop().call_later(
                max(0.0, self._stop_audited_at + _STOP_AUDIT_WINDOW_S - now),
                self._audit_held_stops,
            )

    def _audit_held_stops(self) -> None:
        self._stop_audit = None
        held, self._stops_held = self._stops_held, 0
        self._stop_audited_at = time.monotonic()
        self._carry_out([RecordEvent(self.core.session_id, "stop", "mqtt", {"count": held})])

    def _remote_refused(self, burst: RefusedBurst) -> None:
        """A burst of ``cmd/*`` but stop: refused (telemetry raises the alert), audited here, one
        record per burst with its count."""
        self._carry_out([RecordEvent(
            self.core.session_id, "remote_command_refused", "mqtt", burst.audit_detail()
        )])  # fmt: skip

    def _remote_ignored(self, command: str, payload: bytes) -> None:
        """A retained ``cmd/stop`` found at subscription: stale, not obeyed, audited all the
        same."""
        self._carry_out([RecordEvent(
            self.core.session_id, "remote_command_ignored", "mqtt",
            {"command": command, "bytes": len(payload), "why": "retained: not a live request"},
        )])  # fmt: skip

    def _log_failed_threadsafe(self, loop: asyncio.AbstractEventLoop, exc: LogUnavailable) -> None:
        """Called from the log's writer thread."""
        loop.call_soon_threadsafe(self._log_failed, exc)

    def _check_log(self) -> None:
        """No log, no laser, for a commit that hangs as well (a stalled disk raises nothing for
        a long time): polled at every STATUS, so a stall stops emission within the log's
        stall timeout and one status period. Reported once per episode."""
        log = self.sessionlog
        if log is None:
            return
        failure = log.failure
        if failure is None:
            self._log_failure_reported = False
        else:
            self._log_failed(failure)  # which reports once

    def _log_failed(self, exc: LogUnavailable) -> None:
        """No log, no laser: stop emission the moment the log cannot be written."""
        if self._log_failure_reported:
            return
        self._log_failure_reported = True
        self.core.on_stop_requested()  # an arm whose ARM is not sent yet does not send it
        if self.link is not None and (self.core.armed or self.core.arming):
            self.link.stop_now()
        session = self.core.session_id
        sid = None if session is None else str(session)
        self._telemetry(
            lambda t: t.publish_alert("critical", "log_unavailable", str(exc), session=sid),
            backlog=True,
        )
        self._log.error("session_log_unavailable", error=str(exc))

    # ------------------------------------------------------------------ reporting

    def _state_name(self) -> str:
        status = self.core.status
        if status is None:
            return "unknown"
        return DeviceState(status.state).name.lower()

    def describe(self) -> dict[str, Any]:
        core = self.core
        status = core.status
        link = self.link
        ledger = core.ledger
        latched = core.latched
        device_fault = core.device_fault
        return {
            "version": __version__,
            "connected": bool(link and link.connected.is_set()),
            "port": self.settings.port,
            "device_serial": f"{core.ident.serial:08X}" if core.ident else None,
            "state": self._state_name(),
            "armed": core.armed,
            "interlocks_open": interlock_names(status.interlocks) if status else [],
            "faults": fault_names(status.faults) if status else [],
            "pulse_count": status.pulse_count if status else None,
            "head_temp_c": status.head_temp_cdeg / 100 if status else None,
            "skin_temp_c": status.skin_temp_cdeg / 100 if status else None,
            "footswitch": core.footswitch,
            "params": params_dict(core.chosen) if core.chosen else None,
            "params_acknowledged": params_dict(core.acked) if core.acked else None,
            "session": ledger.id if ledger else None,
            "zone": core.zone.value if core.zone else None,
            "session_pulses": ledger.pulses if ledger else 0,
            "energy_by_zone_uj": dict(ledger.energy_by_zone_uj) if ledger else {},
            "breach_latched": (
                latched.as_dict() | {"session": core.latch_session, "clears_with": ACK_COMMAND}
                if latched
                else None
            ),
            "device_fault_latched": (
                {"faults": fault_names(device_fault), "clears_with": ACK_COMMAND}
                if device_fault
                else None
            ),
            "request_in_progress": core.busy,
            "log_ok": bool(self.sessionlog and self.sessionlog.healthy),
            "log_commits": self.sessionlog.commit_stats() if self.sessionlog else None,
            "sim_control": str(self.sim_control) if self.sim_control else None,
            "link": link.stats if link else {},
            "realtime": scheduling(),
            "telemetry": self._telemetry_view(),
        }

    def _telemetry_view(self) -> dict[str, Any] | None:
        """The telemetry worker, as `status` shows it (None: no broker configured)."""
        if not self.settings.mqtt.url:
            return None
        telemetry = self._worker
        if telemetry is None:
            return {"running": False}
        return {
            "running": True,
            "worker_pid": telemetry.pid,
            "restarts": telemetry.restarts,
            "connected": telemetry.connected,
            "frames_dropped": telemetry.dropped,
        }

    def _telemetry(self, call: Callable[[TelemetrySink], None], *, backlog: bool = False) -> None:
        """Hand a message to telemetry. Its failure is logged and never reaches the caller:
        the laser, the supervisor and the session log do not depend on the network. Before
        telemetry has started, alerts and session events (``backlog``) wait for it (state and
        session summaries are published afresh when it starts)."""
        telemetry = self.telemetry
        if telemetry is None:
            if backlog and self.settings.mqtt.url:
                if len(self._telemetry_backlog) < _BACKLOG_MAX:
                    self._telemetry_backlog.append(call)
                else:
                    self._log.error("telemetry_backlog_full", max=_BACKLOG_MAX)
            return
        try:
            call(telemetry)
        except Exception as exc:  # noqa: BLE001
            self._log.error("telemetry_failed", error=str(exc))

    def _alert(self, alert: Alert) -> None:
        session = None if alert.session is None else str(alert.session)
        self._telemetry(
            lambda t: t.publish_alert(
                alert.severity, alert.code, alert.message, alert.value, alert.limit, session
            ),
            backlog=True,
        )

    def _session_event(
        self, session: int, kind: SessionEventKind, fields: Mapping[str, Any]
    ) -> None:
        sid, details = str(session), dict(fields)
        self._telemetry(lambda t: t.publish_session_event(sid, kind, **details), backlog=True)

    def _publish_state(self) -> None:
        if self.telemetry is None:
            return
        core = self.core
        status = core.status
        connected = self.link is not None and self.link.connected.is_set()
        params = core.chosen
        session = core.session_id
        self._telemetry(
            lambda t: t.publish_state(
                state=DeviceState(status.state) if status and connected else "UNKNOWN",
                interlocks=status.interlocks if status else 0,
                faults=status.faults if status else 0,
                params=_wire_params(params) if params else None,
                armed=core.armed,
                session=None if session is None else str(session),
            )
        )

    async def _periodic(self) -> None:
        """1 Hz: metrics and the session summary (the state is published on every change)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            elapsed, last = now - last, now
            pulses, energy = self._pulses_since_metrics, self._energy_since_metrics
            self._pulses_since_metrics = self._energy_since_metrics = 0
            try:
                self.device.tick()
            except OSError as exc:
                self._log.warning("simulator_memory_not_saved", error=str(exc))
            if self.telemetry is None:
                continue
            self._publish_metrics(pulses / elapsed, energy / 1e6 / elapsed)

    def _publish_metrics(self, rate_hz: float, avg_power_w: float) -> None:
        status = self.core.status
        counters = self.link.stats if self.link else {}
        commits = self.sessionlog.commit_stats() if self.sessionlog else {}
        self._telemetry(
            lambda t: t.publish_metrics(
                rate_hz=rate_hz,
                avg_power_w=avg_power_w,
                skin_temp_c=status.skin_temp_cdeg / 100 if status else None,
                head_temp_c=status.head_temp_cdeg / 100 if status else None,
                counters=counters,
                log_commits_per_s=commits.get("commits_per_s"),
                log_commit_p99_ms=commits.get("commit_delay_p99_ms"),
                log_fsyncs_per_s=commits.get("fsyncs_per_s"),
            )
        )
        summary = self._session_summary()
        if summary is not None:
            self._telemetry(lambda t: t.refresh_session(summary))

    def _publish_session(self) -> None:
        summary = self._session_summary()
        self._telemetry(lambda t: t.publish_session(summary))

    def _session_summary(self) -> dict[str, Any] | None:
        """The live ``session`` topic: the core's ledger, in the MQTT contract's shape."""
        core = self.core
        return core.contract_summary(time.time_ns())


def _verified(request: Any) -> Actor:
    """The verified actor the control layer put on ``request`` (it refuses one without)."""
    actor = request.actor
    if actor is None:
        raise AuthRefused("auth.required", f"{request.command} needs an identified user")
    assert isinstance(actor, Actor)
    return actor


def _ack_fault(user: str, request: FaultAckRequest) -> AckFault:
    """A breach acknowledgement: only with a supervisor's sign-off (the control layer checked it;
    checked again here, where it is acted on)."""
    signoff = _verified(request).signoff
    if signoff is None or signoff.role != "supervisor":
        raise AuthRefused("signoff.required", "a breach acknowledgement needs a supervisor")
    return AckFault(
        user,
        signoff.reason,
        {
            "signed_off_by": signoff.user,
            "signed_off_role": signoff.role.value,
            "reason_code": signoff.reason_code,
        },
    )


def _preset_of(policy: Policy, params: PulseParams) -> str | None:
    """The policy preset these parameters are exactly, if any (else they are the operator's)."""
    for concern, preset in policy.presets.items():
        if preset.params() == params:
            return concern.value
    return None


def _session_info(
    request: SessionStartRequest, ident: Ident, ingredient: str, actor: Actor
) -> dict[str, Any]:
    """The session log's record of a session start (the checklist was given in full)."""
    answers = request.checklist
    numbing = request.numbing if answers.numbing_applied else None
    info: dict[str, Any] = {
        "device_serial": f"{ident.serial:08X}",
        "operator": actor.user,
        "operator_role": actor.role.value,
        "patient_ref": request.patient_ref,
        "skin_type": request.skin_type,
        "concerns": list(request.concerns),
        "course": {
            "course_id": request.course_id or request.patient_ref,
            "session_number": request.course_session,
            "planned_sessions": request.course_planned,
        },
        "checklist": {
            "consultation_done": answers.consultation_done,
            "consent_given": answers.consent_given,
            "area_cleaned": answers.area_cleaned,
            "numbing_applied": answers.numbing_applied,
            "numbing_agent": numbing.agent if numbing else None,
            "numbing_contact_min": numbing.contact_min if numbing else None,
            "contraindications": {
                "recent_sun_exposure_or_tan": answers.recent_sun_exposure,
                "photosensitising_medication": answers.photosensitising_medication,
                "active_skin_infection_or_inflammation": answers.active_skin_infection,
                "pregnancy": answers.pregnancy,
                "allergy_to_active_ingredient": answers.allergy_to_active_ingredient,
            },
        },
        "active_ingredient": ingredient,
        "ingredient_amount": request.ingredient.amount,
        "ingredient_unit": request.ingredient.unit,
        "ingredient_lot": request.ingredient.lot,
    }
    if actor.signoff is not None:
        info["override"] = Override(
            signed_off_by=actor.signoff.user,
            role=actor.signoff.role.value,
            reason_code=actor.signoff.reason_code,
            reason=actor.signoff.reason,
        ).model_dump()
    return info


def _interrupted_summary(summary: Summary) -> dict[str, Any]:
    """A session a restart closed as interrupted, in the MQTT contract's shape (the log's
    summary: no operator, patient, skin type or zone survive the restart)."""
    by_zone = {str(zone): int(uj) for zone, uj in summary.energy_per_zone_uj.items()}
    return {
        "session": str(summary.session_id),
        "started": datetime.fromtimestamp(summary.started_ns / 1e9, UTC),
        "ended": datetime.fromtimestamp(summary.ended_ns / 1e9, UTC),
        "pulses": summary.pulses,
        "energy_uj": sum(by_zone.values()),
        "energy_uj_by_zone": by_zone,
        "peak_fluence_j_cm2": summary.peak_fluence_j_cm2,
        "duration_s": summary.duration_s,
        "faults": summary.faults,
    }


def _wire_params(params: PulseParams) -> dict[str, int]:
    return {
        "energy_uj": params.energy_uj,
        "width_us": params.width_us,
        "rate_mhz": params.rate_mhz,
        "spot_um": params.spot_um,
    }


async def run_daemon(
    settings: Settings,
    *,
    device: DeviceSource | None = None,
    ready: Callable[[Daemon], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop, 1 when the daemon stopped of its own
    accord (:attr:`Daemon.failure`, logged as ``daemon_failed``)."""
    loop = asyncio.get_running_loop()
    notifier = SystemdNotifier()
    async with Daemon(settings, device=device, notifier=notifier) as daemon:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        notifier.ready(f"supervising {settings.port}")
        if ready is not None:
            ready(daemon)
        await daemon.wait_stopped()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    os.environ.pop("NOTIFY_SOCKET", None)
    return 0 if daemon.failure is None else 1
