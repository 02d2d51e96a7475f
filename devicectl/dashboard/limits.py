"""The limits the page draws bars and lines against, read from the clinic policy file.

The telemetry carries what was delivered, not what is allowed, so the dashboard reads the same
policy file as the daemon (``[zones] <zone> = { energy_j = ... }``, ``session_energy_j``,
``skin_temp_max_c``). These only draw the page: enforcing them is the daemon's supervisor's job.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from devicectl.errors import ConfigError

__all__ = ["DEFAULT_SKIN_TEMP_LIMIT_C", "DisplayLimits", "load_display_limits"]

DEFAULT_SKIN_TEMP_LIMIT_C = 41.0  # docs/safety-model.md


@dataclass(frozen=True, slots=True)
class DisplayLimits:
    zone_energy_j: Mapping[str, float] = field(default_factory=dict)
    session_energy_j: float | None = None
    skin_temp_max_c: float = DEFAULT_SKIN_TEMP_LIMIT_C


def _positive(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _from_policy(data: Mapping[str, Any], source: str) -> DisplayLimits:
    zones: dict[str, float] = {}
    raw_zones = data.get("zones", {})
    if not isinstance(raw_zones, Mapping):
        raise ConfigError("zones", raw_zones, f"a table of zones in {source}")
    for name, table in raw_zones.items():
        energy = _positive(table.get("energy_j")) if isinstance(table, Mapping) else None
        if energy is None:
            raise ConfigError(f"zones.{name}.energy_j", table, f"a positive number in {source}")
        zones[str(name)] = energy
    skin = data.get("skin_temp_max_c", DEFAULT_SKIN_TEMP_LIMIT_C)
    skin_c = _positive(skin)
    if skin_c is None:
        raise ConfigError("skin_temp_max_c", skin, f"a positive number in {source}")
    return DisplayLimits(zones, _positive(data.get("session_energy_j")), skin_c)


def load_display_limits(path: Path | None = None) -> DisplayLimits:
    """Limits from a policy TOML file; without one, the packaged default policy if installed.

    Raises ConfigError naming the file and the field when the file cannot be used.
    """
    if path is None:
        packaged = resources.files("devicectl").joinpath("defaults/policy.toml")
        if not packaged.is_file():
            return DisplayLimits()
        text, source = packaged.read_text(encoding="utf-8"), "the packaged default policy"
    else:
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError("policy", str(path), f"a readable policy file ({exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("policy", source, f"valid TOML ({exc})") from exc
    return _from_policy(data, source)
