"""The scripted session against a fake daemon and board: order of requests, fresh presses, the
breach wait, and the laser left safe when the script stops half-way. Time is a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devicectl.demo import (
    DemoError,
    DemoProgress,
    TreatmentScript,
    demo_params,
    plan_phases,
    write_demo_policy,
)
from devicectl.demo.run import DEMO_LEASE_MS
from devicectl.demo.script import ACK_REASON, DEMO_PATIENT, POST_CARE, DemoUsers
from devicectl.policy import Concern, SkinType, Zone, load_policy
from devicectl.safety import check_params
from protocols import Ident
from simulator import SPOTS_UM, Board, ThermalModel
from simulator.physics import skin_steady_state_c


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeClinic:
    """A daemon and a board reduced to what the script relies on: one pulse per 0.1 s while
    armed with the footswitch pressed after arming; drift trips a latched breach."""

    def __init__(self, clock: FakeClock, *, drift_trips: bool = True) -> None:
        self.clock = clock
        self.drift_trips = drift_trips
        self.log: list[str] = []
        self.armed = False
        self.pressed = False
        self.fresh_press = False
        self.drift = False
        self.breach: dict[str, Any] | None = None
        self.pulses = 0
        self.session_open = False
        self.device_count = 40
        self.last_tick = clock.now

    def _tick(self) -> None:
        steps = int((self.clock.now - self.last_tick) / 0.1)
        self.last_tick += steps * 0.1
        for _ in range(steps):
            if not (self.armed and self.pressed and self.fresh_press):
                return
            self.pulses += 1
            self.device_count += 1
            if self.drift and self.drift_trips:
                self.breach = {"code": "energy_out_of_tolerance", "pulse_no": self.device_count}
                self.armed = False
                return

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self._tick()
        command = request["command"]
        if command != "status":
            self.log.append(command)
        if command not in {"status", "stop", "disarm"}:  # these change no treatment
            assert request["auth"] == USERS.operator, request
        match command:
            case "status":
                return {
                    "device_serial": "51000001",
                    "state": "ready" if self.armed else "standby",
                    "armed": self.armed,
                    "footswitch": self.pressed,
                    "session": 7 if self.session_open else None,
                    "session_pulses": self.pulses if self.session_open else 0,
                    "pulse_count": self.device_count,
                    "energy_by_zone_uj": {},
                    "breach_latched": self.breach,
                }
            case "session_start":
                assert request["patient_ref"] == DEMO_PATIENT
                assert all(isinstance(v, bool) for v in request["checklist"].values())
                self.session_open = True
                return {"session": 7}
            case "arm":
                if self.breach is not None:
                    raise DemoError("refused: breach latched")
                self.armed, self.fresh_press = True, False
                return {"armed": True}
            case "disarm" | "stop":
                self.armed = False
                return {"armed": False}
            case "fault_ack":
                assert request["signoff"]["reason"] == ACK_REASON
                assert request["signoff"]["user"] == USERS.supervisor["user"]
                self.breach = None
                return {}
            case "session_end":
                assert request["post_care"] == list(POST_CARE)
                self.session_open = False
                return {"pulses": self.pulses}
        return {}

    async def sim(self, words: str) -> Any:
        self._tick()
        self.log.append(f"sim {words}")
        if words == "status":
            return {"pulse_count": self.device_count}
        if words == "footswitch down":
            self.pressed, self.fresh_press = True, self.armed
        elif words == "footswitch up":
            self.pressed = False
        elif words.startswith("fault energy-drift"):
            self.drift = True
        elif words == "clear-faults":
            self.drift = False
        return words


USERS = DemoUsers(
    operator={"user": "DEMO-OP", "pin": "op-pin-123"},
    supervisor={"user": "DEMO-SUP", "pin": "sup-pin-123"},
)


def _script(clinic: FakeClinic, clock: FakeClock, duration: float = 10.0) -> TreatmentScript:
    policy = load_policy(None)
    params = demo_params(10.0, policy.presets[Concern.FINE_LINES], policy)
    return TreatmentScript(
        clinic,
        plan_phases(duration),
        params,
        DemoProgress(),
        USERS,
        sleep=clock.sleep,
        clock=clock,
    )


async def test_script_plays_every_step_in_order_and_counts_agree() -> None:
    clock = FakeClock()
    clinic = FakeClinic(clock)
    script = _script(clinic, clock)
    record = await script.play()

    assert record.completed
    assert record.session_id == 7
    assert clinic.log == [
        "sim status",
        "session_start",
        "session_zone",
        "params_set",
        "arm",
        "sim footswitch down",
        "sim footswitch up",
        "disarm",
        "session_zone",
        "arm",
        "sim footswitch down",
        "sim fault energy-drift 1.3",
        "sim footswitch up",
        "sim clear-faults",
        "fault_ack",
        "arm",
        "sim footswitch down",
        "sim footswitch up",
        "disarm",
        "session_end",
        "session_reaction",
        "sim status",
    ]
    assert record.breach is not None
    assert record.breach["code"] == "energy_out_of_tolerance"
    assert record.daemon_pulses == clinic.pulses > 0
    assert record.device_count_after is not None
    assert record.device_count_before is not None
    assert record.device_count_after - record.device_count_before == clinic.pulses
    assert record.end_summary == {"pulses": clinic.pulses}
    assert script.progress.pulses == clinic.pulses  # the closed session's totals stay shown
    assert script.progress.phase == "close"
    assert not script.progress.armed
    assert 9.0 <= clock.now - 1000.0 <= 11.0  # the phases add up to the duration asked for


async def test_no_breach_is_a_one_line_failure_and_the_laser_is_left_safe() -> None:
    clock = FakeClock()
    clinic = FakeClinic(clock, drift_trips=False)
    script = _script(clinic, clock)
    with pytest.raises(DemoError, match="did not trip the supervisor"):
        await script.play()
    assert not script.record.completed
    assert clinic.log[-2:] == ["sim footswitch up", "stop"]
    assert not clinic.armed
    assert not clinic.pressed


def test_phases_scale_with_the_duration_and_bad_durations_are_named() -> None:
    short, long = plan_phases(10.0), plan_phases(40.0)
    assert [p.name for p in short] == [p.name for p in long]
    assert sum(p.seconds for p in short) == pytest.approx(10.0)
    assert sum(p.seconds for p in long) == pytest.approx(40.0)
    with pytest.raises(DemoError, match="--duration 1 s"):
        plan_phases(1.0)


def _sim_ident() -> Ident:
    return Board(max_rate_mhz=2_000_000).ident


@pytest.mark.parametrize("speed", [1.0, 10.0, 25.0, 100.0, 500.0, 2000.0])
def test_params_at_any_speed_stay_clear_of_every_limit(speed: float) -> None:
    policy = load_policy(None)
    preset = policy.presets[Concern.FINE_LINES]
    params = demo_params(speed, preset, policy)
    assert params.rate_mhz == round(speed * 1000)
    assert params.average_power_w <= 0.8 * policy.max_average_power_w + 1e-9
    assert params.width_us < params.period_us
    assert 500 <= params.energy_uj <= preset.energy_uj  # the simulated board's range
    assert params.spot_um in SPOTS_UM
    assert params.spot_um >= preset.spot_um
    skin = skin_steady_state_c(ThermalModel(), params.average_power_w, params.spot_um)
    assert skin <= policy.skin_temp_max_c - 3.0
    # The supervisor's own pre-emission check agrees, for the demo's skin type and zones.
    for zone in (Zone.FOREHEAD, Zone.CHEEKS):
        check_params(_sim_ident(), policy, SkinType.III, zone, params)


def test_speed_outside_the_range_is_named() -> None:
    policy = load_policy(None)
    with pytest.raises(DemoError, match="--speed 5000 Hz"):
        demo_params(5000.0, policy.presets[Concern.FINE_LINES], policy)


def test_the_demo_policy_changes_only_the_lease(tmp_path: Path) -> None:
    packaged = load_policy(None)
    demo = load_policy(write_demo_policy(tmp_path))
    assert demo.lease_ms == DEMO_LEASE_MS > packaged.lease_ms
    assert demo.model_copy(update={"lease_ms": packaged.lease_ms}) == packaged
