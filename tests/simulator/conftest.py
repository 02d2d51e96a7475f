"""A host's view of a simulated board, wired in memory: the pair helper of the board tests.

:class:`Bench` owns a :class:`~simulator.board.Board`, a :class:`~protocols.HostCodec` and an
injected clock. Commands go in as messages, everything the board wrote comes back decoded; the clock
moves only when a test moves it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from protocols import (
    Ack,
    Arm,
    Command,
    DeviceState,
    Frame,
    HostCodec,
    Message,
    Nak,
    Pulse,
    SetParams,
    StatusEvent,
)
from simulator.board import Board

PARAMS = SetParams(energy_uj=1000, width_us=200, rate_mhz=20_000, spot_um=300)  # 1 mJ, 20 Hz
PERIOD_US = 50_000


class Bench:
    """One board and one host codec on an injected clock (µs)."""

    def __init__(self, board: Board | None = None, *, now_us: int = 1_000, seed: int = 1) -> None:
        self.now = now_us
        self.board = board or Board(rng=random.Random(seed), now_us=now_us)
        self.host = HostCodec()
        self.seq = 0
        self.frames: list[Frame[Message]] = []  # everything received, in order
        self.receive()

    def state(self) -> DeviceState:
        """The board's state now (a call, so that type checkers do not narrow it)."""
        return self.board.state

    # -- time and bytes
    def tick(self, us: int) -> list[Frame[Message]]:
        """Move the clock on by ``us`` and take what the board wrote meanwhile."""
        self.now += us
        return self.receive()

    def run(self, us: int, step: int = 10_000) -> list[Frame[Message]]:
        """Move the clock on by ``us`` in steps of at most ``step``, as a prompt caller would
        (one call more than 50 ms late would skip the pulses it missed)."""
        frames: list[Frame[Message]] = []
        end = self.now + us
        while self.now < end:
            frames += self.tick(min(step, end - self.now))
        return frames

    def receive(self) -> list[Frame[Message]]:
        self.host.receive_data(self.board.data_to_send(self.now))
        frames = self.host.events()
        self.frames.extend(frames)
        return frames

    def send_raw(self, data: bytes) -> list[Frame[Message]]:
        self.board.receive_data(data, self.now)
        return self.receive()

    # -- commands
    def send(self, msg: Command, seq: int | None = None) -> list[Frame[Message]]:
        """Send ``msg`` (next SEQ unless given) now; return every frame that came back."""
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
            seq = self.seq
        return self.send_raw(self.host.send(seq, msg))

    def command(self, msg: Command, seq: int | None = None) -> Message:
        """Send ``msg`` and return its one reply."""
        sent_seq = self.seq + 1 if seq is None else seq
        replies = [f for f in self.send(msg, seq) if f.message.TYPE < 0xA0]
        assert len(replies) == 1, replies
        assert replies[0].seq == sent_seq & 0xFF
        return replies[0].message

    def ack(self, msg: Command) -> None:
        reply = self.command(msg)
        assert reply == Ack(msg.TYPE), reply

    def nak(self, msg: Command) -> int:
        reply = self.command(msg)
        assert isinstance(reply, Nak), reply
        return reply.reason

    # -- getting into a state
    def arm(self, lease_ms: int = 1000, params: SetParams = PARAMS) -> None:
        self.ack(params)
        self.ack(Arm(lease_ms))
        assert self.state() is DeviceState.READY

    def emit(self, lease_ms: int = 1000, params: SetParams = PARAMS) -> None:
        self.arm(lease_ms, params)
        self.board.footswitch(True, self.now)
        self.receive()
        assert self.state() is DeviceState.EMITTING


def pulses(frames: list[Frame[Message]]) -> list[Pulse]:
    return [f.message for f in frames if isinstance(f.message, Pulse)]


def statuses(frames: list[Frame[Message]]) -> list[StatusEvent]:
    return [f.message for f in frames if isinstance(f.message, StatusEvent)]


def messages_of(frames: list[Frame[Message]], cls: type[Message]) -> list[Message]:
    return [f.message for f in frames if isinstance(f.message, cls)]


@pytest.fixture
def bench() -> Bench:
    return Bench()


@pytest.fixture
def make_bench() -> Callable[..., Bench]:
    return Bench
