"""Drives a :class:`~simulator.board.Board` in real time inside an asyncio loop.

The board is sans-I/O; this is its clock and its cable. One named task sleeps until the board's next
deadline (or until woken), advances the board to the present and writes everything the board has
produced in one call to the attached writer. Host bytes go in with :meth:`BoardRunner.feed` and are
answered at once. A burst of pulses that came due during one sleep leaves in one write, so the
runner keeps up with a 5 kHz board without sleeping per pulse.

    async with BoardRunner(Board()) as runner:
        runner.attach(transport.write)
        ...                      # protocol.data_received -> runner.feed(data)
        runner.board.footswitch(True, runner.now_us()); runner.wake()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import structlog
from structlog.typing import FilteringBoundLogger

from simulator.board import Board

__all__ = ["BoardRunner", "monotonic_us"]


def monotonic_us() -> int:
    """The monotonic clock in µs: the runner's default clock."""
    return time.monotonic_ns() // 1000


class BoardRunner:
    """Runs ``board`` in real time. An async context manager owning one named task."""

    def __init__(
        self,
        board: Board,
        *,
        clock: Callable[[], int] = monotonic_us,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.board = board
        self._clock = clock
        self._log: FilteringBoundLogger = log or structlog.get_logger("simulator.runner")
        self._write: Callable[[bytes], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self.bytes_written = 0
        self.bytes_lost = 0  # written by the board while no writer was attached

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._run(), name="simulator-board-clock")
        self._log.info("board_runner_started", serial=f"{self.board.ident.serial:08X}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None
        assert self._task is not None
        self._task.cancel()
        try:
            await self._group.__aexit__(exc_type, exc, tb)
        finally:
            self._group = None
            self._task = None
            self._log.info(
                "board_runner_stopped", bytes_written=self.bytes_written, bytes_lost=self.bytes_lost
            )

    def attach(self, write: Callable[[bytes], None] | None) -> None:
        """Send the board's bytes to ``write`` from now on; None unplugs the cable (bytes the
        board writes meanwhile are lost)."""
        self._write = write

    def now_us(self) -> int:
        return self._clock()

    def feed(self, data: bytes) -> None:
        """Bytes from the host: processed at once, replies written before returning."""
        now = self._clock()
        self.board.receive_data(data, now)
        self._flush(now)
        self.wake()

    def wake(self) -> None:
        """Re-plan the next wake-up: call after anything that changed the board from outside."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self, now: int) -> None:
        data = self.board.data_to_send(now)
        if not data:
            return
        write = self._write
        if write is None:
            self.bytes_lost += len(data)
            return
        try:
            write(data)
        except OSError as exc:
            # The host end went away: behave like an unplugged cable until re-attached.
            self._log.warning("board_write_failed", error=str(exc))
            self._write = None
            self.bytes_lost += len(data)
            return
        self.bytes_written += len(data)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        board = self.board
        while True:
            now = self._clock()
            board.advance(now)
            self._flush(now)
            deadline = board.next_deadline_us()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            handle = None
            if deadline is not None:
                delay_s = max(0, deadline - self._clock()) / 1e6
                handle = loop.call_later(delay_s, _resolve, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if handle is not None:
                    handle.cancel()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
