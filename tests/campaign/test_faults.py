"""CI's short run of every row of the fault campaign (``benchmarks/faults.py``).

Each row runs the real processes (simulator over a pty or TCP, ``devicectl run``, mosquitto, a
persistent subscriber), injects its fault and closes the books. A row fails on any pulse the board
fired that the log neither holds nor counts as unlogged, on any QoS 1 message not delivered, and on
any pulse fired outside the rules. The rows are independent (own directory, broker, simulator and
daemon), so two run at a time: they mostly wait on subprocesses, and the suite has 2 cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.faults import ROWS, Row, Timing, format_table, run_row
from tests.conftest import require_tool

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Row]:
    require_tool("mosquitto")
    base = tmp_path_factory.mktemp("campaign")
    names = list(ROWS)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="campaign-row") as pool:
        rows = list(
            pool.map(
                lambda item: run_row(item[1], base / f"row{item[0]:02d}", Timing.short()),
                enumerate(names),
            )
        )
    print("\n" + format_table(rows))
    return {row.name: row for row in rows}


@pytest.mark.parametrize("name", list(ROWS))
def test_row_loses_nothing_and_fires_nothing_unsafe(campaign: dict[str, Row], name: str) -> None:
    row = campaign[name]
    assert row.error is None, row.line()
    assert row.board_pulses > 0, row.line()
    assert row.logged + row.unlogged == row.board_pulses, row.line()
    assert row.unaccounted == 0, row.line()
    assert row.double_counted == 0, row.line()
    assert row.tele_expected > 0, row.line()
    assert row.tele_delivered == row.tele_expected, row.line()
    assert row.tele_pending == 0, row.line()
    assert row.unsafe == 0, row.line()
    assert row.chain_ok, row.line()  # the log still verifies after the fault


def test_faults_that_must_stop_the_laser_stopped_it(campaign: dict[str, Row]) -> None:
    """The faults that take the host or the device away end emission: the board's lease (1.5 s in
    the test policy) bounds the time when the host is gone; the rest stop at once."""
    for name in ("device hang", "device reboot", "port vanishes", "daemon SIGKILL",
                 "daemon SIGTERM", "disk full (log)", "combined + SIGKILL"):  # fmt: skip
        row = campaign[name]
        assert row.safe_s is not None, row.line()
        assert row.safe_s < 1.5 + 0.5, row.line()
