"""The simulated board's thermal model: head and skin temperature, first order, time passed in.

Both temperatures obey ``dT/dt = (R·P - (T - T_base)) / τ``: at a steady average power ``P`` they
settle at ``T_base + R·P``, and with no power they relax toward ``T_base`` with time constant ``τ``.
A pulse of energy ``E`` is an impulse of power, so it raises the temperature at once by ``R·E/τ``;
between pulses the temperature relaxes exponentially. Averaged over many pulses at rate ``f``
this is exactly the steady state ``T_base + R·E·f``, with no estimate of average power needed.

- Head: ``T_base`` is the ambient (25 °C); ``R`` in K/W. The ``overheat`` fault injection raises
  the head's target by :attr:`ThermalModel.overheat_rise_c`, above the board's 45 °C cut-off, so
  the head heats toward it (a failed fan or Peltier).
- Skin under the handpiece: ``T_base`` is skin temperature (32 °C) while ``contact`` is closed, and
  the "power" is the irradiance ``P / A`` over the spot area in W/cm². With ``contact`` open the
  sensor sees air: it relaxes toward ambient and pulses do not heat it.

Nothing here reads a clock: every function takes the time that passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "HEAD_CLEAR_C",
    "HEAD_CUTOFF_C",
    "ThermalModel",
    "ThermalState",
    "head_pulse_rise_c",
    "head_steady_state_c",
    "head_target_c",
    "relax",
    "skin_pulse_rise_c",
    "skin_steady_state_c",
    "skin_target_c",
    "spot_area_cm2",
    "time_to_reach_s",
]

HEAD_CUTOFF_C = 45.0  # the board's own cut-off: FAULT OVERTEMP_HEAD
HEAD_CLEAR_C = 43.0  # OVERTEMP_HEAD persists above this


@dataclass(frozen=True, slots=True)
class ThermalModel:
    """Constants of the model. The defaults keep the head below its cut-off at the board's ceiling
    (60 mJ at 500 Hz = 30 W → 40 °C) and let ``overheat`` trip it within a few seconds."""

    ambient_c: float = 25.0
    head_c_per_w: float = 0.5
    head_tau_s: float = 4.0
    overheat_rise_c: float = 30.0
    skin_base_c: float = 32.0
    skin_c_per_w_cm2: float = 0.01
    skin_tau_s: float = 2.0


def spot_area_cm2(spot_um: int) -> float:
    """Area of a round spot of diameter ``spot_um`` µm, in cm²."""
    radius_cm = spot_um * 1e-4 / 2
    return math.pi * radius_cm * radius_cm


def relax(temp_c: float, target_c: float, dt_s: float, tau_s: float) -> float:
    """First-order relaxation of ``temp_c`` toward ``target_c`` over ``dt_s`` seconds."""
    if dt_s <= 0:
        return temp_c
    return target_c + (temp_c - target_c) * math.exp(-dt_s / tau_s)


def head_target_c(model: ThermalModel, *, overheat: bool) -> float:
    """Where the head settles with no pulses."""
    return model.ambient_c + (model.overheat_rise_c if overheat else 0.0)


def skin_target_c(model: ThermalModel, *, contact: bool) -> float:
    """Where the skin sensor settles with no pulses."""
    return model.skin_base_c if contact else model.ambient_c


def head_pulse_rise_c(model: ThermalModel, energy_uj: float) -> float:
    """The head's jump for one pulse of ``energy_uj``."""
    return energy_uj * 1e-6 * model.head_c_per_w / model.head_tau_s


def skin_pulse_rise_c(
    model: ThermalModel, energy_uj: float, spot_um: int, *, contact: bool
) -> float:
    """The skin's jump for one pulse: energy per spot area, and only in contact."""
    if not contact:
        return 0.0
    return energy_uj * 1e-6 / spot_area_cm2(spot_um) * model.skin_c_per_w_cm2 / model.skin_tau_s


def head_steady_state_c(
    model: ThermalModel, avg_power_w: float, *, overheat: bool = False
) -> float:
    """The head's temperature after a long time at ``avg_power_w``."""
    return head_target_c(model, overheat=overheat) + model.head_c_per_w * avg_power_w


def skin_steady_state_c(
    model: ThermalModel, avg_power_w: float, spot_um: int, *, contact: bool = True
) -> float:
    """The skin's temperature after a long time at ``avg_power_w`` through a ``spot_um`` spot."""
    if not contact:
        return model.ambient_c
    return model.skin_base_c + model.skin_c_per_w_cm2 * avg_power_w / spot_area_cm2(spot_um)


def time_to_reach_s(
    temp_c: float, target_c: float, threshold_c: float, tau_s: float
) -> float | None:
    """Seconds until a first-order relaxation from ``temp_c`` toward ``target_c`` reaches
    ``threshold_c`` from below; 0 if already there; None if it never will."""
    if temp_c >= threshold_c:
        return 0.0
    if target_c <= threshold_c:
        return None
    return tau_s * math.log((target_c - temp_c) / (target_c - threshold_c))


class ThermalState:
    """The head and skin temperatures at ``t_us``, moved forward by :meth:`advance_to` and
    :meth:`pulse`. Mutable and slotted: the board calls :meth:`pulse` for every pulse."""

    __slots__ = ("head_c", "model", "skin_c", "t_us")

    def __init__(self, model: ThermalModel | None = None, *, t_us: int = 0) -> None:
        self.model = model or ThermalModel()
        self.head_c = self.model.ambient_c
        self.skin_c = self.model.skin_base_c
        self.t_us = t_us

    def advance_to(self, t_us: int, *, overheat: bool, contact: bool) -> None:
        """Let time pass, with no pulses, until ``t_us`` (earlier times are ignored)."""
        dt_s = (t_us - self.t_us) * 1e-6
        if dt_s <= 0:
            return
        model = self.model
        head_target = head_target_c(model, overheat=overheat)
        skin_target = skin_target_c(model, contact=contact)
        self.head_c = relax(self.head_c, head_target, dt_s, model.head_tau_s)
        self.skin_c = relax(self.skin_c, skin_target, dt_s, model.skin_tau_s)
        self.t_us = t_us

    def pulse(self, energy_uj: float, spot_um: int, *, contact: bool) -> None:
        """One pulse of ``energy_uj`` through a ``spot_um`` spot, at ``t_us``."""
        self.head_c += head_pulse_rise_c(self.model, energy_uj)
        self.skin_c += skin_pulse_rise_c(self.model, energy_uj, spot_um, contact=contact)

    def head_reaches_us(self, threshold_c: float, *, overheat: bool) -> int | None:
        """The time (µs) at which the head reaches ``threshold_c`` if no pulse fires, or None."""
        model = self.model
        seconds = time_to_reach_s(
            self.head_c, head_target_c(model, overheat=overheat), threshold_c, model.head_tau_s
        )
        if seconds is None:
            return None
        # One µs past the exact crossing, so that float rounding cannot leave it just below.
        return self.t_us + math.ceil(seconds * 1e6) + 1
