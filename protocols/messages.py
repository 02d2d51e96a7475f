"""ICD v1 messages: every command, reply and event of docs/protocol.md, as immutable classes.

Each class knows its TYPE code and how to pack its payload; :func:`decode_message` is the inverse.
Fields are plain integers (little-endian on the wire, unsigned unless the table says ``i``); the
enums below name the values, and compare equal to the integers they stand for.

    commands      0x01-0x3F   host -> device, each answered by exactly one reply
    typed replies 0x40-0x7F   IDENT, STATUS
    ACK / NAK     0x80-0x81
    events        0xA0-0xBF   device -> host, unsolicited, SEQ from one shared 8-bit counter
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from protocols.errors import LocalProtocolError

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "INTERLOCK_NAMES",
    "LEASE_MAX_MS",
    "LEASE_MIN_MS",
    "PROTO_VERSION",
    "REPLY_TYPES",
    "Ack",
    "Arm",
    "Boot",
    "BootReason",
    "ClearFault",
    "Command",
    "DeviceState",
    "Disarm",
    "Event",
    "FaultCode",
    "FaultEvent",
    "GetStatus",
    "Heartbeat",
    "Hello",
    "Ident",
    "InputEvent",
    "Interlock",
    "Message",
    "MessageType",
    "Nak",
    "NakReason",
    "Pulse",
    "Reply",
    "SetParams",
    "SetReporting",
    "StatusEvent",
    "StatusReply",
    "StatusReport",
    "Stop",
    "decode_message",
    "describe_fault",
    "expected_length",
    "fault_names",
    "interlock_names",
]

PROTO_VERSION = 1
LEASE_MIN_MS = 50
LEASE_MAX_MS = 5000


class MessageType(IntEnum):
    HELLO = 0x01
    GET_STATUS = 0x02
    SET_PARAMS = 0x03
    ARM = 0x04
    HEARTBEAT = 0x05
    DISARM = 0x06
    STOP = 0x07
    CLEAR_FAULT = 0x08
    SET_REPORTING = 0x09
    IDENT = 0x41
    STATUS = 0x42
    ACK = 0x80
    NAK = 0x81
    PULSE = 0xA0
    STATUS_EVENT = 0xA1
    FAULT = 0xA2
    INPUT = 0xA3
    BOOT = 0xA4


class DeviceState(IntEnum):
    BOOT = 0
    STANDBY = 1
    READY = 2
    EMITTING = 3
    FAULT = 4


class Interlock(IntFlag):
    """Interlock bits; 1 means open (unsafe)."""

    ESTOP = 1 << 0
    DOOR = 1 << 1
    KEY = 1 << 2
    CONTACT = 1 << 3
    COOLING = 1 << 4


INTERLOCK_NAMES: dict[str, Interlock] = {
    "estop": Interlock.ESTOP,
    "door": Interlock.DOOR,
    "key": Interlock.KEY,
    "contact": Interlock.CONTACT,
    "cooling": Interlock.COOLING,
}


class FaultCode(IntEnum):
    LEASE_EXPIRED = 1
    INTERLOCK_OPENED = 2
    OVERTEMP_HEAD = 3
    ENERGY_MONITOR = 4
    SHUTTER_STUCK = 5
    INTERNAL = 6

    @property
    def bit(self) -> int:
        """This fault's bit in STATUS.faults (bit code-1)."""
        return 1 << (self.value - 1)


def interlock_names(bits: int) -> list[str]:
    """The open interlocks in a STATUS/INPUT bitmask, by the names above (``["door"]``)."""
    return [name for name, bit in INTERLOCK_NAMES.items() if bits & bit]


def fault_names(bits: int) -> list[str]:
    """The faults in a STATUS.faults bitmask, lower-case (``["lease_expired"]``)."""
    return [code.name.lower() for code in FaultCode if bits & code.bit]


_FAULT_DETAIL: dict[int, str] = {
    FaultCode.LEASE_EXPIRED: "the lease ran out (no heartbeat reached it in time)",
    FaultCode.SHUTTER_STUCK: "emission went on after STOP or DISARM",
}


def describe_fault(code: int, detail: int) -> str:
    """A FAULT event as a clinician reads it: "the device latched INTERLOCK_OPENED: door open"."""
    try:
        name = FaultCode(code).name
    except ValueError:
        return f"the device latched fault {code} (detail {detail})"
    if code == FaultCode.INTERLOCK_OPENED:
        opened = ", ".join(interlock_names(detail)) or "an interlock"
        why = f"{opened} open"
    elif code == FaultCode.OVERTEMP_HEAD:
        why = f"handpiece head at {detail / 100:.1f} °C"
    elif code == FaultCode.ENERGY_MONITOR:
        why = f"its energy monitor measured {detail} µJ, outside ±50 % of the setpoint"
    elif code == FaultCode.INTERNAL:
        why = f"internal fault (detail {detail})"
    else:
        why = _FAULT_DETAIL[code]
    return f"the device latched {name}: {why}"


class NakReason(IntEnum):
    UNKNOWN_TYPE = 1
    BAD_LENGTH = 2
    OUT_OF_RANGE = 3
    BAD_STATE = 4
    INTERLOCK_OPEN = 5
    FAULT_ACTIVE = 6
    NOT_CONFIGURED = 7
    FAULT_PERSISTS = 8


class BootReason(IntEnum):
    POWER_ON = 0
    WATCHDOG = 1
    BROWN_OUT = 2


def _pack(fmt: struct.Struct, name: str, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as exc:
        raise LocalProtocolError(f"{name}: a field is out of its wire range: {exc}") from exc


class Message:
    """Base of every ICD v1 message. Subclasses are frozen, slotted dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[int]
    STRUCT: ClassVar[struct.Struct]

    def payload(self) -> bytes:
        return _pack(self.STRUCT, type(self).__name__, *self._values())

    def _values(self) -> tuple[int, ...]:
        return ()

    @classmethod
    def from_payload(cls, payload: bytes) -> Message:
        return cls(*cls.STRUCT.unpack(payload))


class Command(Message):
    __slots__ = ()


class Reply(Message):
    __slots__ = ()


class Event(Message):
    __slots__ = ()


_EMPTY = struct.Struct("<")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")


# ---------------------------------------------------------------- commands (host -> device)


@dataclass(frozen=True, slots=True)
class Hello(Command):
    TYPE: ClassVar[int] = MessageType.HELLO
    STRUCT: ClassVar[struct.Struct] = _U8
    proto: int = PROTO_VERSION

    def _values(self) -> tuple[int, ...]:
        return (self.proto,)


@dataclass(frozen=True, slots=True)
class GetStatus(Command):
    TYPE: ClassVar[int] = MessageType.GET_STATUS
    STRUCT: ClassVar[struct.Struct] = _EMPTY


@dataclass(frozen=True, slots=True)
class SetParams(Command):
    TYPE: ClassVar[int] = MessageType.SET_PARAMS
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIH")
    energy_uj: int
    width_us: int
    rate_mhz: int
    spot_um: int

    def _values(self) -> tuple[int, ...]:
        return (self.energy_uj, self.width_us, self.rate_mhz, self.spot_um)


@dataclass(frozen=True, slots=True)
class Arm(Command):
    TYPE: ClassVar[int] = MessageType.ARM
    STRUCT: ClassVar[struct.Struct] = _U16
    lease_ms: int

    def _values(self) -> tuple[int, ...]:
        return (self.lease_ms,)


@dataclass(frozen=True, slots=True)
class Heartbeat(Command):
    TYPE: ClassVar[int] = MessageType.HEARTBEAT
    STRUCT: ClassVar[struct.Struct] = _U16
    lease_ms: int

    def _values(self) -> tuple[int, ...]:
        return (self.lease_ms,)


@dataclass(frozen=True, slots=True)
class Disarm(Command):
    TYPE: ClassVar[int] = MessageType.DISARM
    STRUCT: ClassVar[struct.Struct] = _EMPTY


@dataclass(frozen=True, slots=True)
class Stop(Command):
    TYPE: ClassVar[int] = MessageType.STOP
    STRUCT: ClassVar[struct.Struct] = _EMPTY


@dataclass(frozen=True, slots=True)
class ClearFault(Command):
    TYPE: ClassVar[int] = MessageType.CLEAR_FAULT
    STRUCT: ClassVar[struct.Struct] = _EMPTY


@dataclass(frozen=True, slots=True)
class SetReporting(Command):
    TYPE: ClassVar[int] = MessageType.SET_REPORTING
    STRUCT: ClassVar[struct.Struct] = _U16
    status_period_ms: int

    def _values(self) -> tuple[int, ...]:
        return (self.status_period_ms,)


# ---------------------------------------------------------------- replies (device -> host)

_IDENT_HEAD = struct.Struct("<B3BIHIIIIB")  # 27 bytes, then n x u16 spot sizes
MAX_SPOTS = (64 - _IDENT_HEAD.size) // 2


@dataclass(frozen=True, slots=True)
class Ident(Reply):
    TYPE: ClassVar[int] = MessageType.IDENT
    STRUCT: ClassVar[struct.Struct] = _IDENT_HEAD
    proto: int
    fw: tuple[int, int, int]
    serial: int
    wavelength_nm: int
    max_energy_uj: int
    min_width_us: int
    max_width_us: int
    max_rate_mhz: int
    spots_um: tuple[int, ...]

    def payload(self) -> bytes:
        if len(self.spots_um) > MAX_SPOTS:
            raise LocalProtocolError(f"Ident: {len(self.spots_um)} spot sizes exceed {MAX_SPOTS}")
        head = _pack(
            _IDENT_HEAD,
            "Ident",
            self.proto,
            *self.fw,
            self.serial,
            self.wavelength_nm,
            self.max_energy_uj,
            self.min_width_us,
            self.max_width_us,
            self.max_rate_mhz,
            len(self.spots_um),
        )
        return head + _pack(struct.Struct(f"<{len(self.spots_um)}H"), "Ident", *self.spots_um)

    @classmethod
    def from_payload(cls, payload: bytes) -> Ident:
        (proto, fw0, fw1, fw2, serial, wavelength, max_e, min_w, max_w, max_rate, n) = (
            _IDENT_HEAD.unpack_from(payload)
        )
        spots = struct.unpack_from(f"<{n}H", payload, _IDENT_HEAD.size)
        return cls(proto, (fw0, fw1, fw2), serial, wavelength, max_e, min_w, max_w, max_rate, spots)


@dataclass(frozen=True, slots=True)
class StatusReport(Message):
    """The STATUS payload, shared by the 0x42 reply and the 0xA1 event."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<BBHIhhH")
    state: int
    interlocks: int
    faults: int
    pulse_count: int
    head_temp_cdeg: int
    skin_temp_cdeg: int
    lease_left_ms: int

    def _values(self) -> tuple[int, ...]:
        return (
            self.state,
            self.interlocks,
            self.faults,
            self.pulse_count,
            self.head_temp_cdeg,
            self.skin_temp_cdeg,
            self.lease_left_ms,
        )


@dataclass(frozen=True, slots=True)
class StatusReply(StatusReport, Reply):
    TYPE: ClassVar[int] = MessageType.STATUS


@dataclass(frozen=True, slots=True)
class Ack(Reply):
    TYPE: ClassVar[int] = MessageType.ACK
    STRUCT: ClassVar[struct.Struct] = _U8
    command: int  # the TYPE acknowledged

    def _values(self) -> tuple[int, ...]:
        return (self.command,)


@dataclass(frozen=True, slots=True)
class Nak(Reply):
    TYPE: ClassVar[int] = MessageType.NAK
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<BB")
    command: int  # the TYPE refused
    reason: int  # a NakReason

    def _values(self) -> tuple[int, ...]:
        return (self.command, self.reason)


# ---------------------------------------------------------------- events (device -> host)


@dataclass(frozen=True, slots=True)
class Pulse(Event):
    TYPE: ClassVar[int] = MessageType.PULSE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III")
    pulse_no: int
    t_us: int  # device clock, wraps at 2**32
    energy_uj: int  # measured

    def _values(self) -> tuple[int, ...]:
        return (self.pulse_no, self.t_us, self.energy_uj)


@dataclass(frozen=True, slots=True)
class StatusEvent(StatusReport, Event):
    TYPE: ClassVar[int] = MessageType.STATUS_EVENT


@dataclass(frozen=True, slots=True)
class FaultEvent(Event):
    TYPE: ClassVar[int] = MessageType.FAULT
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Hi")
    code: int
    detail: int

    def _values(self) -> tuple[int, ...]:
        return (self.code, self.detail)


@dataclass(frozen=True, slots=True)
class InputEvent(Event):
    TYPE: ClassVar[int] = MessageType.INPUT
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<BB")
    footswitch: int
    interlocks: int

    def _values(self) -> tuple[int, ...]:
        return (self.footswitch, self.interlocks)


@dataclass(frozen=True, slots=True)
class Boot(Event):
    TYPE: ClassVar[int] = MessageType.BOOT
    STRUCT: ClassVar[struct.Struct] = _U8
    reason: int

    def _values(self) -> tuple[int, ...]:
        return (self.reason,)


_COMMANDS: tuple[type[Message], ...] = (
    Hello, GetStatus, SetParams, Arm, Heartbeat, Disarm, Stop, ClearFault, SetReporting,
)  # fmt: skip
_INBOUND: tuple[type[Message], ...] = (
    Ident, StatusReply, Ack, Nak, Pulse, StatusEvent, FaultEvent, InputEvent, Boot,
)  # fmt: skip

COMMAND_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in _COMMANDS}
REPLY_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in _INBOUND if 0x40 <= cls.TYPE <= 0x81
}
EVENT_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in _INBOUND if cls.TYPE >= 0xA0}
_ALL_TYPES: dict[int, type[Message]] = COMMAND_TYPES | REPLY_TYPES | EVENT_TYPES


def expected_length(type_: int, payload: bytes) -> bool:
    """Whether ``payload`` has the right length for a message of TYPE ``type_``."""
    cls = _ALL_TYPES[type_]
    if cls is Ident:
        n_at = _IDENT_HEAD.size - 1
        return len(payload) > n_at and len(payload) == _IDENT_HEAD.size + 2 * payload[n_at]
    return len(payload) == cls.STRUCT.size


def decode_message(type_: int, payload: bytes) -> Message:
    """Decode a payload of a known TYPE whose length was checked with :func:`expected_length`."""
    return _ALL_TYPES[type_].from_payload(payload)
