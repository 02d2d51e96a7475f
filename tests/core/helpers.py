"""Builders for treatment-core tests: a device's IDENT and STATUS, and a few conversations."""

from __future__ import annotations

from devicectl.core import (
    STOP,
    ArmLaser,
    ChangeZone,
    Effect,
    OpenSession,
    Refuse,
    Reply,
    Send,
    SetParams,
    StartSession,
    TreatmentCore,
)
from devicectl.errors import DevicectlError
from devicectl.policy import PulseParams, SkinType, Zone, load_policy
from protocols.messages import DeviceState, FaultCode, Ident, MessageType, StatusReport

IDENT = Ident(
    proto=1,
    fw=(1, 0, 0),
    serial=4242,
    wavelength_nm=1550,
    max_energy_uj=60_000,
    min_width_us=100,
    max_width_us=20_000,
    max_rate_mhz=500_000,
    spots_um=(120, 300, 1000, 3000),
)
PARAMS = PulseParams(energy_uj=6_000, width_us=1_000, rate_mhz=10_000, spot_um=300)
PERIOD_US = 100_000  # 10 Hz
NOW = 1_800_000_000_000_000_000  # ns; the core never reads a clock


def status(
    pulse_count: int = 0,
    state: int = DeviceState.STANDBY,
    *,
    faults: int = 0,
    interlocks: int = 0,
    lease_left_ms: int = 0,
) -> StatusReport:
    return StatusReport(state, interlocks, faults, pulse_count, 2500, 3000, lease_left_ms)


def lease_expired() -> StatusReport:
    return status(state=DeviceState.FAULT, faults=FaultCode.LEASE_EXPIRED.bit)


def connected(pulse_count: int = 0) -> TreatmentCore:
    core = TreatmentCore(load_policy(), lease_ms=1500)
    core.on_connected(IDENT, status(pulse_count), 0.0)
    return core


def last(effects: list[Effect]) -> Effect:
    assert effects, "no effects"
    return effects[-1]


def reply(effects: list[Effect]) -> dict[str, object]:
    outcome = last(effects)
    assert isinstance(outcome, Reply), effects
    return dict(outcome.result)


def refusal(effects: list[Effect]) -> DevicectlError:
    outcome = last(effects)
    assert isinstance(outcome, Refuse), effects
    return outcome.error


def ack(core: TreatmentCore, effects: list[Effect], *, acked: bool = True) -> list[Effect]:
    """The device answers the command the effects end with; the request goes on."""
    outcome = last(effects)
    assert isinstance(outcome, Send), effects
    command = outcome.command.TYPE
    out = core.on_reply(command, acked)
    error = None if acked else DevicectlError(f"the device refused {command}: NAK")
    if not acked:
        from devicectl.errors import DeviceRefused

        error = DeviceRefused(MessageType(command).name, "BAD_STATE")
    return out + core.settled(command, error, NOW)


def open_session(core: TreatmentCore, session_id: int = 1) -> None:
    start = StartSession("OP-7", "PT-0042", SkinType.III, active_ingredient="hyaluronic acid")
    effects = core.begin(start, NOW)
    assert isinstance(last(effects), OpenSession), effects
    reply(core.session_opened(session_id, NOW))


def ready(core: TreatmentCore, zone: Zone = Zone.FOREHEAD, params: PulseParams = PARAMS) -> None:
    """Session open, zone chosen, params acknowledged: ready to arm."""
    open_session(core)
    reply(core.begin(ChangeZone("OP-7", zone), NOW))
    set_params = SetParams("OP-7", params.energy_uj, params.width_us, params.rate_mhz,
                           params.spot_um)  # fmt: skip
    reply(ack(core, core.begin(set_params, NOW)))


def armed(zone: Zone = Zone.FOREHEAD, params: PulseParams = PARAMS) -> TreatmentCore:
    core = connected()
    ready(core, zone, params)
    reply(ack(core, core.begin(ArmLaser("OP-7"), NOW)))
    assert core.armed
    return core


def stopped(effects: list[Effect]) -> bool:
    return STOP in effects
