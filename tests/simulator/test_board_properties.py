"""Properties of the simulated board: safety invariants under any sequence of inputs (hypothesis),
energy noise statistics, and recovery from a noisy, lossy link by re-sending."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocols import (
    INTERLOCK_NAMES,
    Ack,
    Arm,
    Boot,
    ClearFault,
    Command,
    DeviceState,
    Disarm,
    FaultCode,
    FaultEvent,
    Frame,
    GetStatus,
    Heartbeat,
    Hello,
    HostCodec,
    InputEvent,
    Message,
    Nak,
    Pulse,
    SetParams,
    SetReporting,
    StatusReport,
    Stop,
)
from simulator.board import Board, period_us
from tests.simulator.conftest import Bench, pulses

LEGAL = {DeviceState.STANDBY, DeviceState.READY, DeviceState.EMITTING, DeviceState.FAULT}

GOOD_PARAMS = [
    SetParams(1000, 200, 20_000, 300),  # 20 Hz
    SetParams(5000, 500, 100_000, 1000),  # 100 Hz
    SetParams(60_000, 1000, 500_000, 3000),  # 500 Hz, 30 W
]
commands = st.one_of(
    st.just(Hello()),
    st.just(GetStatus()),
    st.sampled_from(
        [*GOOD_PARAMS, SetParams(0, 200, 20_000, 300), SetParams(1000, 200, 20_000, 7)]
    ),
    st.builds(Arm, st.sampled_from([10, 50, 100, 250, 1000, 5000])),
    st.builds(Heartbeat, st.sampled_from([10, 50, 100, 250, 1000, 5000])),
    st.just(Disarm()),
    st.just(Stop()),
    st.just(ClearFault()),
    st.builds(SetReporting, st.sampled_from([0, 5, 10, 100, 1000])),
)


class BoardSafety(RuleBasedStateMachine):
    """Drives a board with arbitrary inputs and checks every frame it writes, as a host would
    see them (the link is clean here: link faults are tested on their own below)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 10_000
        self.board = Board(rng=random.Random(0), now_us=self.now)
        self.host = HostCodec()
        self.seq = 0
        # What the host has learnt from the frames so far.
        self.state = DeviceState.BOOT
        self.interlocks = 0
        self.params: SetParams | None = None
        self.lease_deadline = 0
        self.stopped = True  # a STOP/DISARM was sent since the last footswitch press
        self.train_period = 0
        self.last_pulse: Pulse | None = None
        self.last_event_seq: int | None = None
        self.pending: dict[int, Command] = {}  # seq -> command awaiting its reply
        # What the test did.
        self.stuck = False
        self.hung = False
        self.energy_setpoint = 0
        self.drain()

    # -- checking the stream
    def drain(self) -> None:
        self.host.receive_data(self.board.data_to_send(self.now))
        for frame in self.host.events():
            self.check(frame)

    def check(self, frame: Frame[Message]) -> None:
        msg = frame.message
        if msg.TYPE >= 0xA0:
            if isinstance(msg, Boot):
                assert frame.seq == 0
                self.state = DeviceState.BOOT
                self.params = None
            else:
                assert self.last_event_seq is not None
                assert frame.seq == (self.last_event_seq + 1) & 0xFF, "an event SEQ was skipped"
            self.last_event_seq = frame.seq
        if msg.TYPE < 0xA0:
            self.check_reply(frame)
        if isinstance(msg, StatusReport):
            assert DeviceState(msg.state) in LEGAL
            if self.state is DeviceState.BOOT:
                assert msg.state == DeviceState.STANDBY
            self.state = DeviceState(msg.state)
            self.interlocks = msg.interlocks
        elif isinstance(msg, InputEvent):
            self.interlocks = msg.interlocks
        elif isinstance(msg, Pulse):
            self.check_pulse(msg)

    def check_pulse(self, pulse: Pulse) -> None:
        last = self.last_pulse
        if last is not None:
            assert pulse.pulse_no == last.pulse_no + 1, "pulse_no must count up by one"
        if not self.stuck:
            assert self.state is DeviceState.EMITTING, f"pulse in {self.state.name}"
            assert self.interlocks == 0, "pulse with an interlock open"
            assert not self.stopped, "pulse after STOP/DISARM"
            assert pulse.t_us < self.lease_deadline, "pulse without a live lease"
            if last is not None:
                assert pulse.t_us - last.t_us >= self.train_period, "pulses closer than the period"
        assert not self.hung
        event("pulse while stuck-shutter is on" if self.stuck else "pulse")
        self.last_pulse = pulse

    def check_reply(self, frame: Frame[Message]) -> None:
        cmd = self.pending.pop(frame.seq)
        msg = frame.message
        event(f"reply {type(msg).__name__} to {type(cmd).__name__}")
        if isinstance(msg, Ack) and isinstance(cmd, SetParams):
            self.params = cmd
        if isinstance(msg, Ack) and isinstance(cmd, (Arm, Heartbeat)):
            self.lease_deadline = self.now + cmd.lease_ms * 1000
        if isinstance(msg, (Ack, Nak)):
            assert msg.command == cmd.TYPE

    # -- inputs
    @rule(cmd=commands)
    def send(self, cmd: Command) -> None:
        self.drain()
        self.seq = (self.seq + 1) & 0xFF
        if isinstance(cmd, (Stop, Disarm)):
            self.stopped = True
        if not self.hung:
            self.pending[self.seq] = cmd
        self.board.receive_data(self.host.send(self.seq, cmd), self.now)
        self.drain()
        assert self.seq not in self.pending, "every command gets exactly one reply, at once"

    @rule(params=st.sampled_from(GOOD_PARAMS), lease=st.sampled_from([250, 1000, 5000]))
    def treat(self, params: SetParams, lease: int) -> None:
        """What a host does most: configure, arm, press (each step checked as above)."""
        self.send(params)
        self.send(Arm(lease))
        self.footswitch(False)
        self.footswitch(True)

    @rule(lease=st.sampled_from([100, 1000, 5000]))
    def keep_alive(self, lease: int) -> None:
        self.send(Heartbeat(lease))

    @rule(down=st.booleans())
    def footswitch(self, down: bool) -> None:
        self.drain()
        if down and not self.board.status(self.now)["footswitch"]:
            self.stopped = False
            if self.state is DeviceState.READY and self.params is not None:
                self.train_period = period_us(self.params.rate_mhz)
        self.board.footswitch(down, self.now)
        self.drain()

    @rule(name=st.sampled_from(sorted(INTERLOCK_NAMES)), open_=st.booleans())
    def interlock(self, name: str, open_: bool) -> None:
        self.drain()
        self.board.interlock(name, open_, self.now)
        self.drain()

    @rule(fault=st.sampled_from(["stuck-shutter", "overheat", "hang", "drift-1.3", "drift-1.7"]))
    def inject(self, fault: str) -> None:
        self.drain()
        if fault.startswith("drift-"):
            self.board.inject("energy-drift", float(fault[6:]), self.now)
        else:
            self.board.inject(fault, None, self.now)
        self.stuck |= fault == "stuck-shutter"
        self.hung |= fault == "hang"
        self.drain()

    @rule()
    def clear_faults(self) -> None:
        self.drain()
        self.board.clear_faults(self.now)
        self.stuck = self.hung = False
        self.pending.clear()
        self.drain()

    @rule()
    def reboot(self) -> None:
        self.drain()
        self.board.reboot(self.now)
        self.hung = False
        self.pending.clear()
        self.drain()

    @rule(ms=st.one_of(st.integers(0, 200), st.integers(0, 6000)))
    def wait(self, ms: int) -> None:
        end = self.now + ms * 1000
        while self.now < end:  # a prompt caller: never 50 ms late
            self.now = min(end, self.now + 20_000)
            self.drain()

    # -- invariants between steps
    @invariant()
    def legal_state_and_live_lease(self) -> None:
        assert self.board.state in LEGAL
        if self.hung:
            return
        assert self.state is self.board.state
        if self.state in (DeviceState.READY, DeviceState.EMITTING):
            assert self.now < self.lease_deadline, "armed past the lease"

    @invariant()
    def head_cut_off(self) -> None:
        status = self.board.status(self.now)
        if not self.hung and float(str(status["head_temp_c"])) >= 45.01:
            assert FaultCode.OVERTEMP_HEAD.name in status["faults"]  # type: ignore[operator]
        for fault in status["faults"]:  # type: ignore[attr-defined]
            event(f"fault {fault}")


BoardSafety.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_board_safety_invariants = BoardSafety.TestCase


# ---------------------------------------------------------------- energy noise


def test_measured_energy_noise_is_2_percent_clipped_at_6() -> None:
    b = Bench(Board(rng=random.Random(11), now_us=0, max_rate_mhz=5_000_000), now_us=0)
    setpoint = 10_000
    b.emit(lease_ms=5000, params=SetParams(setpoint, 100, 5_000_000, 3000))
    b.run(4_000_000, step=40_000)
    eps = [p.energy_uj / setpoint - 1 for p in pulses(b.frames)]
    assert len(eps) == 20_001
    assert abs(statistics.fmean(eps)) < 0.0006
    assert 0.0190 < statistics.pstdev(eps) < 0.0206
    assert max(abs(e) for e in eps) <= 0.06 + 1e-9
    clipped = sum(abs(e) >= 0.06 - 1e-9 for e in eps)
    assert 20 < clipped < 110  # P(|z| > 3) = 0.27 %: about 54 of 20,000 at the clip
    within_1_sigma = sum(abs(e) <= 0.02 for e in eps) / len(eps)
    assert within_1_sigma == pytest.approx(0.683, abs=0.015)


# ---------------------------------------------------------------- a noisy, lossy link


def transact(b: Bench, cmd: Command, seq: int, tries: int = 60) -> Message:
    """Send ``cmd`` with ``seq`` until its reply arrives, as the host's retry rule does."""
    for _ in range(tries):
        frames = b.send(cmd, seq=seq) + b.run(50_000)
        for frame in frames:
            if frame.message.TYPE < 0xA0 and frame.seq == seq:
                return frame.message
    pytest.fail(f"no reply to {cmd} after {tries} sends")


@pytest.mark.parametrize(("fault", "value"), [("line-noise", 2e-3), ("drop-frames", 0.3)])
def test_a_noisy_or_lossy_link_recovers_by_re_sending(fault: str, value: float) -> None:
    b = Bench(Board(rng=random.Random(7)))
    b.board.inject(fault, value, b.now)
    seq = 0
    script: list[tuple[Command, Message]] = [(Hello(), b.board.ident)]
    script.append((GOOD_PARAMS[0], Ack(SetParams.TYPE)))
    for _ in range(15):
        # Not idempotent: executing a re-sent ARM twice would answer BAD_STATE.
        script += [(Arm(5000), Ack(Arm.TYPE)), (Disarm(), Ack(Disarm.TYPE))]
    for cmd, expected in script:
        seq = (seq + 1) & 0xFF
        assert transact(b, cmd, seq) == expected
    link = b.board.link
    assert link.replays > 0  # some replies were lost and re-sent from memory
    if fault == "line-noise":
        assert link.bits_flipped_in > 0
        assert link.bits_flipped_out > 0
        assert b.host.counters.dropped > 0
    else:
        assert link.dropped_in > 0
        assert link.dropped_out > 0
    b.board.clear_faults(b.now)
    reply = transact(b, GetStatus(), (seq + 1) & 0xFF, tries=1)
    assert isinstance(reply, StatusReport)
    assert reply.state == DeviceState.STANDBY


def test_energy_monitor_fault_follows_the_offending_pulse_directly() -> None:
    b = Bench(Board(rng=random.Random(2)))
    b.board.inject("energy-drift", 0.4, b.now)
    b.arm()
    b.board.footswitch(True, b.now)
    b.receive()
    kinds = [type(f.message).__name__ for f in b.frames[-3:]]
    assert kinds == ["Pulse", "FaultEvent", "StatusEvent"]
    fault = b.frames[-2].message
    assert isinstance(fault, FaultEvent)
    assert fault.code == FaultCode.ENERGY_MONITOR
    assert fault.detail < 500
