"""Sans-I/O codecs for both ends of the ICD v1 link, shaped like h11.

Bytes go in with ``receive_data()``; decoded frames come out of ``next_event()`` (or the
:data:`NEED_DATA` sentinel when no whole frame is waiting); ``send(seq, message)`` returns the bytes
to write. No asyncio, no sockets, no clocks.

The host end (:class:`HostCodec`) accepts replies and events and drops, and counts, anything else:
a reply or event of the wrong length, a TYPE it does not know. With ``raw_pulses=True`` a PULSE
comes out as a plain tuple ``(seq, pulse_no, t_us, energy_uj)`` of ints, in its place among the
other frames, rather than as a ``Frame`` holding a :class:`~protocols.messages.Pulse`: the receive
path at thousands of pulses a second builds no objects per pulse beyond that tuple (issue 16).
The device end (:class:`DeviceCodec`) accepts commands; a command whose payload has the wrong
length, or a TYPE that is no command, comes out as a :class:`BadCommand` so that the device can
answer NAK BAD_LENGTH or NAK UNKNOWN_TYPE.

    >>> host = HostCodec()
    >>> host.send(1, Hello()).hex(" ")
    '06 01 01 01 bc d8 00'
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Generic, Literal, NamedTuple, TypeVar

from protocols.framing import FrameCounters, FrameReader, encode_frame
from protocols.messages import (
    COMMAND_TYPES,
    EVENT_TYPES,
    REPLY_TYPES,
    Command,
    Ident,
    Message,
    MessageType,
    NakReason,
    Pulse,
    expected_length,
)

__all__ = [
    "NEED_DATA",
    "BadCommand",
    "DeviceCodec",
    "Frame",
    "HostCodec",
    "NeedData",
    "RawPulse",
]


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
NeedDataType = Literal[NeedData.NEED_DATA]

M = TypeVar("M", bound=Message)


class Frame(NamedTuple, Generic[M]):
    """One decoded frame: its SEQ and its message. (A named tuple: built in C, once per frame on
    the receive path, where a frozen dataclass's ``__init__`` cost a third of the decode.)"""

    seq: int
    message: M


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A host frame the device must refuse: answer NAK ``reason`` for ``type`` with ``seq``."""

    seq: int
    type: int
    reason: NakReason


# The decoder of each inbound TYPE with a fixed payload size (all but IDENT), looked up once per
# frame on the receive path: the class, its payload size and its struct's unpack_from (no slice).
_FIXED_INBOUND: Final[dict[int, tuple[type[Message], int, Callable[..., tuple[int, ...]]]]] = {
    type_: (cls, cls.STRUCT.size, cls.STRUCT.unpack_from)
    for type_, cls in (EVENT_TYPES | REPLY_TYPES).items()
    if cls is not Ident
}


class _Codec:
    __slots__ = ("_events", "_reader")

    def __init__(self) -> None:
        self._reader = FrameReader()
        self._events: deque[object] = deque()

    @property
    def counters(self) -> FrameCounters:
        return self._reader.counters

    def send(self, seq: int, message: Message) -> bytes:
        """The wire bytes of ``message`` with ``seq``."""
        return encode_frame(seq, message.TYPE, message.payload())


# A PULSE body: SEQ, TYPE, pulse_no u32, t_us u32, energy_uj u32.
_PULSE_TYPE: Final = int(MessageType.PULSE)
_PULSE_BODY: Final = 2 + Pulse.STRUCT.size
_PULSE_UNPACK: Final = Pulse.STRUCT.unpack_from

RawPulse = tuple[int, int, int, int]  # (seq, pulse_no, t_us, energy_uj)


class HostCodec(_Codec):
    """The host's end: encodes commands, decodes replies and events. ``raw_pulses``: PULSE frames
    come out as :data:`RawPulse` tuples of plain ints (see the module's docstring)."""

    __slots__ = ("_raw_pulses",)

    def __init__(self, *, raw_pulses: bool = False) -> None:
        super().__init__()
        self._raw_pulses = raw_pulses

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        events = self._events
        counters = self._reader.counters
        fixed = _FIXED_INBOUND
        raw = self._raw_pulses
        unpack_pulse = _PULSE_UNPACK
        for body in self._reader.feed(data):
            type_ = body[1]
            if raw and type_ == _PULSE_TYPE:
                if len(body) != _PULSE_BODY:
                    counters.bad_length += 1
                    continue
                events.append((body[0], *unpack_pulse(body, 2)))
                continue
            decoder = fixed.get(type_)
            if decoder is not None:  # every inbound TYPE but IDENT: one size, one struct
                fixed_cls, size, unpack_from = decoder
                if len(body) - 2 != size:
                    counters.bad_length += 1
                    continue
                events.append(Frame(body[0], fixed_cls(*unpack_from(body, 2))))
                continue
            payload = body[2:]
            cls = EVENT_TYPES.get(type_) or REPLY_TYPES.get(type_)
            if cls is None:
                counters.unknown_type += 1
                continue
            if not expected_length(type_, payload):
                counters.bad_length += 1
                continue
            events.append(Frame(body[0], cls.from_payload(payload)))

    def next_event(self) -> Frame[Message] | NeedDataType:
        if self._events:
            return self._events.popleft()  # type: ignore[return-value]
        return NEED_DATA

    def events(self) -> list[Frame[Message]]:
        """Every frame waiting, oldest first (without ``raw_pulses``; with it, :meth:`take`)."""
        out: list[Frame[Message]] = list(self._events)  # type: ignore[arg-type]
        self._events.clear()
        return out

    def take(self) -> list[Frame[Message] | RawPulse]:
        """Every frame waiting, oldest first, PULSEs as :data:`RawPulse` with ``raw_pulses``."""
        out: list[Frame[Message] | RawPulse] = list(self._events)  # type: ignore[arg-type]
        self._events.clear()
        return out


class DeviceCodec(_Codec):
    """The device's end: decodes commands (or refusals to send), encodes replies and events."""

    __slots__ = ()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        events = self._events
        for body in self._reader.feed(data):
            seq, type_ = body[0], body[1]
            payload = body[2:]
            cls = COMMAND_TYPES.get(type_)
            if cls is None:
                self._reader.counters.unknown_type += 1
                events.append(BadCommand(seq, type_, NakReason.UNKNOWN_TYPE))
            elif not expected_length(type_, payload):
                self._reader.counters.bad_length += 1
                events.append(BadCommand(seq, type_, NakReason.BAD_LENGTH))
            else:
                events.append(Frame(seq, cls.from_payload(payload)))

    def next_event(self) -> Frame[Command] | BadCommand | NeedDataType:
        if self._events:
            return self._events.popleft()  # type: ignore[return-value]
        return NEED_DATA

    def events(self) -> list[Frame[Command] | BadCommand]:
        out: list[Frame[Command] | BadCommand] = list(self._events)  # type: ignore[arg-type]
        self._events.clear()
        return out
