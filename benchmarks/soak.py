"""Soak: one long session at 2,000 pulses/s with a random fault every few seconds.

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--fault-every 4] [--seed 1]

The same real processes as the fault campaign (``benchmarks/faults.py``): the simulator as a
process over a pty with ``--max-rate 2500``, ``devicectl run`` with ``benchmarks/soak-policy.toml``
(500 µJ at 2 kHz on a 1 mm spot is 1 W and 0.06 J/cm²; zone and session budgets sized for hours),
a real mosquitto and a persistent subscriber. Every ``--fault-every`` seconds (jittered) one fault
from :data:`FAULTS` is injected for about a second, then cleared; when a fault made the supervisor
stop the laser, the soak acknowledges and re-arms, as an operator would.

Prints the daemon's RSS at start (after warm-up) and at the end, and the books: every pulse the
board fired must be in the log or counted unlogged, every QoS 1 message delivered. Exit 1 if not,
or if the RSS grew by more than :data:`RSS_GROWTH_LIMIT_KIB`.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.faults import Campaign, Row  # noqa: E402
from tests.daemon.conftest import ACK  # noqa: E402

__all__ = ["FAULTS", "SoakResult", "run_soak"]

POLICY = Path(__file__).with_name("soak-policy.toml")
RATE_HZ = 2000.0
ENERGY_UJ = 500
WIDTH_US = 100
SPOT_UM = 1000
WARM_UP_S = 5.0
# The session log's and outbox's SQLite page caches and the allocator's arenas settle within a few
# MiB; a leak of a few hundred bytes per pulse at 2 kHz would pass this in well under a minute.
RSS_GROWTH_LIMIT_KIB = 16 * 1024
FAULTS = (
    "fault line-noise 1e-4",
    "fault drop-frames 0.01",
    "fault slow-replies 30",
    "broker restart",
)


@dataclass(slots=True)
class SoakResult:
    seconds: float
    row: Row
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    faults: list[str] = field(default_factory=list)
    rearmed: int = 0

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_end_kib - self.rss_start_kib

    @property
    def ok(self) -> bool:
        return self.row.ok and self.rss_growth_kib <= RSS_GROWTH_LIMIT_KIB

    def report(self) -> str:
        row = self.row
        return "\n".join(
            [
                f"soak {self.seconds:g} s at {RATE_HZ:g} pulses/s, {len(self.faults)} faults, "
                f"re-armed {self.rearmed}x",
                f"  daemon RSS      start {self.rss_start_kib / 1024:.1f} MiB, end "
                f"{self.rss_end_kib / 1024:.1f} MiB (growth {self.rss_growth_kib / 1024:+.1f} MiB,"
                f" limit {RSS_GROWTH_LIMIT_KIB / 1024:.0f})",
                f"  pulses          board {row.board_pulses}, logged {row.logged} + unlogged "
                f"{row.unlogged} (unaccounted {row.unaccounted}, double {row.double_counted})",
                f"  QoS 1 messages  expected {row.tele_expected}, delivered {row.tele_delivered},"
                f" pending {row.tele_pending}",
                f"  unsafe pulses   {row.unsafe}",
                f"  log verify      {'ok' if row.chain_ok else 'BROKEN'}",
                f"  notes           {'; '.join(row.notes) or '-'}",
                f"  error           {row.error or '-'}",
                f"  verdict         {'ok' if self.ok else 'FAIL'}",
            ]
        )


def _keep_emitting(rig: Campaign) -> bool:
    """Re-arm after a stop the supervisor made; True when it had to."""
    if rig.sim_status()["emitting"]:
        return False
    rig.sim_cmd("footswitch up")
    status = rig.status()
    if not status["connected"]:
        return False
    if status["breach_latched"]:
        rig.call("fault_ack", **ACK)
    with contextlib.suppress(RuntimeError):
        rig.call("arm")
        rig.sim_cmd("footswitch down")
        return True
    return False


def run_soak(
    directory: Path, seconds: float, *, fault_every_s: float = 4.0, seed: int = 1
) -> SoakResult:
    """Run the soak in ``directory``; never raises (an error lands in the result's row)."""
    rng = random.Random(seed)
    result = SoakResult(seconds, Row("soak"))
    rig = Campaign(
        directory,
        seed=seed,
        policy=POLICY.read_text(),
        max_rate_hz=RATE_HZ * 1.25,
        watch_period_s=0.05,
    )
    try:
        rig.broker.start()
        rig.start_recorder()
        rig.start_sim()
        rig.start_daemon()
        rig.open_session(ENERGY_UJ, WIDTH_US, RATE_HZ, SPOT_UM)
        rig.emit(0.0)
        time.sleep(min(WARM_UP_S, seconds / 4))
        result.rss_start_kib = rig.daemon_rss_kib()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(max(0.5, rng.uniform(0.5, 1.5) * fault_every_s - 1.0))
            fault = rng.choice(FAULTS)
            result.faults.append(fault)
            if fault == "broker restart":
                rig.broker.stop()
                time.sleep(1.0)
                rig.broker.start()
            else:
                rig.sim_cmd(fault)
                time.sleep(1.0)
                rig.sim_cmd("clear-faults")
            time.sleep(0.2)
            with contextlib.suppress(RuntimeError, OSError):
                result.rearmed += _keep_emitting(rig)
        result.rss_end_kib = rig.daemon_rss_kib()
        rig.wind_down(result.row.notes)
        code = rig.stop_daemon()
        if code != 0:
            result.row.notes.append(f"daemon exit {code}")
        rig.drain(result.row, reconcile=False)
        rig.pulse_books(result.row)
    except Exception as exc:
        result.row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        rig.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--fault-every", type=float, default=4.0, metavar="S")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the run's files in this directory")
    args = parser.parse_args()
    if args.seconds <= 0 or args.fault_every <= 0:
        parser.error("--seconds and --fault-every must be positive")
    if args.keep is not None:
        result = run_soak(args.keep, args.seconds, fault_every_s=args.fault_every, seed=args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="devicectl-soak-") as tmp:
            result = run_soak(
                Path(tmp), args.seconds, fault_every_s=args.fault_every, seed=args.seed
            )
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
