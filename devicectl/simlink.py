"""Composition: a daemon with its device — the serial port, or the in-process simulator.

``port = "sim"`` is for engineers and the demo: a simulated board served in the daemon's own
event loop over an in-memory link, with its control socket beside the daemon's so that
``devicectl sim-control`` can drive it. The daemon itself (:mod:`devicectl.daemon`) never imports
the simulator (an import-linter contract says so); this module is where the two meet.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from devicectl.config import Settings
from devicectl.daemon import Daemon, DeviceSource, SerialDevice
from drivers import MemoryLink, MemoryTransport, TransportFactory
from simulator import Board, BoardRunner
from simulator.control import ControlServer as SimControlServer
from simulator.nvram import BoardMemory

__all__ = ["SimulatedDevice", "compose", "device_for"]


class SimulatedDevice:
    """The in-process simulator as a daemon's device. :attr:`runner` is its BoardRunner."""

    def __init__(self) -> None:
        self.runner: BoardRunner | None = None
        self.control_path: Path | None = None
        self._memory: BoardMemory | None = None

    async def open(
        self, stack: contextlib.AsyncExitStack, settings: Settings, log: FilteringBoundLogger
    ) -> tuple[TransportFactory, str]:
        log.warning("device_simulated", detail="port = sim: no laser is controlled")
        data_dir = Path(settings.data_dir)
        memory = BoardMemory.load(data_dir / "simulator-board.json")
        board = Board(
            serial=memory.serial,
            pulse_count=memory.pulse_count,
            max_rate_mhz=round(settings.sim_max_rate_hz * 1000),
        )
        runner = await stack.enter_async_context(BoardRunner(board, log=log))
        self.runner, self._memory = runner, memory
        memory.save(board)
        stack.callback(memory.save, board)  # at exit, after the laser was made safe

        def accept(device: MemoryTransport) -> None:
            device.attach(on_data=runner.feed, on_lost=lambda _exc: runner.attach(None))
            runner.attach(device.write)

        control = Path(settings.control)
        self.control_path = control.with_name(control.stem + "-sim.sock")
        await stack.enter_async_context(SimControlServer(runner, self.control_path, log=log))
        return MemoryLink(accept, name="sim").connect, "sim"

    def tick(self) -> None:
        """Once a second: keep the board's lifetime counter on disk (as its NVRAM would)."""
        if self._memory is not None and self.runner is not None:
            self._memory.save(self.runner.board)


def device_for(settings: Settings) -> DeviceSource:
    """The simulator for ``port = "sim"``, the serial port (or pty) otherwise."""
    return SimulatedDevice() if settings.port == "sim" else SerialDevice()


def compose(settings: Settings, **kwargs: Any) -> Daemon:
    """``async with compose(settings) as daemon``: the daemon wired to its device."""
    return Daemon(settings, device=device_for(settings), **kwargs)
