"""Cost of one safety verdict: SafetySupervisor.on_pulse / on_status, every rule active; and of
the treatment core's per-PULSE step (TreatmentCore.on_pulse: the verdict, the ledger, the flags).

Run: ``.venv/bin/python benchmarks/verdict.py [--calls N]``. Prints a table: median and p99 of the
per-call time (ns), measured over batches of 1,000 calls (a per-call timer would cost more than
the call), and the net memory blocks left allocated after 100,000 calls (sys.getallocatedblocks
and tracemalloc). Target (issue 3): median <= 2 µs; a plain function over floats measured ~0.32 µs.

The stream is a clean 500 Hz train (the simulator's top rate): armed, energies within tolerance,
exactly one period apart, the 1 s window holding ~500 pulses, the zone and session limits active,
one missing pulse_no every 1,000 pulses (charged, under the limits; the clock advances a period
for it, as the device fired it), t_us wrapping mid-run. The core runs the same stream, armed
through its own requests and replies (50,000 pulses: the packaged policy's zone budget).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc

from devicectl.core import PULSE_STOP, ArmLaser, ChangeZone, SetParams, StartSession, TreatmentCore
from devicectl.policy import PulseParams, SkinType, Zone, load_policy
from devicectl.safety import Limits, SafetySupervisor, SessionLimits
from protocols.messages import DeviceState, Ident, MessageType, StatusReport

BATCH = 1_000
U32 = 2**32
PARAMS = PulseParams(energy_uj=1_000, width_us=100, rate_mhz=500_000, spot_um=300)  # 0.5 W
PERIOD_US = 2_000


def supervisor() -> SafetySupervisor:
    session = SessionLimits(
        device_max_energy_uj=60_000,
        device_max_rate_mhz=500_000,
        max_average_power_w=3.0,
        session_energy_j=1e9,
        energy_tolerance_pct=20,
        min_interval_pct=90,
        skin_temp_max_c=41.0,
        head_temp_max_c=43.0,
        lease_nearly_out_ms=80,
    )
    limits = Limits(
        session=session,
        skin_type=SkinType.III,
        zone=Zone.CHEEKS,
        params=PARAMS,
        zone_energy_j=1e9,
        max_fluence_j_cm2=30.0,
        fluence_rule="max_fluence_skin_type_III",
        max_energy_uj=21_000,
        max_rate_mhz=500_000,
        min_width_us=100,
        max_width_us=20_000,
        spots_um=(120, 300, 1000, 3000),
    )
    sup = SafetySupervisor(session)
    sup.set_zone(Zone.CHEEKS, limits)
    sup.arm()
    return sup


def core() -> TreatmentCore:
    """A treatment core armed on PARAMS in the cheeks, through requests and ACKs."""
    ident = Ident(1, (1, 0, 0), 4242, 1550, 60_000, 100, 20_000, 500_000, (120, 300, 1000, 3000))
    treatment = TreatmentCore(load_policy(), lease_ms=1500)
    treatment.on_connected(ident, StatusReport(DeviceState.STANDBY, 0, 0, 0, 2500, 3000, 0), 0)
    now = 0
    start = StartSession("OP-1", "PT-0001", SkinType.III, active_ingredient="hyaluronic acid")
    treatment.begin(start, now)
    treatment.session_opened(1, now)
    treatment.begin(ChangeZone("OP-1", Zone.CHEEKS), now)
    p = PARAMS
    for request, command in (
        (SetParams("OP-1", p.energy_uj, p.width_us, p.rate_mhz, p.spot_um), MessageType.SET_PARAMS),
        (ArmLaser("OP-1"), MessageType.ARM),
    ):
        treatment.begin(request, now)
        treatment.on_reply(command, True)
        treatment.settled(command, None, now)
    assert treatment.armed
    return treatment


def stream(count: int, start_no: int = 1) -> list[tuple[int, int, int]]:
    """Pulses prepared up front, so that the timed loop builds nothing."""
    t0 = U32 - count * PERIOD_US // 2  # wrap half-way
    events = []
    pulse_no = start_no
    t_us = t0
    for i in range(count):
        lost = i % 1_000 == 999
        pulse_no += 2 if lost else 1
        t_us += 2 * PERIOD_US if lost else PERIOD_US
        events.append((pulse_no, t_us % U32, 950 + (i * 37) % 100))
    return events


def time_batches(sup: SafetySupervisor, events: list[tuple[int, int, int]]) -> list[float]:
    on_pulse = sup.on_pulse
    per_call: list[float] = []
    clock = time.perf_counter_ns
    for start in range(0, len(events) - BATCH + 1, BATCH):
        batch = events[start : start + BATCH]
        begin = clock()
        for pulse_no, t_us, energy in batch:
            if on_pulse(pulse_no, t_us, energy):
                raise SystemExit(f"unexpected breach: {sup.last_breach}")
        per_call.append((clock() - begin) / BATCH)
    return per_call


def time_core(treatment: TreatmentCore, events: list[tuple[int, int, int]]) -> list[float]:
    on_pulse = treatment.on_pulse
    take = treatment.take_effects
    per_call: list[float] = []
    clock = time.perf_counter_ns
    for start in range(0, len(events) - BATCH + 1, BATCH):
        batch = events[start : start + BATCH]
        begin = clock()
        for pulse_no, t_us, energy in batch:
            if on_pulse(pulse_no, t_us, energy) & PULSE_STOP:
                raise SystemExit(f"unexpected breach: {treatment.latched}")
        per_call.append((clock() - begin) / BATCH)
        take()  # the gap records of the batch (one in 1,000 pulses)
    return per_call


def time_loop_only(events: list[tuple[int, int, int]]) -> list[float]:
    def nothing(pulse_no: int, t_us: int, energy: int) -> int:
        return 0

    per_call: list[float] = []
    clock = time.perf_counter_ns
    for start in range(0, len(events) - BATCH + 1, BATCH):
        batch = events[start : start + BATCH]
        begin = clock()
        for pulse_no, t_us, energy in batch:
            if nothing(pulse_no, t_us, energy):
                raise SystemExit("unreachable")
        per_call.append((clock() - begin) / BATCH)
    return per_call


def time_status(sup: SafetySupervisor, calls: int) -> list[float]:
    on_status = sup.on_status
    per_call: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(calls // BATCH):
        begin = clock()
        for _ in range(BATCH):
            on_status(3, 0, 3000, 3300, 200)
        per_call.append((clock() - begin) / BATCH)
    return per_call


def allocations(calls: int) -> tuple[int, int, int]:
    """Net blocks over ``calls`` calls, and tracemalloc's bytes grown in safety.py over the first
    and over the second half of another ``calls`` (live state ints are replaced, never piled up:
    a leak would grow in both halves)."""
    sup = supervisor()
    events = stream(3 * calls + 10_000)
    on_pulse = sup.on_pulse
    for pulse_no, t_us, energy in events[:10_000]:  # warm up: window full, free lists primed
        on_pulse(pulse_no, t_us, energy)
    first, second, third = (events[10_000 + i * calls : 10_000 + (i + 1) * calls] for i in range(3))
    gc.collect()
    gc.disable()
    try:
        before = sys.getallocatedblocks()
        for pulse_no, t_us, energy in first:
            on_pulse(pulse_no, t_us, energy)
        blocks = sys.getallocatedblocks() - before
        tracemalloc.start()
        snapshots = [tracemalloc.take_snapshot()]
        for half in (second, third):
            for pulse_no, t_us, energy in half:
                on_pulse(pulse_no, t_us, energy)
            snapshots.append(tracemalloc.take_snapshot())
        tracemalloc.stop()
    finally:
        gc.enable()

    def grown(old: tracemalloc.Snapshot, new: tracemalloc.Snapshot) -> int:
        diffs = new.compare_to(old, "filename")
        return sum(d.size_diff for d in diffs if d.traceback[0].filename.endswith("safety.py"))

    return blocks, grown(snapshots[0], snapshots[1]), grown(snapshots[1], snapshots[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    calls = parser.parse_args().calls

    sup = supervisor()
    events = stream(calls)
    time_batches(supervisor(), stream(20_000))  # warm-up
    pulse = time_batches(sup, events)
    loop = time_loop_only(events)
    status = time_status(sup, calls)
    core_pulse = time_core(core(), stream(min(calls, 50_000)))
    blocks, grown_first, grown_second = allocations(100_000)

    def row(name: str, samples: list[float]) -> str:
        q = statistics.quantiles(samples, n=100)
        return f"| {name:<38} | {statistics.median(samples):>8.0f} | {q[98]:>8.0f} |"

    print(f"Python {sys.version.split()[0]}, {calls} calls, batches of {BATCH}")
    print()
    print(f"| {'call':<38} | {'median ns':>8} | {'p99 ns':>8} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 10}:|")
    print(row("on_pulse, every rule active", pulse))
    print(row("  loop + call of an empty function", loop))
    print(row("on_status, armed, every rule active", status))
    print(row("TreatmentCore.on_pulse (verdict + ledger)", core_pulse))
    print()
    print("| allocations over 100,000 on_pulse calls | net |")
    print("|---|---:|")
    print(f"| sys.getallocatedblocks() delta (blocks) | {blocks} |")
    # A few dozen bytes are the state's own ints (a counter passing 256 leaves the small-int
    # cache); a per-call allocation kept would show as >= 3,200,000 bytes per 100,000 calls.
    print(f"| tracemalloc: bytes grown in safety.py, next 100,000 calls | {grown_first} |")
    print(f"| tracemalloc: bytes grown in safety.py, the 100,000 after | {grown_second} |")
    print(f"| bytes kept per call | {max(grown_first, grown_second) / 100_000:.4f} |")


if __name__ == "__main__":
    main()
