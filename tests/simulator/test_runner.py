"""BoardRunner: the board in real time inside an asyncio loop."""

from __future__ import annotations

import asyncio
import itertools
import random

from protocols import (
    Ack,
    Arm,
    DeviceState,
    Frame,
    Hello,
    HostCodec,
    Ident,
    Message,
    Pulse,
    SetParams,
    SetReporting,
    Stop,
)
from simulator import Board, BoardRunner


class Host:
    """Collects what the runner writes, counting write calls."""

    def __init__(self) -> None:
        self.codec = HostCodec()
        self.frames: list[Frame[Message]] = []
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.codec.receive_data(data)
        self.frames.extend(self.codec.events())

    def pulses(self) -> list[Pulse]:
        return [f.message for f in self.frames if isinstance(f.message, Pulse)]


async def test_runner_sustains_5_khz_with_contiguous_pulses_in_bursts() -> None:
    board = Board(rng=random.Random(5), max_rate_mhz=5_000_000)
    host = Host()
    async with BoardRunner(board) as runner:
        runner.attach(host.write)
        runner.feed(host.codec.send(1, Hello()))
        runner.feed(host.codec.send(2, SetParams(500, 100, 5_000_000, 300)))
        runner.feed(host.codec.send(3, Arm(5000)))
        replies = [f.message for f in host.frames if f.message.TYPE < 0xA0]
        assert isinstance(replies[0], Ident)
        assert replies[1:] == [Ack(SetParams.TYPE), Ack(Arm.TYPE)]
        board.footswitch(True, runner.now_us())
        runner.wake()
        for _ in range(100):
            await asyncio.sleep(0.005)
            if len(host.pulses()) >= 1000:
                break
        runner.feed(host.codec.send(4, Stop()))
        stopped_at = len(host.frames)
        await asyncio.sleep(0.02)
    pulses = host.pulses()
    assert len(pulses) >= 1000
    assert [p.pulse_no for p in pulses] == list(range(1, len(pulses) + 1))
    assert all(b.t_us - a.t_us >= 200 for a, b in itertools.pairwise(pulses))
    assert host.writes < len(pulses)  # bursts leave in one write, not one per pulse
    assert not any(isinstance(f.message, Pulse) for f in host.frames[stopped_at:])
    assert board.state is DeviceState.STANDBY


async def test_bytes_written_while_detached_are_lost() -> None:
    board = Board(rng=random.Random(1))
    host = Host()
    async with BoardRunner(board) as runner:
        runner.feed(host.codec.send(1, Hello()))  # answered into the void
        assert runner.bytes_lost > 0
        runner.attach(host.write)
        runner.feed(host.codec.send(2, Hello()))
        runner.attach(None)
    assert [f.seq for f in host.frames] == [2]


async def test_periodic_status_flows_without_any_input() -> None:
    board = Board(rng=random.Random(1))
    host = Host()
    async with BoardRunner(board) as runner:
        runner.attach(host.write)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sum(f.message.TYPE == 0xA1 for f in host.frames) >= 2:
                break
    assert sum(f.message.TYPE == 0xA1 for f in host.frames) >= 2


async def test_a_failing_writer_is_detached_not_fatal() -> None:
    board = Board(rng=random.Random(1))

    def broken(_data: bytes) -> None:
        raise BrokenPipeError("host gone")

    async with BoardRunner(board) as runner:
        runner.attach(broken)
        runner.feed(HostCodec().send(1, Hello()))
        runner.feed(HostCodec().send(2, Hello()))
    assert runner.bytes_written == 0
    assert runner.bytes_lost > 0


async def test_wake_re_plans_a_runner_with_nothing_scheduled() -> None:
    board = Board(rng=random.Random(1))
    host = Host()
    async with BoardRunner(board) as runner:
        runner.attach(host.write)
        runner.feed(host.codec.send(1, SetReporting(0)))
        runner.feed(host.codec.send(2, SetParams(1000, 200, 100_000, 300)))
        runner.feed(host.codec.send(3, Arm(5000)))
        await asyncio.sleep(0.01)
        assert board.next_deadline_us() is not None  # only the lease
        board.footswitch(True, runner.now_us())
        runner.wake()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(host.pulses()) >= 5:
                break
        board.footswitch(False, runner.now_us())
        runner.wake()
    assert [p.pulse_no for p in host.pulses()][:5] == [1, 2, 3, 4, 5]
