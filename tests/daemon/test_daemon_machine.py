"""A hypothesis state machine over the daemon itself: operator requests through its real control
socket (sometimes two on separate connections a few milliseconds apart) against the in-process
simulator, with slow replies, dropped frames, reboots, energy drift and the footswitch driven
through the simulator's control.

Invariants, after every step once the daemon has answered: while armed, the limits in force are
those of the parameters the board runs and the zone the session is charged to; a latched breach
leaves the board not emitting; every view of the totals agrees (status, the core's ledger, the
log's live summary; ``session end``'s reply and the log's closing record); an arm the operator was
told is refused leaves nothing armed. Few examples: each starts a daemon (CI time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from devicectl.policy import PulseParams
from devicectl.sessionlog import reader, store
from devicectl.simlink import compose
from tests.daemon.conftest import ACK, END, SESSION, Driver, _settings, policy_file

__all__ = ["policy_file"]  # a fixture, imported for pytest

SETTLE_S = 0.06  # STATUS is every 100 ms; replies are answered well within this


class DaemonMachine(RuleBasedStateMachine):
    directory: Path
    policy: Path
    examples = 0
    seen: ClassVar[collections.Counter[str]] = collections.Counter()  # what a run reached

    def __init__(self) -> None:
        super().__init__()
        DaemonMachine.examples += 1
        base = self.directory / f"example-{DaemonMachine.examples}"
        base.mkdir()
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        settings_ = _settings(base, self.policy, "sim")
        daemon = self.run(self.stack.enter_async_context(compose(settings_)))
        self.driver = Driver(daemon)
        self.run(
            self.driver.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        )
        self.told_refused_arm = False

    def teardown(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        self.run(asyncio.sleep(SETTLE_S))

    def note_reply(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        if request["command"] == "arm":
            self.told_refused_arm = not reply["ok"]
        assert "\n" not in json.dumps(reply)
        if not reply["ok"]:
            assert reply["kind"] in {"refused", "usage", "unreachable"}, reply
            assert "Traceback" not in reply["error"]
        elif request["command"] == "session_end":
            self.check_closing_summary(reply["result"])

    def request_for(self, kind: str, zone: str, energy: int) -> dict[str, Any]:
        return {
            "start": SESSION,
            "zone": {"command": "session_zone", "zone": zone},
            "params": {"command": "params_set", "energy_uj": energy, "width_us": 1000,
                       "rate_hz": 50.0, "spot_um": 300},
            "arm": {"command": "arm"},
            "disarm": {"command": "disarm"},
            "ack": {"command": "fault_ack", **ACK},
            "end": {"command": "session_end", **END},
            "stop": {"command": "stop"},
        }[kind]  # fmt: skip

    # ------------------------------------------------------------ operator requests

    KINDS = st.sampled_from(["start", "zone", "params", "arm", "arm", "disarm", "ack", "end"])
    ZONES = st.sampled_from(["forehead", "periorbital", "cheeks"])
    ENERGIES = st.sampled_from([2000, 5000, 6000, 8000])

    @rule(kind=KINDS, zone=ZONES, energy=ENERGIES)
    def request(self, kind: str, zone: str, energy: int) -> None:
        request = self.request_for(kind, zone, energy)
        self.note_reply(request, self.run(self.driver.call(**request)))
        self.settle()

    @rule(first=KINDS, second=KINDS, zone=ZONES, energy=ENERGIES, gap_ms=st.integers(0, 20))
    def two_at_once(self, first: str, second: str, zone: str, energy: int, gap_ms: int) -> None:
        """Two requests on two connections ``gap_ms`` apart."""
        a, b = self.request_for(first, zone, energy), self.request_for(second, zone, energy)

        async def both() -> tuple[dict[str, Any], dict[str, Any]]:
            one = asyncio.create_task(self.driver.call(**a))
            await asyncio.sleep(gap_ms / 1000)
            two = asyncio.create_task(self.driver.call(**b))
            return await one, await two

        ra, rb = self.run(both())
        self.note_reply(a, ra)
        self.note_reply(b, rb)
        self.settle()

    @rule()
    def treat(self) -> None:
        """The usual way to emission (each step may be refused: the state decides)."""
        for request in (
            {"command": "fault_ack", **ACK},
            SESSION,
            {"command": "session_zone", "zone": "forehead"},
            {"command": "params_set", "energy_uj": 2000, "width_us": 500, "rate_hz": 50.0,
             "spot_um": 300},
            {"command": "arm"},
        ):  # fmt: skip
            self.note_reply(request, self.run(self.driver.call(**request)))
        self.driver.sim("footswitch down")
        self.run(asyncio.sleep(0.2))

    # ------------------------------------------------------------ the simulated board

    @rule(
        words=st.sampled_from([
            "footswitch down", "footswitch up", "fault slow-replies 40", "fault slow-replies 20",
            "fault drop-frames 0.02", "fault energy-drift 1.1", "fault energy-drift 1.35",
            "clear-faults", "reboot",
        ])
    )  # fmt: skip
    def board(self, words: str) -> None:
        self.driver.sim(words)
        self.run(asyncio.sleep(0.15))

    # ------------------------------------------------------------ invariants

    @invariant()
    def armed_on_what_the_board_runs(self) -> None:
        core = self.driver.daemon.core
        board = self.driver.sim("status")
        if not core.armed or board["state"] not in ("READY", "EMITTING"):
            return
        supervisor = core.supervisor
        assert supervisor is not None and supervisor.limits is not None
        runs = board["params"]
        assert runs is not None
        assert supervisor.limits.params == PulseParams(**runs), (supervisor.limits, runs)
        assert supervisor.zone == core.zone

    @invariant()
    def a_latch_leaves_the_board_stopped(self) -> None:
        core = self.driver.daemon.core
        if core.latched is None or core.armed:
            return
        self.run(self.driver.until(lambda: not self.driver.sim("status")["emitting"], 2.0))

    @invariant()
    def nothing_armed_after_a_refused_arm(self) -> None:
        if not self.told_refused_arm:
            return
        assert not self.driver.daemon.core.armed
        self.run(
            self.driver.until(
                lambda: self.driver.sim("status")["state"] not in ("READY", "EMITTING"), 2.0
            )
        )

    @invariant()
    def every_view_of_the_totals_agrees(self) -> None:
        daemon = self.driver.daemon
        # In one tick of the loop (pulses keep arriving): what `status` answers, the ledger, the
        # log's live totals.
        status = daemon.describe()
        ledger = daemon.core.ledger
        log = daemon.sessionlog
        assert log is not None
        live = log.current_summary()
        if ledger is None:
            assert live is None and status["session"] is None
            return
        assert live is not None
        if ledger.pulses:
            DaemonMachine.seen["pulses recorded in a session"] += 1
        if daemon.core.latched is not None:
            DaemonMachine.seen["a breach latched"] += 1
        assert status["session"] == ledger.id == live.session_id
        assert status["session_pulses"] == ledger.pulses == live.pulses
        assert status["energy_by_zone_uj"] == ledger.energy_by_zone_uj == live.energy_per_zone_uj
        assert ledger.unlogged_pulses == live.unlogged_pulses
        assert ledger.faults == live.faults
        contract = daemon.core.contract_summary(0)
        assert contract is not None and contract["pulses"] == ledger.pulses
        assert contract["energy_uj"] == live.total_energy_uj

    def check_closing_summary(self, result: dict[str, Any]) -> None:
        log = self.driver.daemon.sessionlog
        assert log is not None
        log.flush()
        conn = store.connect(log.path, readonly=True)
        try:
            record = reader.load_session(conn, result["session_id"])
        finally:
            conn.close()
        assert record is not None
        ended = [r["body"] for r in record.records if r["kind"] == "session_ended"]
        assert ended and ended[0]["summary"] == result, (ended, result)


def test_the_daemon_under_random_interleavings(tmp_path: Path, policy_file: Path) -> None:
    DaemonMachine.directory, DaemonMachine.policy = tmp_path, policy_file
    DaemonMachine.seen.clear()
    run_state_machine_as_test(
        DaemonMachine,
        settings=settings(
            max_examples=8,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert DaemonMachine.seen["pulses recorded in a session"], DaemonMachine.seen
