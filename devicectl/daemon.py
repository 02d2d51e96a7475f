"""The daemon: one device link, its safety supervisor, the session log, telemetry, control.

Data flow (README, "Architecture")::

    transport bytes ─▶ DeviceLink (codec, SEQ, retries) ─▶ Daemon._on_event ─▶ SafetySupervisor
                                                              │ breach: link.stop_now() FIRST
                                                              ├─▶ SessionLog.record_pulse (queue)
                                                              └─▶ Telemetry.offer_pulse (queue)

``_on_event`` runs synchronously inside the transport's receive callback. For a PULSE it asks the
supervisor for a verdict and, on a breach, writes STOP before doing anything else; only then does it
hand the pulse to the session log and telemetry (both cheap appends) and schedule the slow work of
a breach (log records, alerts) as a task. Nothing in that path awaits, logs or validates.

"Armed", for the supervisor's uncommanded-emission rule, is set at ARM's ACK and cleared at the ACK
of STOP or DISARM, both observed synchronously in wire order (the link's ``on_reply`` hook), so
that section 3's frame order makes the rule exact.

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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

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
    SessionNoteRequest,
    SessionStartRequest,
    SessionZoneRequest,
    StatusRequest,
    StopRequest,
)
from devicectl.errors import DevicectlError, LinkError, LogUnavailable, SafetyRefusal
from devicectl.link import DeviceLink
from devicectl.logs import redact_url
from devicectl.policy import Concern, Policy, PulseParams, SkinType, Zone, load_policy_with_source
from devicectl.privacy import published_patient
from devicectl.safety import Breach, BreachCode, Limits, SafetySupervisor, check_params
from devicectl.sessionlog import LimitsInForce, SessionLog
from devicectl.sessionlog.checkpoint import Checkpoint
from devicectl.sessionlog.keys import key_source
from devicectl.sessionlog.model import Override, Provenance, check_patient_ref
from devicectl.systemd import SystemdNotifier
from devicectl.users import Actor, Authenticator, AuthRefused, UserStore
from drivers import MemoryLink, open_serial
from protocols import (
    Arm,
    Boot,
    ClearFault,
    DeviceState,
    Disarm,
    FaultCode,
    FaultEvent,
    Ident,
    InputEvent,
    Interlock,
    Message,
    MessageType,
    Pulse,
    StatusEvent,
    StatusReport,
)

if TYPE_CHECKING:
    from devicectl.telemetry.commands import RefusedBurst

__all__ = ["Daemon", "run_daemon"]

SHUTDOWN_BUDGET_S = 1.8  # SIGTERM to exit 0 within 2 s, all included
# The supervisor grades breaches critical/high/warning; the MQTT contract has info/warning/critical.
_ALERT_SEVERITY = {"critical": "critical", "high": "critical", "warning": "warning", "info": "info"}


_BACKLOGGED = frozenset({"publish_alert", "publish_session_event", "publish_checkpoint"})
_BACKLOG_MAX = 10_000  # bounded; start-up raises a handful


def _interlock_names(bits: int) -> list[str]:
    return [i.name.lower() for i in Interlock if bits & i and i.name is not None]


def _fault_names(bits: int) -> list[str]:
    return [f.name.lower() for f in FaultCode if bits & f.bit]


class _Treatment:
    """What the daemon knows of the open session (the log holds the record)."""

    __slots__ = (
        "energy_by_zone_uj",
        "faults",
        "id",
        "operator",
        "params_preset",
        "patient",
        "preset",
        "pulses",
        "skin_type",
        "started",
        "zone",
    )

    def __init__(
        self, session_id: int, operator: str, patient: str | None, skin_type: SkinType
    ) -> None:
        self.id = session_id
        self.operator = operator
        self.patient = patient  # as published (privacy settings), never read from here else
        self.preset: str | None = None  # the session's preset
        self.params_preset: str | None = None  # what the parameters in force came from
        self.skin_type = skin_type
        self.faults = 0
        self.zone: Zone | None = None
        self.pulses = 0
        self.energy_by_zone_uj: dict[str, int] = {}
        self.started = time.time()


class Daemon:
    """``async with Daemon(settings) as daemon: await daemon.wait_stopped()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: FilteringBoundLogger | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self._log: FilteringBoundLogger = log or structlog.get_logger("devicectl.daemon")
        self._notifier = notifier or SystemdNotifier()
        self.data_dir = Path(settings.data_dir)
        self.policy: Policy
        self.policy, self.policy_source = load_policy_with_source(settings.policy)
        self._stack = contextlib.AsyncExitStack()
        self._stopped = asyncio.Event()
        self._identified = asyncio.Event()
        self._telemetry_release = asyncio.Event()

        self.sessionlog: SessionLog | None = None
        self.telemetry: Any = None
        self.link: DeviceLink | None = None
        self.supervisor: SafetySupervisor | None = None  # built from IDENT and the policy
        self._pending_params: PulseParams | None = None  # a preset waiting for its zone
        self.ident: Ident | None = None
        self.status: StatusReport | None = None
        self.footswitch = False
        self.params: PulseParams | None = None
        self.treatment: _Treatment | None = None
        self.armed = False
        self._arming = False  # ARM sent, ACK not yet seen
        self._lease_ms = self.policy.lease_ms
        self._recovered = False
        self._params_on_device = False
        self._gap_open_since: float | None = None
        self._restored_latch: Breach | None = None  # from the log, until the first IDENT
        self._log_failure_reported = False
        # Alerts and session events raised before telemetry could start (it needs the device's
        # serial for its topics): handed over, in order, the moment it does.
        self._telemetry_backlog: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.sim_control: Path | None = None
        self.sim_runner: Any = None  # the in-process simulator's BoardRunner (port "sim")
        self._sim_memory: Any = None  # its serial and lifetime counter (simulator.nvram)
        self._pulses_since_metrics = 0
        self._energy_since_metrics = 0

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
        # says offline, the log is flushed and closed, the in-process simulator stops.
        connect, port_name = await self._transport(stack)

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

        authenticator = Authenticator(
            UserStore.in_data_dir(self.data_dir), on_refused=self._auth_refused, log=self._log
        )
        await stack.enter_async_context(
            ControlServer(
                Path(settings.control),
                self.handle,
                group=settings.control_group,
                authenticator=authenticator,
                log=self._log,
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
        self.armed = False
        if self.supervisor is not None:
            self.supervisor.disarm()
        self._event(
            "daemon_stopped", "devicectl", {"session_left_open": self.treatment is not None}
        )
        self._publish_state()
        if self.sessionlog is not None:  # flushed, and signed: published before "offline"
            with contextlib.suppress(DevicectlError, TimeoutError):
                await asyncio.wait_for(self.sessionlog.checkpoint_async("shutdown"), 0.3)

    async def _transport(self, stack: contextlib.AsyncExitStack) -> tuple[Any, str]:
        port = self.settings.port
        if port != "sim":
            return functools.partial(open_serial, port, baudrate=self.settings.baudrate), port
        # The in-process simulator, for engineers and the demo: a board served in this loop over
        # an in-memory link, with its control socket beside ours so sim-control can drive it.
        from simulator import Board, BoardRunner
        from simulator.control import ControlServer as SimControlServer
        from simulator.nvram import BoardMemory

        self._log.warning("device_simulated", detail="port = sim: no laser is controlled")
        memory_file = BoardMemory.load(self.data_dir / "simulator-board.json")
        board = Board(
            serial=memory_file.serial,
            pulse_count=memory_file.pulse_count,
            max_rate_mhz=round(self.settings.sim_max_rate_hz * 1000),
        )
        runner = await stack.enter_async_context(BoardRunner(board, log=self._log))
        self.sim_runner = runner
        self._sim_memory = memory_file
        memory_file.save(board)
        stack.callback(memory_file.save, board)  # at exit, after the laser was made safe

        def accept(device: Any) -> None:
            device.attach(on_data=runner.feed, on_lost=lambda _exc: runner.attach(None))
            runner.attach(device.write)

        self.sim_control = Path(self.settings.control).with_name(
            Path(self.settings.control).stem + "-sim.sock"
        )
        await stack.enter_async_context(SimControlServer(runner, self.sim_control, log=self._log))
        memory = MemoryLink(accept, name="sim")
        return memory.connect, "sim"

    async def _run_telemetry(self) -> None:
        """Telemetry needs the device id for its topics: start once it is known, run until the
        daemon lets go of it (after the laser was made safe), then flush and say offline."""
        from devicectl.telemetry import Telemetry, TelemetryConfig

        mqtt = self.settings.mqtt
        device = mqtt.device
        if device is None:
            await self._identified.wait()
            assert self.ident is not None
            device = f"{self.ident.serial:08X}"
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
            for method, args, kwargs in backlog:
                self._telemetry(method, *args, **kwargs)
            if self.treatment is not None:
                telemetry.publish_session(self._session_summary())
            else:
                telemetry.publish_session(None)
            await self._telemetry_release.wait()
            self._publish_state()
        self.telemetry = None

    async def _watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        assert interval is not None
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ the hot path

    def _on_event(self, seq: int, message: Message) -> None:
        kind = type(message)
        if kind is Pulse:
            pulse: Pulse = message  # type: ignore[assignment]
            supervisor = self.supervisor
            if supervisor is None:  # a pulse before IDENT: nothing can have armed the laser
                self.link.stop_now()  # type: ignore[union-attr]
                self._unsupervised_pulse(pulse)
                return
            if supervisor.on_pulse(pulse.pulse_no, pulse.t_us, pulse.energy_uj):
                self.link.stop_now()  # type: ignore[union-attr]
                self._breach()
            self._record_pulse(pulse)
            return
        if kind is StatusEvent:
            self._on_status(message)  # type: ignore[arg-type]
        elif kind is FaultEvent:
            self._on_device_fault(message)  # type: ignore[arg-type]
        elif kind is InputEvent:
            self._on_input(message)  # type: ignore[arg-type]
        elif kind is Boot:
            self._on_boot(message)  # type: ignore[arg-type]

    def _unsupervised_pulse(self, pulse: Pulse) -> None:
        """A PULSE before the device identified itself: STOP was written; record the dose."""
        self._event(
            "uncommanded_emission",
            "device",
            {"pulse_no": pulse.pulse_no, "energy_uj": pulse.energy_uj},
        )
        self._alert(
            "critical",
            "uncommanded_emission",
            f"pulse {pulse.pulse_no} before the device identified itself",
        )

    def _record_pulse(self, pulse: Pulse) -> None:
        treatment = self.treatment
        self._pulses_since_metrics += 1
        self._energy_since_metrics += pulse.energy_uj
        self._charge_lost_events(pulse.pulse_no - 1)
        if treatment is None:
            # A pulse with no session open (uncommanded: the supervisor has stopped the laser):
            # charged to no session at its measured energy, and accounted for like any pulse.
            if self.sessionlog is not None:
                self.sessionlog.record_pulse_gap(
                    None,
                    pulse.pulse_no,
                    pulse.pulse_no,
                    charged_energy_uj=pulse.energy_uj,
                    zone="none",
                    cause="pulse without a session",
                )
            return
        zone = treatment.zone or "none"
        treatment.pulses += 1
        treatment.energy_by_zone_uj[zone] = treatment.energy_by_zone_uj.get(zone, 0) + (
            pulse.energy_uj
        )
        now_ns = time.time_ns()
        if self.sessionlog is not None:
            self.sessionlog.record_pulse(
                treatment.id, pulse.pulse_no, pulse.t_us, now_ns, pulse.energy_uj, zone
            )
        if self.telemetry is not None:
            self.telemetry.offer_pulse(
                pulse.pulse_no, pulse.t_us, pulse.energy_uj, zone, str(treatment.id)
            )

    def _on_reply(self, command: int, reply: Message) -> None:
        """Every command's reply, synchronously, in wire order: keeps ``armed`` exact."""
        if reply.TYPE != MessageType.ACK:
            if command == MessageType.ARM:
                self._arming = False
            return
        supervisor = self.supervisor
        if command == MessageType.ARM:
            self._arming = False
            if supervisor is None:
                self.link.stop_now()  # type: ignore[union-attr]
                return
            try:
                supervisor.arm()
            except SafetyRefusal:  # a limit changed between check_arm and the ACK
                self.link.stop_now()  # type: ignore[union-attr]
                return
            self.armed = True
        elif command in (MessageType.STOP, MessageType.DISARM):
            self.armed = False
            if supervisor is not None:
                supervisor.disarm()
            self._publish_state()

    def _on_status(self, status: StatusReport) -> None:
        previous, self.status = self.status, status
        supervisor = self.supervisor
        if supervisor is not None and supervisor.on_status(
            status.state,
            status.interlocks,
            status.head_temp_cdeg,
            status.skin_temp_cdeg,
            status.lease_left_ms,
        ):
            self.link.stop_now()  # type: ignore[union-attr]
            self._breach()
        # Every pulse counted in a STATUS had its PULSE event written before it (section 3's
        # order): any the log has not seen were lost on the wire, the last of a train included.
        self._charge_lost_events(status.pulse_count)
        self._check_log()
        if previous is None or (previous.state, previous.interlocks, previous.faults) != (
            status.state,
            status.interlocks,
            status.faults,
        ):
            self._publish_state()  # the retained state follows the device, not only our commands
        if self.sessionlog is not None:
            self.sessionlog.record_status(
                self.treatment.id if self.treatment else None,
                state=status.state,
                interlocks=status.interlocks,
                head_temp_cdeg=status.head_temp_cdeg,
                skin_temp_cdeg=status.skin_temp_cdeg,
                pulse_count=status.pulse_count,
            )

    def _on_device_fault(self, fault: FaultEvent) -> None:
        self.armed = False
        if self.supervisor is not None and self.supervisor.on_device_fault(
            fault.code, fault.detail
        ):
            self.link.stop_now()  # type: ignore[union-attr]
            self._breach()  # recorded as the breach: one incident, one fault
            return
        self._event(
            "device_fault", "device", {"code": _code_name(fault.code), "detail": fault.detail}
        )

    def _on_input(self, event: InputEvent) -> None:
        self.footswitch = bool(event.footswitch)
        self._event(
            "input",
            "device",
            {
                "footswitch": bool(event.footswitch),
                "interlocks_open": _interlock_names(event.interlocks),
            },
        )

    def _on_boot(self, boot: Boot) -> None:
        was_armed = self.armed or self._arming
        self.armed = False
        self._arming = False
        if self.supervisor is not None and self.supervisor.on_boot(boot.reason):
            # A booted board is in STANDBY; STOP first all the same, as for every breach.
            self.link.stop_now()  # type: ignore[union-attr]
            self._breach()
        self._params_on_device = False
        self._event("device_boot", "device", {"reason": boot.reason, "while_armed": was_armed})

    def _on_link_lost(self, reason: str) -> None:
        was_armed = self.armed or self._arming
        self.armed = False
        self._arming = False
        self._gap_open_since = time.time()
        if was_armed or (self.supervisor is not None and self.supervisor.armed):
            # The device may still be firing under its lease: STOP, which the link keeps wanted
            # until it is acknowledged, so it goes out right after IDENT on the next connection.
            self.link.stop_now()  # type: ignore[union-attr]
        if self.supervisor is not None and self.supervisor.on_link_lost():
            self._breach()  # recorded and alerted as the breach: one incident, one fault
        else:
            self._event("link_lost", "devicectl", {"reason": reason, "while_armed": was_armed})
            self._alert("warning", "link_lost", f"device link lost: {reason}")
        self._log.error("device_link_lost", reason=reason, armed=was_armed)

    async def _on_connected(self, ident: Ident, status: StatusReport) -> None:
        self.ident = ident
        self.status = status
        if self.supervisor is None or self.treatment is None:
            self.supervisor = self._new_supervisor(ident)
        self._identified.set()
        if self.sessionlog is not None:  # checkpoints are signed for the id telemetry uses
            self.sessionlog.set_device(self.settings.mqtt.device or f"{ident.serial:08X}")
        if not self._recovered and self.sessionlog is not None:
            self._recovered = True
            recovery = self.sessionlog.recover_interrupted(status.pulse_count, ident.max_energy_uj)
            if recovery.interrupted_session is not None or recovery.unlogged_pulses:
                self._log.warning(
                    "session_recovered",
                    session=recovery.interrupted_session,
                    unlogged_pulses=recovery.unlogged_pulses,
                    counter_mismatch=recovery.counter_mismatch,
                )
                self._alert(
                    "warning",
                    "session_interrupted",
                    f"session {recovery.interrupted_session} was interrupted; "
                    f"{recovery.unlogged_pulses} unlogged pulse(s) charged at maximum energy",
                )
            if recovery.interrupted_session is not None and recovery.summary is not None:
                # Its subscribers saw it start: they see it end, as interrupted.
                self._session_event(
                    str(recovery.interrupted_session),
                    "ended",
                    outcome="interrupted",
                    unlogged_pulses=recovery.unlogged_pulses,
                    summary=_mqtt_summary(recovery.summary, None, ended=True),
                )
        elif self._gap_open_since is not None:
            last = self.sessionlog.last_pulse_no() if self.sessionlog else None
            self._event(
                "link_restored",
                "devicectl",
                {
                    "gap_s": round(time.time() - self._gap_open_since, 3),
                    "device_pulse_count": status.pulse_count,
                    "last_logged_pulse_no": last,
                },
            )
            self._charge_gap(last, status.pulse_count, "link_gap")
        self._gap_open_since = None
        if self.params is not None and status.state != DeviceState.EMITTING:
            # Params do not survive a device boot: send them again so ARM is possible.
            with contextlib.suppress(DevicectlError):
                await self.link.request(self.params.as_command())  # type: ignore[union-attr]
        self._log.info(
            "device_connected",
            serial=ident.serial,
            fw=".".join(map(str, ident.fw)),
            pulse_count=status.pulse_count,
            state=DeviceState(status.state).name,
        )
        self._publish_state()

    def _charge_lost_events(self, up_to: int) -> None:
        """PULSE events lost on the link (line noise, dropped frames, a link declared lost): the
        pulses were fired, so they are recorded as unlogged and charged at the device's maximum
        energy, as soon as a later pulse_no or pulse_count shows them missing — a PULSE that
        arrives while a lost link is being re-established included. Not before the start-up
        reconciliation, which accounts for the pulses fired while no daemon ran."""
        log = self.sessionlog
        if log is None or not self._recovered:
            return
        last = log.last_pulse_no()
        if last is not None and up_to > last:
            gap_open = self._gap_open_since is not None
            cause = "link_gap" if gap_open else "pulse events lost on the link"
            self._charge_gap(last, up_to, cause)

    def _charge_gap(self, last: int | None, device_count: int, cause: str) -> None:
        if last is None or device_count <= last or self.sessionlog is None or self.ident is None:
            return
        treatment = self.treatment
        self.sessionlog.record_pulse_gap(
            treatment.id if treatment else None,
            last + 1,
            device_count,
            charged_energy_uj=self.ident.max_energy_uj,
            zone=(treatment.zone if treatment and treatment.zone else "none"),
            cause=cause,
        )

    # ------------------------------------------------------------------ breaches

    def _new_supervisor(self, ident: Ident) -> SafetySupervisor:
        """One per session (and per identified device until a session starts). A latched
        breach outlives the supervisor that latched it: only an operator's acknowledgement
        clears it, not ending the session, starting another, a reconnection or a restart."""
        supervisor = SafetySupervisor.for_device(ident, self.policy)
        previous = self.supervisor
        supervisor.inherit_latch(previous.latched if previous else self._restored_latch)
        self._restored_latch = None
        return supervisor

    def _restore_latch(self, record: dict[str, Any] | None) -> None:
        """The breach the log says was never acknowledged (the daemon stopped, or was killed,
        while it was latched): arming stays refused until it is."""
        if record is None:
            return
        try:
            self._restored_latch = Breach.from_record(record)
        except ValueError:
            # A breach the log holds but this version cannot read: latch it as what it was.
            self._restored_latch = Breach(
                BreachCode.DEVICE_FAULT, 0.0, 0.0, "", f"a breach the log holds: {record!r}"
            )
        self._log.warning("breach_latch_restored", breach=self._restored_latch.message)

    def _breach(self) -> None:
        """After STOP was written: record, alert, latch (the supervisor has latched already)."""
        self.armed = False
        breach = self.supervisor.last_breach if self.supervisor else None
        if breach is None:
            return
        detail = _breach_dict(breach)
        session = self.treatment.id if self.treatment else None
        # "breach" is what the session log counts as a fault; repeats are recorded apart.
        self._event("breach_repeat" if breach.repeat else "breach", "devicectl", detail)
        if breach.repeat:
            # The same rule again since the latch (pulses already in flight when STOP was written):
            # recorded above, but one incident raises one alert.
            return
        if self.treatment is not None:
            self.treatment.faults += 1
        self._alert(
            breach.severity.value,
            breach.alert_code,
            breach.message,
            value=breach.value,
            limit=breach.limit,
        )
        if session is not None:
            self._session_event(str(session), "fault", **detail)
        self._log.error("safety_breach", **detail)
        self._publish_state()

    # ------------------------------------------------------------------ control requests

    async def handle(self, request: Any) -> dict[str, Any]:
        match request:
            case StatusRequest():
                return self.describe()
            case StopRequest():
                return await self.stop_emission("operator")
            case ArmRequest():
                return await self.arm(_actor(request))
            case DisarmRequest():
                return await self.disarm(request.actor)
            case ParamsSetRequest():
                return await self.set_params(request)
            case SessionStartRequest():
                return self.start_session(request)
            case SessionZoneRequest():
                return await self.set_zone(request.zone, _actor(request))
            case SessionEndRequest():
                return await self.end_session(request)
            case FaultAckRequest():
                return await self.acknowledge(_actor(request))
            case SessionNoteRequest():
                return self.append_clinical(request)
        raise ControlError("usage", f"unknown request {request!r}")

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
        """STOP now. Not connected, or not acknowledged in 1 s: the STOP stays wanted (re-sent
        until acknowledged, first thing after IDENT on a reconnection) and the caller is told
        the truth: it cannot be confirmed (exit 3), never "stopped"."""
        self._event("stop", actor, {})
        link = self.link
        assert link is not None
        link.stop_now()
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

    def start_session(self, request: SessionStartRequest) -> dict[str, Any]:
        log = self._require_log()
        if self.treatment is not None:
            raise ControlError(
                "refused", f"session {self.treatment.id} is still open: end it first"
            )
        ident = self.ident
        if ident is None:
            raise LinkError(f"the device on {self.settings.port} has not identified itself yet")
        # First, so that a name typed by mistake is refused as such (it also seeds the course id).
        check_patient_ref(request.patient_ref, self.settings.patient_ref_pattern)
        preset = self.policy.presets[Concern(request.preset)] if request.preset else None
        ingredient = request.ingredient.name or (preset.active_ingredient if preset else None)
        if ingredient is None:
            raise ControlError("usage", "name the active ingredient (--ingredient) or a --preset")
        actor = _actor(request)
        opened = log.start_session(
            _session_info(request, ident, ingredient, actor),
            device_pulse_count=self.status.pulse_count if self.status else None,
            limits=LimitsInForce.from_policy(self.policy),
            provenance=Provenance(
                software_version=__version__,
                firmware_version=".".join(str(part) for part in ident.fw),
                device_serial=f"{ident.serial:08X}",
                policy_name=self.policy_source.name,
                policy_sha256=self.policy_source.sha256,
                time_zone=self.settings.clinic.time_zone,
            ),
        )
        skin = SkinType.parse(request.skin_type)
        privacy = self.settings.privacy
        secret = privacy.patient_key_secret
        patient = published_patient(
            request.patient_ref,
            secret=secret.get_secret_value() if secret is not None else None,
            publish_ref=privacy.publish_patient_ref,
        )  # what leaves the device: a keyed pseudonym, nothing, or (configured) the reference
        self.treatment = _Treatment(opened.session_id, actor.user, patient, skin)
        self.treatment.preset = request.preset
        self.supervisor = self._new_supervisor(ident)
        self.params = None
        self._pending_params = preset.params() if preset else None
        self._session_event(
            str(opened.session_id),
            "started",
            operator=actor.user,
            patient=patient,
            skin_type=request.skin_type,
            concerns=list(request.concerns),
        )
        self._telemetry("publish_session", self._session_summary())
        self._publish_state()
        position = opened.position
        return {
            "session": opened.session_id,
            "course": position.to_dict() if position is not None else None,
            "warnings": [w.message for w in opened.warnings],
            "active_ingredient": ingredient,
            "preset": request.preset,
        }

    def _treatment(self) -> _Treatment:
        if self.treatment is None:
            raise ControlError("refused", "no session is open: `devicectl session start` first")
        return self.treatment

    async def set_zone(self, zone_name: str, actor: Actor) -> dict[str, Any]:
        treatment = self._treatment()
        if self.armed or self._arming:
            raise ControlError("refused", "disarm before changing zone")
        zone = Zone(zone_name)
        limit_uj = round(self.policy.zone(zone).energy_j * 1e6)
        self._require_log().record_zone(
            treatment.id, zone, actor=actor.user, role=actor.role, energy_limit_uj=limit_uj
        )
        treatment.zone = zone
        self._session_event(str(treatment.id), "zone", zone=zone.value, energy_limit_uj=limit_uj)
        result: dict[str, Any] = {
            "session": treatment.id,
            "zone": zone.value,
            "energy_limit_uj": limit_uj,
        }
        if self.params is None and self._pending_params is not None:
            # The session's preset becomes the parameters once there is a zone to check them for.
            params, self._pending_params = self._pending_params, None
            result |= await self._apply_params(params, treatment, actor, treatment.preset)
        elif self.params is not None:
            try:
                limits = self._limits(self.params)
            except SafetyRefusal as exc:
                result["warning"] = f"the current parameters are not allowed here: {exc}"
            else:  # the same parameters, under this zone's cap: recorded as such
                self._record_params(self.params, treatment, actor, treatment.params_preset, limits)
        self._telemetry("publish_session", self._session_summary())
        self._publish_state()
        return result

    async def set_params(self, request: ParamsSetRequest) -> dict[str, Any]:
        treatment = self._treatment()
        if treatment.zone is None:
            raise ControlError("refused", "no zone chosen: `devicectl session zone ZONE` first")
        if self.armed or self._arming:
            raise ControlError("refused", "disarm before changing parameters")
        base = self.params or self._pending_params
        preset = treatment.preset if base is not None else None
        if request.preset is not None:
            base = self.policy.presets[Concern(request.preset)].params()
            preset = request.preset
        fields: dict[str, int | None] = {
            "energy_uj": request.energy_uj,
            "width_us": request.width_us,
            "rate_mhz": round(request.rate_hz * 1000) if request.rate_hz is not None else None,
            "spot_um": request.spot_um,
        }
        missing = [k for k, v in fields.items() if v is None]
        if base is None and missing:
            raise ControlError("usage", f"give {', '.join(missing)} (or --preset)")
        values = {k: v if v is not None else getattr(base, k) for k, v in fields.items()}
        if any(v is not None for v in fields.values()):
            preset = f"{preset} (modified)" if preset else None
        return await self._apply_params(PulseParams(**values), treatment, _actor(request), preset)

    def _limits(self, params: PulseParams) -> Limits:
        """Every limit checkable before emission (section 4); SafetyRefusal names the one broken."""
        treatment = self._treatment()
        ident = self.ident
        if ident is None:
            raise LinkError(f"the device on {self.settings.port} has not identified itself yet")
        if treatment.zone is None:
            raise ControlError("refused", "no zone chosen: `devicectl session zone ZONE` first")
        return check_params(ident, self.policy, treatment.skin_type, treatment.zone, params)

    async def _apply_params(
        self, params: PulseParams, treatment: _Treatment, actor: Actor, preset: str | None
    ) -> dict[str, Any]:
        limits = self._limits(params)
        await self._link().request(params.as_command())
        self.params = params
        self._params_on_device = True
        self._record_params(params, treatment, actor, preset, limits)
        self._session_event(str(treatment.id), "params", **_params(params))
        self._telemetry("publish_session", self._session_summary())
        self._publish_state()
        return {"params": _params(params), "fluence_j_cm2": round(params.fluence_j_cm2, 3)}

    def _record_params(
        self,
        params: PulseParams,
        treatment: _Treatment,
        actor: Actor,
        preset: str | None,
        limits: Limits,
    ) -> None:
        """The parameters in force with the fluence cap they were checked against."""
        treatment.params_preset = preset
        self._require_log().record_params(
            treatment.id,
            energy_uj=params.energy_uj,
            width_us=params.width_us,
            rate_mhz=params.rate_mhz,
            spot_um=params.spot_um,
            actor=actor.user,
            role=actor.role,
            fluence_limit={
                "fluence_j_cm2": round(limits.fluence_j_cm2, 4),
                "max_fluence_j_cm2": limits.max_fluence_j_cm2,
                "rule": limits.fluence_rule,
                "skin_type": treatment.skin_type.name,
                "zone": treatment.zone.value if treatment.zone else None,
                "preset": preset,
            },
        )

    async def arm(self, actor: Actor) -> dict[str, Any]:
        treatment = self._treatment()
        self._require_log()
        supervisor = self.supervisor
        if supervisor is None:
            raise LinkError(f"the device on {self.settings.port} has not identified itself yet")
        if treatment.zone is None:
            raise ControlError("refused", "no zone chosen: `devicectl session zone ZONE` first")
        if self.params is None:
            raise ControlError("refused", "no parameters set: `devicectl params set ...` first")
        if self.armed or self._arming:
            return {"armed": True, "lease_ms": self._lease_ms}
        limits = self._limits(self.params)
        if supervisor.zone != treatment.zone:
            supervisor.set_zone(treatment.zone, limits)
        else:
            supervisor.set_params(limits)
        supervisor.check_arm()  # latched breach, zone or session energy spent
        link = self._link()
        if not self._params_on_device:  # the device rebooted since: params are gone
            await link.request(self.params.as_command())
            self._params_on_device = True
        self._arming = True
        try:
            await link.request(Arm(self._lease_ms))
        finally:
            self._arming = False
        if not self.armed:  # the ACK handler refused (see _on_reply) and sent STOP
            raise ControlError("refused", "arming was undone: a limit changed during ARM")
        link.start_heartbeats(self._lease_ms)
        self._event("armed", actor.user, {"lease_ms": self._lease_ms}, role=actor.role)
        self._session_event(str(treatment.id), "armed", lease_ms=self._lease_ms)
        self._publish_state()
        return {"armed": True, "lease_ms": self._lease_ms}

    async def disarm(self, actor: Actor | None = None) -> dict[str, Any]:
        link = self._link()
        link.stop_heartbeats()
        await link.request(Disarm())
        if actor is not None:
            self._event("disarmed", actor.user, {}, role=actor.role)
        else:  # disarming needs no identity: recorded as the session's operator's console
            self._event("disarmed", self.treatment.operator if self.treatment else "console", {})
        if self.treatment is not None:
            self._session_event(str(self.treatment.id), "disarmed")
        self._publish_state()
        return {"armed": False}

    async def acknowledge(self, actor: Actor) -> dict[str, Any]:
        signoff = actor.signoff
        if signoff is None or signoff.role != "supervisor":  # the control layer checked it too
            raise AuthRefused("signoff.required", "a breach acknowledgement needs a supervisor")
        supervisor = self.supervisor
        if supervisor is None or supervisor.latched is None:
            raise ControlError("refused", "no breach is latched: nothing to acknowledge")
        self._require_log()
        reason = signoff.reason
        breach = supervisor.acknowledge(actor.user, reason)
        assert breach is not None
        self._event(
            "fault_ack",
            actor.user,
            {
                "breach": breach.alert_code,
                "pulse_no": breach.pulse_no,
                "signed_off_by": signoff.user,
                "signed_off_role": signoff.role,
                "reason_code": signoff.reason_code,
            },
            reason=reason,
            role=actor.role,
        )
        link = self.link
        device_faulted = self.status is not None and self.status.state == DeviceState.FAULT
        if link is not None and link.connected.is_set() and device_faulted:
            with contextlib.suppress(DevicectlError):
                await link.request(ClearFault())
        if self.treatment is not None:
            self._session_event(
                str(self.treatment.id),
                "ack",
                breach=breach.alert_code,
                operator=actor.user,
                signed_off_by=signoff.user,
                reason_code=signoff.reason_code,
                reason=reason,
            )
        self._publish_state()
        return {
            "acknowledged": breach.alert_code,
            "operator": actor.user,
            "signed_off_by": signoff.user,
            "reason_code": signoff.reason_code,
            "reason": reason,
        }

    async def end_session(self, request: SessionEndRequest) -> dict[str, Any]:
        treatment = self._treatment()
        actor = _actor(request)
        self._require_log()  # never report an end the log could not record
        if (self.armed or self._arming) and self.link is not None:
            await self.disarm(actor)
        log = self.sessionlog
        assert log is not None
        summary = log.end_session(
            treatment.id,
            actor=actor.user,
            role=actor.role,
            post_care=request.post_care,
            post_care_declined=request.post_care_declined,
        )
        self.treatment = None
        self.params = None
        self._pending_params = None
        result = summary.to_dict()
        ended = _mqtt_summary(summary, treatment, ended=True)
        self._telemetry("publish_session", None)
        self._publish_state()
        # The ended event carries the signed checkpoint covering the session (a commit away).
        # Everything above is settled first: another request may run during this await.
        checkpoint: Checkpoint | None = None
        with contextlib.suppress(DevicectlError, TimeoutError):  # the end is recorded already
            checkpoint = await asyncio.wait_for(log.checkpoint_async("session_end"), 1.0)
        self._session_event(
            str(treatment.id),
            "ended",
            summary=ended,
            checkpoint=None if checkpoint is None else checkpoint.wire(),
        )
        return result

    def _on_checkpoint(self, checkpoint: Checkpoint) -> None:
        """A signed checkpoint was committed (handed over from the log's writer thread)."""
        self._telemetry("publish_checkpoint", checkpoint.wire())

    def append_clinical(self, request: SessionNoteRequest) -> dict[str, Any]:
        """A note, the immediate reaction or an adverse event: appended to the open session, or
        to ``request.session`` (ended), as a record of its own; nothing is ever edited."""
        actor = _actor(request)
        log = self._require_log()
        session = request.session
        if session is None:
            if self.treatment is None:
                raise ControlError("usage", "no session is open: name one with --session ID")
            session = self.treatment.id
        kind = request.command.removeprefix("session_")
        entry = request.model_dump(
            exclude={"command", "session", "auth", "actor"}, exclude_none=True
        )
        log.record_clinical(session, kind, actor=actor.user, role=actor.role, entry=entry)
        return {"session": session, "recorded": kind, "by": actor.user}

    def _auth_refused(self, user: str | None, command: str, exc: AuthRefused) -> None:
        """A request whose identity did not hold: audited (never the PIN)."""
        self._event("auth_refused", user or "unidentified", {"command": command, "rule": exc.rule})

    def _remote_stop(self) -> None:
        """``cmd/stop`` over MQTT: stopping is always safe, so it needs no authority here. Not
        connected: it goes out first thing after IDENT on the reconnection."""
        if self.link is not None:
            self.link.stop_now()
        self._event("stop", "mqtt", {})

    def _remote_refused(self, burst: RefusedBurst) -> None:
        """A burst of ``cmd/*`` but stop: refused (telemetry raises the alert), audited here, one
        record per burst with its count."""
        self._event("remote_command_refused", "mqtt", burst.audit_detail())

    def _remote_ignored(self, command: str, payload: bytes) -> None:
        """A retained ``cmd/stop`` found at subscription: stale, not obeyed, audited all the
        same."""
        self._event(
            "remote_command_ignored",
            "mqtt",
            {"command": command, "bytes": len(payload), "why": "retained: not a live request"},
        )

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
        if self.link is not None and (self.armed or self._arming):
            self.link.stop_now()
        self._alert("critical", "log_unavailable", str(exc))
        self._log.error("session_log_unavailable", error=str(exc))

    # ------------------------------------------------------------------ reporting

    def _state_name(self) -> str:
        if self.status is None:
            return "unknown"
        return DeviceState(self.status.state).name.lower()

    def describe(self) -> dict[str, Any]:
        status = self.status
        link = self.link
        treatment = self.treatment
        latched = self.supervisor.latched if self.supervisor else None
        return {
            "version": __version__,
            "connected": bool(link and link.connected.is_set()),
            "port": self.settings.port,
            "device_serial": f"{self.ident.serial:08X}" if self.ident else None,
            "state": self._state_name(),
            "armed": self.armed,
            "interlocks_open": _interlock_names(status.interlocks) if status else [],
            "faults": _fault_names(status.faults) if status else [],
            "pulse_count": status.pulse_count if status else None,
            "head_temp_c": status.head_temp_cdeg / 100 if status else None,
            "skin_temp_c": status.skin_temp_cdeg / 100 if status else None,
            "footswitch": self.footswitch,
            "params": _params(self.params) if self.params else None,
            "session": treatment.id if treatment else None,
            "zone": treatment.zone.value if treatment and treatment.zone else None,
            "session_pulses": treatment.pulses if treatment else 0,
            "energy_by_zone_uj": dict(treatment.energy_by_zone_uj) if treatment else {},
            "breach_latched": _breach_dict(latched) if latched else None,
            "log_ok": bool(self.sessionlog and self.sessionlog.healthy),
            "sim_control": str(self.sim_control) if self.sim_control else None,
            "link": link.stats if link else {},
        }

    def _event(
        self,
        kind: str,
        actor: str,
        detail: dict[str, Any],
        reason: str | None = None,
        *,
        role: str | None = None,
    ) -> None:
        if self.sessionlog is None:
            return
        session = self.treatment.id if self.treatment else None
        self.sessionlog.record_event(session, kind, actor, detail, reason, role=role)

    def _alert(
        self,
        severity: str,
        code: str,
        message: str,
        *,
        value: float | None = None,
        limit: float | None = None,
    ) -> None:
        session = str(self.treatment.id) if self.treatment else None
        level = _ALERT_SEVERITY.get(severity, "critical")
        self._telemetry("publish_alert", level, code, message, value, limit, session)

    def _telemetry(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Hand a message to telemetry. Its failure is logged and never reaches the caller:
        the laser, the supervisor and the session log do not depend on the network. Before
        telemetry has started, alerts and session events wait for it (state and session
        summaries are published afresh when it starts)."""
        telemetry = self.telemetry
        if telemetry is None:
            if method in _BACKLOGGED and self.settings.mqtt.url:
                if len(self._telemetry_backlog) < _BACKLOG_MAX:
                    self._telemetry_backlog.append((method, args, kwargs))
                else:
                    self._log.error("telemetry_backlog_full", method=method, max=_BACKLOG_MAX)
            return
        try:
            getattr(telemetry, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._log.error("telemetry_failed", method=method, error=str(exc))

    def _session_event(self, session_id: str, kind: str, **fields: Any) -> None:
        self._telemetry("publish_session_event", session_id, kind, **fields)

    def _publish_state(self) -> None:
        if self.telemetry is None:
            return
        status = self.status
        connected = self.link is not None and self.link.connected.is_set()
        params = self.params
        self._telemetry(
            "publish_state",
            state=DeviceState(status.state) if status and connected else "UNKNOWN",
            interlocks=status.interlocks if status else 0,
            faults=status.faults if status else 0,
            params=(
                {
                    "energy_uj": params.energy_uj,
                    "width_us": params.width_us,
                    "rate_mhz": params.rate_mhz,
                    "spot_um": params.spot_um,
                }
                if params
                else None
            ),
            armed=self.armed,
            session=str(self.treatment.id) if self.treatment else None,
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
            if self._sim_memory is not None:
                try:
                    self._sim_memory.save(self.sim_runner.board)
                except OSError as exc:
                    self._log.warning("simulator_memory_not_saved", error=str(exc))
            if self.telemetry is None:
                continue
            status = self.status
            self._telemetry(
                "publish_metrics",
                rate_hz=pulses / elapsed,
                avg_power_w=energy / 1e6 / elapsed,
                skin_temp_c=status.skin_temp_cdeg / 100 if status else None,
                head_temp_c=status.head_temp_cdeg / 100 if status else None,
                counters=self.link.stats if self.link else {},
            )
            if self.treatment is not None:
                self._telemetry("refresh_session", self._session_summary())

    def _session_summary(self) -> dict[str, Any]:
        treatment = self.treatment
        assert treatment is not None
        by_zone = dict(treatment.energy_by_zone_uj)
        return {
            "session": str(treatment.id),
            "operator": treatment.operator,
            "patient": treatment.patient,
            "skin_type": treatment.skin_type.name,
            "zone": treatment.zone.value if treatment.zone else None,
            "started": datetime.fromtimestamp(treatment.started, UTC),
            "pulses": treatment.pulses,
            "energy_uj": sum(by_zone.values()),
            "energy_uj_by_zone": by_zone,
            "duration_s": round(time.time() - treatment.started, 3),
            "faults": treatment.faults,
        }


def _actor(request: Any) -> Actor:
    """The verified actor the control layer put on ``request`` (it refuses one without)."""
    actor = request.actor
    if actor is None:
        raise AuthRefused("auth.required", f"{request.command} needs an identified user")
    assert isinstance(actor, Actor)
    return actor


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


def _mqtt_summary(summary: Any, treatment: _Treatment | None, *, ended: bool) -> dict[str, Any]:
    """The session log's closing summary in the MQTT contract's shape (``SessionSummary``);
    without the live treatment (a session a restart closed as interrupted) it has no operator,
    patient, skin type or zone."""
    by_zone = {str(zone): int(uj) for zone, uj in summary.energy_per_zone_uj.items()}
    return {
        "session": str(summary.session_id),
        "operator": treatment.operator if treatment else None,
        "patient": treatment.patient if treatment else None,
        "skin_type": treatment.skin_type.name if treatment else None,
        "zone": treatment.zone.value if treatment and treatment.zone else None,
        "started": datetime.fromtimestamp(summary.started_ns / 1e9, UTC),
        "ended": datetime.fromtimestamp(summary.ended_ns / 1e9, UTC) if ended else None,
        "pulses": summary.pulses,
        "energy_uj": sum(by_zone.values()),
        "energy_uj_by_zone": by_zone,
        "peak_fluence_j_cm2": summary.peak_fluence_j_cm2,
        "duration_s": summary.duration_s,
        "faults": summary.faults,
    }


def _params(params: PulseParams) -> dict[str, Any]:
    return {
        "energy_uj": params.energy_uj,
        "width_us": params.width_us,
        "rate_hz": params.rate_mhz / 1000,
        "spot_um": params.spot_um,
    }


def _breach_dict(breach: Breach) -> dict[str, Any]:
    return {
        "code": breach.alert_code,
        "severity": breach.severity.value,
        "value": breach.value,
        "limit": breach.limit,
        "unit": breach.unit,
        "detail": breach.detail,
        "pulse_no": breach.pulse_no,
        "message": breach.message,
    }


def _code_name(code: int) -> str:
    try:
        return FaultCode(code).name.lower()
    except ValueError:
        return f"fault_{code}"


async def run_daemon(settings: Settings, *, ready: Callable[[Daemon], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
    loop = asyncio.get_running_loop()
    notifier = SystemdNotifier()
    async with Daemon(settings, notifier=notifier) as daemon:
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
