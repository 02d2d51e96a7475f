"""What a real board keeps in non-volatile memory across power cycles, for a simulated one.

An in-process simulator (``devicectl run --port sim``) restarts with its host. So that it still
behaves as one board — the same serial number (its MQTT topics and session log entries stay its
own, and two simulated devices never share one), and a lifetime pulse counter that survives
(docs/protocol.md: pulse_no is kept across boots) — its serial and counter live in a small
JSON file, written atomically. Saved by the host every second and at exit: a host killed with
-9 may lose the last second of counts, which the next start's reconciliation then reports as a
counter behind the log rather than hiding.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from simulator.board import Board

__all__ = ["BoardMemory"]

_U32_MAX = 0xFFFF_FFFF


@dataclass
class BoardMemory:
    path: Path
    serial: int
    pulse_count: int

    @classmethod
    def load(cls, path: Path, rng: random.Random | None = None) -> BoardMemory:
        """The board remembered at ``path``, or a new one with a random serial (not saved yet).
        A file that cannot be read as one is replaced, not trusted."""
        try:
            data = json.loads(path.read_text())
            serial, count = int(data["serial"]), int(data["pulse_count"])
            if 0 <= serial <= _U32_MAX and 0 <= count <= _U32_MAX:
                return cls(path, serial, count)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        serial = (rng or random.SystemRandom()).randrange(1, 1_000_000)
        return cls(path, serial, 0)

    def save(self, board: Board) -> None:
        """Remember ``board``'s serial and lifetime pulse counter (atomically: write, rename)."""
        self.serial, self.pulse_count = board.ident.serial, board.pulse_count
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"serial": self.serial, "pulse_count": self.pulse_count}))
        os.replace(temporary, self.path)
