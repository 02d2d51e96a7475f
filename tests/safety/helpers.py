"""Builders for supervisor tests: limits made directly, without a policy file or a device."""

from __future__ import annotations

from devicectl.policy import PulseParams, SkinType, Zone
from devicectl.safety import Limits, SessionLimits


def session(
    *,
    device_max_energy_uj: int = 60_000,
    device_max_rate_mhz: int = 500_000,
    max_average_power_w: float = 3.0,
    session_energy_j: float = 300.0,
    energy_tolerance_pct: int = 20,
    min_interval_pct: int = 90,
    skin_temp_max_c: float = 41.0,
    head_temp_max_c: float = 43.0,
    lease_nearly_out_ms: int = 80,
) -> SessionLimits:
    return SessionLimits(
        device_max_energy_uj=device_max_energy_uj,
        device_max_rate_mhz=device_max_rate_mhz,
        max_average_power_w=max_average_power_w,
        session_energy_j=session_energy_j,
        energy_tolerance_pct=energy_tolerance_pct,
        min_interval_pct=min_interval_pct,
        skin_temp_max_c=skin_temp_max_c,
        head_temp_max_c=head_temp_max_c,
        lease_nearly_out_ms=lease_nearly_out_ms,
    )


def limits(
    session_limits: SessionLimits,
    zone: Zone = Zone.CHEEKS,
    params: PulseParams | None = None,
    zone_energy_j: float = 80.0,
) -> Limits:
    return Limits(
        session=session_limits,
        skin_type=SkinType.II,
        zone=zone,
        params=params or PulseParams(energy_uj=10_000, width_us=1000, rate_mhz=10_000, spot_um=300),
        zone_energy_j=zone_energy_j,
        max_fluence_j_cm2=35.0,
        fluence_rule="max_fluence_skin_type_II",
        max_energy_uj=session_limits.device_max_energy_uj,
        max_rate_mhz=session_limits.device_max_rate_mhz,
        min_width_us=100,
        max_width_us=20_000,
        spots_um=(120, 300, 1000, 3000),
    )
