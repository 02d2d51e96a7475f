"""The simulator's control socket, against a simulator running in-process: round trips for every
kind of command, and malformed requests that are answered without disturbing the simulator."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols.errors import DevicectlError
from simulator.board import Board
from simulator.control import (
    MAX_REQUEST_BYTES,
    CommandError,
    ControlServer,
    SimulatorUnreachable,
    send_command,
)
from simulator.runner import monotonic_us
from simulator.serve import Simulator


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="simctl", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def simulator(short_dir: Path) -> AsyncIterator[Simulator]:
    board = Board(serial=77, now_us=monotonic_us())
    async with Simulator(board, control_path=short_dir / "sim.sock") as running:
        yield running


async def _status(sim: Simulator) -> dict[str, Any]:
    result = await send_command(sim.control_path, "status")
    assert isinstance(result, dict)
    return result


async def test_socket_is_created_0660_and_removed_on_exit(short_dir: Path) -> None:
    path = short_dir / "sim.sock"
    async with Simulator(Board(now_us=monotonic_us()), control_path=path):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
    assert not path.exists()


async def test_inputs_round_trip(simulator: Simulator) -> None:
    status = await _status(simulator)
    assert status["state"] == "STANDBY"
    assert status["serial"] == 77
    assert status["footswitch"] is False
    assert status["interlocks"] == []

    assert await send_command(simulator.control_path, ["footswitch", "down"]) == "footswitch down"
    assert await send_command(simulator.control_path, "interlock door open") == (
        "interlock door open"
    )
    assert await send_command(simulator.control_path, "interlock cooling open")
    status = await _status(simulator)
    assert status["footswitch"] is True
    assert status["interlocks"] == ["door", "cooling"]

    await send_command(simulator.control_path, "interlock door close")
    await send_command(simulator.control_path, "footswitch up")
    status = await _status(simulator)
    assert status["footswitch"] is False
    assert status["interlocks"] == ["cooling"]
    assert status["transport"]["bytes_out"] > 0


async def test_faults_are_injected_and_cleared(simulator: Simulator) -> None:
    path = simulator.control_path
    for words in (
        "fault energy-drift 1.3",
        "fault stuck-shutter",
        "fault overheat",
        "fault line-noise 0.001",
        "fault drop-frames 0.25",
        "fault slow-replies 40",
    ):
        assert await send_command(path, words) == words
    injected = (await _status(simulator))["injected"]
    assert injected == {
        "energy-drift": 1.3,
        "stuck-shutter": None,
        "overheat": None,
        "line-noise": 0.001,
        "drop-frames": 0.25,
        "slow-replies": 40.0,
    }
    assert await send_command(path, "clear-faults") == "clear-faults"
    assert (await _status(simulator))["injected"] == {}

    await send_command(path, "fault hang")
    assert "hang" in (await _status(simulator))["injected"]
    await send_command(path, "clear-faults")
    assert (await _status(simulator))["injected"] == {}


async def test_reboot_keeps_the_physical_inputs(simulator: Simulator) -> None:
    await send_command(simulator.control_path, "interlock key open")
    assert await send_command(simulator.control_path, "reboot") == "reboot"
    status = await _status(simulator)
    assert status["state"] == "STANDBY"
    assert status["interlocks"] == ["key"]


async def _exchange(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw request lines on one connection; the replies, one per line sent."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REQUEST_BYTES * 4)
    try:
        replies = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            async with asyncio.timeout(5):
                replies.append(json.loads(await reader.readline()))
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (b"footswitch down\n", "request is not JSON"),
        (b"\xff\xfe\n", "request is not JSON"),
        (b'["footswitch", "down"]\n', "request must be a JSON object"),
        (b"{}\n", "invalid request: command: Field required"),
        (b'{"command": []}\n', "invalid request: command"),
        (b'{"command": 7}\n', "invalid request: command"),
        (b'{"command": "status", "force": true}\n', "invalid request: force: Extra inputs"),
        (b'{"command": "footswitch sideways"}\n', "unknown footswitch position 'sideways'"),
        (b'{"command": ["fault", "drop-frames", "2"]}\n', "P 2 is out of range 0..1"),
        (b'{"command": ["selfdestruct"]}\n', "unknown command 'selfdestruct'"),
    ],
)
async def test_malformed_requests_are_answered_and_change_nothing(
    simulator: Simulator, line: bytes, named: str
) -> None:
    before = await _status(simulator)
    bad, good = await _exchange(simulator.control_path, line, b'{"command": "status"}\n')
    assert bad["ok"] is False
    assert bad["kind"] == "usage"
    assert named in bad["error"]
    assert "\n" not in bad["error"]
    # The same connection still serves, and the board is as it was.
    assert good["ok"] is True
    after = good["result"]
    for key in ("state", "footswitch", "interlocks", "injected", "faults", "params"):
        assert after[key] == before[key]


async def test_an_overlong_request_is_refused_and_the_server_lives_on(
    simulator: Simulator,
) -> None:
    (reply,) = await _exchange(simulator.control_path, b"x" * (MAX_REQUEST_BYTES + 10) + b"\n")
    assert reply == {"ok": False, "kind": "usage", "error": "request too long"}
    assert (await _status(simulator))["state"] == "STANDBY"


async def test_the_client_validates_words_before_connecting(short_dir: Path) -> None:
    with pytest.raises(CommandError, match="unknown interlock 'window'"):
        await send_command(short_dir / "absent.sock", "interlock window open")


async def test_no_simulator_is_reported_with_the_path(short_dir: Path) -> None:
    path = short_dir / "absent.sock"
    with pytest.raises(SimulatorUnreachable) as caught:
        await send_command(path, "status")
    assert caught.value.path == path
    assert str(path) in str(caught.value)


async def test_a_second_simulator_on_the_same_socket_is_refused(simulator: Simulator) -> None:
    with pytest.raises(DevicectlError, match="another simulator is already listening"):
        async with ControlServer(simulator.runner, simulator.control_path):
            pass
    # The first one still serves.
    assert (await _status(simulator))["state"] == "STANDBY"


async def test_a_stale_socket_file_is_replaced(short_dir: Path) -> None:
    import socket

    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening, then closed: what a killed sim leaves
    assert path.exists()
    async with Simulator(Board(now_us=monotonic_us()), control_path=path) as sim:
        assert (await _status(sim))["state"] == "STANDBY"
