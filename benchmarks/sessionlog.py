"""Session log throughput, commit latency and size, through the real writer thread with chaining.

    .venv/bin/python benchmarks/sessionlog.py [--pulses 300000] [--seconds 5] [--rate 5000]

Prints one table:
- sustained insert rate: pulses recorded back to back from the calling thread, until all are
  committed (hashing, SQLite, group commit included), for synchronous=FULL and NORMAL, plus the
  caller's cost per ``record_pulse`` call (what the daemon's loop pays);
- commit latency at ``--rate`` pulses/s (arrival in ``record_pulse`` → the commit holding it),
  p50 / p99 / max, measured with the ``on_commit`` hook;
- ``log verify`` rate, and database size per million pulses (extrapolated from the file);
- with signed checkpoints on at the default interval (every 10,000 records or 2 s): the same
  sustained rate, how many checkpoints were written, and the signing cost of one checkpoint
  (Ed25519 over its canonical text, alone, and the whole checkpoint: encode, sign, chain).
Targets: ≥ 50,000 pulses/s (issue 4); ≥ 100,000 records/s with checkpoints on (issue 12);
p99 < 50 ms at 5,000 pulses/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from devicectl.sessionlog import Checkpoint, DeviceKey, SessionLog, verify_log
from devicectl.sessionlog.checkpoint import make_checkpoint, signed_bytes

_INFO = {
    "device_serial": "BENCH-1",
    "operator": "op-bench",
    "patient_ref": "PT-BENCH",
    "skin_type": "III",
    "course": {"course_id": "C-BENCH", "session_number": 1, "planned_sessions": 4},
    "checklist": {
        "consultation_done": True,
        "consent_given": True,
        "area_cleaned": True,
        "numbing_applied": False,
        "contraindications": dict.fromkeys(
            (
                "recent_sun_exposure_or_tan",
                "photosensitising_medication",
                "active_skin_infection_or_inflammation",
                "pregnancy",
                "allergy_to_active_ingredient",
            ),
            False,
        ),
    },
    "active_ingredient": "hyaluronic acid",
    "ingredient_amount": 2.0,
    "ingredient_unit": "ml",
    "ingredient_lot": "HA-BENCH",
}


class _Quiet:
    """A logger that drops everything, so the benchmark measures the log, not the console."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def _db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def sustained(
    workdir: Path, pulses: int, synchronous: str, *, signed: list[Checkpoint] | None = None
) -> tuple[float, float, int, float]:
    """(pulses/s end to end, µs per record_pulse call, bytes on disk, verify records/s). With
    ``signed``, checkpoints are on at the default interval and collected there."""
    path = workdir / f"sustained-{synchronous}{'-signed' if signed is not None else ''}.db"
    options: dict[str, object] = {}
    if signed is not None:
        options = {"signing_key": DeviceKey.generate(), "device": "BENCH-1",
                   "on_checkpoint": signed.append}  # fmt: skip
    with SessionLog.open(path, log=_Quiet(), synchronous=synchronous, **options) as slog:  # type: ignore[arg-type]
        sid = slog.start_session(_INFO, device_pulse_count=0).session_id
        slog.record_params(
            sid, energy_uj=2000, width_us=1000, rate_mhz=500_000, spot_um=300, actor="b"
        )
        slog.flush()
        record, now = slog.record_pulse, time.time_ns
        start = time.perf_counter()
        for n in range(1, pulses + 1):
            record(sid, n, n * 2000, now(), 2000 + n % 40, "cheeks")
        queued = time.perf_counter()
        slog.flush(timeout=300)
        done = time.perf_counter()
        slog.end_session(sid, actor="b")
    size = _db_bytes(path)
    t0 = time.perf_counter()
    report = verify_log(path)
    verify_s = time.perf_counter() - t0
    assert report.ok, (report.first_break, report.findings)
    assert report.pulses == pulses, report
    return pulses / (done - start), (queued - start) / pulses * 1e6, size, report.records / verify_s


def signing_cost(rounds: int = 2000) -> tuple[float, float]:
    """(µs per Ed25519 signature over a checkpoint's text, µs per whole checkpoint)."""
    key = DeviceKey.generate()
    text = signed_bytes("BENCH-1", 123_456, "ab" * 32, "2026-12-07T12:00:00.000000Z", key.key_id)
    t0 = time.perf_counter()
    for _ in range(rounds):
        key.sign(text)
    sign_us = (time.perf_counter() - t0) / rounds * 1e6
    head = bytes(32)
    t0 = time.perf_counter()
    for n in range(rounds):
        make_checkpoint(key, "BENCH-1", n, head, 1_796_000_000_000_000_000 + n, "periodic")
    return sign_us, (time.perf_counter() - t0) / rounds * 1e6


def latency(workdir: Path, seconds: float, rate: int, synchronous: str) -> list[float]:
    """Arrival → commit delays (ms) of every pulse recorded at ``rate`` pulses/s."""
    path = workdir / f"latency-{synchronous}.db"
    total = int(seconds * rate)
    arrived = [0] * (total + 1)
    committed = [0] * (total + 1)
    done_upto = [0]

    def on_commit(count: int, last_pulse_no: int | None) -> None:
        if last_pulse_no is None:
            return
        t = time.perf_counter_ns()
        for n in range(done_upto[0] + 1, last_pulse_no + 1):
            committed[n] = t
        done_upto[0] = last_pulse_no

    with SessionLog.open(path, log=_Quiet(), synchronous=synchronous, on_commit=on_commit) as slog:
        sid = slog.start_session(_INFO, device_pulse_count=0).session_id
        slog.flush()
        period_ns = 1_000_000_000 // rate
        start = time.perf_counter_ns()
        n = 0
        while n < total:
            due = min(total, (time.perf_counter_ns() - start) // period_ns + 1)
            while n < due:
                n += 1
                arrived[n] = time.perf_counter_ns()
                slog.record_pulse(sid, n, n * 200, time.time_ns(), 2000, "cheeks")
            time.sleep(0.0005)  # the daemon's loop waits for the next frames
        slog.flush(timeout=60)
    return [(committed[i] - arrived[i]) / 1e6 for i in range(1, total + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulses", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=5000)
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for sync in ("FULL", "NORMAL"):
            rate, call_us, size, verify_rate = sustained(work, args.pulses, sync)
            rows.append((f"sustained insert rate ({sync})", f"{rate:,.0f} pulses/s", "≥ 50,000"))
            rows.append((f"record_pulse on the caller ({sync})", f"{call_us:.2f} µs/call", ""))
            if sync == "FULL":
                # bytes per pulse = MB per million pulses
                rows.append(("size per million pulses", f"{size / args.pulses:,.0f} MB", ""))
                rows.append(("log verify", f"{verify_rate:,.0f} records/s", ""))
        signed: list[Checkpoint] = []
        rate, call_us, _size, verify_rate = sustained(work, args.pulses, "FULL", signed=signed)
        rows.append(("sustained, checkpoints on (FULL)", f"{rate:,.0f} records/s", "≥ 100,000"))
        rows.append(("record_pulse, checkpoints on (FULL)", f"{call_us:.2f} µs/call", ""))
        rows.append(("checkpoints written", f"{len(signed):,} ({args.pulses:,} pulses)", ""))
        rows.append(("log verify, checkpoints on", f"{verify_rate:,.0f} records/s", ""))
        sign_us, checkpoint_us = signing_cost()
        rows.append(("Ed25519 signature per checkpoint", f"{sign_us:.0f} µs", ""))
        rows.append(("whole checkpoint (encode, sign)", f"{checkpoint_us:.0f} µs", ""))
        for sync in ("FULL", "NORMAL"):
            delays = sorted(latency(work, args.seconds, args.rate, sync))
            p50 = statistics.median(delays)
            p99 = delays[int(len(delays) * 0.99) - 1]
            rows.append(
                (
                    f"commit latency at {args.rate:,}/s ({sync})",
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {delays[-1]:.1f} ms",
                    "p99 < 50 ms",
                )
            )
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'result':<{value_width}}  target")
    print(f"{'-' * width}  {'-' * value_width}  ------")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {target}")


if __name__ == "__main__":
    main()
