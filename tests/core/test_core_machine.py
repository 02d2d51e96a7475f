"""A hypothesis state machine over the treatment core: random interleavings of operator requests,
device replies (ACK, NAK, lost, abandoned by STOP), PULSEs (on time, early, drifting, lost on the
wire), STATUS, FAULT, BOOT and lost links — against a model of the device, with a real session log
carrying out the core's records.

The invariants: every pulse is judged against the parameters the device acknowledged and the zone
it is charged to; no pulse is accepted once the device has acknowledged the STOP; the core's
ledger and the log's summary agree at every step (and ``session end``'s reply is the log's closing
summary); nothing is armed that the operator was told is refused.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from devicectl.core import (
    PULSE_FOLLOW,
    PULSE_RECORD,
    PULSE_STOP,
    AckFault,
    ArmLaser,
    ChangeZone,
    CloseSession,
    DisarmLaser,
    Effect,
    EndSession,
    OpenSession,
    RecordEvent,
    RecordGap,
    RecordParams,
    RecordZone,
    Refuse,
    Refused,
    Reply,
    Request,
    Send,
    SetParams,
    StartSession,
    StopEmission,
    TreatmentCore,
)
from devicectl.errors import DeviceRefused, LinkLost
from devicectl.link import DeviceRebooted, SupersededByStop
from devicectl.policy import PulseParams, SkinType, Zone, load_policy
from devicectl.sessionlog import SessionLog
from protocols.messages import (
    Arm,
    ClearFault,
    DeviceState,
    Disarm,
    FaultCode,
    MessageType,
    StatusReport,
)
from protocols.messages import SetParams as SetParamsCommand
from tests.core.helpers import IDENT
from tests.sessionlog.helpers import session_info

NOW = 1_800_000_000_000_000_000
ENERGIES = st.sampled_from([2_000, 5_000, 6_000, 8_000])
ZONES = st.sampled_from([Zone.FOREHEAD, Zone.PERIORBITAL, Zone.CHEEKS])


def note(text: str) -> None:
    """What a run reached: counted, and in hypothesis' statistics."""
    CoreMachine.seen[text] += 1
    with contextlib.suppress(InvalidArgument):
        event(text)


class CoreMachine(RuleBasedStateMachine):
    log: SessionLog  # one for every example of a run (opening one per example costs 0.5 s)
    seen: ClassVar[collections.Counter[str]] = collections.Counter()  # what a run reached

    def __init__(self) -> None:
        super().__init__()
        self.core = TreatmentCore(load_policy(), lease_ms=1500)
        self.now = NOW
        # The device, as the model sees it.
        self.dev_params: PulseParams | None = None
        self.dev_armed = False
        self.dev_fault = 0
        self.count = 0  # the device's pulse counter
        self.t_us = 0
        self.stop_wanted = False  # a STOP written, its ACK not yet delivered
        self.host_off = True  # the host saw STOP's or DISARM's ACK (or no ARM's) last
        # The operator request in flight and the command it awaits.
        self.asked: Request | None = None
        self.sent: Send | None = None
        self.told_refused_arm = False
        self.run(self.core.on_connected(IDENT, self.status(), 0.0))

    def teardown(self) -> None:
        open_id = self.log.open_session()
        if open_id is not None:  # the next example starts with none
            self.log.end_session(open_id, actor="test")

    # ------------------------------------------------------------ carrying out effects

    def status(self, state: int | None = None) -> StatusReport:
        if state is None:
            state = DeviceState.FAULT if self.dev_fault else (
                DeviceState.READY if self.dev_armed else DeviceState.STANDBY
            )  # fmt: skip
        lease = 1500 if self.dev_armed else 0
        return StatusReport(state, 0, self.dev_fault, self.count, 2500, 3000, lease)

    def tick(self) -> int:
        self.now += 1_000_000
        return self.now

    def run(self, effects: list[Effect]) -> None:
        if any(isinstance(e, StopEmission) for e in effects):
            self.write_stop()
        for effect in effects:
            match effect:
                case RecordEvent(session, kind, actor, detail, reason):
                    self.log.record_event(session, kind, actor, detail, reason)
                case RecordGap(session, first, last, charged, zone, cause):
                    self.log.record_pulse_gap(
                        session, first, last, charged_energy_uj=charged, zone=zone, cause=cause
                    )
                case RecordZone(session, zone, actor, limit):
                    self.log.record_zone(session, zone, actor=actor, energy_limit_uj=limit)
                case RecordParams(session, params, actor):
                    self.log.record_params(
                        session, energy_uj=params.energy_uj, width_us=params.width_us,
                        rate_mhz=params.rate_mhz, spot_um=params.spot_um, actor=actor,
                    )  # fmt: skip
                case Send():
                    assert self.sent is None, "two commands in flight"
                    self.sent = effect
                case OpenSession(ingredient):
                    opened = self.log.start_session(
                        self.session_info(ingredient), host_time_ns=self.now
                    )
                    self.run(self.core.session_opened(opened.session_id, self.now))
                case CloseSession(session, actor, post_care):
                    now = self.tick()
                    summary = self.log.end_session(
                        session, actor=actor, post_care=post_care, host_time_ns=now
                    )
                    effects = self.core.session_closed(now)
                    outcome = effects[-1]
                    assert isinstance(outcome, Reply)
                    # One totals owner: session end's reply is the log's closing summary.
                    assert dict(outcome.result) == summary.to_dict()
                    self.run(effects)
                case Reply() | Refuse():
                    self.finish(effect)

    def session_info(self, ingredient: str) -> dict[str, Any]:
        return session_info(device_serial=f"{IDENT.serial:08X}", active_ingredient=ingredient)

    def finish(self, outcome: Reply | Refuse) -> None:
        if isinstance(self.asked, ArmLaser) and isinstance(outcome, Refuse):
            self.told_refused_arm = True
        elif isinstance(self.asked, ArmLaser):
            self.told_refused_arm = False
        self.asked = None

    def write_stop(self) -> None:
        """STOP goes out ahead of everything: the command in flight is abandoned (the device may
        have run it: the worst case, it did) and the STOP is re-sent until acknowledged."""
        self.stop_wanted = True
        sent, self.sent = self.sent, None
        if sent is not None:
            self.execute(sent)
            self.run(self.core.settled(sent.command.TYPE, SupersededByStop("x"), self.tick()))

    def execute(self, sent: Send) -> bool:
        """The device runs a command; False when it refuses it (NAK)."""
        command = sent.command
        if isinstance(command, SetParamsCommand):
            self.dev_params = PulseParams(
                command.energy_uj, command.width_us, command.rate_mhz, command.spot_um
            )
            return True
        if isinstance(command, Arm):
            if self.dev_fault or self.dev_params is None or self.dev_armed:
                return False
            self.dev_armed = True
            return True
        if isinstance(command, Disarm):
            self.dev_armed = False
            return True
        if isinstance(command, ClearFault):
            self.dev_fault = 0
            return True
        raise AssertionError(f"unexpected command {command!r}")

    # ------------------------------------------------------------ operator requests

    def begin(self, request: Request) -> None:
        if self.asked is not None:
            effects = self.core.begin(request, self.tick())
            outcome = effects[-1]
            assert isinstance(outcome, Refuse), effects
            assert isinstance(outcome.error, Refused)
            assert outcome.error.rule == "request_in_progress"
            note("a request refused while another was in progress")
            self.run(effects[:-1])
            return
        self.asked = request
        self.run(self.core.begin(request, self.tick()))

    def start(self) -> None:
        self.begin(StartSession("OP-7", "PT-0042", SkinType.III, None, "hyaluronic acid"))

    def zone(self, zone: Zone) -> None:
        self.begin(ChangeZone("OP-7", zone))

    def params(self, energy: int) -> None:
        self.begin(SetParams("OP-7", energy, 1_000, 10_000, 300))

    def arm(self) -> None:
        self.begin(ArmLaser("OP-7"))

    @rule(
        kind=st.sampled_from(["start", "zone", "params", "arm", "disarm", "ack", "end"]),
        zone=ZONES,
        energy=ENERGIES,
    )
    def request(self, kind: str, zone: Zone, energy: int) -> None:
        """One operator request, of any kind, at any moment (another may be in flight)."""
        if kind == "start":
            self.start()
        elif kind == "zone":
            self.zone(zone)
        elif kind == "params":
            self.params(energy)
        elif kind == "arm":
            self.arm()
        elif kind == "disarm":
            self.begin(DisarmLaser("OP-7"))
        elif kind == "ack":
            self.begin(AckFault("OP-7", "checked"))
        else:
            self.begin(EndSession("OP-7"))

    @precondition(lambda self: self.asked is None and not self.core.armed)
    @rule(zone=ZONES, energy=ENERGIES)
    def treat(self, zone: Zone, energy: int) -> None:
        """The usual way to emission, step by step through the same requests and replies."""
        steps: list[Callable[[], None]] = []
        if self.core.latched is not None or self.core.device_fault:
            steps.append(lambda: self.begin(AckFault("OP-7", "checked")))
        if self.core.ledger is None:
            steps.append(self.start)
        steps += [lambda: self.zone(zone), lambda: self.params(energy), self.arm]
        for step in steps:
            step()
            while self.sent is not None:
                self.answer(True)
            if self.asked is not None:
                return

    # ------------------------------------------------------------ the device answers

    @precondition(lambda self: self.sent is not None)
    @rule(ack=st.booleans())
    def answer(self, ack: bool) -> None:
        if self.stop_wanted:  # the link sends a STOP first: commands wait for its ACK
            self.stop_acked()
            if self.sent is None:
                return
        sent, self.sent = self.sent, None
        assert sent is not None
        acked = ack and self.execute(sent)
        command = sent.command.TYPE
        if acked and command == MessageType.ARM:
            self.host_off = False
        elif acked and command == MessageType.DISARM:
            self.host_off = True
        self.run(self.core.on_reply(command, acked))
        error = None if acked else DeviceRefused(MessageType(command).name, "BAD_STATE")
        self.run(self.core.settled(command, error, self.tick()))

    @precondition(lambda self: self.sent is not None)
    @rule(ran=st.booleans())
    def reply_lost(self, ran: bool) -> None:
        if self.stop_wanted:
            self.stop_acked()
            if self.sent is None:
                return
        sent, self.sent = self.sent, None
        assert sent is not None
        if ran:
            self.execute(sent)
        self.run(self.core.settled(sent.command.TYPE, LinkLost("no reply"), self.tick()))

    @precondition(lambda self: self.stop_wanted)
    @rule()
    def stop_acked(self) -> None:
        self.stop_wanted = False
        self.dev_armed = False
        self.host_off = True
        self.run(self.core.on_reply(MessageType.STOP, True))

    # ------------------------------------------------------------ the device's events

    def judge(self, pulse_no: int, energy: int) -> int:
        core = self.core
        supervisor = core.supervisor
        assert supervisor is not None
        if supervisor.armed:
            # Judged against what the device runs and the zone the pulse is charged to.
            limits = supervisor.limits
            assert limits is not None and limits.params == self.dev_params, (
                limits,
                self.dev_params,
            )
            assert supervisor.zone == core.zone
            note("a pulse judged while armed")
        flags = core.on_pulse(pulse_no, self.t_us, energy)
        if flags & PULSE_STOP:
            note("a pulse stopped the laser")
        if flags & PULSE_STOP:
            self.write_stop()
        if flags & PULSE_FOLLOW:
            self.run(core.take_effects())
        if flags & PULSE_RECORD:
            session = core.session_id
            assert session is not None
            self.log.record_pulse(session, pulse_no, self.t_us, self.now, energy, core.zone_name)
        return flags

    @precondition(lambda self: self.dev_armed)
    @rule(
        train=st.integers(1, 8),
        lost=st.integers(0, 3),
        drift=st.sampled_from([1.0, 1.0, 1.0, 1.1, 1.4]),
        early=st.booleans(),
    )
    def pulse(self, train: int, lost: int, drift: float, early: bool) -> None:
        """A train of pulses; the last may follow ``lost`` pulses lost on the wire, or come
        early, or drift."""
        for i in range(train):
            if not self.dev_armed:  # STOP's ACK: the device stopped
                return
            assert self.dev_params is not None
            period = 10**9 // self.dev_params.rate_mhz
            last = i == train - 1
            skipped = lost if last else 0
            self.t_us += (period // 2 if early and last else period) * (skipped + 1)
            self.count += skipped + 1
            energy = round(self.dev_params.energy_uj * (drift if last else 1.0))
            self.judge(self.count, energy)

    @precondition(lambda self: self.host_off and not self.dev_armed)
    @rule()
    def stuck_shutter(self) -> None:
        """A pulse after the ACK of STOP or DISARM (or before any ARM's): never accepted."""
        self.t_us += 100_000
        self.count += 1
        assert self.judge(self.count, 6_000) & PULSE_STOP

    @rule()
    def status_event(self) -> None:
        self.run(self.core.on_status(self.status()))

    @rule()
    def boot(self) -> None:
        self.dev_params, self.dev_armed, self.dev_fault, self.t_us = None, False, 0, 0
        self.stop_wanted = False
        self.host_off = True  # the supervisor disarms at BOOT
        sent, self.sent = self.sent, None
        self.run(self.core.on_boot(0))
        if sent is not None:
            error = DeviceRebooted(MessageType(sent.command.TYPE).name, 0)
            self.run(self.core.settled(sent.command.TYPE, error, self.tick()))
        self.run(self.core.on_connected(IDENT, self.status(), 0.0))

    @rule()
    def lease_expires(self) -> None:
        if not self.dev_armed:
            return
        self.dev_armed = False
        self.host_off = True  # and at a FAULT event
        self.dev_fault = FaultCode.LEASE_EXPIRED.bit
        self.run(self.core.on_fault(FaultCode.LEASE_EXPIRED, 0))
        self.run(self.core.on_status(self.status()))

    @rule(fired=st.integers(0, 5))
    def link_lost_and_back(self, fired: int) -> None:
        sent, self.sent = self.sent, None
        self.run(self.core.on_link_lost("no STATUS for 3 periods", 0.0))
        if sent is not None:
            self.run(self.core.settled(sent.command.TYPE, LinkLost("lost"), self.tick()))
        if self.dev_armed:
            self.count += fired  # under its lease, unseen
            self.t_us += fired * 100_000
        if self.stop_wanted:  # the handshake sends it first
            self.stop_acked()
        self.run(self.core.on_connected(IDENT, self.status(), 1.0))

    # ------------------------------------------------------------ invariants

    @invariant()
    def armed_only_on_what_the_device_runs(self) -> None:
        core = self.core
        if core.armed:
            assert core.supervisor is not None and core.supervisor.armed
            assert core.acked == self.dev_params
            assert core.supervisor.limits is not None
            assert core.supervisor.limits.params == self.dev_params
            assert core.supervisor.zone == core.zone

    @invariant()
    def nothing_armed_after_a_refused_arm(self) -> None:
        if self.told_refused_arm:
            assert not self.core.armed
            assert not self.dev_armed or self.stop_wanted

    @invariant()
    def the_ledger_is_the_log_summary(self) -> None:
        ledger = self.core.ledger
        summary = self.log.current_summary(host_time_ns=self.now)
        if ledger is None:
            assert summary is None
            return
        assert summary is not None
        mine = ledger.summary("open", self.now)
        assert mine == summary.to_dict()


def test_the_core_under_random_interleavings(tmp_path: Path) -> None:
    # The log is the core's reference for the totals, not under test here: a machine loaded by
    # other work must not make a commit look stalled (2 s by default) and change the run.
    with SessionLog.open(tmp_path / "sessions.db", synchronous="OFF", stall_timeout_s=120.0) as log:
        CoreMachine.log = log
        CoreMachine.seen.clear()
        run_state_machine_as_test(
            CoreMachine,
            settings=settings(
                max_examples=150,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    seen = CoreMachine.seen
    assert seen["a pulse judged while armed"] > 100, seen
    assert seen["a pulse stopped the laser"] > 10, seen
    assert seen["a request refused while another was in progress"] > 0, seen


def test_the_device_model_is_not_vacuous(tmp_path: Path) -> None:
    """The machine reaches emission: a run that arms and fires, by hand."""
    with SessionLog.open(tmp_path / "sessions.db", synchronous="OFF") as log:
        CoreMachine.log = log
        _by_hand()


def _by_hand() -> None:
    machine = CoreMachine()
    try:
        machine.request("start", Zone.FOREHEAD, 6_000)
        machine.zone(Zone.FOREHEAD)
        machine.params(6_000)
        machine.answer(True)
        machine.arm()
        machine.answer(True)
        assert machine.core.armed and machine.dev_armed
        machine.pulse(3, 0, 1.0, False)
        machine.pulse(1, 2, 1.0, False)  # two lost on the wire
        machine.the_ledger_is_the_log_summary()
        assert machine.core.ledger is not None and machine.core.ledger.unlogged_pulses == 2
    finally:
        machine.teardown()
