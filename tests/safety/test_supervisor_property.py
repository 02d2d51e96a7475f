"""The supervisor against a deliberately simple reference model of docs/safety-model.md.

The reference keeps every pulse in a list, uses the unwrapped device time, recomputes every sum
from scratch and compares with exact integer arithmetic; it shares no code with the supervisor.
For any stream of events and any limits, the supervisor must give the reference's verdict at every
event (the same rule, or OK), refuse arming exactly when the reference does, and agree on the
latched breach and the energy totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import event as record_event
from hypothesis import strategies as st

from devicectl.errors import SafetyRefusal
from devicectl.policy import PulseParams, Zone
from devicectl.safety import BreachCode, SafetySupervisor, SessionLimits
from tests.safety.helpers import limits, session

U32 = 2**32


@dataclass
class Reference:
    s: SessionLimits
    armed: bool = False
    configured: bool = False
    params: PulseParams | None = None
    zone: Zone | None = None
    zone_limit_j: dict[Zone, float] = field(default_factory=dict)
    energy: dict[Zone | None, int] = field(default_factory=dict)  # delivered + gap charges
    since_boot: list[tuple[int, int]] = field(default_factory=list)  # (unwrapped t, energy)
    previous_t: int | None = None  # the previous pulse of the current train
    last_pulse_no: int | None = None
    latched: BreachCode | None = None

    def verdict(self, code: BreachCode | None) -> int:
        if code is not None and self.latched is None:
            self.latched = code
        return 0 if code is None else int(code)

    def pulse(self, pulse_no: int, t: int, e: int) -> int:
        missing = 0
        if self.last_pulse_no is not None and pulse_no > self.last_pulse_no + 1:
            missing = pulse_no - self.last_pulse_no - 1
        self.last_pulse_no = pulse_no
        zone_before = self.energy.get(self.zone, 0)
        session_before = sum(self.energy.values())
        self.energy[self.zone] = zone_before + e + missing * self.s.device_max_energy_uj
        # Missing pulses count in the window at the device's maximum, at the time they are seen.
        self.since_boot.append((t, e + missing * self.s.device_max_energy_uj))
        previous, self.previous_t = self.previous_t, t
        window = sum(ej for tj, ej in self.since_boot if t - tj < 1_000_000)
        zone_limit = self.zone_limit_j[self.zone] * 1e6 if self.zone is not None else None

        if not self.armed:
            return self.verdict(BreachCode.UNCOMMANDED_EMISSION)
        assert self.params is not None
        setpoint = self.params.energy_uj
        if 100 * abs(e - setpoint) > self.s.energy_tolerance_pct * setpoint:
            return self.verdict(BreachCode.ENERGY_OUT_OF_TOLERANCE)
        if (
            previous is not None
            and (t - previous) * 100 * self.params.rate_mhz
            < (missing + 1) * self.s.min_interval_pct * 10**9
        ):
            return self.verdict(BreachCode.OVER_RATE)
        if window > self.s.max_average_power_w * 1e6:
            return self.verdict(BreachCode.AVERAGE_POWER)
        if zone_limit is not None and zone_before + e > zone_limit:
            return self.verdict(BreachCode.ZONE_ENERGY)
        if session_before + e > self.s.session_energy_j * 1e6:
            return self.verdict(BreachCode.SESSION_ENERGY)
        if missing and (
            (zone_limit is not None and self.energy[self.zone] > zone_limit)
            or sum(self.energy.values()) > self.s.session_energy_j * 1e6
        ):
            return self.verdict(BreachCode.PULSE_GAP)
        return 0

    def status(self, state: int, interlocks: int, head: int, skin: int, lease: int) -> int:
        if skin > self.s.skin_temp_max_c * 100:
            return self.verdict(BreachCode.SKIN_OVERTEMP)
        if head > self.s.head_temp_max_c * 100:
            return self.verdict(BreachCode.HEAD_OVERTEMP)
        device_armed = state in (2, 3)  # READY, EMITTING
        if self.armed and state == 4:
            return self.verdict(BreachCode.DEVICE_FAULT)
        if self.armed and device_armed and interlocks != 0:
            return self.verdict(BreachCode.INTERLOCK_OPEN)
        if self.armed and device_armed and lease < self.s.lease_nearly_out_ms:
            return self.verdict(BreachCode.LEASE_NEARLY_OUT)
        return 0

    def arm_refusal(self) -> str | None:
        if self.latched is not None:
            return "breach_latched"
        if not self.configured or self.zone is None:
            return "not_configured"
        if self.energy.get(self.zone, 0) >= self.zone_limit_j[self.zone] * 1e6:
            return "zone_energy"
        if sum(self.energy.values()) >= self.s.session_energy_j * 1e6:
            return "session_energy"
        return None

    def arm(self) -> str | None:
        refusal = self.arm_refusal()
        if refusal is None:
            self.armed = True
            self.previous_t = None
        return refusal

    def set_zone(self, zone: Zone, zone_limit_j: float, params: PulseParams) -> None:
        self.zone = zone
        self.zone_limit_j[zone] = zone_limit_j
        self.set_params(params)

    def set_params(self, params: PulseParams) -> None:
        self.params = params
        self.configured = True
        self.previous_t = None

    def boot(self) -> int:
        code = BreachCode.DEVICE_BOOT if self.armed else None
        self.armed = self.configured = False
        self.since_boot = []
        self.previous_t = None
        return self.verdict(code)

    def link_lost(self) -> int:
        # Still armed: only STOP's ACK (rule 1) disarms; the device may fire under its lease.
        code = BreachCode.LINK_LOST if self.armed else None
        self.previous_t = None
        return self.verdict(code)

    def fault(self) -> int:
        code = BreachCode.DEVICE_FAULT if self.armed else None
        self.armed = False
        return self.verdict(code)


# ---------------------------------------------------------------- strategies

sessions = st.builds(
    session,
    device_max_energy_uj=st.integers(1_000, 60_000),
    device_max_rate_mhz=st.just(500_000),
    max_average_power_w=st.sampled_from([0.01, 0.02, 0.05, 0.1, 0.333, 1.0, 3.0]),
    session_energy_j=st.sampled_from([0.05, 0.2, 0.5, 2.0, 300.0]),
    energy_tolerance_pct=st.integers(1, 50),
    min_interval_pct=st.integers(50, 100),
    skin_temp_max_c=st.integers(3500, 4300).map(lambda c: c / 100),
    head_temp_max_c=st.integers(3500, 4500).map(lambda c: c / 100),
    lease_nearly_out_ms=st.integers(1, 200),
)
param_sets = st.builds(
    PulseParams,
    energy_uj=st.one_of(st.integers(1, 20_000), st.sampled_from([1_000, 2_500, 5_000, 10_000])),
    width_us=st.just(100),
    rate_mhz=st.sampled_from([1_000, 10_000, 20_000, 100_000, 333_333, 500_000]),
    spot_um=st.just(300),
)
# Time steps and energies are partly symbolic, resolved against the current setpoint, so that the
# boundaries (exactly at the tolerance, exactly 90 % of the period, exactly 1 s) come up often.
time_steps = st.one_of(
    st.integers(0, 2_000_000),
    st.sampled_from(["period", "min", "min-1", "1s", "1s-1", "half", "edge", "edge-1"]),
)
energies = st.one_of(st.integers(0, 70_000), st.sampled_from(["set", "hi", "hi+1", "lo", "lo-1"]))
pulses = st.tuples(
    st.just("pulse"),
    st.one_of(st.just("period"), time_steps),
    st.one_of(st.just("set"), energies),
    st.sampled_from([1, 1, 1, 1, 1, 1, 0, 2, 5]),
)
temperatures = st.one_of(*[st.integers(2500, 3400)] * 9, st.integers(3400, 4600))
events = st.one_of(
    pulses,
    pulses,
    pulses,
    pulses,
    pulses,
    pulses,
    st.tuples(
        st.just("status"),
        st.sampled_from([1, 2, 2, 3, 3, 4]),
        st.sampled_from([0, 0, 0, 0, 1, 8]),
        temperatures,
        temperatures,
        st.one_of(st.integers(150, 250), st.integers(0, 300)),
    ),
    st.tuples(st.just("arm")),
    st.tuples(st.just("ack_arm")),
    st.tuples(st.just("ack_arm")),
    st.tuples(st.just("ack")),
    st.tuples(st.just("params"), param_sets),
    st.tuples(
        st.just("zone"),
        st.sampled_from(list(Zone)[:3]),
        st.sampled_from([0.02, 0.1, 1.0]),
        param_sets,
    ),
    st.tuples(st.sampled_from(["disarm", "boot", "link_lost", "fault"])),
)


def _resolve_dt(step: int | str, ref: Reference) -> int:
    if isinstance(step, int):
        return step
    rate = ref.params.rate_mhz if ref.params is not None else 10_000
    period = 10**9 // rate
    minimum = -((-ref.s.min_interval_pct * 10**9) // (100 * rate))
    return {
        "period": period,
        "min": minimum,
        "min-1": minimum - 1,
        "1s": 1_000_000,
        "1s-1": 999_999,
        "half": period // 2,
        # exactly 1 s (or 1 µs less) after the pulse before the previous one: the window's edge
        "edge": max(0, _two_back(ref) + 1_000_000 - _one_back(ref)),
        "edge-1": max(0, _two_back(ref) + 999_999 - _one_back(ref)),
    }[step]


def _one_back(ref: Reference) -> int:
    return ref.since_boot[-1][0] if ref.since_boot else 0


def _two_back(ref: Reference) -> int:
    return ref.since_boot[-2][0] if len(ref.since_boot) > 1 else 0


def _resolve_energy(energy: int | str, ref: Reference) -> int:
    if isinstance(energy, int):
        return energy
    setpoint = ref.params.energy_uj if ref.params is not None else 10_000
    tol = ref.s.energy_tolerance_pct
    hi = setpoint * (100 + tol) // 100
    lo = -((-setpoint * (100 - tol)) // 100)
    return {"set": setpoint, "hi": hi, "hi+1": hi + 1, "lo": lo, "lo-1": max(0, lo - 1)}[energy]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=sessions,
    start_t=st.sampled_from([0, U32 - 1, U32 - 50_000, U32 - 999_999, 123_456_789]),
    start_no=st.integers(0, 1_000),
    first_zone=st.tuples(st.just("zone"), st.just(Zone.CHEEKS), st.just(1.0), param_sets),
    stream=st.lists(events, min_size=20, max_size=120),
)
def test_supervisor_matches_reference(
    s: SessionLimits,
    start_t: int,
    start_no: int,
    first_zone: tuple[object, ...],
    stream: list[tuple[object, ...]],
) -> None:
    stream = [first_zone, ("arm",), *stream]
    sup = SafetySupervisor(s, window_capacity=1_000)  # large: folding is tested separately
    ref = Reference(s)
    t, pulse_no = start_t, start_no
    for index, event in enumerate(stream):
        kind = event[0]
        where = f"event {index} {event!r}"
        if kind == "pulse":
            _, step, energy, no_step = event
            assert isinstance(step, int | str) and isinstance(energy, int | str)
            assert isinstance(no_step, int)
            t += _resolve_dt(step, ref)
            pulse_no += no_step
            e = _resolve_energy(energy, ref)
            verdict = sup.on_pulse(pulse_no, t % U32, e)
            assert verdict == ref.pulse(pulse_no, t, e), where
            record_event(f"pulse verdict {BreachCode(verdict).name if verdict else 'OK'}")
        elif kind == "status":
            args = tuple(int(str(x)) for x in event[1:])
            verdict = sup.on_status(*args)
            assert verdict == ref.status(*args), where
            record_event(f"status verdict {BreachCode(verdict).name if verdict else 'OK'}")
        elif kind in {"arm", "ack_arm"}:
            if kind == "ack_arm":
                sup.acknowledge("op-1", "checked the handpiece")
                ref.latched = None
            expected = ref.arm()
            refused: str | None = None
            try:
                sup.arm()
            except SafetyRefusal as refusal:
                refused = refusal.rule
            assert refused == expected, where
        elif kind == "disarm":
            sup.disarm()
            ref.armed = False
        elif kind == "ack":
            cleared = sup.acknowledge("op-1", "checked the handpiece")
            assert (cleared.code if cleared else None) == ref.latched, where
            ref.latched = None
        elif kind == "params":
            params = event[1]
            assert isinstance(params, PulseParams)
            if ref.zone is not None:
                sup.set_params(limits(s, ref.zone, params, ref.zone_limit_j[ref.zone]))
                ref.set_params(params)
        elif kind == "zone":
            _, zone, zone_j, params = event
            assert isinstance(zone, Zone) and isinstance(zone_j, float)
            assert isinstance(params, PulseParams)
            sup.set_zone(zone, limits(s, zone, params, zone_j))
            ref.set_zone(zone, zone_j, params)
        elif kind == "boot":
            assert sup.on_boot(0) == ref.boot(), where
        elif kind == "link_lost":
            assert sup.on_link_lost() == ref.link_lost(), where
        else:
            assert sup.on_device_fault(2, 1) == ref.fault(), where
        assert sup.armed == ref.armed, where
        assert (sup.latched.code if sup.latched else None) == ref.latched, where
        assert sup.session_energy_uj == sum(ref.energy.values()), where
        if ref.zone is not None:
            assert sup.zone_energy_uj(ref.zone) == ref.energy.get(ref.zone, 0), where
