"""CI's 60 s of the soak (``benchmarks/soak.py``): 2,000 pulses/s through the real processes with a
random fault every few seconds; nothing lost, nothing unsafe, the daemon's memory flat."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import RSS_GROWTH_LIMIT_KIB, run_soak
from tests.conftest import require_tool

pytestmark = pytest.mark.system

SOAK_S = 60.0


def test_soak_60_s_at_2000_pulses_per_s(tmp_path: Path) -> None:
    require_tool("mosquitto")
    result = run_soak(tmp_path, SOAK_S, fault_every_s=4.0, seed=7)
    report = result.report()
    print("\n" + report)
    row = result.row
    assert row.error is None, report
    assert len(result.faults) >= SOAK_S / 8, report
    # At least half the nominal pulses: the soak really ran at load (faults and re-arms cost some).
    assert row.board_pulses >= 2000 * SOAK_S / 2, report
    assert row.logged + row.unlogged == row.board_pulses, report
    assert row.unaccounted == 0 and row.double_counted == 0, report
    assert row.tele_expected == row.tele_delivered and row.tele_pending == 0, report
    assert row.unsafe == 0, report
    assert row.chain_ok, report
    assert result.rss_start_kib > 0 and result.rss_growth_kib <= RSS_GROWTH_LIMIT_KIB, report
