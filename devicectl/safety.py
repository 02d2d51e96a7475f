"""The safety supervisor: the rules of docs/safety-model.md, in one place.

Two halves:

* **Before** params are sent or the device armed (not hot): :func:`compile_limits` folds three
  layers into one :class:`Limits`, the tightest wins — the device's IDENT ceilings, the clinic
  :class:`~devicectl.policy.Policy`, and the session (Fitzpatrick skin type, zone, params).
  :func:`check_params` refuses with :class:`~devicectl.errors.SafetyRefusal` naming the limit,
  the value and the bound. Derived: A = π(d/2)², F = E/A (J/cm²), P = E·f (W).

* **During** emission (hot): :class:`SafetySupervisor` judges every PULSE and STATUS event with
  plain integers held in slots — no allocation that outlives the call, no logging, no await. A
  nonzero verdict is a :class:`BreachCode`; the daemon writes STOP first and only then reads
  :attr:`SafetySupervisor.last_breach` (built on the breach path only).

Rules on a PULSE, in this order (the first that fails is the verdict)::

    1 uncommanded_emission     pulse while not armed (armed = from ARM's ACK to STOP/DISARM's ACK)
    2 energy_out_of_tolerance  100·|E - setpoint| > tolerance_pct · setpoint
    3 over_rate                interval by t_us (u32, wraps) < min_interval_pct % of the period;
                               after k missing pulse numbers, < (k + 1) × that (k + 1 periods
                               passed: if they do not fit, at least one interval was too short)
    4 average_power            Σ energy of pulses with t_now - t < 1 s  >  P_max · 1 s, missing
                               pulses counted at the device's max energy at this pulse's time
    5 zone_energy              zone total (with this pulse) > zone limit
      session_energy           session total > session limit
    6 pulse_gap                missing pulse_no charged at the device's max energy, then as 5

Every pulse updates all state whatever the verdict (a pulse emitted is a dose delivered), so the
verdict of the next pulse does not depend on whether this one breached. Rules on a STATUS: skin
temperature above its limit, head temperature above its limit, and while armed: the device in FAULT
(a FAULT event may have been lost), and while the device reports READY or EMITTING too: an
interlock open, the lease nearly out. Link loss, BOOT and
FAULT events while armed are breaches too. A breach latches until an operator acknowledges it with a
reason; arming while latched is refused (rule ``breach_latched``). See docs/safety-model.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from devicectl.errors import DevicectlError, SafetyRefusal
from devicectl.policy import (
    Policy,
    PulseParams,
    SkinType,
    Zone,
    average_power_w,
    fluence_j_cm2,
    spot_area_cm2,
)
from protocols.messages import DeviceState, Ident, describe_fault, interlock_names

__all__ = [
    "AcknowledgementRefused",
    "Breach",
    "BreachCode",
    "Limits",
    "SafetySupervisor",
    "SessionLimits",
    "Severity",
    "check_params",
    "compile_limits",
    "session_limits",
]

_U32 = 0xFFFF_FFFF
WINDOW_US = 1_000_000  # the sliding average-power window, by the device clock
_NO_LIMIT = 1 << 62  # an integer bound no sum of u32 energies reaches
_DEVICE_ARMED = frozenset({int(DeviceState.READY), int(DeviceState.EMITTING)})
_NO_INTERVAL = 1 << 40  # "no previous pulse": longer than any period (at most 1e9 µs)


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    WARNING = "warning"


class BreachCode(IntEnum):
    """A supervisor verdict other than OK (0). Names are the telemetry alert codes: stable."""

    UNCOMMANDED_EMISSION = 1
    ENERGY_OUT_OF_TOLERANCE = 2
    OVER_RATE = 3
    AVERAGE_POWER = 4
    ZONE_ENERGY = 5
    SESSION_ENERGY = 6
    PULSE_GAP = 7
    SKIN_OVERTEMP = 8
    HEAD_OVERTEMP = 9
    INTERLOCK_OPEN = 10
    LEASE_NEARLY_OUT = 11
    LINK_LOST = 12
    DEVICE_BOOT = 13
    DEVICE_FAULT = 14

    @property
    def alert_code(self) -> str:
        """The stable lower-case name used in telemetry alerts and the session log."""
        return self.name.lower()

    @property
    def severity(self) -> Severity:
        return _SEVERITY[self]


_SEVERITY: dict[BreachCode, Severity] = {
    BreachCode.UNCOMMANDED_EMISSION: Severity.CRITICAL,
    BreachCode.ENERGY_OUT_OF_TOLERANCE: Severity.HIGH,
    BreachCode.OVER_RATE: Severity.HIGH,
    BreachCode.AVERAGE_POWER: Severity.HIGH,
    BreachCode.ZONE_ENERGY: Severity.HIGH,
    BreachCode.SESSION_ENERGY: Severity.HIGH,
    BreachCode.PULSE_GAP: Severity.HIGH,
    BreachCode.SKIN_OVERTEMP: Severity.CRITICAL,
    BreachCode.HEAD_OVERTEMP: Severity.HIGH,
    BreachCode.INTERLOCK_OPEN: Severity.HIGH,
    BreachCode.LEASE_NEARLY_OUT: Severity.WARNING,
    BreachCode.LINK_LOST: Severity.CRITICAL,
    BreachCode.DEVICE_BOOT: Severity.HIGH,
    BreachCode.DEVICE_FAULT: Severity.HIGH,
}


@dataclass(frozen=True, slots=True)
class Breach:
    """What a nonzero verdict was about. Built only on the breach path."""

    code: BreachCode
    value: float
    limit: float
    unit: str
    detail: str
    pulse_no: int | None = None  # the pulse judged, for PULSE rules
    repeat: bool = False  # this code was already reported since the latch was last cleared

    @property
    def severity(self) -> Severity:
        return self.code.severity

    @property
    def alert_code(self) -> str:
        return self.code.alert_code

    def as_dict(self) -> dict[str, object]:
        """JSON-ready facts for the session log and the telemetry alert."""
        return {
            "code": self.alert_code,
            "severity": self.severity.value,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "detail": self.detail,
            "pulse_no": self.pulse_no,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Breach:
        """The breach a ``breach`` event of the session log recorded (the daemon's ``as_dict``
        plus ``detail``), to restore its latch after a restart. Raises ValueError if it is not
        one."""
        try:
            code = BreachCode[str(record["code"]).upper()]
            pulse_no = record.get("pulse_no")
            return cls(
                code,
                float(record["value"]),  # type: ignore[arg-type]
                float(record["limit"]),  # type: ignore[arg-type]
                str(record.get("unit", "")),
                str(record.get("detail", "")),
                None if pulse_no is None else int(pulse_no),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a recorded breach: {record!r}") from exc

    @property
    def message(self) -> str:
        """One line for a clinician: what, the value, the limit (a breach of state, with no
        measure to compare, says what happened: "device_fault: the device latched ...")."""
        where = f" at pulse {self.pulse_no}" if self.pulse_no is not None else ""
        if not self.unit and not self.limit:
            return f"{self.alert_code}{where}: {self.detail}"
        sep = " " if self.unit else ""
        return (
            f"{self.alert_code}{where}: {self.value:g}{sep}{self.unit} "
            f"(limit {self.limit:g}{sep}{self.unit}); {self.detail}"
        )


class AcknowledgementRefused(DevicectlError):
    """An acknowledgement of a latched breach lacks its operator or its reason."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        super().__init__(f"a breach acknowledgement needs {missing}")


# ---------------------------------------------------------------- limits (not hot)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The session-wide numbers: device ceilings and policy figures that do not depend on zone."""

    device_max_energy_uj: int
    device_max_rate_mhz: int
    max_average_power_w: float
    session_energy_j: float
    energy_tolerance_pct: int
    min_interval_pct: int
    skin_temp_max_c: float
    head_temp_max_c: float
    lease_nearly_out_ms: int


def session_limits(ident: Ident, policy: Policy) -> SessionLimits:
    """The device and policy layers folded; power is the tighter of the policy and the device."""
    device_power = average_power_w(ident.max_energy_uj, ident.max_rate_mhz)
    return SessionLimits(
        device_max_energy_uj=ident.max_energy_uj,
        device_max_rate_mhz=ident.max_rate_mhz,
        max_average_power_w=min(policy.max_average_power_w, device_power),
        session_energy_j=policy.session_energy_j,
        energy_tolerance_pct=policy.energy_tolerance_pct,
        min_interval_pct=policy.min_interval_pct,
        skin_temp_max_c=policy.skin_temp_max_c,
        head_temp_max_c=policy.head_temp_max_c,
        lease_nearly_out_ms=policy.lease_nearly_out_ms,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """Everything the supervisor and :func:`check_params` need for one zone and one setpoint."""

    session: SessionLimits
    skin_type: SkinType
    zone: Zone
    params: PulseParams
    zone_energy_j: float
    max_fluence_j_cm2: float  # the tighter of the skin type's and the zone's cap
    fluence_rule: str  # which of the two set it
    max_energy_uj: int  # the tightest energy at this spot: device ceiling or fluence cap
    max_rate_mhz: int  # the tightest rate at this energy: device ceiling or average power
    min_width_us: int
    max_width_us: int
    spots_um: tuple[int, ...] = field(default=())

    @property
    def fluence_j_cm2(self) -> float:
        return fluence_j_cm2(self.params.energy_uj, self.params.spot_um)

    @property
    def average_power_w(self) -> float:
        return average_power_w(self.params.energy_uj, self.params.rate_mhz)


def compile_limits(
    ident: Ident, policy: Policy, skin_type: SkinType, zone: Zone, params: PulseParams
) -> Limits:
    """Fold the device, policy and session layers into one :class:`Limits`; the tightest wins.

    Does not judge ``params`` (see :func:`check_params`); it only derives the ceilings for them.
    """
    session = session_limits(ident, policy)
    cap, rule = policy.max_fluence(skin_type, zone)
    max_energy = ident.max_energy_uj
    if params.spot_um > 0:
        max_energy = min(max_energy, math.floor(cap * spot_area_cm2(params.spot_um) * 1e6))
    max_rate = ident.max_rate_mhz
    if params.energy_uj > 0:
        power_rate = math.floor(session.max_average_power_w / (params.energy_uj * 1e-6) * 1000)
        max_rate = min(max_rate, power_rate)
    return Limits(
        session=session,
        skin_type=skin_type,
        zone=zone,
        params=params,
        zone_energy_j=policy.zones[zone].energy_j,
        max_fluence_j_cm2=cap,
        fluence_rule=rule,
        max_energy_uj=max_energy,
        max_rate_mhz=max_rate,
        min_width_us=ident.min_width_us,
        max_width_us=ident.max_width_us,
        spots_um=tuple(ident.spots_um),
    )


def check_params(
    ident: Ident, policy: Policy, skin_type: SkinType, zone: Zone, params: PulseParams
) -> Limits:
    """The limits for ``params``, or :class:`SafetyRefusal` naming the first limit they break.

    Call before SET_PARAMS is sent and before ARM. The checks, in order: the device's energy,
    width, rate and spot ranges; width shorter than the period; fluence within the session's cap
    (skin type, or the zone's when tighter); average power within the policy's and device's.
    """
    limits = compile_limits(ident, policy, skin_type, zone, params)
    p = params
    if p.energy_uj < 1:
        raise SafetyRefusal("device_min_energy", p.energy_uj, 1, "µJ", relation="below")
    if p.energy_uj > ident.max_energy_uj:
        raise SafetyRefusal("device_max_energy", p.energy_uj, ident.max_energy_uj, "µJ")
    if p.width_us < ident.min_width_us:
        raise SafetyRefusal(
            "device_min_width", p.width_us, ident.min_width_us, "µs",
            f"the device needs at least {ident.min_width_us} µs", relation="below",
        )  # fmt: skip
    if p.width_us > ident.max_width_us:
        raise SafetyRefusal("device_max_width", p.width_us, ident.max_width_us, "µs")
    if p.rate_mhz < 1:
        raise SafetyRefusal("device_min_rate", p.rate_mhz / 1000, 0.001, "Hz", relation="below")
    if p.rate_mhz > ident.max_rate_mhz:
        raise SafetyRefusal("device_max_rate", p.rate_mhz / 1000, ident.max_rate_mhz / 1000, "Hz")
    if p.spot_um not in ident.spots_um:
        offered = ", ".join(str(s) for s in ident.spots_um)
        raise SafetyRefusal(
            "device_spot", p.spot_um, max(ident.spots_um, default=0), "µm",
            f"the handpiece offers spots of {offered} µm only", relation="not_offered",
        )  # fmt: skip
    if p.width_us >= p.period_us:
        raise SafetyRefusal(
            "width_period", p.width_us, p.period_us, "µs",
            "the pulse width must be shorter than the period",
        )  # fmt: skip
    fluence = limits.fluence_j_cm2
    if fluence > limits.max_fluence_j_cm2:
        raise SafetyRefusal(
            limits.fluence_rule, round(fluence, 3), limits.max_fluence_j_cm2, "J/cm²",
            f"skin type {skin_type.name}, zone {zone.value}: at most {limits.max_energy_uj} µJ "
            f"at {p.spot_um} µm",
        )  # fmt: skip
    power = limits.average_power_w
    if power > limits.session.max_average_power_w:
        raise SafetyRefusal(
            "max_average_power", round(power, 4), limits.session.max_average_power_w, "W",
            f"at {p.energy_uj} µJ the rate may be at most {limits.max_rate_mhz / 1000:g} Hz",
        )  # fmt: skip
    return limits


# ---------------------------------------------------------------- the supervisor (hot)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


class SafetySupervisor:
    """Judges every event of one treatment session against its limits. See the module docstring.

    The daemon drives it: :meth:`set_zone` / :meth:`set_params` when a zone or params are applied
    (at SET_PARAMS's ACK), :meth:`check_arm` before sending ARM, :meth:`arm` at ARM's ACK,
    :meth:`disarm` at the ACK of STOP or DISARM, and ``on_*`` for every device event. On a nonzero
    verdict: ``link.stop_now()`` first, then read :attr:`last_breach`.
    """

    __slots__ = (
        "_armed",
        "_breach_count",
        "_configured",
        "_device_max_uj",
        "_energy_hi",
        "_energy_lo",
        "_gap_uj",
        "_head_max_cdeg",
        "_last_breach",
        "_last_pulse_no",
        "_last_t_us",
        "_latched",
        "_lease_min_ms",
        "_limits",
        "_min_interval_us",
        "_missed",
        "_pulses",
        "_reported",
        "_session",
        "_session_max_uj",
        "_session_uj",
        "_skin_max_cdeg",
        "_win_cap",
        "_win_carry",
        "_win_e",
        "_win_head",
        "_win_len",
        "_win_max_uj",
        "_win_sum",
        "_win_t",
        "_zone",
        "_zone_max_uj",
        "_zone_totals",
        "_zone_uj",
    )

    def __init__(self, session: SessionLimits, *, window_capacity: int | None = None) -> None:
        self._session = session
        if window_capacity is None:
            # The most pulses 1 s can hold at the device's top rate without an over-rate breach;
            # beyond that the oldest entries fold into the next (see _fold), never undercounting.
            hz = session.device_max_rate_mhz / 1000
            window_capacity = math.ceil(hz * 100 / session.min_interval_pct) + 2
        self._win_cap = max(16, window_capacity)
        self._win_t = [0] * self._win_cap
        self._win_e = [0] * self._win_cap
        self._win_head = 0
        self._win_len = 0
        self._win_sum = 0
        self._win_carry = 0  # charged to the window with the next pulse (no device time known)
        self._win_max_uj = math.floor(session.max_average_power_w * WINDOW_US)
        self._device_max_uj = session.device_max_energy_uj
        self._session_max_uj = math.floor(session.session_energy_j * 1e6)
        self._skin_max_cdeg = math.floor(session.skin_temp_max_c * 100)
        self._head_max_cdeg = math.floor(session.head_temp_max_c * 100)
        self._lease_min_ms = session.lease_nearly_out_ms
        self._armed = False
        self._configured = False
        self._energy_lo = 0
        self._energy_hi = _NO_LIMIT
        self._min_interval_us = 0
        self._last_pulse_no = -1
        self._last_t_us = -1
        self._zone: Zone | None = None
        self._zone_totals: dict[Zone, int] = {}
        self._zone_uj = 0
        self._zone_max_uj = _NO_LIMIT
        self._session_uj = 0
        self._pulses = 0
        self._missed = 0
        self._gap_uj = 0
        self._limits: Limits | None = None
        self._latched: Breach | None = None
        self._last_breach: Breach | None = None
        self._reported = 0  # a bit per BreachCode reported since the latch was last cleared
        self._breach_count = 0

    @classmethod
    def for_device(cls, ident: Ident, policy: Policy) -> SafetySupervisor:
        return cls(session_limits(ident, policy))

    # ------------------------------------------------------------ the hot loop

    def on_pulse(self, pulse_no: int, t_us: int, energy_uj: int) -> int:
        """Judge one PULSE event: 0, or the first :class:`BreachCode` it breaks (as an int)."""
        # Bookkeeping first, whatever the verdict: an emitted pulse is a delivered dose.
        self._pulses += 1
        last_no = self._last_pulse_no
        self._last_pulse_no = pulse_no
        missing = pulse_no - last_no - 1 if last_no >= 0 else 0
        if missing > 0:
            self._missed += missing
            gap_uj = missing * self._device_max_uj
            self._gap_uj += gap_uj
            # k pulses missing: k + 1 periods must have passed (rule 3); they count in the window
            # at the device's maximum energy, now (rule 4).
            min_interval = self._min_interval_us * (missing + 1)
            charged = energy_uj + gap_uj
        else:
            missing = 0
            gap_uj = 0
            min_interval = self._min_interval_us
            charged = energy_uj

        last_t = self._last_t_us
        self._last_t_us = t_us
        interval = (t_us - last_t) & _U32 if last_t >= 0 else _NO_INTERVAL

        # Sliding 1 s window by the device clock: a ring of two preallocated lists (lists rather
        # than array('q'): reading an array boxes a new int each time; a list hands back the
        # object it holds, so the ring allocates nothing).
        win_t = self._win_t
        win_e = self._win_e
        cap = self._win_cap
        head = self._win_head
        n = self._win_len
        total = self._win_sum
        while n and ((t_us - win_t[head]) & _U32) >= WINDOW_US:
            total -= win_e[head]
            head += 1
            if head == cap:
                head = 0
            n -= 1
        if n == cap:
            head = self._fold(head)
            n -= 1
        elif not n and self._win_carry:  # lost pulses found while the window was empty
            charged += self._win_carry
            self._win_carry = 0
        tail = head + n
        if tail >= cap:
            tail -= cap
        win_t[tail] = t_us
        win_e[tail] = charged
        total += charged
        self._win_head = head
        self._win_len = n + 1
        self._win_sum = total

        zone_uj = self._zone_uj + energy_uj
        session_uj = self._session_uj + energy_uj
        self._zone_uj = zone_uj + gap_uj
        self._session_uj = session_uj + gap_uj

        # The verdict, in the order of docs/safety-model.md.
        if not self._armed:
            return self._pulse_breach(BreachCode.UNCOMMANDED_EMISSION, pulse_no, energy_uj)
        if energy_uj < self._energy_lo or energy_uj > self._energy_hi:
            return self._pulse_breach(BreachCode.ENERGY_OUT_OF_TOLERANCE, pulse_no, energy_uj)
        if interval < min_interval:
            return self._pulse_breach(BreachCode.OVER_RATE, pulse_no, interval)
        if total > self._win_max_uj:
            return self._pulse_breach(BreachCode.AVERAGE_POWER, pulse_no, total)
        if zone_uj > self._zone_max_uj:
            return self._pulse_breach(BreachCode.ZONE_ENERGY, pulse_no, zone_uj)
        if session_uj > self._session_max_uj:
            return self._pulse_breach(BreachCode.SESSION_ENERGY, pulse_no, session_uj)
        if missing and (
            self._zone_uj > self._zone_max_uj or self._session_uj > self._session_max_uj
        ):
            return self._pulse_breach(BreachCode.PULSE_GAP, pulse_no, missing)
        return 0

    def on_status(
        self, state: int, interlocks: int, head_cdeg: int, skin_cdeg: int, lease_left_ms: int
    ) -> int:
        """Judge one STATUS (event or reply): 0, or the first :class:`BreachCode` it breaks."""
        if skin_cdeg > self._skin_max_cdeg:
            return self._status_breach(BreachCode.SKIN_OVERTEMP, skin_cdeg, state, interlocks)
        if head_cdeg > self._head_max_cdeg:
            return self._status_breach(BreachCode.HEAD_OVERTEMP, head_cdeg, state, interlocks)
        if self._armed:
            # Interlocks and the lease matter while the device itself is armed. Between our
            # STOP/DISARM and its ACK the device may already report STANDBY with no lease (a STATUS
            # may overtake a slow reply): not a breach; no pulse can come from STANDBY.
            if state == DeviceState.FAULT:
                return self._status_breach(BreachCode.DEVICE_FAULT, state, state, interlocks)
            if state in _DEVICE_ARMED:
                if interlocks:
                    return self._status_breach(
                        BreachCode.INTERLOCK_OPEN, interlocks, state, interlocks
                    )
                if lease_left_ms < self._lease_min_ms:
                    return self._status_breach(
                        BreachCode.LEASE_NEARLY_OUT, lease_left_ms, state, interlocks
                    )
        return 0

    def on_link_lost(self) -> int:
        """The device stopped answering: a breach while armed (the daemon sends STOP, first thing
        after IDENT on the next connection). The host stays armed until that STOP's ACK, as rule 1
        says: until then the device may go on firing under its lease, and those pulses are
        commanded, judged by every other rule; calling them uncommanded would report a stuck
        shutter that did not happen."""
        self._last_t_us = -1
        if not self._armed:
            return 0
        return self._breach(
            BreachCode.LINK_LOST, 1, 0, "", "no reply or STATUS from the device while armed"
        )

    def on_boot(self, reason: int = 0) -> int:
        """A BOOT event: the device restarted with no params, its clock from zero."""
        was_armed = self._armed
        self._armed = False
        self._configured = False
        self._energy_lo, self._energy_hi, self._min_interval_us = 0, _NO_LIMIT, 0
        self._last_t_us = -1
        self._win_head = self._win_len = self._win_sum = self._win_carry = 0
        if not was_armed:
            return 0
        return self._breach(
            BreachCode.DEVICE_BOOT,
            reason,
            0,
            "",
            f"the device rebooted while armed (reason {reason})",
        )

    def on_device_fault(self, code: int, detail: int) -> int:
        """A FAULT event: the device stopped emission and left READY/EMITTING."""
        was_armed = self._armed
        self._armed = False
        if not was_armed:
            return 0
        return self._breach(BreachCode.DEVICE_FAULT, code, 0, "", describe_fault(code, detail))

    # ------------------------------------------------------------ the breach path (not hot)

    def _fold(self, head: int) -> int:
        """The ring is full: merge the oldest entry into the next one, so that its energy stays
        counted (for longer than it should: pessimistic) and one slot frees. Returns the new head.
        """
        nxt = head + 1 if head + 1 < self._win_cap else 0
        self._win_e[nxt] += self._win_e[head]
        return nxt

    def _pulse_breach(self, code: BreachCode, pulse_no: int, value: int) -> int:
        if code is BreachCode.UNCOMMANDED_EMISSION:
            breach = (value / 1, 0.0, "µJ", "a pulse was emitted while the laser was not armed")
        elif code is BreachCode.ENERGY_OUT_OF_TOLERANCE:
            bound = self._energy_lo if value < self._energy_lo else self._energy_hi
            pct = self._session.energy_tolerance_pct
            breach = (value / 1, bound / 1, "µJ", f"measured energy outside ±{pct} % of setpoint")
        elif code is BreachCode.OVER_RATE:
            breach = (
                value / 1, self._min_interval_us / 1, "µs",
                "pulses closer than the set period allows",
            )  # fmt: skip
        elif code is BreachCode.AVERAGE_POWER:
            breach = (value / 1e6, self._win_max_uj / 1e6, "W", "average power over the last 1 s")
        elif code is BreachCode.ZONE_ENERGY:
            zone = self._zone.value if self._zone is not None else "none"
            breach = (value / 1e6, self._zone_max_uj / 1e6, "J", f"cumulative energy in {zone}")
        elif code is BreachCode.SESSION_ENERGY:
            breach = (value / 1e6, self._session_max_uj / 1e6, "J", "cumulative session energy")
        else:  # PULSE_GAP
            zone_over = self._zone_uj > self._zone_max_uj
            total = self._zone_uj if zone_over else self._session_uj
            limit = self._zone_max_uj if zone_over else self._session_max_uj
            which = "zone" if zone_over else "session"
            breach = (
                total / 1e6, limit / 1e6, "J",
                f"{value} missing pulse(s) charged at {self._device_max_uj} µJ each take the "
                f"{which} energy over its limit",
            )  # fmt: skip
        return self._breach(code, *breach, pulse_no=pulse_no)

    def _status_breach(self, code: BreachCode, value: int, state: int, interlocks: int) -> int:
        if code is BreachCode.SKIN_OVERTEMP:
            args = (value / 100, self._session.skin_temp_max_c, "°C", "skin temperature")
        elif code is BreachCode.HEAD_OVERTEMP:
            args = (value / 100, self._session.head_temp_max_c, "°C", "handpiece temperature")
        elif code is BreachCode.INTERLOCK_OPEN:
            names = ", ".join(interlock_names(interlocks))
            args = (float(value), 0.0, "", f"interlock open while armed: {names}")
        elif code is BreachCode.DEVICE_FAULT:
            args = (float(value), 0.0, "", "the device reports FAULT while armed")
        else:  # LEASE_NEARLY_OUT
            args = (
                float(value), float(self._lease_min_ms), "ms",
                "the lease nearly ran out: heartbeats are not getting through",
            )  # fmt: skip
        return self._breach(code, *args)

    def _breach(
        self,
        code: BreachCode,
        value: float,
        limit: float,
        unit: str,
        detail: str,
        pulse_no: int | None = None,
    ) -> int:
        bit = 1 << code
        repeat = bool(self._reported & bit)
        breach = Breach(code, value, limit, unit, detail, pulse_no, repeat)
        self._last_breach = breach
        self._reported |= bit
        self._breach_count += 1
        if self._latched is None:
            self._latched = breach
        return int(code)

    # ------------------------------------------------------------ commands from the daemon

    def set_zone(self, zone: Zone, limits: Limits) -> None:
        """Move treatment to ``zone``; its cumulative energy carries over from earlier visits."""
        if limits.zone != zone:
            raise ValueError(f"limits compiled for zone {limits.zone.value}, not {zone.value}")
        if self._zone is not None:
            self._zone_totals[self._zone] = self._zone_uj
        self._zone = zone
        self._zone_uj = self._zone_totals.get(zone, 0)
        self._zone_max_uj = math.floor(limits.zone_energy_j * 1e6)
        self.set_params(limits)

    def set_params(self, limits: Limits) -> None:
        """Load a setpoint the device acknowledged (SET_PARAMS's ACK), checked by check_params."""
        if limits.zone != self._zone:
            raise ValueError(f"limits are for zone {limits.zone.value}: call set_zone first")
        p = limits.params
        if p.energy_uj < 1 or p.rate_mhz < 1:
            raise ValueError(f"params {p} were not checked: use check_params")
        tol = self._session.energy_tolerance_pct
        self._limits = limits
        self._energy_lo = _ceil_div(p.energy_uj * (100 - tol), 100)
        self._energy_hi = p.energy_uj * (100 + tol) // 100
        # interval < pct % of 1e9/rate µs  <=>  interval < ceil(pct * 1e9 / (100 * rate))
        self._min_interval_us = _ceil_div(self._session.min_interval_pct * 10**9, 100 * p.rate_mhz)
        self._last_t_us = -1  # a new setpoint starts a new pulse train
        self._configured = True

    def check_arm(self) -> None:
        """Refuse (SafetyRefusal) what must not be armed; call before sending ARM."""
        latched = self._latched
        if latched is not None:
            raise SafetyRefusal(
                "breach_latched", 1, 0, "",
                f"{latched.message} — acknowledge it with a reason first "
                "(devicectl fault ack --reason TEXT)", relation="state",
            )  # fmt: skip
        if not self._configured or self._zone is None:
            raise SafetyRefusal(
                "not_configured",
                0,
                1,
                "",
                "choose a zone and set parameters before arming",
                relation="state",
            )
        zone_limit_j = (
            self._zone_max_uj / 1e6 if self._limits is None else self._limits.zone_energy_j
        )
        if self._zone_uj >= zone_limit_j * 1e6:
            raise SafetyRefusal(
                "zone_energy", self._zone_uj / 1e6, zone_limit_j, "J",
                f"zone {self._zone.value} has received its energy for this session",
                relation="reached",
            )  # fmt: skip
        session_limit_j = self._session.session_energy_j
        if self._session_uj >= session_limit_j * 1e6:
            raise SafetyRefusal(
                "session_energy", self._session_uj / 1e6, session_limit_j, "J",
                "the session has delivered its energy", relation="reached",
            )  # fmt: skip

    def arm(self) -> None:
        """ARM was acknowledged. Raises SafetyRefusal (and stays disarmed) if it must not be:
        the daemon then sends DISARM at once."""
        self.check_arm()
        self._armed = True
        self._last_t_us = -1

    def disarm(self) -> None:
        """STOP or DISARM was acknowledged: from here on, any pulse is uncommanded."""
        self._armed = False

    def inherit_latch(self, breach: Breach | None) -> None:
        """Carry over a latched breach from the supervisor this one replaces (a new session, a
        reconnection) or from the session log (a restart): a breach stays latched until an
        operator acknowledges it, whatever happens in between."""
        if breach is not None and self._latched is None:
            self._latched = breach
            self._last_breach = breach

    def acknowledge(self, operator: str, reason: str) -> Breach | None:
        """Clear the latched breach (the daemon records who and why); None if none was latched."""
        if not operator.strip():
            raise AcknowledgementRefused("an operator id")
        if not reason.strip():
            raise AcknowledgementRefused("a reason")
        latched, self._latched = self._latched, None
        self._reported = 0
        return latched

    def follow_on(self, last_pulse_no: int) -> None:
        """Pulse numbers up to ``last_pulse_no`` are accounted for already (by the supervisor this
        one replaces, or the log's reconciliation): a later gap is charged from there."""
        self._last_pulse_no = max(self._last_pulse_no, last_pulse_no)

    def charge_gap(self, first: int, last: int) -> int:
        """Pulses ``first..last`` were fired and never seen as PULSE events (a STATUS counted
        them, or the link was down): charge each at the device's maximum energy to the zone and
        session budgets and to the 1 s power window, now — at the newest device time known (the
        last pulse's), or with the next pulse when none is in the window. Returns 0, or the
        verdict: ``pulse_gap`` if a budget is over, ``average_power`` if the window is."""
        if last < first:
            return 0
        missing = last - first + 1
        self._last_pulse_no = max(self._last_pulse_no, last)
        gap_uj = missing * self._device_max_uj
        self._missed += missing
        self._gap_uj += gap_uj
        self._zone_uj += gap_uj
        self._session_uj += gap_uj
        if self._win_len:
            tail = (self._win_head + self._win_len - 1) % self._win_cap
            self._win_e[tail] += gap_uj
            self._win_sum += gap_uj
        else:
            self._win_carry += gap_uj
        if self._zone_uj > self._zone_max_uj or self._session_uj > self._session_max_uj:
            zone_over = self._zone_uj > self._zone_max_uj
            total = self._zone_uj if zone_over else self._session_uj
            limit = self._zone_max_uj if zone_over else self._session_max_uj
            return self._breach(
                BreachCode.PULSE_GAP, total / 1e6, limit / 1e6, "J",
                f"{missing} missing pulse(s) charged at {self._device_max_uj} µJ each take the "
                f"{'zone' if zone_over else 'session'} energy over its limit",
            )  # fmt: skip
        window = self._win_sum + self._win_carry
        if window > self._win_max_uj:
            return self._breach(
                BreachCode.AVERAGE_POWER, window / 1e6, self._win_max_uj / 1e6, "W",
                f"average power over the last 1 s, with {missing} missing pulse(s) charged at "
                f"{self._device_max_uj} µJ each",
            )  # fmt: skip
        return 0

    # ------------------------------------------------------------ read-only views

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def latched(self) -> Breach | None:
        return self._latched

    @property
    def last_breach(self) -> Breach | None:
        return self._last_breach

    @property
    def breach_count(self) -> int:
        return self._breach_count

    @property
    def limits(self) -> Limits | None:
        return self._limits

    @property
    def session_limits(self) -> SessionLimits:
        return self._session

    @property
    def zone(self) -> Zone | None:
        return self._zone

    @property
    def pulses(self) -> int:
        """PULSE events judged."""
        return self._pulses

    @property
    def missed_pulses(self) -> int:
        """Pulses missing from the pulse_no sequence, each charged at the device's max energy."""
        return self._missed

    @property
    def gap_energy_uj(self) -> int:
        return self._gap_uj

    @property
    def last_pulse_no(self) -> int:
        return self._last_pulse_no

    @property
    def session_energy_uj(self) -> int:
        return self._session_uj

    @property
    def window_power_w(self) -> float:
        """Average power over the last 1 s of pulses (by the device clock)."""
        return self._win_sum / WINDOW_US

    def zone_energy_uj(self, zone: Zone) -> int:
        """Energy delivered (plus gap charges) in ``zone`` this session."""
        if zone == self._zone:
            return self._zone_uj
        return self._zone_totals.get(zone, 0)
