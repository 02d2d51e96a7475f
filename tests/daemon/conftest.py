"""A daemon on the in-process simulator, driven through its real control socket."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from devicectl.config import load_settings
from devicectl.daemon import Daemon
from devicectl.sessionlog import reader, store
from devicectl.simlink import compose
from devicectl.users import UserStore
from simulator.control import apply_command, parse_command

# The packaged policy with a lease long enough that a loaded CI machine never trips the
# lease-nearly-out rule by accident, and a small forehead budget for the zone-energy test.
TEST_POLICY = """
max_average_power_w = 3.0
session_energy_j = 300.0
energy_tolerance_pct = 20
min_interval_pct = 90
skin_temp_max_c = 41.0
head_temp_max_c = 43.0
lease_ms = 1500
lease_nearly_out_ms = 100

[max_fluence_j_cm2]
I = 40.0
II = 35.0
III = 30.0
IV = 22.0
V = 16.0
VI = 12.0

[zones]
forehead = { energy_j = 60.0 }
periorbital = { energy_j = 15.0, max_fluence_j_cm2 = 10.0 }
perioral = { energy_j = 30.0, max_fluence_j_cm2 = 15.0 }
cheeks = { energy_j = 80.0 }
neck = { energy_j = 0.25, max_fluence_j_cm2 = 20.0 }
decollete = { energy_j = 100.0, max_fluence_j_cm2 = 20.0 }
hands = { energy_j = 50.0 }

[presets.fine_lines]
energy_uj = 6000
width_us = 1000
rate_hz = 10.0
spot_um = 300
active_ingredient = "hyaluronic acid"

[presets.laxity]
energy_uj = 15000
width_us = 2000
rate_hz = 8.0
spot_um = 1000
active_ingredient = "peptide complex"

[presets.acne_scars]
energy_uj = 2400
width_us = 500
rate_hz = 20.0
spot_um = 120
active_ingredient = "niacinamide"
skin_types = ["I", "II", "III", "IV"]

[presets.pigmentation]
energy_uj = 5000
width_us = 1000
rate_hz = 10.0
spot_um = 300
active_ingredient = "tranexamic acid"

[presets.dehydration]
energy_uj = 4000
width_us = 800
rate_hz = 15.0
spot_um = 300
active_ingredient = "hyaluronic acid"

[presets.sun_damage]
energy_uj = 7000
width_us = 1000
rate_hz = 10.0
spot_um = 300
active_ingredient = "vitamin C"
"""

CHECKLIST = {
    "consultation_done": True,
    "consent_given": True,
    "area_cleaned": True,
    "numbing_applied": False,
    "recent_sun_exposure": False,
    "photosensitising_medication": False,
    "active_skin_infection": False,
    "pregnancy": False,
    "allergy_to_active_ingredient": False,
}

SESSION: dict[str, Any] = {
    "command": "session_start",
    "patient_ref": "PT-0042",
    "skin_type": "III",
    "concerns": ["fine_lines"],
    "preset": "fine_lines",
    "ingredient": {"amount": 2.0, "unit": "ml", "lot": "HA-2611-07"},
    "checklist": CHECKLIST,
}

# Registered in every test daemon's data dir (argon2's cheapest profile: tests stay fast; the
# hash names its own parameters, so the daemon verifies them as they are).
OPERATOR = {"user": "OP-7", "pin": "op7-pin-7777"}
SUPERVISOR = {"user": "SUP-1", "pin": "sup1-pin-1111"}
# Requests that change the treatment: Driver.call identifies them as OPERATOR unless told.
IDENTIFIED = frozenset(
    {
        "session_start", "session_zone", "session_end", "params_set", "arm", "fault_ack",
        "session_note", "session_reaction", "session_adverse_event",
    }
)  # fmt: skip
ACK = {
    "signoff": {
        **SUPERVISOR,
        "reason_code": "handpiece_checked",
        "reason": "handpiece recalibrated and energy checked",
    }
}
END = {"post_care": ["serum_or_moisturiser", "avoid_sun", "sunscreen"]}


def add_test_users(data_dir: Path) -> None:
    store = UserStore.in_data_dir(data_dir, hasher=PasswordHasher.from_parameters(CHEAPEST))
    if store.get(OPERATOR["user"]) is None:
        store.add(OPERATOR["user"], "operator", OPERATOR["pin"])
        store.add(SUPERVISOR["user"], "supervisor", SUPERVISOR["pin"])


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(TEST_POLICY)
    return path


class Driver:
    """Talks to a running daemon over its control socket, and to its simulator board: in this
    process (``sim_socket`` None) or a `devicectl sim` process over a real pty (its control
    socket)."""

    def __init__(self, daemon: Daemon, sim_socket: Path | None = None) -> None:
        self.daemon = daemon
        self.path = Path(daemon.settings.control)
        self.sim_socket = sim_socket

    async def raw(self, line: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            writer.write(line)
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        result: dict[str, Any] = json.loads(reply)
        return result

    async def call(self, command: str, **fields: Any) -> dict[str, Any]:
        """One request; a treatment-changing one is identified as OPERATOR unless ``auth`` is
        given (``auth=None``: sent without)."""
        if command in IDENTIFIED and "auth" not in fields:
            fields["auth"] = OPERATOR
        if fields.get("auth", True) is None:
            del fields["auth"]
        return await self.raw((json.dumps({"command": command, **fields}) + "\n").encode())

    async def ok(self, command: str, **fields: Any) -> dict[str, Any]:
        reply = await self.call(command, **fields)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def sim(self, words: str) -> Any:
        """Apply a sim-control command, returning once the board has applied it. (Blocking for
        the simulator process: a local round trip of about a millisecond.)"""
        if self.sim_socket is None:
            return apply_command(self.runner, parse_command(words))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.sim_socket))
            sock.sendall((json.dumps({"command": words.split()}) + "\n").encode())
            with sock.makefile("rb") as stream:
                reply = json.loads(stream.readline())
        assert reply["ok"], reply
        return reply["result"]

    @property
    def runner(self) -> Any:
        """The in-process simulator's BoardRunner (in-memory mode only)."""
        return self.daemon.device.runner  # type: ignore[attr-defined]

    def pulse_count(self) -> int:
        """The board's lifetime pulse counter: what was really emitted."""
        count: int = self.sim("status")["pulse_count"]
        return count

    @property
    def board(self) -> Any:
        """The in-process board (in-memory mode only)."""
        return self.runner.board

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            await asyncio.sleep(0.01)

    async def emitting_session(
        self,
        zone: str = "forehead",
        rate_hz: float = 50.0,
        energy_uj: int = 2000,
        spot_um: int = 300,
    ) -> None:
        """Session open, zone chosen, params set, armed, footswitch pressed, pulses flowing."""
        await self.ok("session_start", **{k: v for k, v in SESSION.items() if k != "command"})
        await self.ok("session_zone", zone=zone)
        await self.ok(
            "params_set", energy_uj=energy_uj, width_us=500, rate_hz=rate_hz, spot_um=spot_um
        )
        await self.ok("arm")
        self.sim("footswitch down")
        await self.until(lambda: self.daemon.treatment and self.daemon.treatment.pulses >= 5)


def _settings(tmp_path: Path, policy_file: Path, port: str, **overrides: Any) -> Any:
    """A daemon's settings in ``tmp_path`` (``mqtt__url=...`` and the like as overrides), with
    the test users registered in its data dir."""
    add_test_users(tmp_path / "data")
    return load_settings(
        None,
        port=port,
        data_dir=tmp_path / "data",
        control=tmp_path / "ctl.sock",
        policy=policy_file,
        sim_max_rate_hz=5000,
        **overrides,
    )


@pytest.fixture
async def driver(tmp_path: Path, policy_file: Path) -> AsyncIterator[Driver]:
    """The daemon with the simulator board in its own process (in memory): fast."""
    async with compose(_settings(tmp_path, policy_file, "sim")) as daemon:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        yield drv


@pytest.fixture
async def pty_driver(tmp_path: Path, policy_file: Path) -> AsyncIterator[Driver]:
    """The daemon talking to `devicectl sim` (another process) over a real pty, as on a device."""
    sim_socket = tmp_path / "sim.sock"
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from devicectl.cli import main; main()",
        "sim", "--pty", "--control", str(sim_socket), "--max-rate", "5000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert sim.stdout is not None
        port = (await asyncio.wait_for(sim.stdout.readline(), 30)).decode().strip()
        assert port.startswith("/dev/pts/"), port
        async with compose(_settings(tmp_path, policy_file, port)) as daemon:
            drv = Driver(daemon, sim_socket)
            await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
            yield drv
    finally:
        if sim.returncode is None:
            sim.terminate()
        await sim.wait()


def session_events(drv: Driver, session: int) -> list[dict[str, Any]]:
    """The ``event`` records of ``session`` in the daemon's log (flushed first)."""
    log = drv.daemon.sessionlog
    assert log is not None
    log.flush()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, session)
    finally:
        conn.close()
    assert record is not None
    return [r["body"] for r in record.records if r["kind"] == "event"]
