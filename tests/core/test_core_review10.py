"""Adversarial review of the treatment core (issue 10): orderings of requests, replies and
faults that charged a dose to the wrong zone or left the laser armed, each failing before its
fix."""

from __future__ import annotations

from devicectl.core import ArmLaser, ChangeZone, Refused, Reply, Send
from devicectl.policy import PulseParams, Zone
from protocols.messages import DeviceState, MessageType
from tests.core.helpers import (
    IDENT,
    NOW,
    PERIOD_US,
    armed,
    connected,
    ready,
    refusal,
    status,
)


def test_a_zone_change_while_the_device_may_still_fire_is_refused() -> None:
    """The link is lost while armed: the device may go on firing under its lease until the STOP
    sent after the next IDENT is acknowledged, on the handpiece's zone. A zone change in that
    time (it needs no device) charged the pulses found on reconnection to the new zone, and
    judged them against its budget, not the forehead's."""
    core = armed(Zone.FOREHEAD, PulseParams(8_000, 1_000, 10_000, 300))
    for i in range(3):
        core.on_pulse(1 + i, i * PERIOD_US, 8_000)
    core.on_link_lost("no STATUS for 3 periods", 10.0)
    assert core.supervisor is not None and core.supervisor.armed  # until STOP's ACK
    error = refusal(core.begin(ChangeZone("OP-7", Zone.PERIORBITAL), NOW))
    assert isinstance(error, Refused) and error.rule == "disarm_first", error
    # On reconnection the device counts 8: pulses 4..8 were fired on the forehead.
    core.on_connected(IDENT, status(8, DeviceState.EMITTING, lease_left_ms=500), 11.0)
    assert core.ledger is not None
    by_zone = core.ledger.energy_by_zone_uj
    assert by_zone == {"forehead": 3 * 8_000 + 5 * IDENT.max_energy_uj}, by_zone
    core.on_reply(MessageType.STOP, True)
    assert not core.supervisor.armed
    # Once the device cannot fire, the zone changes.
    core.take_effects()
    assert isinstance(core.begin(ChangeZone("OP-7", Zone.PERIORBITAL), NOW)[-1], Reply)


def test_an_arm_stopped_between_its_ack_and_its_reply_says_it_was_stopped() -> None:
    """ARM's ACK, then the operator's STOP and its ACK, then the arm's reply: refused as stopped,
    not as "a limit changed during ARM" (which sends the operator looking for a limit)."""
    core = connected()
    ready(core)
    effects = core.begin(ArmLaser("OP-7"), NOW)
    assert isinstance(effects[-1], Send) and effects[-1].command.TYPE == MessageType.ARM
    core.on_reply(MessageType.ARM, True)
    assert core.armed
    core.on_stop_requested()
    core.on_reply(MessageType.STOP, True)
    error = refusal(core.settled(MessageType.ARM, None, NOW))
    assert isinstance(error, Refused) and error.rule == "stopped", error
    assert not core.armed and core.busy is None


def test_after_a_lost_link_arm_sends_the_parameters_again() -> None:
    """The device may have rebooted while the link was down (its BOOT event lost with the link):
    it then holds no parameters. `arm` sent ARM on the strength of the parameters acknowledged
    before the outage, and the device refused it (NOT_CONFIGURED) on every try."""
    core = connected()
    ready(core)
    assert core.acked is not None
    core.on_link_lost("no STATUS for 3 periods", 10.0)
    core.on_connected(IDENT, status(0), 12.0)
    effects = core.begin(ArmLaser("OP-7"), NOW)
    assert isinstance(effects[-1], Send), effects
    assert effects[-1].command.TYPE == MessageType.SET_PARAMS, effects[-1]


def test_an_arm_stopped_before_the_stop_is_acknowledged_is_refused_too() -> None:
    core = connected()
    ready(core)
    core.begin(ArmLaser("OP-7"), NOW)
    core.on_reply(MessageType.ARM, True)
    core.on_stop_requested()  # STOP written; its ACK still on the way
    error = refusal(core.settled(MessageType.ARM, None, NOW))
    assert isinstance(error, Refused) and error.rule == "stopped", error
    core.on_reply(MessageType.STOP, True)
    assert not core.armed and core.busy is None
