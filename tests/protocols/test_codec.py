"""Message round-trips over the sans-I/O codecs (hypothesis over every field's range), wrong
lengths and unknown TYPEs on each end."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import (
    COMMAND_TYPES,
    EVENT_TYPES,
    REPLY_TYPES,
    Ack,
    Arm,
    BadCommand,
    Boot,
    ClearFault,
    DeviceCodec,
    Disarm,
    FaultEvent,
    Frame,
    GetStatus,
    Heartbeat,
    Hello,
    HostCodec,
    Ident,
    InputEvent,
    LocalProtocolError,
    Message,
    Nak,
    NakReason,
    Pulse,
    SetParams,
    SetReporting,
    StatusEvent,
    StatusReply,
    Stop,
    encode_frame,
)
from protocols.messages import MAX_SPOTS

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
seqs = u8

commands = st.one_of(
    st.builds(Hello, u8),
    st.just(GetStatus()),
    st.builds(SetParams, u32, u32, u32, u16),
    st.builds(Arm, u16),
    st.builds(Heartbeat, u16),
    st.just(Disarm()),
    st.just(Stop()),
    st.just(ClearFault()),
    st.builds(SetReporting, u16),
)
status_fields = (u8, u8, u16, u32, i16, i16, u16)
inbound = st.one_of(
    st.builds(
        Ident,
        u8,
        st.tuples(u8, u8, u8),
        u32,
        u16,
        u32,
        u32,
        u32,
        u32,
        st.lists(u16, max_size=MAX_SPOTS).map(tuple),
    ),
    st.builds(StatusReply, *status_fields),
    st.builds(Ack, u8),
    st.builds(Nak, u8, u8),
    st.builds(Pulse, u32, u32, u32),
    st.builds(StatusEvent, *status_fields),
    st.builds(FaultEvent, u16, i32),
    st.builds(InputEvent, u8, u8),
    st.builds(Boot, u8),
)


def test_strategies_cover_every_message_type() -> None:
    every = set(COMMAND_TYPES) | set(REPLY_TYPES) | set(EVENT_TYPES)
    assert len(every) == 18  # 9 commands, IDENT, STATUS, ACK, NAK, 5 events


@given(seq=seqs, command=commands)
def test_every_command_round_trips_host_to_device(seq: int, command: Message) -> None:
    device = DeviceCodec()
    wire = HostCodec().send(seq, command)
    for i in range(len(wire)):  # one byte at a time
        device.receive_data(wire[i : i + 1])
    assert device.events() == [Frame(seq, command)]
    assert device.counters.dropped == 0


@given(seq=seqs, message=inbound, cut=st.integers(0, 100))
def test_every_reply_and_event_round_trips_device_to_host(
    seq: int, message: Message, cut: int
) -> None:
    host = HostCodec()
    wire = DeviceCodec().send(seq, message)
    host.receive_data(wire[:cut])
    host.receive_data(wire[cut:])
    assert host.events() == [Frame(seq, message)]
    assert host.counters.dropped == 0


def test_field_out_of_its_wire_range_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="Arm: a field is out of its wire range"):
        HostCodec().send(1, Arm(70000))
    with pytest.raises(LocalProtocolError, match="spot sizes exceed"):
        Ident(1, (1, 0, 0), 1, 1550, 1, 1, 1, 1, tuple(range(MAX_SPOTS + 1))).payload()
    with pytest.raises(ValueError, match="SEQ 256"):
        encode_frame(256, 1)


def test_command_of_wrong_length_gets_bad_length_on_the_device() -> None:
    device = DeviceCodec()
    device.receive_data(encode_frame(9, Hello.TYPE, b"\x01\x00"))
    device.receive_data(encode_frame(10, GetStatus.TYPE, b"\x00"))
    device.receive_data(encode_frame(11, Arm.TYPE, b""))
    assert device.events() == [
        BadCommand(9, Hello.TYPE, NakReason.BAD_LENGTH),
        BadCommand(10, GetStatus.TYPE, NakReason.BAD_LENGTH),
        BadCommand(11, Arm.TYPE, NakReason.BAD_LENGTH),
    ]
    assert device.counters.bad_length == 3


def test_unknown_type_on_the_device_gets_unknown_type() -> None:
    device = DeviceCodec()
    for seq, type_ in enumerate((0x3F, 0x0A, 0x00, 0x80, 0xA0, 0xFF)):
        device.receive_data(encode_frame(seq, type_, b"\x01"))
    assert [e.reason for e in device.events()] == [NakReason.UNKNOWN_TYPE] * 6  # type: ignore[union-attr]
    assert device.counters.unknown_type == 6


def test_reply_or_event_of_wrong_length_is_dropped_and_counted_on_the_host() -> None:
    host = HostCodec()
    host.receive_data(encode_frame(1, Pulse.TYPE, bytes(11)))
    host.receive_data(encode_frame(2, Ack.TYPE, b""))
    ident = Ident(1, (1, 0, 0), 1, 1550, 1, 1, 1, 1, (120, 300)).payload()
    host.receive_data(encode_frame(3, Ident.TYPE, ident[:-1]))  # n promises one more byte
    host.receive_data(encode_frame(4, Ident.TYPE, ident[:10]))  # too short to hold n
    host.receive_data(encode_frame(5, Boot.TYPE, b"\x01"))
    assert host.events() == [Frame(5, Boot(1))]
    assert host.counters.bad_length == 4


def test_unknown_type_on_the_host_is_dropped_and_counted() -> None:
    host = HostCodec()
    host.receive_data(encode_frame(1, Hello.TYPE, b"\x01"))  # a command is no reply
    host.receive_data(encode_frame(2, 0xBF, b""))
    host.receive_data(encode_frame(3, Ack.TYPE, b"\x07"))
    assert host.events() == [Frame(3, Ack(7))]
    assert host.counters.unknown_type == 2


# ── the PULSE fast path (issue 16) ───────────────────────────────────────────────────────────


@given(frames=st.lists(st.tuples(seqs, inbound), max_size=20), cut=st.integers(0, 400))
def test_raw_pulses_come_out_as_plain_ints_in_wire_order_among_the_other_frames(
    frames: list[tuple[int, Message]], cut: int
) -> None:
    wire = b"".join(DeviceCodec().send(seq, message) for seq, message in frames)
    host = HostCodec(raw_pulses=True)
    host.receive_data(wire[:cut])
    host.receive_data(wire[cut:])
    expected = [
        (seq, m.pulse_no, m.t_us, m.energy_uj) if isinstance(m, Pulse) else Frame(seq, m)
        for seq, m in frames
    ]
    got = host.take()
    assert got == expected
    assert [type(item) is tuple for item in got] == [isinstance(m, Pulse) for _, m in frames]
    assert host.counters.dropped == 0


def test_a_raw_pulse_of_the_wrong_length_is_dropped_and_counted() -> None:
    host = HostCodec(raw_pulses=True)
    host.receive_data(encode_frame(1, Pulse.TYPE, bytes(11)))
    host.receive_data(encode_frame(2, Pulse.TYPE, bytes(13)))
    host.receive_data(encode_frame(3, Pulse.TYPE, bytes(range(12))))
    assert host.take() == [(3, 0x03020100, 0x07060504, 0x0B0A0908)]
    assert host.counters.bad_length == 2
