"""The limits the page draws bars and lines against, from the clinic policy the daemon enforces.

The telemetry carries what was delivered, not what is allowed, so the dashboard reads the same
policy file as the daemon, with the daemon's own loader (:func:`devicectl.policy.load_policy`): a
policy the daemon would refuse (``inf``, ``nan``, a darker skin type allowed more, an unknown zone)
is refused here too, with the same one line. These only draw the page: enforcing them is the
daemon's supervisor's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devicectl.policy import Policy, load_policy

__all__ = ["DEFAULT_SKIN_TEMP_LIMIT_C", "DisplayLimits", "display_limits", "load_display_limits"]

DEFAULT_SKIN_TEMP_LIMIT_C = 41.0  # docs/safety-model.md


@dataclass(frozen=True, slots=True)
class DisplayLimits:
    zone_energy_j: Mapping[str, float] = field(default_factory=dict)
    session_energy_j: float | None = None
    skin_temp_max_c: float = DEFAULT_SKIN_TEMP_LIMIT_C


def display_limits(policy: Policy) -> DisplayLimits:
    """What the page draws from a validated policy."""
    return DisplayLimits(
        {zone.value: table.energy_j for zone, table in policy.zones.items()},
        policy.session_energy_j,
        policy.skin_temp_max_c,
    )


def load_display_limits(path: Path | None = None) -> DisplayLimits:
    """Limits from a policy TOML file, else the packaged default policy.

    Raises ConfigError naming the file and the key, as ``devicectl run`` would for that policy.
    """
    return display_limits(load_policy(path))
