"""Bad bytes on the wire, both ways: the codecs and the simulated board never raise, never invent a
frame that was not sent, and no byte stream without a footswitch press makes the board emit."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import (
    NEED_DATA,
    BadCommand,
    DeviceCodec,
    DeviceState,
    Frame,
    HostCodec,
    encode_frame,
)
from protocols.messages import COMMAND_TYPES, EVENT_TYPES, REPLY_TYPES
from simulator import Board

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

chunks = st.lists(st.binary(max_size=200), max_size=20)
# Frames whose CRC is right but whose TYPE and payload are anything: they get past the framing.
valid_frames = st.builds(
    encode_frame,
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=64),
)
mixed = st.lists(st.one_of(st.binary(max_size=80), valid_frames), max_size=30)


@FUZZ
@given(chunks)
def test_host_codec_survives_any_bytes(data: list[bytes]) -> None:
    codec = HostCodec()
    for chunk in data:
        codec.receive_data(chunk)
    for frame in codec.events():
        assert isinstance(frame, Frame)
        assert type(frame.message).TYPE in EVENT_TYPES | REPLY_TYPES
    assert codec.next_event() is NEED_DATA


@FUZZ
@given(mixed)
def test_host_codec_decodes_exactly_the_well_formed_frames(data: list[bytes]) -> None:
    codec = HostCodec()
    for chunk in data:
        codec.receive_data(chunk)
    for frame in codec.events():
        # A decoded frame re-encodes to bytes that decode to the same frame: nothing half-parsed.
        again = HostCodec()
        again.receive_data(again.send(frame.seq, frame.message))
        assert again.events() == [frame]


@FUZZ
@given(mixed)
def test_device_codec_answers_every_frame_with_a_command_or_a_refusal(data: list[bytes]) -> None:
    codec = DeviceCodec()
    for chunk in data:
        codec.receive_data(chunk)
    for event in codec.events():
        if isinstance(event, BadCommand):
            assert event.type not in COMMAND_TYPES or event.reason.name == "BAD_LENGTH"
        else:
            assert type(event.message).TYPE in COMMAND_TYPES
    counters = codec.counters
    assert min(vars_of(counters).values()) >= 0


def vars_of(counters: object) -> dict[str, int]:
    return {name: getattr(counters, name) for name in type(counters).__slots__}  # type: ignore[attr-defined]


@FUZZ
@given(mixed, st.lists(st.integers(0, 20_000), min_size=1, max_size=30))
def test_board_never_emits_without_a_footswitch_press(data: list[bytes], steps: list[int]) -> None:
    board = Board(serial=7)
    now = 0
    out = bytearray()
    for i, chunk in enumerate(data):
        now += steps[i % len(steps)]
        board.receive_data(chunk, now)
        board.advance(now)
        out += board.data_to_send(now)
    now += 1_000_000
    board.advance(now)
    out += board.data_to_send(now)
    assert board.pulse_count == 0
    assert board.state in set(DeviceState) - {DeviceState.BOOT, DeviceState.EMITTING}
    host = HostCodec()
    host.receive_data(bytes(out))
    assert not [f for f in host.events() if type(f.message).__name__ == "Pulse"]


@FUZZ
@given(mixed, st.lists(st.integers(0, 20_000), min_size=1, max_size=30))
def test_board_with_footswitch_held_only_emits_after_an_acknowledged_arm(
    data: list[bytes], steps: list[int]
) -> None:
    """Footswitch held from the start: a held switch is not a fresh press (section 3), so no byte
    stream, whatever commands it smuggles in, can make the board fire."""
    board = Board(serial=7)
    board.footswitch(True, 0)
    now = 0
    for i, chunk in enumerate(data):
        now += steps[i % len(steps)]
        board.receive_data(chunk, now)
        board.advance(now)
        board.data_to_send(now)
    board.advance(now + 1_000_000)
    assert board.pulse_count == 0
