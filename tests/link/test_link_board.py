"""DeviceLink against the real simulated board (simulator.Board in a BoardRunner), in memory."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from devicectl.errors import LinkLost
from devicectl.link import DeviceLink
from drivers import MemoryLink, MemoryTransport
from protocols import (
    Arm,
    Boot,
    BootReason,
    DeviceState,
    GetStatus,
    Message,
    MessageType,
    Pulse,
    SetParams,
    StatusReply,
)
from simulator import Board, BoardRunner


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail the test (not time it) if it never does."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - conditions are plain state, not events
            await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def board_link(**options: Any) -> AsyncIterator[tuple[DeviceLink, BoardRunner, MemoryLink]]:
    board = Board(serial=0x51000042, rng=random.Random(7))

    async with BoardRunner(board) as runner:

        def accept(end: MemoryTransport) -> None:
            end.attach(on_data=runner.feed, on_lost=lambda _e: runner.attach(None))
            runner.attach(end.write)

        memory = MemoryLink(accept, name="board")
        settings: dict[str, Any] = {"backoff": lambda _n: 0.005} | options
        async with DeviceLink(memory.connect, port=memory.url, **settings) as link:
            await until(link.connected.is_set)
            yield link, runner, memory


async def test_pulses_flow_and_none_follows_the_ack_of_stop() -> None:
    log: list[str] = []
    pulses: list[Pulse] = []
    link_ref: list[DeviceLink] = []

    def on_event(_seq: int, message: Message) -> None:
        if type(message) is Pulse:
            pulses.append(message)
            log.append("pulse")
            if len(pulses) == 5:
                link_ref[0].stop_now()  # from inside the receive callback, as the supervisor does

    def on_reply(command: int, _reply: Message) -> None:
        log.append(f"reply {MessageType(command).name}")

    async with board_link(on_event=on_event, on_reply=on_reply) as (link, runner, _):
        link_ref.append(link)
        assert link.ident is not None
        assert link.ident.serial == 0x51000042
        await link.request(SetParams(10_000, 100, 200_000, 300))  # 10 mJ, 200 Hz
        await link.request(Arm(3000))
        link.start_heartbeats(3000)
        runner.board.footswitch(True, runner.now_us())
        runner.wake()
        await until(lambda: "reply STOP" in log)
        await asyncio.sleep(0.05)  # ten more periods: any PULSE after the ACK would show
        status = await link.request(GetStatus())
        stats = link.stats
    assert isinstance(status, StatusReply)
    assert status.state == DeviceState.STANDBY
    assert "pulse" not in log[log.index("reply STOP") :]
    assert [p.pulse_no for p in pulses] == list(range(1, len(pulses) + 1))
    assert stats["lost_events"] == 0
    assert stats["dropped"] == 0


async def test_dropped_frames_are_recovered_by_retransmission() -> None:
    async with board_link(status_period_ms=0, reply_timeout=0.02) as (link, runner, _):
        runner.board.inject("drop-frames", 0.1, runner.now_us())
        answered = 0
        for _ in range(40):
            try:
                reply = await link.request(GetStatus())
            except LinkLost:
                await until(link.connected.is_set)
                continue
            assert isinstance(reply, StatusReply)
            answered += 1
        stats = link.stats
    assert answered >= 35
    assert stats["retries"] >= 1


async def test_board_reboot_leads_to_hello_again() -> None:
    events: list[Message] = []
    async with board_link(on_event=lambda _s, m: events.append(m)) as (link, runner, memory):
        runner.board.reboot(runner.now_us(), BootReason.BROWN_OUT)
        runner.wake()
        await until(lambda: any(type(m) is Boot for m in events))
        await until(link.connected.is_set)
        reply = await link.request(GetStatus())
        assert memory.connections == 1
    assert Boot(BootReason.BROWN_OUT) in events
    assert isinstance(reply, StatusReply)


async def test_hung_board_loses_the_link_and_the_watchdog_reboot_brings_it_back() -> None:
    lost: list[str] = []
    async with board_link(status_period_ms=20, on_link_lost=lost.append) as (link, runner, _):
        runner.board.inject("hang", None, runner.now_us())
        await until(lambda: bool(lost))
        assert not link.connected.is_set()
        await until(lambda: link.stats["timeouts"] >= 1)  # HELLO unanswered while hung
        runner.board.clear_faults(runner.now_us())  # watchdog reboot: BOOT reason 1
        runner.wake()
        await until(link.connected.is_set)
        reply = await link.request(GetStatus())
    assert lost[0] == "no STATUS for 3 periods (60 ms)"
    assert isinstance(reply, StatusReply)
