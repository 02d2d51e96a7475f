"""The demo's scripted treatment: what is said to the daemon and the simulator, and when.

The script plays one session the way a clinician would, through the daemon's control API (the same
requests ``devicectl session start``, ``params set``, ``arm`` ... send) and the simulator's control
words (the footswitch, the injected fault)::

    consult    session start: DEMO-OP, PT-DEMO-0001, skin type III, fine lines, full checklist
    forehead   zone forehead, params, arm, footswitch down ............ pulses
    cheeks     footswitch up, zone cheeks, arm, footswitch down ........ pulses
    breach     fault energy-drift 1.3 → the supervisor STOPs at the first drifted pulse
    review     footswitch up, clear the injected fault; the breach stays latched
    resume     fault ack with a reason, arm, footswitch down ........... pulses
    close      footswitch up, disarm, session end with post-care

Phase lengths scale with the demo's duration (:func:`plan_phases`); the pulse rate is the demo's
speed, with energy and pulse width lowered where the policy's average power or the period need it
(:func:`demo_params`). Time is injected (``clock``, ``sleep``), so the script runs against a fake
controller in tests without waiting.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from devicectl.errors import DevicectlError
from devicectl.policy import Policy, Preset, PulseParams

__all__ = [
    "ACK_REASON",
    "DEFAULT_DURATION_S",
    "DEFAULT_SPEED_HZ",
    "DEMO_CONCERN",
    "DEMO_OPERATOR",
    "DEMO_PATIENT",
    "DEMO_SKIN_TYPE",
    "DEMO_SUPERVISOR",
    "DRIFT_FACTOR",
    "MAX_SPEED_HZ",
    "MIN_DURATION_S",
    "MIN_SPEED_HZ",
    "POST_CARE",
    "DemoControls",
    "DemoError",
    "DemoProgress",
    "DemoUsers",
    "Phase",
    "ScriptRecord",
    "TreatmentScript",
    "demo_params",
    "plan_phases",
]

DEMO_OPERATOR = "DEMO-OP"
DEMO_SUPERVISOR = "DEMO-SUP"
DEMO_PATIENT = "PT-DEMO-0001"
DEMO_SKIN_TYPE = "III"
DEMO_CONCERN = "fine_lines"
DRIFT_FACTOR = 1.3  # +30 %: outside the supervisor's ±20 %, inside the board's own ±50 % monitor
POST_CARE = ("serum_or_moisturiser", "avoid_sun", "sunscreen", "gentle_skincare")
ACK_REASON = "demo: injected energy drift removed, energy monitor checked, treatment may resume"
ACK_REASON_CODE = "cause_found_and_fixed"
DEMO_INGREDIENT = {"amount": 2.0, "unit": "ml", "lot": "DEMO-LOT-001"}

DEFAULT_DURATION_S = 20.0
MIN_DURATION_S = 4.0
MAX_DURATION_S = 3600.0
DEFAULT_SPEED_HZ = 25.0
MIN_SPEED_HZ = 1.0
MAX_SPEED_HZ = 2000.0
# Average power well inside the policy's limit, so that the only breach is the injected one.
_POWER_MARGIN = 0.8
_SKIN_MARGIN_C = 3.0
# The supervisor needs a pulse to see the drift: wait at least this long for the breach.
_BREACH_WAIT_MIN_S = 5.0
_POLL_S = 0.1

# Each phase's share of the duration; they sum to 1.
_PHASES: tuple[tuple[str, str, float], ...] = (
    ("consult", "consultation and checklist: session start", 0.05),
    ("forehead", "forehead: armed, footswitch down", 0.28),
    ("cheeks", "cheeks: armed, footswitch down", 0.17),
    ("breach", "injected fault: energy drift ×1.3", 0.05),
    ("review", "breach latched: footswitch up, fault removed", 0.12),
    ("resume", "fault acknowledged, re-armed: cheeks", 0.23),
    ("close", "disarm, post-care, session end", 0.10),
)


class DemoError(DevicectlError):
    """The demo could not play as scripted; the message is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    title: str
    seconds: float


def plan_phases(duration_s: float) -> tuple[Phase, ...]:
    """The script's phases for a demo lasting about ``duration_s`` seconds."""
    if not MIN_DURATION_S <= duration_s <= MAX_DURATION_S:
        raise DemoError(
            f"--duration {duration_s:g} s is not allowed: from {MIN_DURATION_S:g} "
            f"to {MAX_DURATION_S:g} s"
        )
    return tuple(Phase(name, title, share * duration_s) for name, title, share in _PHASES)


def demo_params(speed_hz: float, preset: Preset, policy: Policy) -> PulseParams:
    """The preset's parameters at ``speed_hz``, kept clear of every limit but the injected one:
    average power at most the preset's own or 80 % of the policy's, pulse width at most half the
    period, and the smallest spot (not below the preset's) on which the simulated skin settles at
    least 3 °C under the policy's skin limit."""
    from simulator import SPOTS_UM, ThermalModel
    from simulator.physics import skin_steady_state_c

    if not MIN_SPEED_HZ <= speed_hz <= MAX_SPEED_HZ:
        raise DemoError(
            f"--speed {speed_hz:g} Hz is not allowed: from {MIN_SPEED_HZ:g} to {MAX_SPEED_HZ:g} Hz"
        )
    power_w = min(_POWER_MARGIN * policy.max_average_power_w, preset.energy_uj * 1e-6 * speed_hz)
    energy_uj = min(preset.energy_uj, math.floor(power_w / speed_hz * 1e6))
    power_w = energy_uj * 1e-6 * speed_hz
    ceiling_c = policy.skin_temp_max_c - _SKIN_MARGIN_C
    model = ThermalModel()
    spot_um = next(
        (
            spot
            for spot in SPOTS_UM
            if spot >= preset.spot_um and skin_steady_state_c(model, power_w, spot) <= ceiling_c
        ),
        None,
    )
    if spot_um is None:
        raise DemoError(
            f"--speed {speed_hz:g} Hz would heat the simulated skin above {ceiling_c:g} °C "
            "with every spot"
        )
    width_us = min(preset.width_us, math.floor(0.5e6 / speed_hz))
    return PulseParams(energy_uj, width_us, round(speed_hz * 1000), spot_um)


@dataclass(frozen=True, slots=True)
class DemoUsers:
    """The demo's registered users (created non-interactively with random PINs): an operator
    who treats, and a supervisor who signs off the breach acknowledgement."""

    operator: dict[str, str]  # {"user", "pin"}
    supervisor: dict[str, str]


class DemoControls(Protocol):
    """How the script reaches the daemon (control requests) and the simulator (command words)."""

    async def request(self, request: dict[str, Any]) -> dict[str, Any]: ...

    async def sim(self, words: str) -> Any: ...


@dataclass(slots=True)
class DemoProgress:
    """What the live view shows; the script updates it as it plays."""

    phase: str = "starting"
    phase_title: str = "starting broker, daemon and dashboard"
    phase_index: int = 0
    phase_count: int = len(_PHASES)
    state: str = "unknown"
    armed: bool = False
    footswitch: bool = False
    pulses: int = 0
    device_pulse_count: int | None = None
    energy_by_zone_uj: dict[str, int] = field(default_factory=dict)
    breach: dict[str, Any] | None = None
    alerts: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def absorb(self, status: dict[str, Any]) -> None:
        """Take the daemon's ``status`` reply."""
        self.state = str(status.get("state", "unknown"))
        self.armed = bool(status.get("armed"))
        self.footswitch = bool(status.get("footswitch"))
        self.device_pulse_count = status.get("pulse_count")
        if status.get("session") is not None:  # once it is closed, show its last totals
            self.pulses = int(status.get("session_pulses") or 0)
            zones = status.get("energy_by_zone_uj") or {}
            self.energy_by_zone_uj = {str(k): int(v) for k, v in zones.items()}
        breach = status.get("breach_latched")
        if breach and breach != self.breach:
            self.alerts.append(str(breach.get("message") or breach.get("code")))
        self.breach = breach or None


@dataclass(slots=True)
class ScriptRecord:
    """What the script saw, to be checked against the log once the session is closed."""

    params: PulseParams
    session_id: int | None = None
    device_count_before: int | None = None
    device_count_after: int | None = None
    daemon_pulses: int | None = None
    breach: dict[str, Any] | None = None
    end_summary: dict[str, Any] | None = None
    completed: bool = False


class TreatmentScript:
    """Plays the scripted session; :meth:`play` returns what it saw or raises DemoError."""

    def __init__(
        self,
        controls: DemoControls,
        phases: tuple[Phase, ...],
        params: PulseParams,
        progress: DemoProgress,
        users: DemoUsers,
        *,
        on_progress: Callable[[DemoProgress], None] = lambda _p: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._controls = controls
        self._users = users
        self._phases = {phase.name: phase for phase in phases}
        self._order = [phase.name for phase in phases]
        self._params = params
        self.progress = progress
        self._on_progress = on_progress
        self._sleep = sleep
        self._clock = clock
        self._started = clock()
        self.record = ScriptRecord(params)

    async def play(self) -> ScriptRecord:
        self._started = self._clock()
        try:
            await self._play()
        finally:
            if not self.record.completed:
                await self._make_safe()
        return self.record

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        """A treatment-changing request, identified as the demo's operator."""
        return await self._controls.request({**request, "auth": self._users.operator})

    async def _play(self) -> None:
        request, sim, record = self._request, self._controls.sim, self.record
        params = self._params

        self._enter("consult")
        await self._wait_for_device()
        record.device_count_before = int((await sim("status"))["pulse_count"])
        opened = await request(
            {
                "command": "session_start",
                "patient_ref": DEMO_PATIENT,
                "skin_type": DEMO_SKIN_TYPE,
                "concerns": [DEMO_CONCERN],
                "preset": DEMO_CONCERN,
                "ingredient": DEMO_INGREDIENT,
                "checklist": {
                    "consultation_done": True,
                    "consent_given": True,
                    "area_cleaned": True,
                    "numbing_applied": True,
                    "recent_sun_exposure": False,
                    "photosensitising_medication": False,
                    "active_skin_infection": False,
                    "pregnancy": False,
                    "allergy_to_active_ingredient": False,
                },
                "numbing": {"agent": "lidocaine 4 % cream (demo)", "contact_min": 30},
            }
        )
        record.session_id = int(opened["session"])
        await self._hold("consult")

        self._enter("forehead")
        await request({"command": "session_zone", "zone": "forehead"})
        await request(
            {
                "command": "params_set",
                "energy_uj": params.energy_uj,
                "width_us": params.width_us,
                "rate_hz": params.rate_mhz / 1000,
                "spot_um": params.spot_um,
            }
        )
        await self._fire("forehead")

        self._enter("cheeks")
        await request({"command": "session_zone", "zone": "cheeks"})
        await self._fire("cheeks", release=False)

        self._enter("breach")
        await sim(f"fault energy-drift {DRIFT_FACTOR:g}")
        record.breach = await self._wait_for_breach()
        await sim("footswitch up")

        self._enter("review")
        await sim("clear-faults")
        await self._hold("review")

        self._enter("resume")
        # The operator acknowledges; the supervisor signs it off with their own PIN.
        signoff = {**self._users.supervisor, "reason_code": ACK_REASON_CODE, "reason": ACK_REASON}
        await request({"command": "fault_ack", "signoff": signoff})
        await self._fire("resume", release=False)

        self._enter("close")
        await sim("footswitch up")
        await request({"command": "disarm"})
        status = await self._refresh()
        record.daemon_pulses = int(status.get("session_pulses") or 0)
        record.end_summary = await request({"command": "session_end", "post_care": [*POST_CARE]})
        await request(
            {
                "command": "session_reaction",
                "session": record.session_id,
                "erythema": "mild",
                "oedema": "none",
            }
        )
        record.device_count_after = int((await sim("status"))["pulse_count"])
        await self._refresh()
        await self._hold("close")
        record.completed = True

    # ---------------------------------------------------------------- steps

    def _enter(self, name: str) -> None:
        phase = self._phases[name]
        self.progress.phase = phase.name
        self.progress.phase_title = phase.title
        self.progress.phase_index = self._order.index(name) + 1
        self._on_progress(self.progress)

    async def _fire(self, name: str, *, release: bool = True) -> None:
        """Arm and hold the footswitch down for the phase (a fresh press, as the board wants)."""
        await self._request({"command": "arm"})
        await self._controls.sim("footswitch down")
        await self._hold(name)
        if release:
            await self._controls.sim("footswitch up")
            await self._request({"command": "disarm"})

    async def _hold(self, name: str) -> None:
        await self._wait(self._phases[name].seconds)

    async def _wait(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while True:
            await self._refresh()
            left = deadline - self._clock()
            if left <= 0:
                return
            await self._sleep(min(_POLL_S, left))

    async def _refresh(self) -> dict[str, Any]:
        status = await self._controls.request({"command": "status"})
        self.progress.absorb(status)
        self.progress.elapsed_s = self._clock() - self._started
        self._on_progress(self.progress)
        return status

    async def _wait_for_device(self) -> None:
        deadline = self._clock() + _BREACH_WAIT_MIN_S
        while not (await self._refresh()).get("device_serial"):
            if self._clock() > deadline:
                raise DemoError(
                    f"the simulated device did not identify itself within {_BREACH_WAIT_MIN_S:g} s"
                )
            await self._sleep(_POLL_S)

    async def _wait_for_breach(self) -> dict[str, Any]:
        limit_s = max(_BREACH_WAIT_MIN_S, self._phases["breach"].seconds)
        deadline = self._clock() + limit_s
        while True:
            status = await self._refresh()
            breach = status.get("breach_latched")
            if breach:
                return dict(breach)
            if self._clock() > deadline:
                raise DemoError(
                    f"the injected energy drift did not trip the supervisor within {limit_s:g} s"
                )
            await self._sleep(min(_POLL_S, self._phases["breach"].seconds or _POLL_S))

    async def _make_safe(self) -> None:
        """The script stopped half-way (an error, Ctrl-C): release the footswitch and disarm.
        The daemon makes the laser safe on shut-down anyway; this keeps it safe while it runs."""
        for step in (
            lambda: self._controls.sim("footswitch up"),
            lambda: self._controls.request({"command": "stop"}),
        ):
            try:
                async with asyncio.timeout(1.0):
                    await step()
            except (DevicectlError, OSError, TimeoutError):
                continue
