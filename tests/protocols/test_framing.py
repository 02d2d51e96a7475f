"""ICD v1 framing, byte-level and synchronous: the worked example, every fixture fed whole, split at
every point and one byte at a time, garbage, bit flips, size limits and resynchronisation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import (
    NEED_DATA,
    FrameReader,
    Hello,
    HostCodec,
    Pulse,
    StatusEvent,
    crc16,
    encode_frame,
)
from protocols.framing import MAX_BODY, MAX_HOLD, MAX_PAYLOAD

# One stream of real frames: HELLO, PULSE, STATUS event, an empty payload, a maximal payload.
FIXTURE_FRAMES: list[tuple[int, int, bytes]] = [
    (1, 0x01, b"\x01"),
    (7, 0xA0, Pulse(123456, 0xFFFFFFFF, 0).payload()),
    (8, 0xA1, StatusEvent(3, 0x1F, 0x3F, 2**32 - 1, -32768, 32767, 65535).payload()),
    (0, 0x02, b""),
    (255, 0x41, bytes(range(MAX_PAYLOAD))),  # zeros and every other byte value inside
    (9, 0x80, b"\x00"),
]
FIXTURE = b"".join(encode_frame(*f) for f in FIXTURE_FRAMES)
BODIES = [bytes((seq, type_)) + payload for seq, type_, payload in FIXTURE_FRAMES]


def feed_all(chunks: Iterable[bytes]) -> tuple[list[bytes], FrameReader]:
    reader = FrameReader()
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out, reader


def splits(data: bytes) -> Iterator[list[bytes]]:
    for at in range(len(data) + 1):
        yield [data[:at], data[at:]]


def test_worked_example_of_design_section_3() -> None:
    assert crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE check value
    assert crc16(b"\x01\x01\x01") == 0xD8BC
    wire = bytes.fromhex("06 01 01 01 bc d8 00")
    assert encode_frame(1, 0x01, b"\x01") == wire
    assert HostCodec().send(1, Hello(1)) == wire
    assert FrameReader().feed(wire) == [b"\x01\x01\x01"]


def test_fixture_fed_whole() -> None:
    bodies, reader = feed_all([FIXTURE])
    assert bodies == BODIES
    assert reader.counters.frames == len(BODIES)
    assert reader.counters.dropped == 0
    assert reader.held == 0


def test_fixture_split_at_every_point() -> None:
    for chunks in splits(FIXTURE):
        bodies, reader = feed_all(chunks)
        assert bodies == BODIES, chunks
        assert reader.counters.dropped == 0


def test_fixture_one_byte_at_a_time() -> None:
    bodies, reader = feed_all(FIXTURE[i : i + 1] for i in range(len(FIXTURE)))
    assert bodies == BODIES
    assert reader.counters.dropped == 0


def test_host_codec_fixture_whole_split_and_bytewise() -> None:
    stream = b"".join(
        HostCodec().send(seq, message)
        for seq, message in [(4, Pulse(1, 2, 3)), (5, StatusEvent(1, 0, 0, 1, 2500, 3000, 0))]
    )
    expected = [(4, Pulse(1, 2, 3)), (5, StatusEvent(1, 0, 0, 1, 2500, 3000, 0))]
    feeds = [[stream], [stream[i : i + 1] for i in range(len(stream))], *splits(stream)]
    for chunks in feeds:
        codec = HostCodec()
        for chunk in chunks:
            codec.receive_data(chunk)
        assert [(f.seq, f.message) for f in codec.events()] == expected
        assert codec.next_event() is NEED_DATA


def test_extra_delimiters_are_ignored() -> None:
    bodies, reader = feed_all([b"\x00\x00" + FIXTURE.replace(b"\x00", b"\x00\x00\x00")])
    assert bodies == BODIES
    assert reader.counters.dropped == 0


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_garbage_never_raises(chunks: list[bytes]) -> None:
    reader = FrameReader()
    for chunk in chunks:
        reader.feed(chunk)
    assert reader.held <= MAX_HOLD
    codec = HostCodec()
    for chunk in chunks:
        codec.receive_data(chunk)
    codec.events()


@settings(max_examples=300)
@given(garbage=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_garbage_never_affects_any_frame_after_the_next_delimiter(garbage: bytes, cut: int) -> None:
    stream = garbage + b"\x00" + FIXTURE
    cut = min(cut, len(stream))
    bodies, _ = feed_all([stream[:cut], stream[cut:]])
    assert bodies[-len(BODIES) :] == BODIES
    # Whatever came out of the garbage was a well-formed frame, not part of the fixture.
    assert len(bodies) >= len(BODIES)


def test_every_single_flipped_bit_is_caught() -> None:
    for seq, type_, payload in FIXTURE_FRAMES:
        wire = encode_frame(seq, type_, payload)
        good = bytes((seq, type_)) + payload
        trailer = encode_frame(3, 0x80, b"\x07")
        for bit in range(len(wire) * 8):
            corrupted = bytearray(wire)
            corrupted[bit // 8] ^= 1 << (bit % 8)
            bodies, reader = feed_all([bytes(corrupted) + trailer])
            assert good not in bodies
            assert all(b == b"\x03\x80\x07" for b in bodies), (seq, type_, bit)
            if bit // 8 != len(wire) - 1:  # the delimiter itself intact: the next frame survives
                assert bodies == [b"\x03\x80\x07"]
            assert reader.counters.dropped >= 1


def test_bodies_too_short_or_too_long_are_dropped_and_counted() -> None:
    from cobs import cobs

    short = bytes((1, 2))  # 2 bytes: no room for a CRC
    crc = crc16(short)
    three = cobs.encode(short[:1] + bytes((crc & 0xFF,))) + b"\x00"
    long_head = bytes(MAX_BODY - 1)  # 69 bytes with its CRC: one too many
    crc = crc16(long_head)
    long_frame = cobs.encode(long_head + bytes((crc & 0xFF, crc >> 8))) + b"\x00"
    bodies, reader = feed_all([three + long_frame + FIXTURE])
    assert bodies == BODIES
    assert reader.counters.bad_size == 2


def test_bad_cobs_and_bad_crc_are_counted_by_cause() -> None:
    bad_cobs = b"\x05\x01\x00"  # the code byte promises 4 more bytes before the delimiter
    frame = bytearray(encode_frame(1, 1, b"\x01"))
    frame[-2] ^= 0x01  # inside the CRC: decodes, CRC wrong
    bodies, reader = feed_all([bad_cobs + bytes(frame) + FIXTURE])
    assert bodies == BODIES
    assert reader.counters.bad_cobs == 1
    assert reader.counters.bad_crc == 1


def test_a_maximal_frame_is_held_whole_but_more_than_70_bytes_resynchronise() -> None:
    biggest = encode_frame(1, 0x41, bytes(range(1, MAX_PAYLOAD + 1)))
    assert len(biggest) - 1 <= MAX_HOLD
    reader = FrameReader()
    assert reader.feed(biggest[:-1]) == []
    assert reader.held == len(biggest) - 1
    assert reader.feed(b"\x00") == [bytes((1, 0x41)) + bytes(range(1, MAX_PAYLOAD + 1))]

    reader = FrameReader()
    assert reader.feed(b"\x55" * MAX_HOLD) == []
    assert reader.held == MAX_HOLD  # 70 bytes may be held
    assert reader.feed(b"\x55") == []
    assert reader.held == 0  # the 71st discards them
    assert reader.counters.overruns == 1
    # Still discarding until the next delimiter: these bytes can never start a frame ...
    assert reader.feed(encode_frame(2, 0x80, b"\x07")[:-1]) == []
    assert reader.feed(b"\x00" + FIXTURE) == BODIES  # ... and it resynchronises at the 0x00.
    assert reader.counters.overruns == 1


@pytest.mark.parametrize("chunk", [1, 7, 71, 500])
def test_overlong_run_in_any_chunking_costs_only_itself(chunk: int) -> None:
    stream = b"\x11" * 300 + b"\x00" + FIXTURE
    bodies, reader = feed_all(stream[i : i + chunk] for i in range(0, len(stream), chunk))
    assert bodies == BODIES
    # Held across feeds it is an overrun; seen whole in one chunk, an over-size chunk: once.
    assert reader.counters.dropped == 1
    assert reader.counters.overruns + reader.counters.bad_size == 1
