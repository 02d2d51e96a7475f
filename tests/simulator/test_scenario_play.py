"""Playing scenarios: steps in order, none before its time, a refused step does not stop the rest,
and a scenario played by a served simulator drives its board."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.board import Board, BoardInputError
from simulator.control import InjectFault, SimCommand, send_command
from simulator.runner import monotonic_us
from simulator.scenario import parse_scenario, play_scenario
from simulator.serve import Simulator

SCRIPT = """
description = "order matters: the door ends closed, the footswitch released"
[[step]]
at = 0
command = "interlock door open"
[[step]]
at = 0.02
command = "footswitch down"
[[step]]
at = 0.02
command = "fault overheat"
[[step]]
at = 0.04
command = ["footswitch", "up"]
[[step]]
at = 0.06
command = "interlock door close"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="simscn", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_steps_play_in_order_and_never_early() -> None:
    scenario = parse_scenario(SCRIPT)
    loop = asyncio.get_running_loop()
    played: list[tuple[SimCommand, float]] = []
    start = loop.time()

    def record(command: SimCommand) -> None:
        played.append((command, loop.time() - start))

    failed = await play_scenario(scenario, record)
    assert failed == 0
    assert [command for command, _ in played] == [step.command for step in scenario.steps]
    for (_, at), step in zip(played, scenario.steps, strict=True):
        # The loop may fire a timer up to its clock resolution early; a millisecond covers it.
        assert at >= step.at - 0.001


async def test_a_refused_step_is_counted_and_the_rest_still_play() -> None:
    scenario = parse_scenario(SCRIPT)
    played: list[SimCommand] = []

    def refuse_overheat(command: SimCommand) -> None:
        if command == InjectFault("overheat", None):
            raise BoardInputError("the board does not overheat today")
        played.append(command)

    assert await play_scenario(scenario, refuse_overheat) == 1
    assert len(played) == len(scenario.steps) - 1
    assert played[-1] == scenario.steps[-1].command


async def test_a_served_simulator_plays_its_scenario_on_the_board(short_dir: Path) -> None:
    board = Board(now_us=monotonic_us())
    path = short_dir / "sim.sock"
    async with Simulator(board, control_path=path, scenario=parse_scenario(SCRIPT)) as sim:
        assert sim.scenario_done is not None
        assert await asyncio.wait_for(sim.scenario_done, 5) == 0
        status = await send_command(path, "status")
    assert status["interlocks"] == []
    assert status["footswitch"] is False
    assert status["injected"] == {"overheat": None}


async def test_leaving_the_simulator_cancels_an_unfinished_scenario(short_dir: Path) -> None:
    late = parse_scenario('[[step]]\nat = 3600\ncommand = "reboot"\n')
    async with Simulator(
        Board(now_us=monotonic_us()), control_path=short_dir / "sim.sock", scenario=late
    ) as sim:
        done = sim.scenario_done
        assert done is not None
        assert not done.done()
    assert done.cancelled()
