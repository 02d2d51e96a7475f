"""The in-process simulator's non-volatile memory: one board across host restarts."""

from __future__ import annotations

import random
from pathlib import Path

from simulator import Board
from simulator.nvram import BoardMemory


def test_a_new_board_gets_a_serial_of_its_own_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "board.json"
    first = BoardMemory.load(path, random.Random(1))
    other = BoardMemory.load(tmp_path / "other.json", random.Random(2))
    assert first.serial != other.serial and first.pulse_count == 0
    board = Board(serial=first.serial, pulse_count=1234)
    first.save(board)
    again = BoardMemory.load(path)
    assert (again.serial, again.pulse_count) == (first.serial, 1234)
    assert not path.with_suffix(".tmp").exists()


def test_an_unreadable_memory_is_replaced_not_trusted(tmp_path: Path) -> None:
    for text in ("", "{", '{"serial": -1, "pulse_count": 0}', '{"serial": 7}', "[1, 2]"):
        path = tmp_path / "board.json"
        path.write_text(text)
        memory = BoardMemory.load(path, random.Random(3))
        assert 1 <= memory.serial < 1_000_000 and memory.pulse_count == 0, text
