"""The clinic policy: the middle layer of the safety limits (docs/safety-model.md).

A clinic's policy is a TOML file; when none is configured the packaged default
(``devicectl/defaults/policy.toml``) is used. Its numbers are ILLUSTRATIVE, NOT CLINICAL GUIDANCE:
a clinic sets its own with its medical lead. The file gives

- the maximum fluence (J/cm²) per Fitzpatrick skin type I-VI, non-increasing towards darker types
  (to avoid post-inflammatory hyperpigmentation);
- the maximum average power (W), the per-session energy (J), and per zone (forehead,
  periorbital, perioral, cheeks, neck, decollete, hands) an energy limit (J) and optionally a
  tighter fluence cap;
- the supervisor's tolerances: measured energy within ±``energy_tolerance_pct`` of the setpoint,
  pulses no closer than ``min_interval_pct`` of the set period; skin and head temperature limits;
  the lease length and the "lease nearly out" threshold;
- treatment presets per concern with default pulse parameters and the active ingredient.

Every number is strict and bounded (see :data:`_BOUNDS` and ``docs/safety-model.md``): finite
(``inf`` or ``nan`` would switch a limit off), of its own type (``true`` is not 1, ``"5"`` is not 5,
``2.5`` is not an integer; an integer is a fine real number), and inside a sanity range wide enough
for any clinic and narrow enough to catch a typo. The ranges are not clinical guidance either.

Loading checks every preset against the policy for each skin type it is allowed for, so a policy
that would offer a preset it forbids is refused at start, with the key, the value and the bound.
Units follow the wire protocol: ``_uj`` µJ, ``_us`` µs, ``_mhz`` millihertz, ``_um`` µm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from devicectl.errors import ConfigError
from protocols.bounded import BoundedInputError, loads_toml
from protocols.messages import LEASE_MAX_MS, LEASE_MIN_MS, SetParams

__all__ = [
    "Concern",
    "Policy",
    "PolicySource",
    "Preset",
    "PulseParams",
    "SkinType",
    "Zone",
    "ZonePolicy",
    "average_power_w",
    "fluence_j_cm2",
    "load_policy",
    "load_policy_with_source",
    "parse_policy",
    "spot_area_cm2",
]


class SkinType(IntEnum):
    """Fitzpatrick skin type; a larger value is a darker skin."""

    I = 1  # noqa: E741 - the clinical name
    II = 2
    III = 3
    IV = 4
    V = 5
    VI = 6

    @classmethod
    def parse(cls, value: object) -> SkinType:
        """``"IV"``, ``"iv"``, ``4`` or ``"4"`` -> :attr:`IV`; anything else raises ValueError."""
        if isinstance(value, SkinType):
            return value
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            text = value.strip().upper()
            if text in cls.__members__:
                return cls[text]
            if text.isdigit():
                number = int(text)
        if number is not None and 1 <= number <= 6:
            return cls(number)
        raise ValueError(f"a Fitzpatrick skin type I-VI, not {value!r}")


class Zone(StrEnum):
    FOREHEAD = "forehead"
    PERIORBITAL = "periorbital"
    PERIORAL = "perioral"
    CHEEKS = "cheeks"
    NECK = "neck"
    DECOLLETE = "decollete"
    HANDS = "hands"


class Concern(StrEnum):
    FINE_LINES = "fine_lines"
    LAXITY = "laxity"
    ACNE_SCARS = "acne_scars"
    PIGMENTATION = "pigmentation"
    DEHYDRATION = "dehydration"
    SUN_DAMAGE = "sun_damage"


def spot_area_cm2(spot_um: int) -> float:
    """A = π(d/2)², in cm² (1 µm = 1e-4 cm)."""
    radius_cm = spot_um * 1e-4 / 2.0
    return math.pi * radius_cm * radius_cm


def fluence_j_cm2(energy_uj: float, spot_um: int) -> float:
    """F = E/A, in J/cm²."""
    return energy_uj * 1e-6 / spot_area_cm2(spot_um)


def average_power_w(energy_uj: float, rate_mhz: float) -> float:
    """P = E·f, in W."""
    return energy_uj * 1e-6 * rate_mhz * 1e-3


@dataclass(frozen=True, slots=True)
class PulseParams:
    """The parameters of SET_PARAMS, in wire units."""

    energy_uj: int
    width_us: int
    rate_mhz: int
    spot_um: int

    @property
    def period_us(self) -> float:
        return 1e9 / self.rate_mhz

    @property
    def fluence_j_cm2(self) -> float:
        return fluence_j_cm2(self.energy_uj, self.spot_um)

    @property
    def average_power_w(self) -> float:
        return average_power_w(self.energy_uj, self.rate_mhz)

    def as_command(self) -> SetParams:
        return SetParams(self.energy_uj, self.width_us, self.rate_mhz, self.spot_um)


SkinTypeKey = Annotated[SkinType, BeforeValidator(SkinType.parse)]
_STRICT = ConfigDict(frozen=True, extra="forbid")


def _number_text(bound: float) -> str:
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True, slots=True)
class _Bounds:
    """What one policy number allows: a type, a range and a unit; the validator of that number.

    ``above`` excludes ``low`` itself (a limit of 0 is not a limit). A bool is refused although
    Python calls it an int, and so is text: a quoted number in a safety file is a typo to report,
    not an intent to guess.
    """

    integer: bool
    low: float
    high: float
    unit: str
    above: bool = False

    @property
    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        high = f"{_number_text(self.high)} {self.unit}"
        if self.above:
            return f"{kind} above {_number_text(self.low)} and at most {high}"
        return f"{kind} from {_number_text(self.low)} to {high}"

    def __call__(self, value: object) -> int | float:
        wrong_type = isinstance(value, bool) or (self.integer and isinstance(value, float))
        if wrong_type or not isinstance(value, int | float):
            raise PydanticCustomError("policy_number", "{allowed}", {"allowed": self.allowed})
        # ints compare exactly, however large; only a float can be inf or nan
        finite = not isinstance(value, float) or math.isfinite(value)
        low_ok = value > self.low if self.above else value >= self.low
        if not (finite and low_ok and value <= self.high):
            raise PydanticCustomError("policy_number", "{allowed}", {"allowed": self.allowed})
        return value if self.integer else float(value)


# Sanity ranges: the tightest layer is still the clinic's own numbers and the device's IDENT.
# Wide enough for any clinic (the soak policy's 100 kJ session fits), narrow enough to refuse a
# typo or a switched-off limit; the preset ranges also keep SET_PARAMS inside its u32/u16 fields.
_BOUNDS: dict[str, _Bounds] = {
    "fluence": _Bounds(integer=False, low=0, high=1_000, unit="J/cm²", above=True),
    "power": _Bounds(integer=False, low=0, high=100, unit="W", above=True),
    "energy": _Bounds(integer=False, low=0, high=1_000_000, unit="J", above=True),
    "tolerance": _Bounds(integer=True, low=1, high=50, unit="%"),
    "interval": _Bounds(integer=True, low=50, high=100, unit="%"),
    "skin_temp": _Bounds(integer=False, low=30, high=45, unit="°C"),
    "head_temp": _Bounds(integer=False, low=25, high=60, unit="°C"),
    "lease": _Bounds(integer=True, low=LEASE_MIN_MS, high=LEASE_MAX_MS, unit="ms"),
    "lease_nearly_out": _Bounds(integer=True, low=1, high=LEASE_MAX_MS, unit="ms"),
    "pulse_energy": _Bounds(integer=True, low=1, high=10_000_000, unit="µJ"),
    "width": _Bounds(integer=True, low=1, high=1_000_000, unit="µs"),
    "rate": _Bounds(integer=False, low=0.001, high=10_000, unit="Hz"),
    "spot": _Bounds(integer=True, low=10, high=50_000, unit="µm"),
}
_FluenceJcm2 = Annotated[float, PlainValidator(_BOUNDS["fluence"])]
_EnergyJ = Annotated[float, PlainValidator(_BOUNDS["energy"])]


def _distinct_skin_types(value: object) -> object:
    """Refuse a fluence table naming a type twice ("VI" and "6"): the file order would pick one."""
    if not isinstance(value, dict):
        return value
    seen: dict[SkinType, object] = {}
    for key in value:
        try:
            skin = SkinType.parse(key)
        except ValueError:
            continue  # the key's own validation names it
        if skin in seen:
            raise PydanticCustomError(
                "policy_skin_type_twice",
                "each skin type once ({skin} given as {first} and {second})",
                {"skin": skin.name, "first": repr(seen[skin]), "second": repr(key)},
            )
        seen[skin] = key
    return value


def _some_skin_types(value: tuple[SkinType, ...]) -> tuple[SkinType, ...]:
    if not value:
        raise PydanticCustomError(
            "policy_no_skin_type", "at least one skin type I-VI (omit the key for all six)"
        )
    return value


SkinTypes = Annotated[tuple[SkinTypeKey, ...], AfterValidator(_some_skin_types)]


class ZonePolicy(BaseModel):
    model_config = _STRICT
    energy_j: _EnergyJ = Field(description="cumulative energy limit for this zone in a session")
    max_fluence_j_cm2: _FluenceJcm2 | None = Field(
        default=None, description="a fluence cap tighter than the skin type's, if any"
    )


class Preset(BaseModel):
    """Default parameters for one concern."""

    model_config = _STRICT
    energy_uj: Annotated[int, PlainValidator(_BOUNDS["pulse_energy"])]
    width_us: Annotated[int, PlainValidator(_BOUNDS["width"])]
    rate_hz: Annotated[float, PlainValidator(_BOUNDS["rate"])]
    spot_um: Annotated[int, PlainValidator(_BOUNDS["spot"])]
    active_ingredient: str = Field(min_length=1)
    skin_types: SkinTypes = tuple(SkinType)

    def params(self) -> PulseParams:
        """These defaults in wire units (rate in mHz)."""
        return PulseParams(self.energy_uj, self.width_us, round(self.rate_hz * 1000), self.spot_um)


class Policy(BaseModel):
    """A clinic policy, validated. Build with :func:`load_policy` or :func:`parse_policy`."""

    model_config = _STRICT
    max_fluence_j_cm2: Annotated[
        dict[SkinTypeKey, _FluenceJcm2], BeforeValidator(_distinct_skin_types)
    ]
    max_average_power_w: Annotated[float, PlainValidator(_BOUNDS["power"])]
    session_energy_j: _EnergyJ
    energy_tolerance_pct: Annotated[int, PlainValidator(_BOUNDS["tolerance"])]
    min_interval_pct: Annotated[int, PlainValidator(_BOUNDS["interval"])]
    skin_temp_max_c: Annotated[float, PlainValidator(_BOUNDS["skin_temp"])]
    head_temp_max_c: Annotated[float, PlainValidator(_BOUNDS["head_temp"])]
    lease_ms: Annotated[int, PlainValidator(_BOUNDS["lease"])]
    lease_nearly_out_ms: Annotated[int, PlainValidator(_BOUNDS["lease_nearly_out"])]
    zones: dict[Zone, ZonePolicy]
    presets: dict[Concern, Preset]

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        _check_coherent(self)
        return self

    def zone(self, zone: Zone) -> ZonePolicy:
        return self.zones[zone]

    def max_fluence(self, skin_type: SkinType, zone: Zone) -> tuple[float, str]:
        """The fluence cap for a session layer, and which rule set it (the tighter wins)."""
        cap, rule = self.max_fluence_j_cm2[skin_type], f"max_fluence_skin_type_{skin_type.name}"
        zone_cap = self.zones[zone].max_fluence_j_cm2
        if zone_cap is not None and zone_cap < cap:
            cap, rule = zone_cap, f"max_fluence_zone_{zone.value}"
        return cap, rule


class _PolicyRefused(ValueError):
    """Raised inside validation, converted to ConfigError with its key at the boundary."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(allowed)


def _check_coherent(policy: Policy) -> None:
    missing = [t.name for t in SkinType if t not in policy.max_fluence_j_cm2]
    if missing:
        raise _PolicyRefused(
            "max_fluence_j_cm2", sorted(k.name for k in policy.max_fluence_j_cm2),
            f"a fluence for every skin type I-VI (missing {', '.join(missing)})",
        )  # fmt: skip
    previous: tuple[SkinType, float] | None = None
    for skin in SkinType:
        cap = policy.max_fluence_j_cm2[skin]  # finite and positive: _BOUNDS["fluence"]
        if previous is not None and cap > previous[1]:
            raise _PolicyRefused(
                f"max_fluence_j_cm2.{skin.name}", cap,
                f"at most {previous[1]:g} J/cm² (type {previous[0].name}): darker types get lower "
                "fluence",
            )  # fmt: skip
        previous = (skin, cap)
    missing_zones = [z.value for z in Zone if z not in policy.zones]
    if missing_zones:
        raise _PolicyRefused(
            "zones",
            sorted(policy.zones),
            f"a table for every zone (missing {', '.join(missing_zones)})",
        )
    if policy.lease_nearly_out_ms >= policy.lease_ms:
        raise _PolicyRefused(
            "lease_nearly_out_ms", policy.lease_nearly_out_ms,
            f"less than lease_ms ({policy.lease_ms} ms)",
        )  # fmt: skip
    for concern, preset in policy.presets.items():
        _check_preset(policy, concern, preset)


def _check_preset(policy: Policy, concern: Concern, preset: Preset) -> None:
    key = f"presets.{concern.value}"
    params = preset.params()  # at least 1 mHz: _BOUNDS["rate"]
    if params.width_us >= params.period_us:
        raise _PolicyRefused(
            f"{key}.width_us", preset.width_us,
            f"shorter than the period {params.period_us:g} µs at {preset.rate_hz:g} Hz",
        )  # fmt: skip
    power = params.average_power_w
    if power > policy.max_average_power_w:
        raise _PolicyRefused(
            f"{key}.rate_hz", preset.rate_hz,
            f"a rate whose average power ({power:.3g} W) is within max_average_power_w "
            f"{policy.max_average_power_w:g} W",
        )  # fmt: skip
    fluence = params.fluence_j_cm2
    for skin in preset.skin_types:
        cap = policy.max_fluence_j_cm2[skin]
        if fluence > cap:
            most_uj = math.floor(cap * spot_area_cm2(preset.spot_um) * 1e6)
            raise _PolicyRefused(
                f"{key}.energy_uj", preset.energy_uj,
                f"at most {most_uj} µJ at {preset.spot_um} µm for skin type {skin.name} "
                f"(fluence {fluence:.3g} J/cm² above max_fluence_j_cm2.{skin.name} = {cap:g}), "
                "or leave that type out of skin_types",
            )  # fmt: skip


def _error_from_validation(exc: ValidationError, source: str) -> ConfigError:
    """The first problem as a one-line ConfigError naming the key, the value and what is allowed."""
    first = exc.errors()[0]
    context = first.get("ctx") or {}
    cause = context.get("error")
    if isinstance(cause, _PolicyRefused):
        return ConfigError(f"policy.{cause.key}", cause.value, f"{cause.allowed} (in {source})")
    key = ".".join(str(part) for part in first["loc"]) or "<file>"
    value: Any = first.get("input")
    if first["type"] == "missing":
        value = None
    return ConfigError(f"policy.{key}", value, f"{first['msg']} (in {source})")


def parse_policy(data: dict[str, Any], source: str = "<policy>") -> Policy:
    """Validate a policy already read from TOML; raise ConfigError on the first bad key."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise _error_from_validation(exc, source) from None


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Which policy is in force, for the record: its name (the file, or the packaged default)
    and the SHA-256 of the exact bytes that were parsed."""

    name: str
    sha256: str


def load_policy(path: Path | None = None) -> Policy:
    """Read and validate the policy at ``path``, or the packaged default when ``None``."""
    return load_policy_with_source(path)[0]


def load_policy_with_source(path: Path | None = None) -> tuple[Policy, PolicySource]:
    """:func:`load_policy`, with the name and SHA-256 of the bytes it parsed (one read)."""
    if path is None:
        resource = resources.files("devicectl") / "defaults" / "policy.toml"
        source = "the packaged default policy"
        raw = resource.read_bytes()
    else:
        source = str(path)
        if not source.strip() or source == ".":
            raise ConfigError("policy", source, "a TOML file path (an empty one is refused)")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                "policy", str(path), f"a readable TOML file ({exc.strerror})"
            ) from None
    try:
        data = loads_toml(raw)  # UTF-8, at most 1 MiB and 16 levels deep
    except BoundedInputError as exc:
        raise ConfigError("policy", source, f"a UTF-8 TOML file: {exc.reason}") from None
    name = "packaged default policy" if path is None else str(path)
    return parse_policy(data, source), PolicySource(name, hashlib.sha256(raw).hexdigest())
