"""ICD v1 framing: COBS-stuffed bodies delimited by 0x00, each body CRC-protected.

A frame on the wire::

    +---------------- COBS(body) ----------------+------+
    | code | stuffed SEQ TYPE PAYLOAD CRC_lo CRC_hi | 0x00 |
    +--------------------------------------------+------+

    body, before stuffing (4..68 bytes):
    +-----+------+------------------+--------+--------+
    | SEQ | TYPE | PAYLOAD (0..64)  | CRC lo | CRC hi |
    +-----+------+------------------+--------+--------+
      u8    u8                        CRC-16/CCITT-FALSE over SEQ..PAYLOAD

Receiving rules (docs/protocol.md): split at 0x00; an empty chunk is ignored; a chunk that fails
COBS decoding, decodes to fewer than 4 or more than 68 bytes, or has a wrong CRC is dropped and
counted; a receiver holding more than 70 bytes with no 0x00 discards them and resynchronises at the
next 0x00. A corrupted frame can therefore never affect any frame after the next delimiter.

This module does no I/O: bytes go in with :meth:`FrameReader.feed`, validated bodies come out.
"""

from __future__ import annotations

from binascii import crc_hqx

from cobs import cobs

__all__ = [
    "DELIMITER",
    "MAX_BODY",
    "MAX_HOLD",
    "MAX_PAYLOAD",
    "MIN_BODY",
    "FrameCounters",
    "FrameReader",
    "crc16",
    "encode_frame",
]

DELIMITER = b"\x00"
MAX_PAYLOAD = 64
MIN_BODY = 4  # SEQ, TYPE, CRC
MAX_BODY = 2 + MAX_PAYLOAD + 2
MAX_HOLD = 70  # bytes a receiver may hold without seeing a delimiter

_cobs_encode = cobs.encode
_cobs_decode = cobs.decode
_DecodeError = cobs.DecodeError


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0 (check 0x29B1)."""
    return crc_hqx(data, 0xFFFF)


def encode_frame(seq: int, type_: int, payload: bytes = b"") -> bytes:
    """The wire bytes of one frame, delimiter included."""
    if not 0 <= seq <= 0xFF:
        raise ValueError(f"SEQ {seq} is outside 0..255")
    if not 0 <= type_ <= 0xFF:
        raise ValueError(f"TYPE {type_} is outside 0..255")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = bytes((seq, type_)) + payload
    crc = crc_hqx(head, 0xFFFF)
    stuffed: bytes = _cobs_encode(head + bytes((crc & 0xFF, crc >> 8)))
    return stuffed + DELIMITER


class FrameCounters:
    """What a receiver dropped, by cause. Plain integers, read at will."""

    __slots__ = (
        "bad_cobs",
        "bad_crc",
        "bad_length",
        "bad_size",
        "frames",
        "overruns",
        "unknown_type",
    )

    def __init__(self) -> None:
        self.frames = 0  # bodies with a good CRC
        self.bad_cobs = 0  # chunk failed COBS decoding
        self.bad_size = 0  # decoded body shorter than 4 or longer than 68 bytes
        self.bad_crc = 0
        self.overruns = 0  # more than 70 bytes held without a delimiter
        self.bad_length = 0  # payload of the wrong length for its TYPE (counted by the codec)
        self.unknown_type = 0  # a TYPE the receiver has no use for (counted by the codec)

    @property
    def dropped(self) -> int:
        return (
            self.bad_cobs
            + self.bad_size
            + self.bad_crc
            + self.overruns
            + self.bad_length
            + self.unknown_type
        )

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__} | {"dropped": self.dropped}


class FrameReader:
    """Splits a byte stream into validated frame bodies (SEQ, TYPE, PAYLOAD; CRC stripped).

    >>> r = FrameReader()
    >>> r.feed(bytes.fromhex("06010101bcd800"))
    [b'\\x01\\x01\\x01']
    """

    __slots__ = ("_discarding", "_held", "counters")

    def __init__(self) -> None:
        self._held = b""
        self._discarding = False  # inside an over-long run, waiting for the next delimiter
        self.counters = FrameCounters()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data``; return the bodies it completed, oldest first."""
        if DELIMITER not in data:
            if self._discarding:
                return []
            held = self._held + data
            if len(held) > MAX_HOLD:
                self._overrun()
                return []
            self._held = held
            return []
        chunks = (self._held + data).split(DELIMITER)
        tail = chunks.pop()
        if self._discarding:
            # The first chunk's beginning was thrown away: it cannot be a frame.
            chunks[0] = b""
            self._discarding = False
        if len(tail) > MAX_HOLD:
            self._held = b""
            self._overrun()
        else:
            self._held = tail
        bodies: list[bytes] = []
        counters = self.counters
        for chunk in chunks:
            if not chunk:
                continue
            if len(chunk) > MAX_BODY + 1:
                counters.bad_size += 1
                continue
            try:
                body = _cobs_decode(chunk)
            except _DecodeError:
                counters.bad_cobs += 1
                continue
            size = len(body)
            if size < MIN_BODY or size > MAX_BODY:
                counters.bad_size += 1
                continue
            if crc_hqx(body[:-2], 0xFFFF) != body[-2] | (body[-1] << 8):
                counters.bad_crc += 1
                continue
            counters.frames += 1
            bodies.append(body[:-2])
        return bodies

    def _overrun(self) -> None:
        self._held = b""
        self._discarding = True
        self.counters.overruns += 1

    @property
    def held(self) -> int:
        """Bytes waiting for a delimiter."""
        return len(self._held)
