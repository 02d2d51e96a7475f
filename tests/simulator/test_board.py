"""The simulated board against docs/protocol.md, byte level, on an injected clock."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable

import pytest

from protocols import (
    Ack,
    Arm,
    Boot,
    BootReason,
    ClearFault,
    Command,
    DeviceState,
    Disarm,
    FaultCode,
    FaultEvent,
    GetStatus,
    Heartbeat,
    Hello,
    Ident,
    InputEvent,
    Message,
    Nak,
    NakReason,
    SetParams,
    SetReporting,
    StatusEvent,
    StatusReply,
    Stop,
    encode_frame,
)
from simulator.board import Board, BoardInputError, period_us
from tests.simulator.conftest import PARAMS, PERIOD_US, Bench, messages_of, pulses, statuses

S = DeviceState


def in_standby(b: Bench) -> None:
    b.ack(PARAMS)


def in_ready(b: Bench) -> None:
    b.arm()


def in_emitting(b: Bench) -> None:
    b.emit()


def in_fault(b: Bench) -> None:
    b.arm(lease_ms=50)
    b.tick(50_000)
    assert b.state() is S.FAULT


SETUP: dict[DeviceState, Callable[[Bench], None]] = {
    S.STANDBY: in_standby,
    S.READY: in_ready,
    S.EMITTING: in_emitting,
    S.FAULT: in_fault,
}


def ack(cmd: Command) -> Message:
    return Ack(cmd.TYPE)


def nak(cmd: Command, reason: NakReason) -> Message:
    return Nak(cmd.TYPE, reason)


P2 = SetParams(2000, 300, 10_000, 1000)
ROWS: list[tuple[DeviceState, Command, Message | type[Message], DeviceState]] = [
    # HELLO: IDENT everywhere, no state change
    *((st, Hello(), Ident, st) for st in SETUP),
    # GET_STATUS: STATUS everywhere
    *((st, GetStatus(), StatusReply, st) for st in SETUP),
    # SET_PARAMS: ACK in STANDBY, READY (stays armed), FAULT; NAK BAD_STATE in EMITTING
    (S.STANDBY, P2, ack(P2), S.STANDBY),
    (S.READY, P2, ack(P2), S.READY),
    (S.EMITTING, P2, nak(P2, NakReason.BAD_STATE), S.EMITTING),
    (S.FAULT, P2, ack(P2), S.FAULT),
    # ARM
    (S.STANDBY, Arm(250), ack(Arm(250)), S.READY),
    (S.READY, Arm(250), nak(Arm(250), NakReason.BAD_STATE), S.READY),
    (S.EMITTING, Arm(250), nak(Arm(250), NakReason.BAD_STATE), S.EMITTING),
    (S.FAULT, Arm(250), nak(Arm(250), NakReason.FAULT_ACTIVE), S.FAULT),
    # HEARTBEAT
    (S.STANDBY, Heartbeat(250), nak(Heartbeat(250), NakReason.BAD_STATE), S.STANDBY),
    (S.READY, Heartbeat(250), ack(Heartbeat(250)), S.READY),
    (S.EMITTING, Heartbeat(250), ack(Heartbeat(250)), S.EMITTING),
    (S.FAULT, Heartbeat(250), nak(Heartbeat(250), NakReason.BAD_STATE), S.FAULT),
    # DISARM and STOP: ACK; armed states to STANDBY; FAULT stays
    (S.STANDBY, Disarm(), ack(Disarm()), S.STANDBY),
    (S.READY, Disarm(), ack(Disarm()), S.STANDBY),
    (S.EMITTING, Disarm(), ack(Disarm()), S.STANDBY),
    (S.FAULT, Disarm(), ack(Disarm()), S.FAULT),
    (S.STANDBY, Stop(), ack(Stop()), S.STANDBY),
    (S.READY, Stop(), ack(Stop()), S.STANDBY),
    (S.EMITTING, Stop(), ack(Stop()), S.STANDBY),
    (S.FAULT, Stop(), ack(Stop()), S.FAULT),
    # CLEAR_FAULT: FAULT -> STANDBY (LEASE_EXPIRED never persists); ACK, no effect elsewhere
    (S.STANDBY, ClearFault(), ack(ClearFault()), S.STANDBY),
    (S.READY, ClearFault(), ack(ClearFault()), S.READY),
    (S.EMITTING, ClearFault(), ack(ClearFault()), S.EMITTING),
    (S.FAULT, ClearFault(), ack(ClearFault()), S.STANDBY),
    # SET_REPORTING: ACK everywhere
    *((st, SetReporting(50), ack(SetReporting(50)), st) for st in SETUP),
    *((st, SetReporting(5), nak(SetReporting(5), NakReason.OUT_OF_RANGE), st) for st in SETUP),
]


@pytest.mark.parametrize(
    ("state", "cmd", "reply", "after"),
    ROWS,
    ids=[f"{r[0].name}-{type(r[1]).__name__}-{i}" for i, r in enumerate(ROWS)],
)
def test_every_state_command_pair_replies_as_section_3_says(
    bench: Bench,
    state: DeviceState,
    cmd: Command,
    reply: Message | type[Message],
    after: DeviceState,
) -> None:
    SETUP[state](bench)
    assert bench.state() is state
    got = bench.command(cmd)
    if isinstance(reply, type):
        assert isinstance(got, reply)
    else:
        assert got == reply
    assert bench.state() is after
    if isinstance(got, StatusReply):
        assert got.state == state


def test_every_state_and_command_is_in_the_table() -> None:
    covered = {(st, type(cmd)) for st, cmd, _, _ in ROWS}
    commands = {Hello, GetStatus, SetParams, Arm, Heartbeat, Disarm, Stop, ClearFault, SetReporting}
    assert covered == {(st, c) for st in SETUP for c in commands}


def test_boot_sends_boot_with_seq_0_then_status_standby() -> None:
    b = Bench()
    assert [f.seq for f in b.frames] == [0, 1]
    assert b.frames[0].message == Boot(BootReason.POWER_ON)
    status = statuses(b.frames)[0]
    assert status.state == S.STANDBY
    assert status.faults == 0
    assert status.lease_left_ms == 0


def test_ident_describes_the_simulated_board() -> None:
    b = Bench(Board(serial=0x5100_0042, max_rate_mhz=5_000_000))
    ident = b.command(Hello())
    assert ident == Ident(1, (1, 0, 0), 0x5100_0042, 1550, 60_000, 100, 20_000, 5_000_000,
                          (120, 300, 1000, 3000))  # fmt: skip


def test_hello_with_an_unknown_proto_still_gets_the_devices_ident(bench: Bench) -> None:
    reply = bench.command(Hello(proto=7))
    assert isinstance(reply, Ident)
    assert reply.proto == 1


def test_arm_naks_in_the_documented_order(bench: Bench) -> None:
    # No params, an interlock open and a bad lease: the lease is named first.
    bench.board.interlock("door", True, bench.now)
    assert bench.nak(Arm(10)) == NakReason.OUT_OF_RANGE
    assert bench.nak(Arm(5001)) == NakReason.OUT_OF_RANGE
    # Good lease, no params, interlock open: NOT_CONFIGURED before INTERLOCK_OPEN.
    assert bench.nak(Arm(250)) == NakReason.NOT_CONFIGURED
    bench.ack(PARAMS)
    assert bench.nak(Arm(250)) == NakReason.INTERLOCK_OPEN
    bench.board.interlock("door", False, bench.now)
    bench.ack(Arm(250))
    # READY with a bad lease: BAD_STATE before OUT_OF_RANGE.
    assert bench.nak(Arm(10)) == NakReason.BAD_STATE
    bench.board.interlock("estop", True, bench.now)
    assert bench.state() is S.FAULT
    # FAULT with everything else wrong too: FAULT_ACTIVE first.
    assert bench.nak(Arm(10)) == NakReason.FAULT_ACTIVE


@pytest.mark.parametrize(
    "params",
    [
        SetParams(0, 200, 20_000, 300),
        SetParams(60_001, 200, 20_000, 300),
        SetParams(1000, 99, 20_000, 300),
        SetParams(1000, 20_001, 1000, 300),
        SetParams(1000, 200, 0, 300),
        SetParams(1000, 200, 500_001, 300),
        SetParams(1000, 200, 20_000, 301),
        SetParams(1000, 2000, 500_000, 300),  # width == period
        SetParams(1000, 2001, 500_000, 300),  # width > period
    ],
)
def test_set_params_out_of_range_is_refused(bench: Bench, params: SetParams) -> None:
    assert bench.nak(params) == NakReason.OUT_OF_RANGE
    assert bench.nak(Arm(250)) == NakReason.NOT_CONFIGURED


def test_set_params_at_the_limits_is_accepted(bench: Bench) -> None:
    bench.ack(SetParams(1, 100, 1, 120))
    bench.ack(SetParams(60_000, 1999, 500_000, 3000))
    bench.ack(SetParams(60_000, 20_000, 49_000, 1000))


def test_heartbeat_lease_out_of_range_is_refused_when_armed(bench: Bench) -> None:
    bench.arm()
    assert bench.nak(Heartbeat(49)) == NakReason.OUT_OF_RANGE
    assert bench.nak(Heartbeat(5001)) == NakReason.OUT_OF_RANGE


def test_unknown_type_and_bad_length_are_nakd(bench: Bench) -> None:
    frames = bench.send_raw(encode_frame(9, 0x3F, b""))
    assert [(f.seq, f.message) for f in frames] == [(9, Nak(0x3F, NakReason.UNKNOWN_TYPE))]
    frames = bench.send_raw(encode_frame(10, Arm.TYPE, b"\x01"))
    assert [(f.seq, f.message) for f in frames] == [(10, Nak(Arm.TYPE, NakReason.BAD_LENGTH))]
    frames = bench.send_raw(encode_frame(11, 0x80, b"\x01"))  # a reply TYPE sent by a host
    assert [(f.seq, f.message) for f in frames] == [(11, Nak(0x80, NakReason.UNKNOWN_TYPE))]


# ---------------------------------------------------------------- reply memory


def test_a_repeated_command_gets_the_remembered_reply_byte_for_byte_without_executing(
    bench: Bench,
) -> None:
    bench.ack(PARAMS)
    first = bench.board.data_to_send(bench.now)
    assert first == b""
    arm = bench.host.send(7, Arm(1000))
    bench.board.receive_data(arm, bench.now)
    reply = bench.board.data_to_send(bench.now)
    ack_bytes = encode_frame(7, Ack.TYPE, bytes([Arm.TYPE]))
    assert reply.startswith(ack_bytes)  # then STATUS READY
    # DISARM is a physical event here (interlock) so that no command replaces the memory.
    bench.board.interlock("key", True, bench.now)
    bench.board.interlock("key", False, bench.now)
    assert bench.state() is S.FAULT
    bench.board.data_to_send(bench.now)
    # Same SEQ and TYPE, a different payload: the remembered ACK, not FAULT_ACTIVE; no execution.
    bench.board.receive_data(bench.host.send(7, Arm(2000)), bench.now)
    assert bench.board.data_to_send(bench.now) == ack_bytes
    assert bench.state() is S.FAULT
    assert bench.board.link.replays == 1


def test_naks_are_remembered_too(bench: Bench) -> None:
    bench.board.interlock("door", True, bench.now)
    bench.ack(PARAMS)
    assert bench.nak(Arm(250)) == NakReason.INTERLOCK_OPEN
    bench.board.interlock("door", False, bench.now)
    bench.receive()
    # Re-sent: the same NAK, although ARM would now succeed.
    assert bench.command(Arm(250), seq=bench.seq) == Nak(Arm.TYPE, NakReason.INTERLOCK_OPEN)
    assert bench.state() is S.STANDBY
    # A different TYPE with the same SEQ is a new command.
    reply = bench.command(GetStatus(), seq=bench.seq)
    assert isinstance(reply, StatusReply)
    assert reply.state == S.STANDBY


def test_hello_always_executes_and_clears_the_memory(bench: Bench) -> None:
    bench.ack(PARAMS)
    bench.board.interlock("door", True, bench.now)
    assert bench.command(Arm(250), seq=40) == Nak(Arm.TYPE, NakReason.INTERLOCK_OPEN)
    bench.board.interlock("door", False, bench.now)
    assert isinstance(bench.command(Hello(), seq=41), Ident)
    assert isinstance(bench.command(Hello(), seq=41), Ident)  # executed again, not replayed
    assert bench.board.link.replays == 0
    assert bench.command(Arm(250), seq=40) == Ack(Arm.TYPE)
    assert bench.state() is S.READY


def test_reboot_clears_the_memory(bench: Bench) -> None:
    assert bench.command(Arm(250), seq=3) == Nak(Arm.TYPE, NakReason.NOT_CONFIGURED)
    bench.board.reboot(bench.now)
    bench.receive()
    # The board forgot SEQ 3: this ARM is executed (and refused for another reason).
    bench.board.interlock("door", True, bench.now)
    assert bench.command(SetParams(1000, 200, 20_000, 300), seq=2) == Ack(SetParams.TYPE)
    assert bench.command(Arm(250), seq=3) == Nak(Arm.TYPE, NakReason.INTERLOCK_OPEN)
    assert bench.board.link.replays == 0


# ---------------------------------------------------------------- events


def test_event_seq_is_one_counter_for_all_events_and_wraps(bench: Bench) -> None:
    bench.emit(lease_ms=5000)
    for _ in range(100):
        bench.tick(100_000)
        bench.ack(Heartbeat(5000))
    events = [f for f in bench.frames if f.message.TYPE >= 0xA0]
    assert len(events) > 300
    assert {type(f.message).__name__ for f in events} >= {"Boot", "StatusEvent", "InputEvent",
                                                          "Pulse"}  # fmt: skip
    for prev, cur in itertools.pairwise(events):
        assert cur.seq == (prev.seq + 1) & 0xFF


def test_status_every_period_and_set_reporting(bench: Bench) -> None:
    assert len(statuses(bench.run(1_000_000))) == 10
    bench.ack(SetReporting(0))
    assert statuses(bench.run(1_000_000)) == []
    bench.ack(SetReporting(10))
    assert len(statuses(bench.run(100_000, step=5_000))) == 10
    assert bench.nak(SetReporting(10_001)) == NakReason.OUT_OF_RANGE
    bench.board.reboot(bench.now)
    bench.receive()
    assert len(statuses(bench.run(1_000_000))) == 10  # back to 100 ms at boot


def test_status_on_every_change_of_state(bench: Bench) -> None:
    bench.ack(SetReporting(0))
    bench.emit(lease_ms=100)
    bench.board.footswitch(False, bench.now)
    bench.tick(200_000)  # lease runs out
    bench.ack(ClearFault())
    states = [s.state for s in statuses(bench.frames)]
    assert states == [S.STANDBY, S.READY, S.EMITTING, S.READY, S.FAULT, S.STANDBY]


def test_input_event_on_every_change_of_footswitch_or_interlocks(bench: Bench) -> None:
    board = bench.board
    board.footswitch(True, bench.now)
    board.footswitch(True, bench.now)  # no change: no event
    board.interlock("contact", True, bench.now)
    board.interlock("cooling", True, bench.now)
    board.interlock("contact", False, bench.now)
    board.footswitch(False, bench.now)
    inputs = messages_of(bench.receive(), InputEvent)
    assert inputs == [InputEvent(1, 0), InputEvent(1, 8), InputEvent(1, 24), InputEvent(1, 16),
                      InputEvent(0, 16)]  # fmt: skip


def test_unknown_interlock_and_fault_names_raise_one_line_value_errors(bench: Bench) -> None:
    with pytest.raises(ValueError, match="unknown interlock 'window'"):
        bench.board.interlock("window", True, bench.now)
    with pytest.raises(BoardInputError, match="unknown fault 'fire'"):
        bench.board.inject("fire", None, bench.now)
    with pytest.raises(ValueError, match="needs a value"):
        bench.board.inject("energy-drift", None, bench.now)
    with pytest.raises(ValueError, match="takes no value"):
        bench.board.inject("hang", 1.0, bench.now)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        bench.board.inject("drop-frames", 1.5, bench.now)
    with pytest.raises(ValueError, match="must be above 0"):
        bench.board.inject("energy-drift", 0.0, bench.now)
    with pytest.raises(ValueError, match="not a finite number"):
        bench.board.inject("line-noise", float("nan"), bench.now)


# ---------------------------------------------------------------- lease, footswitch, interlocks


def test_lease_expiry_in_ready_and_emitting_faults(bench: Bench) -> None:
    bench.arm(lease_ms=100)
    bench.tick(99_999)
    assert bench.state() is S.READY
    frames = bench.tick(1)
    assert bench.state() is S.FAULT
    assert messages_of(frames, FaultEvent) == [FaultEvent(FaultCode.LEASE_EXPIRED, 0)]
    assert statuses(frames)[-1].faults == FaultCode.LEASE_EXPIRED.bit


def test_heartbeat_replaces_the_remaining_lease(bench: Bench) -> None:
    bench.emit(lease_ms=1000)
    bench.tick(50_000)
    bench.ack(Heartbeat(100))  # replaced, not added: runs out 100 ms from now
    bench.tick(99_999)
    assert bench.state() is S.EMITTING
    assert bench.board.status(bench.now)["lease_left_ms"] == 1
    frames = bench.tick(1)
    assert bench.state() is S.FAULT
    assert pulses(frames) == []  # the pulse due at the expiry instant does not fire


def test_a_footswitch_held_while_arming_does_not_count(bench: Bench) -> None:
    bench.board.footswitch(True, bench.now)
    bench.arm()
    assert pulses(bench.tick(200_000)) == []
    bench.board.footswitch(False, bench.now)
    bench.board.footswitch(True, bench.now)
    assert bench.state() is S.EMITTING
    assert len(pulses(bench.receive())) == 1


def test_a_footswitch_held_while_a_fault_is_cleared_does_not_count(bench: Bench) -> None:
    bench.emit(lease_ms=50)
    bench.tick(60_000)
    assert bench.state() is S.FAULT
    bench.ack(ClearFault())
    bench.ack(Arm(1000))
    assert pulses(bench.tick(200_000)) == []
    assert bench.state() is S.READY


def test_footswitch_release_returns_to_ready(bench: Bench) -> None:
    bench.emit()
    bench.tick(120_000)
    bench.board.footswitch(False, bench.now)
    assert bench.state() is S.READY
    assert pulses(bench.tick(500_000)) == []


def test_an_interlock_opening_while_armed_faults_and_persists(bench: Bench) -> None:
    bench.emit()
    bench.board.interlock("door", True, bench.now)
    bench.board.interlock("estop", True, bench.now)
    frames = bench.receive()
    assert bench.state() is S.FAULT
    assert messages_of(frames, FaultEvent) == [FaultEvent(FaultCode.INTERLOCK_OPENED, 0b10)]
    assert pulses(bench.tick(500_000)) == []
    assert bench.nak(ClearFault()) == NakReason.FAULT_PERSISTS
    bench.board.interlock("door", False, bench.now)
    assert bench.nak(ClearFault()) == NakReason.FAULT_PERSISTS  # estop still open
    bench.board.interlock("estop", False, bench.now)
    bench.ack(ClearFault())
    assert bench.state() is S.STANDBY


def test_an_interlock_opening_in_standby_is_only_reported(bench: Bench) -> None:
    bench.ack(PARAMS)
    bench.board.interlock("contact", True, bench.now)
    assert bench.state() is S.STANDBY
    assert messages_of(bench.receive(), FaultEvent) == []


# ---------------------------------------------------------------- pulses


def test_pulses_fire_at_the_press_then_every_period_with_scheduled_t_us(bench: Bench) -> None:
    press = bench.now
    bench.emit(lease_ms=5000)
    frames = bench.run(1_000_000, step=49_000)  # late calls: bursts with exact stamps
    all_pulses = pulses(bench.frames)
    assert [p.t_us for p in all_pulses] == [press + i * PERIOD_US for i in range(21)]
    assert [p.pulse_no for p in all_pulses] == list(range(1, 22))
    assert len(pulses(frames)) == 20


def test_a_backlog_over_50_ms_shifts_the_schedule(bench: Bench) -> None:
    board = Board(rng=random.Random(3), now_us=0, max_rate_mhz=5_000_000)
    b = Bench(board, now_us=0)
    b.emit(lease_ms=5000, params=SetParams(1000, 100, 5_000_000, 300))  # 5 kHz, 200 µs
    got = pulses(b.tick(1_000_000))
    # Pulses due within 50 ms of the call fire at their scheduled times; older ones are lost.
    stamps = [p.t_us for p in got]
    assert all(later - earlier >= 200 for earlier, later in itertools.pairwise(stamps))
    assert stamps[-1] == 1_000_000
    assert len(got) == 1
    got = pulses(b.tick(40_000))
    assert len(got) == 200  # within the limit: made up, exact stamps
    assert got[-1].t_us == 1_040_000


def test_t_us_wraps_at_2_to_the_32(make_bench: Callable[..., Bench]) -> None:
    start = 2**32 - 60_000
    b = make_bench(Board(rng=random.Random(1), now_us=start), now_us=start)
    b.emit(lease_ms=1000)
    b.tick(100_000)
    assert [p.t_us for p in pulses(b.frames)] == [start, 2**32 - 10_000, 40_000]


def test_a_quick_re_press_keeps_the_pulse_spacing(bench: Bench) -> None:
    bench.emit()
    bench.tick(10_000)
    bench.board.footswitch(False, bench.now)
    bench.board.footswitch(True, bench.now)
    bench.run(100_000)
    stamps = [p.t_us for p in pulses(bench.frames)]
    assert [t - stamps[0] for t in stamps] == [0, 50_000, 100_000]


def test_a_pulse_fired_before_a_command_precedes_its_reply(bench: Bench) -> None:
    bench.emit()
    bench.now += 45_000
    bench.receive()
    bench.now += 49_000  # 1 more pulse due; nobody has advanced the board
    frames = bench.send(Stop())
    kinds = [type(f.message).__name__ for f in frames if f.message.TYPE != StatusEvent.TYPE]
    assert kinds == ["Pulse", "Ack"]
    assert statuses(frames)[-1].state == S.STANDBY
    assert pulses(bench.tick(1_000_000)) == []


def test_no_pulse_follows_the_ack_of_disarm(bench: Bench) -> None:
    bench.emit()
    bench.now += 50_000  # exactly when a pulse is due: it fires, then DISARM
    kinds = [type(f.message).__name__ for f in bench.send(Disarm())]
    assert kinds == ["Pulse", "Ack", "StatusEvent"]
    assert pulses(bench.tick(1_000_000)) == []


def test_pulse_count_survives_reboot(bench: Bench) -> None:
    bench.emit()
    bench.tick(100_000)
    assert bench.board.pulse_count == 3
    bench.board.footswitch(False, bench.now)
    bench.board.reboot(bench.now, BootReason.BROWN_OUT)
    frames = bench.receive()
    assert frames[0].seq == 0
    assert frames[0].message == Boot(BootReason.BROWN_OUT)
    assert statuses(frames)[0].pulse_count == 3
    assert bench.nak(Arm(250)) == NakReason.NOT_CONFIGURED  # params lost
    bench.emit()
    bench.run(50_000)  # the re-press came within a period of pulse 3
    assert [p.pulse_no for p in pulses(bench.frames)] == [1, 2, 3, 4]


def test_a_board_can_start_from_a_stored_pulse_count() -> None:
    b = Bench(Board(pulse_count=1_000, rng=random.Random(1)))
    b.emit()
    assert pulses(b.frames)[0].pulse_no == 1_001


# ---------------------------------------------------------------- injected faults


def test_energy_drift_below_the_monitor_goes_unnoticed(bench: Bench) -> None:
    bench.board.inject("energy-drift", 1.3, bench.now)
    bench.emit(lease_ms=5000)
    bench.run(2_000_000)
    energies = [p.energy_uj for p in pulses(bench.frames)]
    assert len(energies) == 41
    assert all(1300 * 0.94 - 1 <= e <= 1300 * 1.06 + 1 for e in energies)
    assert bench.state() is S.EMITTING


def test_energy_drift_beyond_the_monitor_faults_energy_monitor(bench: Bench) -> None:
    bench.emit(lease_ms=5000)
    bench.tick(100_000)
    bench.board.inject("energy-drift", 1.6, bench.now)
    frames = bench.tick(50_000)
    faults = messages_of(frames, FaultEvent)
    assert len(faults) == 1
    assert isinstance(faults[0], FaultEvent)
    assert faults[0].code == FaultCode.ENERGY_MONITOR
    assert faults[0].detail == pulses(frames)[-1].energy_uj > 1500
    assert bench.state() is S.FAULT
    assert pulses(bench.tick(500_000)) == []
    bench.ack(ClearFault())  # never persists


def test_stuck_shutter_keeps_pulsing_after_stop_and_faults(bench: Bench) -> None:
    bench.board.inject("stuck-shutter", None, bench.now)
    bench.emit(lease_ms=5000)
    frames = bench.send(Stop())
    assert [type(f.message).__name__ for f in frames] == ["Ack", "StatusEvent"]
    assert bench.state() is S.STANDBY
    frames = bench.run(120_000)
    kinds = [type(f.message).__name__ for f in frames]
    first = kinds.index("Pulse")
    assert kinds[first : first + 3] == ["Pulse", "FaultEvent", "StatusEvent"]
    assert messages_of(frames, FaultEvent) == [FaultEvent(FaultCode.SHUTTER_STUCK, 0)]
    assert bench.state() is S.FAULT
    assert len(pulses(frames)) == 2  # the runaway goes on
    assert bench.nak(ClearFault()) == NakReason.FAULT_PERSISTS
    bench.board.clear_faults(bench.now)
    assert pulses(bench.tick(500_000)) == []
    bench.ack(ClearFault())
    assert bench.state() is S.STANDBY


def test_stuck_shutter_does_not_matter_when_nothing_is_emitting(bench: Bench) -> None:
    bench.board.inject("stuck-shutter", None, bench.now)
    bench.arm()
    bench.ack(Disarm())
    assert pulses(bench.tick(500_000)) == []
    assert bench.state() is S.STANDBY


def test_overheat_trips_the_head_cut_off_in_any_state_and_persists_above_43(bench: Bench) -> None:
    bench.board.inject("overheat", None, bench.now)
    bench.tick(4_000_000)
    assert bench.state() is S.STANDBY
    frames = bench.tick(1_000_000)  # 25 -> 45 °C toward 55 °C with tau 4 s: 4.39 s
    faults = messages_of(frames, FaultEvent)
    assert len(faults) == 1
    assert isinstance(faults[0], FaultEvent)
    assert faults[0].code == FaultCode.OVERTEMP_HEAD
    assert faults[0].detail >= 4500
    assert bench.state() is S.FAULT
    bench.board.clear_faults(bench.now)
    assert bench.nak(ClearFault()) == NakReason.FAULT_PERSISTS
    bench.tick(300_000)
    assert bench.nak(ClearFault()) == NakReason.FAULT_PERSISTS  # still above 43 °C
    bench.tick(1_000_000)
    bench.ack(ClearFault())
    assert float(str(bench.board.status(bench.now)["head_temp_c"])) <= 43.0


def test_slow_replies_delay_replies_but_not_events(bench: Bench) -> None:
    bench.board.inject("slow-replies", 30, bench.now)
    bench.tick(95_000)  # the next periodic STATUS is 5 ms away
    frames = bench.send(PARAMS)
    assert frames == []
    assert bench.board.next_deadline_us() == bench.now + 5_000
    frames = bench.tick(29_999)
    assert [type(f.message).__name__ for f in frames] == ["StatusEvent"]
    frames = bench.tick(1)
    assert [f.message for f in frames] == [Ack(SetParams.TYPE)]


def test_hang_silences_both_ways_and_clear_faults_reboots_with_watchdog(bench: Bench) -> None:
    bench.emit(lease_ms=5000)
    bench.board.inject("hang", None, bench.now)
    assert bench.send(GetStatus()) == []
    assert bench.tick(1_000_000) == []
    count = bench.board.pulse_count
    assert bench.board.next_deadline_us() is None
    bench.board.clear_faults(bench.now)
    frames = bench.receive()
    assert frames[0].seq == 0
    assert frames[0].message == Boot(BootReason.WATCHDOG)
    assert statuses(frames)[0].state == S.STANDBY
    assert bench.board.pulse_count == count
    assert bench.board.link.lost_in_hang > 0


def test_status_is_json_able_and_names_things(bench: Bench) -> None:
    bench.emit()
    bench.board.inject("drop-frames", 0.5, bench.now)
    bench.board.interlock("door", True, bench.now)
    status = bench.board.status(bench.now)
    text = json.loads(json.dumps(status))
    assert text["state"] == "FAULT"
    assert text["interlocks"] == ["door"]
    assert text["footswitch"] is True
    assert text["params"] == {"energy_uj": 1000, "width_us": 200, "rate_mhz": 20_000,
                              "spot_um": 300}  # fmt: skip
    assert text["faults"] == ["INTERLOCK_OPENED"]
    assert text["injected"] == {"drop-frames": 0.5}
    assert text["pulse_count"] == 1
    assert text["link"]["frames_in"] == 2


def test_next_deadline_is_the_next_pulse_status_or_lease(bench: Bench) -> None:
    bench.ack(SetReporting(0))
    assert bench.board.next_deadline_us() is None
    bench.arm(lease_ms=300)
    assert bench.board.next_deadline_us() == bench.now + 300_000
    bench.board.footswitch(True, bench.now)
    assert bench.board.next_deadline_us() == bench.now  # bytes waiting
    bench.receive()
    assert bench.board.next_deadline_us() == bench.now + period_us(PARAMS.rate_mhz)


# ---------------------------------------------------------------- byte-level feeding


def _session_bytes() -> bytes:
    host = Bench().host
    cmds: list[Command] = [Hello(), PARAMS, Arm(1000), GetStatus(), Heartbeat(500), Stop()]
    return b"\x00" + b"".join(host.send(i + 1, cmd) for i, cmd in enumerate(cmds))


@pytest.mark.parametrize("chunking", ["whole", "halves", "bytes"])
def test_commands_split_anywhere_get_the_same_replies(chunking: str) -> None:
    wire = _session_bytes()
    if chunking == "whole":
        chunks = [wire]
    elif chunking == "halves":
        chunks = [wire[: len(wire) // 2], wire[len(wire) // 2 :]]
    else:
        chunks = [wire[i : i + 1] for i in range(len(wire))]
    board = Board(rng=random.Random(4), now_us=0)
    out = board.data_to_send(0)
    for chunk in chunks:
        board.receive_data(chunk, 0)
        out += board.data_to_send(0)
    reference = Board(rng=random.Random(4), now_us=0)
    expected = reference.data_to_send(0)
    reference.receive_data(wire, 0)
    expected += reference.data_to_send(0)
    assert out == expected
    b = Bench()
    b.host.receive_data(out)
    replies = [f.message for f in b.host.events() if f.message.TYPE < 0xA0]
    assert [type(r).__name__ for r in replies] == ["Ident", "Ack", "Ack", "StatusReply", "Ack",
                                                   "Ack"]  # fmt: skip


def test_garbage_on_the_line_is_counted_and_does_not_disturb_the_next_command(bench: Bench) -> None:
    bench.send_raw(b"\x01\x02\x03\x00" + bytes(range(1, 100)) + b"\x00")
    assert bench.command(GetStatus()).TYPE == StatusReply.TYPE
    counters = bench.board.status(bench.now)["link"]
    assert isinstance(counters, dict)
    assert counters["codec"]["dropped"] >= 2


# ---------------------------------------------------------------- more injected-fault details


def test_a_slow_reply_keeps_its_place_among_events(bench: Bench) -> None:
    bench.ack(SetReporting(10))
    bench.board.inject("slow-replies", 25, bench.now)
    bench.send(GetStatus())
    frames = bench.run(40_000, step=40_000)
    kinds = [type(f.message).__name__ for f in frames]
    # Periodic STATUS at +10, +20 ms, the reply at +25 ms, then STATUS at +30, +40 ms.
    assert kinds == ["StatusEvent", "StatusEvent", "StatusReply", "StatusEvent", "StatusEvent"]


def test_reboot_ends_a_hang_with_power_on(bench: Bench) -> None:
    bench.board.inject("hang", None, bench.now)
    bench.board.reboot(bench.now)
    frames = bench.receive()
    assert frames[0].message == Boot(BootReason.POWER_ON)
    assert not bench.board.hung
    assert isinstance(bench.command(Hello()), Ident)


def test_clear_faults_keeps_a_latched_fault_latched(bench: Bench) -> None:
    bench.emit()
    bench.board.inject("energy-drift", 2.0, bench.now)
    bench.run(60_000)
    assert bench.state() is S.FAULT
    bench.board.clear_faults(bench.now)
    assert bench.state() is S.FAULT
    assert bench.board.status(bench.now)["faults"] == ["ENERGY_MONITOR"]
    assert bench.board.status(bench.now)["injected"] == {}
    bench.ack(ClearFault())
    assert bench.state() is S.STANDBY


def test_injected_faults_survive_a_reboot_except_hang(bench: Bench) -> None:
    bench.board.inject("energy-drift", 1.2, bench.now)
    bench.board.inject("slow-replies", 5, bench.now)
    bench.board.reboot(bench.now)
    assert bench.board.status(bench.now)["injected"] == {"energy-drift": 1.2, "slow-replies": 5.0}


def test_a_hot_board_trips_the_cut_off_again_right_after_reboot(bench: Bench) -> None:
    bench.board.inject("overheat", None, bench.now)
    bench.run(5_000_000, step=50_000)
    bench.board.reboot(bench.now)
    frames = bench.receive()
    assert frames[0].message == Boot(BootReason.POWER_ON)
    faults = messages_of(frames, FaultEvent)
    assert len(faults) == 1
    assert isinstance(faults[0], FaultEvent)
    assert faults[0].code == FaultCode.OVERTEMP_HEAD
    assert faults[0].detail >= 4500
    assert bench.state() is S.FAULT
