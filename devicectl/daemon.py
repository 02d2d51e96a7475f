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
from typing import Any, Protocol, Self

import structlog
from structlog.typing import FilteringBoundLogger

from devicectl import __version__
from devicectl.config import Settings
from devicectl.control import (
    ArmRequest,
    ControlError,
    ControlServer,
    DisarmRequest,
    FaultAckRequest,
    ParamsSetRequest,
    SessionEndRequest,
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
from devicectl.policy import Concern, Policy, PulseParams, SkinType, Zone, load_policy
from devicectl.safety import Breach, BreachCode, SafetySupervisor
from devicectl.sessionlog import LimitsInForce, SessionLog
from devicectl.sessionlog.model import Summary, check_patient_ref
from devicectl.systemd import SystemdNotifier
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

__all__ = ["Daemon", "DeviceSource", "SerialDevice", "TelemetrySink", "run_daemon"]

SHUTDOWN_BUDGET_S = 1.8  # SIGTERM to exit 0 within 2 s, all included
_BACKLOG_MAX = 10_000  # bounded; start-up raises a handful


class TelemetrySink(Protocol):
    """What the daemon hands to telemetry (:class:`devicectl.telemetry.Telemetry`)."""

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

    def publish_metrics(
        self,
        *,
        rate_hz: float | None = None,
        avg_power_w: float | None = None,
        skin_temp_c: float | None = None,
        head_temp_c: float | None = None,
        counters: Mapping[str, int] | None = None,
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
        self.policy: Policy = load_policy(settings.policy)
        self.core = TreatmentCore(self.policy)
        self._stack = contextlib.AsyncExitStack()
        self._stopped = asyncio.Event()
        self._identified = asyncio.Event()
        self._telemetry_release = asyncio.Event()
        self._turn = asyncio.Lock()  # operator requests, one at a time, in arrival order

        self.sessionlog: SessionLog | None = None
        self.telemetry: TelemetrySink | None = None
        self.link: DeviceLink | None = None
        self._log_failure_reported = False
        # Alerts and session events raised before telemetry could start (it needs the device's
        # serial for its topics): handed over, in order, the moment it does.
        self._telemetry_backlog: list[Callable[[TelemetrySink], None]] = []
        self._pulses_since_metrics = 0
        self._energy_since_metrics = 0
        self._now_ns = 0  # the time the request in progress began

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

        self.sessionlog = SessionLog.open(
            settings.session_log_path,
            log=self._log,
            patient_ref_pattern=settings.patient_ref_pattern,
            on_unavailable=lambda exc: self._log_failed_threadsafe(loop, exc),
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
                on_reply=self._on_reply,
                on_link_lost=self._on_link_lost,
                on_connected=self._on_connected,
                status_period_ms=settings.status_period_ms,
                log=self._log,
            )
        )
        stack.push_async_callback(self._make_safe)

        await stack.enter_async_context(
            ControlServer(
                Path(settings.control), self.handle, group=settings.control_group, log=self._log
            )
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
        self._carry_out(self.core.on_shutdown())
        if self.sessionlog is not None:
            with contextlib.suppress(DevicectlError, TimeoutError):
                await asyncio.wait_for(self.sessionlog.flush_async(), 0.3)

    async def _run_telemetry(self) -> None:
        """Telemetry needs the device id for its topics: start once it is known, run until the
        daemon lets go of it (after the laser was made safe), then flush and say offline."""
        from devicectl.telemetry import Telemetry, TelemetryConfig

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
        async with Telemetry(
            config,
            on_stop=self._remote_stop,
            on_refused_command=self._remote_refused,
            on_ignored_command=self._remote_ignored,
            log=self._log,
        ) as telemetry:
            self.telemetry = telemetry
            self._publish_state()
            backlog, self._telemetry_backlog = self._telemetry_backlog, []
            for call in backlog:
                self._telemetry(call)
            telemetry.publish_session(self._session_summary())
            await self._telemetry_release.wait()
            self._publish_state()
        self.telemetry = None

    async def _watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        assert interval is not None
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ device events (hot)

    def _on_event(self, seq: int, message: Message) -> None:
        kind = type(message)
        core = self.core
        if kind is Pulse:
            pulse: Pulse = message  # type: ignore[assignment]
            flags = core.on_pulse(pulse.pulse_no, pulse.t_us, pulse.energy_uj)
            if flags & PULSE_STOP:
                self.link.stop_now()  # type: ignore[union-attr]
            if flags & PULSE_FOLLOW:
                self._carry_out(core.take_effects())
            self._pulses_since_metrics += 1
            self._energy_since_metrics += pulse.energy_uj
            if flags & PULSE_RECORD:
                self._record_pulse(pulse)
            return
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

    def _record_pulse(self, pulse: Pulse) -> None:
        ledger = self.core.ledger  # PULSE_RECORD: a session is open, charged to ledger.zone_key
        assert ledger is not None
        session, zone = ledger.id, ledger.zone_key
        if self.sessionlog is not None:
            self.sessionlog.record_pulse(
                session, pulse.pulse_no, pulse.t_us, time.time_ns(), pulse.energy_uj, zone
            )
        if self.telemetry is not None:
            self.telemetry.offer_pulse(
                pulse.pulse_no, pulse.t_us, pulse.energy_uj, zone, str(session)
            )

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
        self._carry_out(self.core.on_connected(ident, status, time.time()))
        self._identified.set()
        self._log.info(
            "device_connected",
            serial=ident.serial,
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
                        log.record_event(session, kind, actor, detail, reason)
                case RecordGap(session, first, last, charged, zone, cause):
                    if log is not None:
                        log.record_pulse_gap(
                            session, first, last, charged_energy_uj=charged, zone=zone, cause=cause
                        )
                case RecordZone(session, zone, actor, limit):
                    if log is not None:
                        log.record_zone(session, zone, actor=actor, energy_limit_uj=limit)
                case RecordParams(session, params, actor):
                    if log is not None:
                        log.record_params(
                            session,
                            energy_uj=params.energy_uj,
                            width_us=params.width_us,
                            rate_mhz=params.rate_mhz,
                            spot_um=params.spot_um,
                            actor=actor,
                        )
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
                return await self._operate(ArmLaser(self._actor()))
            case DisarmRequest():
                return await self._operate(DisarmLaser(self._actor()))
            case ParamsSetRequest():
                rate = None if request.rate_hz is None else round(request.rate_hz * 1000)
                preset = Concern(request.preset) if request.preset else None
                return await self._operate(
                    SetParams(
                        self._actor(),
                        request.energy_uj,
                        request.width_us,
                        rate,
                        request.spot_um,
                        preset,
                    )
                )
            case SessionZoneRequest():
                return await self._operate(ChangeZone(self._actor(), Zone(request.zone)))
            case SessionEndRequest():
                return await self._operate(EndSession(self._actor(), tuple(request.post_care)))
            case FaultAckRequest():
                return await self._operate(AckFault(request.operator, request.reason))
        raise ControlError("usage", f"unknown request {request!r}")

    def _actor(self) -> str:
        """Who a request acts for: the session's operator (requests carry no identity yet)."""
        ledger = self.core.ledger
        return ledger.actor if ledger is not None else "operator"

    async def start_session(self, request: SessionStartRequest) -> dict[str, Any]:
        extra: dict[str, Any] = {}

        def open_session(step: OpenSession) -> int:
            log = self._require_log()
            ident = self.core.ident
            assert ident is not None
            # First among the log's checks, so that a name typed by mistake is refused as such.
            check_patient_ref(request.patient_ref, self.settings.patient_ref_pattern)
            status = self.core.status
            opened = log.start_session(
                _session_info(request, ident, step.active_ingredient),
                device_pulse_count=status.pulse_count if status else None,
                limits=LimitsInForce.from_policy(self.policy),
                host_time_ns=self._now_ns,
            )
            extra["warnings"] = [w.message for w in opened.warnings]
            extra["active_ingredient"] = step.active_ingredient
            extra["preset"] = request.preset
            return opened.session_id

        start = StartSession(
            request.operator,
            request.patient_ref,
            SkinType.parse(request.skin_type),
            Concern(request.preset) if request.preset else None,
            request.active_ingredient,
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
                        case CloseSession(session, actor, post_care):
                            now = time.time_ns()
                            try:
                                self._require_log().end_session(
                                    session, actor=actor, post_care=post_care, host_time_ns=now
                                )
                            except DevicectlError as exc:
                                outcome = self._carry_out(core.abandon(exc))
                            else:
                                outcome = self._carry_out(core.session_closed(now))
                        case _:
                            raise AssertionError(f"a request ended without a reply: {outcome!r}")
            finally:
                if core.busy is not None:  # cancelled mid-request: the core must not stay busy
                    self._carry_out(core.abandon(LinkError("the request was cancelled")))

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

    def _remote_stop(self) -> None:
        """``cmd/stop`` over MQTT: stopping is always safe, so it needs no authority here. Not
        connected: it goes out first thing after IDENT on the reconnection."""
        if self.link is not None:
            self.link.stop_now()
        self._carry_out([RecordEvent(self.core.session_id, "stop", "mqtt", {})])

    def _remote_refused(self, command: str, payload: bytes) -> None:
        """Any ``cmd/*`` but stop: refused (telemetry has raised the alert), audited here."""
        self._carry_out([RecordEvent(
            self.core.session_id, "remote_command_refused", "mqtt",
            {"command": command, "bytes": len(payload)},
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
            "sim_control": str(self.sim_control) if self.sim_control else None,
            "link": link.stats if link else {},
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
        self._telemetry(
            lambda t: t.publish_metrics(
                rate_hz=rate_hz,
                avg_power_w=avg_power_w,
                skin_temp_c=status.skin_temp_cdeg / 100 if status else None,
                head_temp_c=status.head_temp_cdeg / 100 if status else None,
                counters=counters,
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


def _session_info(request: SessionStartRequest, ident: Ident, ingredient: str) -> dict[str, Any]:
    """The session log's record of a session start (the checklist was given in full)."""
    answers = request.checklist
    info: dict[str, Any] = {
        "device_serial": f"{ident.serial:08X}",
        "operator": request.operator,
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
            "area_cleaned": answers.area_cleaned,
            "numbing_applied": answers.numbing_applied,
            "contraindications": {
                "recent_sun_exposure_or_tan": answers.recent_sun_exposure,
                "photosensitising_medication": answers.photosensitising_medication,
                "active_skin_infection_or_inflammation": answers.active_skin_infection,
                "pregnancy": answers.pregnancy,
                "allergy_to_active_ingredient": answers.allergy_to_active_ingredient,
            },
        },
        "active_ingredient": ingredient,
    }
    if request.contraindication_override is not None:
        info["contraindication_override"] = request.contraindication_override
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
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
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
    return 0
