"""DeviceLink against a fake device over the in-memory transport: handshake, retransmission, NAK,
STOP pre-emption, heartbeats, event SEQ gaps, supervision, reboot, reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from structlog.testing import capture_logs

from devicectl.errors import DeviceRefused, LinkError, LinkLost
from devicectl.link import DeviceLink, SupersededByStop, backoff_delay
from drivers import MemoryLink
from protocols import (
    Ack,
    Arm,
    ClearFault,
    FrameReader,
    GetStatus,
    Heartbeat,
    Hello,
    Ident,
    InputEvent,
    Message,
    MessageType,
    NakReason,
    Pulse,
    SetReporting,
    StatusEvent,
    StatusReply,
    Stop,
)
from tests.link.fake_device import FakeDevice

FAST: dict[str, Any] = {
    "reply_timeout": 0.02,
    "backoff": lambda _attempt: 0.001,
    "status_period_ms": 0,
}


async def until(condition: Callable[[], bool], limit: float = 3.0) -> None:
    """Wait until ``condition()`` holds; fail the test (not time it) if it never does."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - conditions are plain state, not events
            await asyncio.sleep(0.001)


class Wire:
    """Records every chunk the host writes, synchronously, before delivery (a manipulator)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> Iterable[bytes]:
        self.chunks.append(data)
        return [data]

    def types(self) -> list[int]:
        reader = FrameReader()
        return [body[1] for chunk in self.chunks for body in reader.feed(chunk)]


@contextlib.asynccontextmanager
async def running(
    device: FakeDevice, *, wire: Wire | None = None, **options: Any
) -> AsyncIterator[tuple[DeviceLink, MemoryLink]]:
    memory = MemoryLink(device.accept, to_device=wire)
    settings = FAST | options
    try:
        async with DeviceLink(memory.connect, port=memory.url, **settings) as link:
            await until(link.connected.is_set)
            yield link, memory
    finally:
        device.close()


def types_of(device: FakeDevice) -> list[int]:
    return [f.message.TYPE for f in device.received if hasattr(f, "message")]


async def test_handshake_writes_delimiter_then_hello_set_reporting_get_status() -> None:
    device = FakeDevice(serial=777)
    wire = Wire()
    connected: list[tuple[Ident, StatusReply]] = []

    async def on_connected(ident: Ident, status: StatusReply) -> None:
        connected.append((ident, status))

    async with running(device, wire=wire, on_connected=on_connected, status_period_ms=250) as (
        link,
        _,
    ):
        await until(lambda: bool(connected))
    assert wire.chunks[0] == b"\x00"
    assert types_of(device)[:3] == [Hello.TYPE, SetReporting.TYPE, GetStatus.TYPE]
    hello, reporting = device.received[0], device.received[1]
    assert hello.message == Hello(1)  # type: ignore[union-attr]
    assert reporting.message == SetReporting(250)  # type: ignore[union-attr]
    assert link.ident is not None
    assert link.ident.serial == 777
    assert connected[0][0] is link.ident
    assert connected[0][1].state == device.state


async def test_seq_increments_per_command_and_wraps_at_8_bits() -> None:
    device = FakeDevice()
    async with running(device) as (link, _):
        for _ in range(260):
            await link.request(ClearFault())
    seqs = [f.seq for f in device.received]
    assert len(seqs) == 3 + 260
    assert all((b - a) & 0xFF == 1 for a, b in itertools.pairwise(seqs))
    assert 0 in seqs  # wrapped through 0 without skipping it


async def test_dropped_replies_are_recovered_by_resending_with_the_same_seq() -> None:
    device = FakeDevice()
    async with running(device) as (link, _):
        device.drop_replies[ClearFault.TYPE] = 2
        reply = await link.request(ClearFault())
        stats = link.stats
    assert reply == Ack(ClearFault.TYPE)
    sends = device.commands(ClearFault.TYPE)
    assert len(sends) == 3
    assert len({f.seq for f in sends}) == 1
    assert sum(isinstance(c, ClearFault) for c in device.executed) == 1  # re-sends not re-executed
    assert stats["retries"] == 2
    assert stats["timeouts"] == 0


async def test_four_unanswered_sends_raise_link_lost_and_reconnect_with_hello() -> None:
    device = FakeDevice()
    lost: list[str] = []
    async with running(device, on_link_lost=lost.append) as (link, memory):
        device.silent_types.add(ClearFault.TYPE)
        with pytest.raises(LinkLost, match="no reply to CLEAR_FAULT after 4 sends"):
            await link.request(ClearFault())
        sends = device.commands(ClearFault.TYPE)
        assert len(sends) == 4
        assert len({f.seq for f in sends}) == 1
        await until(lambda: memory.connections == 2 and link.connected.is_set())
        stats = link.stats
    assert lost == ["no reply to CLEAR_FAULT after 4 sends"]
    assert len(device.commands(Hello.TYPE)) == 2
    assert stats["timeouts"] == 1
    assert stats["retries"] == 3
    assert stats["reconnects"] == 1


async def test_nak_raises_device_refused_naming_command_and_reason() -> None:
    device = FakeDevice(naks={Arm.TYPE: NakReason.NOT_CONFIGURED})
    async with running(device) as (link, _):
        with pytest.raises(DeviceRefused) as caught:
            await link.request(Arm(250))
        assert link.stats["naks"] == 1
        assert link.connected.is_set()  # a refusal is not a link failure
    assert caught.value.command == "ARM"
    assert caught.value.reason == "NOT_CONFIGURED"
    assert str(caught.value) == "the device refused ARM: NOT_CONFIGURED"


async def test_stop_jumps_the_queue_and_the_command_in_flight_is_never_resent() -> None:
    device = FakeDevice()
    wire = Wire()
    async with running(device, wire=wire, reply_timeout=0.01) as (link, _):
        device.silent_types.add(Arm.TYPE)  # ARM's reply never comes: it stays in flight
        arm = asyncio.create_task(link.request(Arm(250)))
        await until(lambda: bool(device.commands(Arm.TYPE)))
        written_before = len(wire.chunks)
        link.stop_now()
        # Written synchronously, inside stop_now, before any await.
        assert len(wire.chunks) == written_before + 1
        assert FrameReader().feed(wire.chunks[-1])[0][1] == Stop.TYPE
        with pytest.raises(SupersededByStop, match="ARM was superseded by STOP"):
            await arm
        await link.stop()  # the ACK arrives
        # Long enough for several ARM retransmissions, had any been scheduled.
        await asyncio.sleep(0.1)
        assert link.stats["superseded"] == 1
    types = wire.types()
    stop_at = types.index(Stop.TYPE)
    assert Arm.TYPE not in types[stop_at:]
    assert len(device.commands(Arm.TYPE)) <= 4


async def test_stop_is_retransmitted_until_acked() -> None:
    device = FakeDevice()
    async with running(device) as (link, _):
        device.drop_replies[Stop.TYPE] = 2
        await link.stop()
        # Requests queue behind the STOP and go out after it.
        assert await link.request(GetStatus()) == StatusReply(device.state, 0, 0, 0, 2500, 3100, 0)
    stops = device.commands(Stop.TYPE)
    assert len(stops) == 3
    assert len({f.seq for f in stops}) == 1


async def test_request_for_stop_goes_through_stop_now() -> None:
    device = FakeDevice()
    async with running(device) as (link, _):
        assert await link.request(Stop()) == Ack(MessageType.STOP)
    assert len(device.commands(Stop.TYPE)) == 1


async def test_heartbeats_every_third_of_the_lease_and_end_with_stop() -> None:
    device = FakeDevice()
    now = [0.0]
    sent_at: list[float] = []

    def clock() -> float:
        return now[0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds  # a virtual clock: no real waiting
        await asyncio.sleep(0)

    original = device._command

    def record(seq: int, command: Message) -> None:
        if isinstance(command, Heartbeat):
            sent_at.append(now[0])
        original(seq, command)

    device._command = record  # type: ignore[method-assign]
    async with running(device, clock=clock, sleep=sleep) as (link, _):
        await link.request(Arm(300))
        link.start_heartbeats(300)
        await until(lambda: len(sent_at) >= 5)
        link.stop_now()
        await link.stop()
        for _ in range(20):  # the virtual clock runs on: no heartbeat may follow the STOP
            await sleep(0.1)
        assert not link.heartbeating
    types = types_of(device)
    assert Heartbeat.TYPE not in types[types.index(Stop.TYPE) :]
    assert sent_at[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    beats = [f.message for f in device.commands(Heartbeat.TYPE)]
    assert all(b == Heartbeat(300) for b in beats)


async def test_a_late_heartbeat_is_logged_with_its_lateness() -> None:
    """A host too busy to wake on time says so, before the lease can run low."""
    device = FakeDevice()
    now = [0.0]
    oversleep = [0.0]

    def clock() -> float:
        return now[0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds + oversleep[0]  # a virtual clock; the host wakes late when asked
        oversleep[0] = 0.0
        await asyncio.sleep(0)

    with capture_logs() as logs:
        async with running(device, clock=clock, sleep=sleep) as (link, _):
            await link.request(Arm(300))
            link.start_heartbeats(300)  # every 100 ms
            await until(lambda: len(device.commands(Heartbeat.TYPE)) >= 2)
            oversleep[0] = 0.040  # 40 ms late: more than a quarter of the interval
            sent = len(device.commands(Heartbeat.TYPE))
            await until(lambda: len(device.commands(Heartbeat.TYPE)) >= sent + 3)
            link.stop_now()
            await link.stop()
    late = [e for e in logs if e["event"] == "heartbeat_late"]
    assert len(late) == 1, late
    assert late[0]["late_ms"] == pytest.approx(40.0)
    assert (late[0]["interval_ms"], late[0]["lease_ms"]) == (100.0, 300)


async def test_heartbeats_end_when_the_device_refuses_them() -> None:
    device = FakeDevice()  # STANDBY: HEARTBEAT gets NAK BAD_STATE
    async with running(device) as (link, _):
        link.start_heartbeats(60)
        await until(lambda: not link.heartbeating)
    assert len(device.commands(Heartbeat.TYPE)) == 1


async def test_events_reach_the_handler_in_wire_order_and_seq_gaps_are_counted() -> None:
    device = FakeDevice()
    seen: list[tuple[int, Message]] = []

    def on_event(seq: int, message: Message) -> None:
        seen.append((seq, message))

    async with running(device, on_event=on_event) as (link, _):
        device.send_event(Pulse(1, 100, 1000), seq=5)
        device.send_event(InputEvent(1, 0))  # 6
        device.send_event(Pulse(2, 200, 1000), seq=9)  # 7, 8 lost
        device.send_event(Pulse(3, 300, 1000), seq=254)  # 10..253 lost: 244
        device.send_event(Pulse(4, 400, 1000))  # 255
        device.send_event(Pulse(5, 500, 1000), seq=1)  # 0 lost (8-bit wrap)
        await until(lambda: len(seen) == 6)
        stats = link.stats
    assert [s for s, _ in seen] == [5, 6, 9, 254, 255, 1]
    assert seen[1][1] == InputEvent(1, 0)
    assert [m.pulse_no for _, m in seen if isinstance(m, Pulse)] == [1, 2, 3, 4, 5]
    assert stats["lost_events"] == 2 + 244 + 1
    assert stats["events"] == 6


async def test_a_raising_event_handler_triggers_stop() -> None:
    device = FakeDevice()

    def on_event(_seq: int, _message: Message) -> None:
        raise RuntimeError("supervisor bug")

    with capture_logs() as logs:
        async with running(device, on_event=on_event) as (link, _):
            device.send_event(Pulse(1, 0, 1000))
            await until(lambda: bool(device.commands(Stop.TYPE)))
            assert link.stats["handler_errors"] == 1
    assert any(entry["event"] == "event_handler_failed" for entry in logs)


async def test_reply_with_another_seq_is_counted_and_ignored() -> None:
    device = FakeDevice()
    async with running(device) as (link, _):
        assert device.transport is not None
        device.transport.write(device.codec.send(200, Ack(Arm.TYPE)))
        await until(lambda: link.stats["stale_replies"] == 1)
        assert await link.request(GetStatus()) == StatusReply(device.state, 0, 0, 0, 2500, 3100, 0)


async def test_no_status_for_three_periods_loses_the_link_and_reconnects_with_hello() -> None:
    device = FakeDevice()
    lost: list[str] = []
    async with running(device, status_period_ms=20, on_link_lost=lost.append) as (link, memory):
        await until(lambda: link.stats["events"] >= 3)  # STATUS flowing: link stays up
        assert memory.connections == 1
        device.reporting = False
        await until(lambda: bool(lost))
        await until(lambda: memory.connections == 2 and link.connected.is_set())
        device.reporting = True
    assert lost[0] == "no STATUS for 3 periods (60 ms)"
    assert len(device.commands(Hello.TYPE)) == 2


async def test_boot_event_leads_to_hello_again_on_the_same_connection() -> None:
    device = FakeDevice()
    seen: list[Message] = []
    async with running(device, on_event=lambda _s, m: seen.append(m)) as (link, memory):
        device.boot(reason=1)
        await until(lambda: len(device.commands(Hello.TYPE)) == 2 and link.connected.is_set())
        await until(lambda: len(device.commands(GetStatus.TYPE)) == 2)
        assert memory.connections == 1
        assert link.stats["lost_events"] == 0
    assert seen[0].TYPE == MessageType.BOOT
    assert types_of(device)[3:6] == [Hello.TYPE, SetReporting.TYPE, GetStatus.TYPE]


async def test_protocol_mismatch_is_logged_and_disconnects() -> None:
    device = FakeDevice(proto=2)
    memory = MemoryLink(device.accept)
    with capture_logs() as logs:
        async with DeviceLink(memory.connect, port="sim0", **FAST):
            await until(lambda: memory.connections >= 2)
            assert not memory.device or not memory.device.is_open or memory.connections >= 2
    device.close()
    mismatches = [e for e in logs if e["event"] == "device_protocol_mismatch"]
    assert mismatches[0]["device_proto"] == 2
    assert mismatches[0]["port"] == "sim0"
    assert not any(e["event"] == "device_connected" for e in logs)
    failures = [e for e in logs if e["event"] == "device_handshake_failed"]
    assert "speaks ICD protocol 2" in failures[0]["cause"]


async def test_connect_failures_are_logged_per_attempt_then_it_connects() -> None:
    device = FakeDevice()
    memory = MemoryLink(device.accept, name="usb0")
    memory.available = False
    with capture_logs() as logs:
        async with DeviceLink(memory.connect, port=memory.url, **FAST) as link:
            await until(lambda: link.stats["connect_failures"] >= 3)
            memory.available = True
            await until(link.connected.is_set)
    device.close()
    failures = [e for e in logs if e["event"] == "device_connect_failed"]
    assert len(failures) >= 3
    assert failures[0]["port"] == "memory://usb0"
    assert failures[0]["cause"] == "no device attached"
    # Each line says that it retries, when, and for how long: `run --port /dev/ttyNOPE` does not
    # leave the operator guessing whether it gave up.
    assert failures[0]["retry_in_s"] >= 0
    assert "until the device answers" in failures[0]["retrying"]
    assert "5 s" in failures[0]["retrying"]


async def test_vanished_port_reports_link_lost_naming_it_and_reconnects() -> None:
    device = FakeDevice()
    lost: list[str] = []
    async with running(device, on_link_lost=lost.append) as (link, memory):
        assert memory.device is not None
        memory.device.close()
        await until(lambda: bool(lost))
        await until(lambda: memory.connections == 2 and link.connected.is_set())
    assert lost == [f"serial port {memory.url} vanished: peer closed"]


async def test_requests_fail_fast_while_the_port_is_gone() -> None:
    device = FakeDevice()
    async with running(device) as (link, memory):
        memory.available = False
        assert memory.device is not None
        memory.device.close()
        await until(lambda: not link.connected.is_set())
        with pytest.raises(LinkError, match=f"the device on {memory.url} is not connected"):
            await link.request(GetStatus())


async def test_in_flight_command_fails_with_link_lost_when_the_port_vanishes() -> None:
    device = FakeDevice()
    async with running(device, reply_timeout=1.0) as (link, memory):
        device.silent_types.add(ClearFault.TYPE)
        task = asyncio.create_task(link.request(ClearFault()))
        await until(lambda: bool(device.commands(ClearFault.TYPE)))
        assert memory.device is not None
        memory.device.close()
        with pytest.raises(LinkLost, match="vanished"):
            await task


async def test_stop_requested_while_disconnected_goes_out_right_after_ident() -> None:
    device = FakeDevice()
    async with running(device) as (link, memory):
        memory.available = False
        assert memory.device is not None
        memory.device.close()
        await until(lambda: not link.connected.is_set())
        stopping = asyncio.create_task(link.stop())
        await asyncio.sleep(0.01)
        assert not stopping.done()
        memory.available = True
        await stopping
        await until(link.connected.is_set)
    types = types_of(device)
    second_hello = [i for i, t in enumerate(types) if t == Hello.TYPE][1]
    assert types[second_hello + 1] == Stop.TYPE


async def test_leaving_while_heartbeating_sends_stop() -> None:
    device = FakeDevice()
    async with running(device, reply_timeout=0.05) as (link, _):
        await link.request(Arm(3000))
        link.start_heartbeats(3000)
    assert len(device.commands(Stop.TYPE)) == 1


def test_backoff_is_jittered_exponential_capped_at_five_seconds() -> None:
    delays = [backoff_delay(n) for n in range(1, 12)]
    assert 0.05 <= delays[0] <= 0.1
    assert 0.1 <= delays[1] <= 0.2
    assert all(2.5 <= d <= 5.0 for d in delays[7:])
    assert len({backoff_delay(3) for _ in range(20)}) > 1  # jittered


def test_status_period_out_of_range_is_refused_at_construction() -> None:
    memory = MemoryLink()
    with pytest.raises(ValueError, match="status_period_ms=5"):
        DeviceLink(memory.connect, port="x", status_period_ms=5)


async def test_status_events_do_not_count_as_lost_across_reconnection() -> None:
    device = FakeDevice()
    async with running(device) as (link, memory):
        device.send_event(StatusEvent(1, 0, 0, 0, 0, 0, 0), seq=10)
        await until(lambda: link.stats["events"] == 1)
        assert memory.device is not None
        memory.device.close()
        await until(lambda: memory.connections == 2 and link.connected.is_set())
        device.send_event(StatusEvent(1, 0, 0, 0, 0, 0, 0), seq=40)
        await until(lambda: link.stats["events"] == 2)
        assert link.stats["lost_events"] == 0


async def test_a_command_queued_behind_the_one_in_flight_is_abandoned_by_stop() -> None:
    device = FakeDevice()
    wire = Wire()
    async with running(device, wire=wire, reply_timeout=0.05) as (link, _):
        device.silent_types.add(ClearFault.TYPE)
        in_flight = asyncio.create_task(link.request(ClearFault()))
        await until(lambda: bool(device.commands(ClearFault.TYPE)))
        queued = asyncio.create_task(link.request(Arm(250)))  # waits its turn
        await asyncio.sleep(0)
        link.stop_now()
        with pytest.raises(SupersededByStop, match="CLEAR_FAULT"):
            await in_flight
        with pytest.raises(SupersededByStop, match="ARM"):
            await queued
        await link.stop()
        # A command issued after the STOP goes out normally.
        assert await link.request(GetStatus()) == StatusReply(device.state, 0, 0, 0, 2500, 3100, 0)
        assert link.stats["superseded"] == 2
    assert device.commands(Arm.TYPE) == []
    assert Arm.TYPE not in wire.types()


async def test_stop_unanswered_during_the_handshake_reconnects_and_is_sent_again() -> None:
    device = FakeDevice()
    async with running(device) as (link, memory):
        memory.available = False
        assert memory.device is not None
        memory.device.close()
        await until(lambda: not link.connected.is_set())
        stopping = asyncio.create_task(link.stop())
        device.drop_replies[Stop.TYPE] = 4  # every send of the first post-IDENT STOP is lost
        memory.available = True
        await stopping
        await until(link.connected.is_set)
        assert memory.connections == 3
        assert link.stats["timeouts"] == 1
    stops = device.commands(Stop.TYPE)
    assert len(stops) == 5  # 4 unanswered sends, then the STOP of the next connection
    assert len(device.commands(Hello.TYPE)) == 3


async def test_reply_hook_sees_each_reply_before_later_frames() -> None:
    device = FakeDevice()
    order: list[str] = []

    def on_reply(command: int, reply: Message) -> None:
        order.append(f"reply {MessageType(command).name} {type(reply).__name__}")

    def on_event(_seq: int, message: Message) -> None:
        order.append(f"event {type(message).__name__}")

    async with running(device, on_event=on_event, on_reply=on_reply) as (link, _):
        original = device._reply

        def reply_then_pulse(seq: int, type_: int, reply: Message) -> None:
            original(seq, type_, reply)
            if type_ == Arm.TYPE:
                device.send_event(Pulse(1, 0, 1000))

        device._reply = reply_then_pulse  # type: ignore[method-assign]
        order.clear()
        await link.request(Arm(250))
        await until(lambda: len(order) == 2)
    assert order == ["reply ARM Ack", "event Pulse"]


async def test_a_reply_of_the_wrong_kind_for_the_command_in_flight_is_ignored() -> None:
    device = FakeDevice()
    async with running(device, reply_timeout=0.05) as (link, _):
        device.silent_types.add(Arm.TYPE)
        arm = asyncio.create_task(link.request(Arm(250)))
        await until(lambda: bool(device.commands(Arm.TYPE)))
        seq = device.commands(Arm.TYPE)[0].seq
        assert device.transport is not None
        device.transport.write(device.codec.send(seq, Ack(Stop.TYPE)))  # ACK of another command
        device.transport.write(device.codec.send(seq, StatusReply(1, 0, 0, 0, 0, 0, 0)))
        device.transport.write(device.codec.send(seq, Ack(Arm.TYPE)))  # the real answer
        assert await arm == Ack(Arm.TYPE)
        assert link.stats["stale_replies"] == 2


# ── the PULSE fast path (issue 16) ───────────────────────────────────────────────────────────


async def test_fast_path_pulses_come_as_ints_in_wire_order_with_events_and_replies() -> None:
    device = FakeDevice()
    order: list[object] = []
    chunks: list[int] = []

    def on_pulse(seq: int, pulse_no: int, t_us: int, energy_uj: int) -> None:
        order.append(("pulse", seq, pulse_no, t_us, energy_uj))

    def on_event(seq: int, message: Message) -> None:
        order.append(("event", seq, type(message).__name__))

    def on_reply(command: int, reply: Message) -> None:
        order.append(("reply", MessageType(command).name, type(reply).__name__))

    async with running(
        device,
        on_event=on_event,
        on_pulse=on_pulse,
        on_reply=on_reply,
        on_chunk_end=lambda: chunks.append(len(order)),
    ) as (link, _):
        original = device._reply

        def pulse_reply_pulse(seq: int, type_: int, reply: Message) -> None:
            if type_ == Arm.TYPE:
                device.send_event(Pulse(7, 70, 1000))
            original(seq, type_, reply)
            if type_ == Arm.TYPE:
                device.send_event(Pulse(8, 80, 1000))

        device._reply = pulse_reply_pulse  # type: ignore[method-assign]
        order.clear()
        device.send_event(Pulse(1, 100, 1000), seq=5)
        device.send_event(InputEvent(1, 0))  # 6
        device.send_event(Pulse(2, 200, 1001), seq=9)  # 7, 8 lost
        await until(lambda: len(order) == 3)
        await link.request(Arm(250))
        await until(lambda: len(order) == 6)
        stats = link.stats
    assert order == [
        ("pulse", 5, 1, 100, 1000),
        ("event", 6, "InputEvent"),
        ("pulse", 9, 2, 200, 1001),
        ("pulse", 10, 7, 70, 1000),
        ("reply", "ARM", "Ack"),
        ("pulse", 11, 8, 80, 1000),
    ]
    assert stats["lost_events"] == 2 and stats["events"] == 5
    assert chunks and chunks[-1] == 6  # every chunk's frames, then its end


async def test_a_raising_pulse_handler_triggers_stop_and_the_chunk_still_ends() -> None:
    device = FakeDevice()
    ended: list[bool] = []

    def on_pulse(_seq: int, _pulse_no: int, _t_us: int, _energy_uj: int) -> None:
        raise RuntimeError("supervisor bug")

    with capture_logs() as logs:
        async with running(device, on_pulse=on_pulse, on_chunk_end=lambda: ended.append(True)) as (
            link,
            _,
        ):
            ended.clear()
            device.send_event(Pulse(1, 0, 1000))
            await until(lambda: bool(device.commands(Stop.TYPE)))
            assert link.stats["handler_errors"] == 1
            assert ended
    assert any(entry["event"] == "event_handler_failed" for entry in logs)
