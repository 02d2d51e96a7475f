"""Issue 2's integration test: the host link layer over a real pty, opened with pyserial
(pyserial-asyncio-fast, as the daemon opens it), against `devicectl sim --pty` as its own process.

HELLO, params, arm, footswitch, pulses at the set rate, STOP; retransmission through dropped frames
and line noise; the lease stopping emission when heartbeats stop. Rates are judged by the device's
own clock (``t_us`` in each PULSE), never by the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from devicectl.link import DeviceLink
from drivers import open_serial
from protocols import (
    Arm,
    FaultCode,
    FaultEvent,
    GetStatus,
    Message,
    MessageType,
    Pulse,
    SetParams,
    StatusReply,
)
from simulator.control import send_command
from tests.simulator.test_serve_cli import running_sim, short_dir, sim_control_process

__all__ = ["short_dir"]  # the fixture, imported for pytest

pytestmark = pytest.mark.system

RATE_MHZ = 200_000  # 200 Hz: a 5,000 µs period
PERIOD_US = 5_000


async def until(condition: Callable[[], object], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - plain state, polled
            await asyncio.sleep(0.005)


class Host:
    """A DeviceLink on the pty, recording events and replies in wire order."""

    def __init__(self) -> None:
        self.pulses: list[Pulse] = []
        self.faults: list[FaultEvent] = []
        self.order: list[str] = []
        self.link: DeviceLink | None = None

    def on_event(self, _seq: int, message: Message) -> None:
        if type(message) is Pulse:
            self.pulses.append(message)
            self.order.append("pulse")
        elif type(message) is FaultEvent:
            self.faults.append(message)

    def on_reply(self, command: int, _reply: Message) -> None:
        self.order.append(f"reply {MessageType(command).name}")


@contextlib.asynccontextmanager
async def host_on_pty(workdir: Path) -> AsyncIterator[tuple[Host, Any, Path]]:
    with running_sim(workdir, "--pty") as sim:
        host = Host()
        connect = functools.partial(open_serial, sim.address, baudrate=115200)
        async with DeviceLink(
            connect,
            port=sim.address,
            on_event=host.on_event,
            on_reply=host.on_reply,
            backoff=lambda _n: 0.05,
        ) as link:
            host.link = link
            await until(link.connected.is_set)
            yield host, link, sim.control


def sim(control: Path, *words: str) -> None:
    """`devicectl sim-control`, as its own process (as an engineer drives it by hand)."""
    done = sim_control_process(control, *words)
    assert done.returncode == 0, done.stderr


async def test_hello_params_arm_pulses_at_the_set_rate_then_stop(short_dir: Path) -> None:
    async with host_on_pty(short_dir) as (host, link, control):
        assert link.ident is not None and link.ident.proto == 1  # HELLO answered with IDENT
        await link.request(SetParams(2_000, 500, RATE_MHZ, 300))
        await link.request(Arm(1500))
        link.start_heartbeats(1500)
        await asyncio.to_thread(sim, control, "footswitch", "down")
        await until(lambda: len(host.pulses) >= 60)
        await link.stop()
        stopped_at = len(host.order)
        await asyncio.sleep(0.1)  # twenty periods: a PULSE after the ACK of STOP would show
        status = await link.request(GetStatus())

    assert "reply STOP" in host.order
    assert "pulse" not in host.order[host.order.index("reply STOP") :], "PULSE after STOP's ACK"
    assert len(host.order) >= stopped_at
    numbers = [p.pulse_no for p in host.pulses]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # none lost, in order
    intervals = [(b.t_us - a.t_us) & 0xFFFF_FFFF for a, b in itertools.pairwise(host.pulses)]
    assert min(intervals) >= PERIOD_US  # never closer than the period
    assert sum(intervals) / len(intervals) < PERIOD_US * 1.05, intervals  # and at that rate
    for pulse in host.pulses:
        assert 0.94 * 2_000 <= pulse.energy_uj <= 1.06 * 2_000  # measured: σ 2 %, clipped 6 %
    assert isinstance(status, StatusReply) and status.state == 1  # STANDBY
    assert link.stats["lost_events"] == 0


@pytest.mark.parametrize("fault", [("drop-frames", "0.2"), ("line-noise", "0.002")])
async def test_retransmission_recovers_from_a_bad_line(
    short_dir: Path, fault: tuple[str, str]
) -> None:
    async with host_on_pty(short_dir) as (_host, link, control):
        await asyncio.to_thread(sim, control, "fault", *fault)
        for _ in range(40):  # each command answered, some only after a same-SEQ re-send
            reply = await link.request(GetStatus())
            assert isinstance(reply, StatusReply)
        assert link.stats["retries"] > 0, link.stats
        await asyncio.to_thread(sim, control, "clear-faults")


async def test_the_lease_stops_emission_when_heartbeats_stop(short_dir: Path) -> None:
    async with host_on_pty(short_dir) as (host, link, control):
        await link.request(SetParams(2_000, 500, RATE_MHZ, 300))
        await link.request(Arm(300))  # no heartbeats: the host has gone quiet
        await send_command(control, "footswitch down")  # at once: the lease is short
        await until(lambda: host.faults)
        fault = host.faults[0]
        assert fault.code == FaultCode.LEASE_EXPIRED
        last = host.pulses[-1]
        first = host.pulses[0]
        # Every pulse fired within the lease, by the device's clock (the lease began at ARM,
        # before the first pulse).
        assert (last.t_us - first.t_us) & 0xFFFF_FFFF <= 300_000
        count = len(host.pulses)
        await asyncio.sleep(0.1)
        assert len(host.pulses) == count
        status = await link.request(GetStatus())
        assert isinstance(status, StatusReply) and status.state == 4  # FAULT
