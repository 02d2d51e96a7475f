"""A small scriptable device for link tests, built on the sans-I/O DeviceCodec.

It answers every command (remembering the last reply, as ICD v1 requires), can drop or withhold
replies, NAK chosen commands, send events with its own event SEQ counter, report STATUS
periodically, reboot, and speak another protocol version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from drivers import MemoryTransport, TransportError
from protocols import (
    Ack,
    Arm,
    BadCommand,
    Boot,
    DeviceCodec,
    DeviceState,
    Event,
    Frame,
    GetStatus,
    Heartbeat,
    Hello,
    Ident,
    Message,
    Nak,
    NakReason,
    SetReporting,
    StatusEvent,
    StatusReply,
    Stop,
)


@dataclass
class FakeDevice:
    proto: int = 1
    serial: int = 4242
    state: int = DeviceState.STANDBY
    drop_replies: dict[int, int] = field(default_factory=dict)  # TYPE -> replies still to drop
    silent_types: set[int] = field(default_factory=set)  # TYPEs never answered
    naks: dict[int, NakReason] = field(default_factory=dict)  # TYPE -> refusal
    received: list[Frame[Message] | BadCommand] = field(default_factory=list)
    executed: list[Message] = field(default_factory=list)
    status_period_ms: int = 100
    reporting: bool = True  # False: no STATUS events (a hung reporter)
    transport: MemoryTransport | None = None
    connections: int = 0

    def __post_init__(self) -> None:
        self.codec = DeviceCodec()
        self.event_seq = 0
        self._memory: tuple[int, int, bytes] | None = None
        self._ticker: asyncio.TimerHandle | None = None

    # --------------------------------------------------------- wiring

    def accept(self, transport: MemoryTransport) -> None:
        """MemoryLink's accept hook: a host connected."""
        self.transport = transport
        self.connections += 1
        self.codec = DeviceCodec()
        transport.attach(on_data=self.on_data, on_lost=self._on_lost)

    def _on_lost(self, _error: TransportError) -> None:
        self._cancel_ticker()

    def close(self) -> None:
        self._cancel_ticker()
        if self.transport is not None:
            self.transport.close()

    # --------------------------------------------------------- commands

    def commands(self, type_: int) -> list[Frame[Message]]:
        return [f for f in self.received if isinstance(f, Frame) and type_ == f.message.TYPE]

    def on_data(self, data: bytes) -> None:
        self.codec.receive_data(data)
        for item in self.codec.events():
            self.received.append(item)  # type: ignore[arg-type]
            if isinstance(item, BadCommand):
                self._reply(item.seq, item.type, Nak(item.type, item.reason))
            else:
                self._command(item.seq, item.message)

    def _command(self, seq: int, command: Message) -> None:
        type_ = command.TYPE
        if type_ in self.silent_types:
            return
        memory = self._memory
        if type_ != Hello.TYPE and memory is not None and memory[:2] == (seq, type_):
            self._write_reply(memory[2], type_)
            return
        self.executed.append(command)
        reply: Message
        if type_ in self.naks:
            reply = Nak(type_, self.naks[type_])
        elif isinstance(command, Hello):
            self._memory = None
            reply = Ident(self.proto, (1, 2, 3), self.serial, 1550, 60000, 100, 20000, 500000,
                          (120, 300, 1000, 3000))  # fmt: skip
        elif isinstance(command, GetStatus):
            reply = StatusReply(*self._status_fields())
        elif isinstance(command, SetReporting):
            self.status_period_ms = command.status_period_ms
            self._restart_ticker()
            reply = Ack(type_)
        elif isinstance(command, Arm):
            self.state = DeviceState.READY
            reply = Ack(type_)
        elif isinstance(command, Heartbeat):
            ok = self.state in (DeviceState.READY, DeviceState.EMITTING)
            reply = Ack(type_) if ok else Nak(type_, NakReason.BAD_STATE)
        elif isinstance(command, Stop):
            self.state = DeviceState.STANDBY
            reply = Ack(type_)
        else:
            reply = Ack(type_)
        self._reply(seq, type_, reply)

    def _reply(self, seq: int, type_: int, reply: Message) -> None:
        wire = self.codec.send(seq, reply)
        self._memory = (seq, type_, wire)
        self._write_reply(wire, type_)

    def _write_reply(self, wire: bytes, type_: int) -> None:
        left = self.drop_replies.get(type_, 0)
        if left:
            self.drop_replies[type_] = left - 1
            return
        assert self.transport is not None
        self.transport.write(wire)

    # --------------------------------------------------------- events

    def _status_fields(self) -> tuple[int, ...]:
        return (self.state, 0, 0, 0, 2500, 3100, 0)

    def send_event(self, message: Event, seq: int | None = None) -> None:
        """Write an event with the next event SEQ (or ``seq``, to simulate a gap)."""
        if seq is not None:
            self.event_seq = seq
        assert self.transport is not None
        self.transport.write(self.codec.send(self.event_seq, message))
        self.event_seq = (self.event_seq + 1) & 0xFF

    def boot(self, reason: int = 0) -> None:
        self.state = DeviceState.STANDBY
        self._memory = None
        self.status_period_ms = 100
        self.send_event(Boot(reason), seq=0)

    def _restart_ticker(self) -> None:
        self._cancel_ticker()
        if self.status_period_ms:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.status_period_ms / 1000, self._tick)

    def _cancel_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        if self.reporting and self.transport is not None and self.transport.is_open:
            self.send_event(StatusEvent(*self._status_fields()))
        self._restart_ticker()
