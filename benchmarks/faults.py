"""The reliability campaign: real sessions, one fault per row; nothing lost, nothing unsafe.

    .venv/bin/python benchmarks/faults.py [--short] [--rows NAME,NAME] [--keep DIR] [--seed N]

Every row runs the real processes: the simulator (``devicectl sim --pty``; for the port-vanishing
row ``--tcp`` behind a TCP relay the campaign cuts and restores, because a vanished pty comes back
under another path and a restarted simulator process would forget its lifetime pulse counter), the
daemon (``devicectl run``) on that port with a real mosquitto (started here, as tests/brokers.py:
no queue limit, TCP_NODELAY, persistence) and a persistent paho subscriber on ``lasers/#``.

A row opens a session, emits at :data:`RATE_HZ`, injects its fault, watches the board until it is
safe (or for the fault window when the fault need not stop emission), recovers, ends the session
and stops the daemon. Then a *drain run* restarts the daemon once with the broker up: it reconciles
the log with the board's counter (after a kill) and delivers whatever waited in the outbox. Only
then are the books closed:

- **pulses**: the board's ``pulse_count`` delta against the pulses in the log plus the pulses the
  log counts as unlogged (``pulse_gap`` ranges), as sets of pulse_no: each must be accounted for
  exactly once;
- **telemetry**: per QoS 1 topic, the seq counter the daemon's outbox assigned (expected) against
  the distinct seqs the subscriber received (delivered);
- **safe**: seconds from the fault to the first board sample not emitting;
- **unsafe**: pulses the board fired after it was first seen safe following the fault (no row
  re-arms after its fault and none injects a stuck shutter), plus the log's uncommanded emissions.

The disk-full row checkpoints the session log's WAL to zero, lets it grow for 0.2 s, and lowers
``RLIMIT_FSIZE`` of the running daemon with ``prlimit(2)`` to that size, so no file of its may grow
further (Python ignores SIGXFSZ, so writes fail with EFBIG): no root mount needed.
``--short`` is the CI size (``tests/campaign``). Prints a table; exit 1 when a row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devicectl.sessionlog import verify_log  # noqa: E402
from tests.brokers import Broker, free_port  # noqa: E402
from tests.daemon.conftest import (  # noqa: E402
    ACK,
    END,
    IDENTIFIED,
    SESSION,
    TEST_POLICY,
    add_test_users,
)
from tests.daemon.conftest import OPERATOR as OPERATOR_AUTH  # noqa: E402
from tests.telemetry.helpers import Recorder  # noqa: E402

__all__ = [
    "ROWS",
    "Campaign",
    "Row",
    "Timing",
    "format_table",
    "log_accounts",
    "run_row",
]

DEVICECTL = [sys.executable, "-c", "from devicectl.cli import main; main()"]
RATE_HZ = 200.0
ENERGY_UJ = 2000
QOS1_STREAMS = ("state", "session", "alerts", "pulses", "events")


@dataclass(frozen=True, slots=True)
class Timing:
    """How long each phase lasts: emission before the fault, the fault window, the watch."""

    emit_s: float = 1.0
    fault_s: float = 2.0
    settle_s: float = 0.5

    @classmethod
    def short(cls) -> Timing:
        return cls(emit_s=0.4, fault_s=1.0, settle_s=0.3)

    @classmethod
    def full(cls) -> Timing:
        return cls(emit_s=3.0, fault_s=8.0, settle_s=1.0)


@dataclass(slots=True)
class Row:
    """One row of the campaign's table."""

    name: str
    board_pulses: int = 0
    logged: int = 0
    unlogged: int = 0
    unaccounted: int = 0  # board pulse_no in no log record
    double_counted: int = 0  # pulse_no both logged and charged, or logged twice
    tele_expected: int = 0
    tele_delivered: int = 0
    tele_pending: int = 0
    safe_s: float | None = None
    unsafe: int = 0
    chain_ok: bool = True  # `devicectl log verify` passes after the row
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def pulses_ok(self) -> bool:
        return (
            self.logged + self.unlogged == self.board_pulses
            and self.unaccounted == 0
            and self.double_counted == 0
        )

    @property
    def telemetry_ok(self) -> bool:
        return self.tele_expected == self.tele_delivered and self.tele_pending == 0

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.pulses_ok
            and self.telemetry_ok
            and self.unsafe == 0
            and self.chain_ok
        )

    def line(self) -> str:
        safe = "-" if self.safe_s is None else f"{self.safe_s:.3f}"
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name:<22} {self.board_pulses:>7} {self.logged:>7}+{self.unlogged:<5}"
            f" {self.tele_expected:>6}/{self.tele_delivered:<6} {safe:>7} {self.unsafe:>6}"
            f"  {verdict}  {'; '.join(self.notes)}{' ERROR: ' + self.error if self.error else ''}"
        )


HEADER = (
    f"{'fault':<22} {'emitted':>7} {'logged+unlogged':>13} {'QoS1 exp/deliv':>13}"
    f" {'safe s':>7} {'unsafe':>6}  verdict  notes"
)


def format_table(rows: list[Row]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER), *(row.line() for row in rows)])


# ------------------------------------------------------------------------------- helpers


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _jsonline(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall((json.dumps(request) + "\n").encode())
        with sock.makefile("rb") as stream:
            line = stream.readline()
    reply: dict[str, Any] = json.loads(line)
    return reply


def log_accounts(db: Path) -> tuple[list[int], list[int], int]:
    """From a session log: (pulse_no of every logged pulse, pulse_no of every pulse counted as
    unlogged — ``pulse_gap`` ranges and pulses seen with no session —, uncommanded emissions)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        logged = [n for (n,) in conn.execute("SELECT pulse_no FROM pulses")]
        charged: list[int] = []
        uncommanded = 0
        for kind, body_text in conn.execute(
            "SELECT kind, body FROM records WHERE kind IN ('pulse_gap', 'event')"
        ):
            body = json.loads(body_text)
            if kind == "pulse_gap":
                charged.extend(range(int(body["first"]), int(body["last"]) + 1))
            elif body.get("event") == "pulse_without_session":
                charged.append(int(body["detail"]["pulse_no"]))
            elif body.get("event") == "uncommanded_emission" or (
                body.get("event") in {"breach", "breach_repeat", "safety_breach"}
                and body.get("detail", {}).get("code") == "uncommanded_emission"
            ):
                uncommanded += 1
    finally:
        conn.close()
    return logged, charged, uncommanded


class TcpRelay:
    """A TCP relay standing in for a serial cable: :meth:`cut` unplugs it, :meth:`restore`
    plugs it back. While cut, connections are refused and existing ones are closed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._stop.clear()
        self.restore()
        self._thread = threading.Thread(target=self._run, name="campaign-relay", daemon=True)
        self._thread.start()

    def restore(self) -> None:
        with self._lock:
            if self._listener is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(4)
                self._listener = listener

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for a, b in self._pairs:
                a.close()
                b.close()
            self._pairs.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.cut()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks: list[socket.socket] = [s for pair in self._pairs for s in pair]
                listener = self._listener
                if listener is not None:
                    socks.append(listener)
            if not socks:
                time.sleep(0.01)
                continue
            try:
                readable, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):
                continue
            for sock in readable:
                with self._lock:
                    self._relay(sock)

    def _relay(self, sock: socket.socket) -> None:
        if sock is self._listener:
            try:
                client, _ = sock.accept()
                upstream = socket.create_connection(self.target, 2)
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pairs.append((client, upstream))
            return
        for pair in self._pairs:
            if sock in pair:
                other = pair[1] if sock is pair[0] else pair[0]
                try:
                    data = sock.recv(65536)
                    if data:
                        other.sendall(data)
                        return
                except OSError:
                    pass
                pair[0].close()
                pair[1].close()
                self._pairs.remove(pair)
                return


class BoardWatch:
    """Samples the simulator's status every few ms: (monotonic time, pulse_count, emitting)."""

    def __init__(self, control: Path, period_s: float = 0.005) -> None:
        self.control = control
        self.period_s = period_s
        self.samples: list[tuple[float, int, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="campaign-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                status = _jsonline(self.control, {"command": "status"})["result"]
                self.samples.append(
                    (time.monotonic(), status["pulse_count"], status["emitting"], status["state"])
                )
            self._stop.wait(self.period_s)

    def safe_after(self, t0: float) -> tuple[float | None, int]:
        """(seconds from t0 to the first sample not emitting, pulses fired after that sample)."""
        samples = [s for s in self.samples if s[0] >= t0]
        for i, (t, count, emitting, _state) in enumerate(samples):
            if not emitting:
                later = [c for _t, c, _e, _s in samples[i:]]
                return t - t0, max(later) - count
        return None, 0


# ------------------------------------------------------------------------------- the rig


class Campaign:
    """The processes of one row: broker, simulator, daemon, subscriber, board watch."""

    def __init__(
        self,
        directory: Path,
        *,
        tcp: bool = False,
        seed: int = 1,
        policy: str = TEST_POLICY,
        max_rate_hz: float | None = None,
        watch_period_s: float = 0.005,
    ) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.sim_control = directory / "sim.sock"
        self.control = directory / "ctl.sock"
        self.data = directory / "data"
        add_test_users(self.data)
        self.daemon_log = directory / "daemon.log"
        self.tcp = tcp
        self.seed = seed
        self.max_rate_hz = max_rate_hz
        self.watch_period_s = watch_period_s
        policy_file = directory / "policy.toml"
        policy_file.write_text(policy)
        self.broker = Broker(directory / "mosquitto")
        self.config = directory / "devicectl.toml"
        self.config.write_text(
            f'policy = "{policy_file}"\nstatus_period_ms = 100\n'
            f'[mqtt]\nurl = "{self.broker.url}"\nsite = "campaign"\ndevice = "laser1"\n'
        )
        self.sim: subprocess.Popen[str] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.relay: TcpRelay | None = None
        self.recorder: Recorder | None = None
        self.watch: BoardWatch | None = None
        self.port = ""
        self.start_count = 0
        self.session: int | None = None

    # ---- processes

    def start_sim(self) -> None:
        args = ["sim", "--control", str(self.sim_control), "--seed", str(self.seed)]
        sim_port = free_port()
        args += ["--tcp", f"127.0.0.1:{sim_port}"] if self.tcp else ["--pty"]
        if self.max_rate_hz is not None:
            args += ["--max-rate", f"{self.max_rate_hz:g}"]
        self.sim = subprocess.Popen(
            [*DEVICECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.sim.stdout is not None
        self.port = self.sim.stdout.readline().strip()
        if not self.port:
            raise RuntimeError("the simulator printed no port")
        if self.tcp:
            self.relay = TcpRelay(("127.0.0.1", sim_port))
            self.relay.start()
            self.port = self.relay.url
        self.start_count = int(self.sim_status()["pulse_count"])
        self.watch = BoardWatch(self.sim_control, self.watch_period_s)
        self.watch.start()

    def start_daemon(self, *, wait_connected: bool = True, preexec: Any = None) -> None:
        args = ["run", "--config", str(self.config), "--port", self.port]
        args += ["--data-dir", str(self.data), "--control", str(self.control)]
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [*DEVICECTL, *args],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=preexec,  # noqa: PLW1509 - only resource limits, no locks taken
            )
        if wait_connected:
            _wait(self._connected, 30, "the daemon to connect to the simulator")

    def _connected(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.daemon.returncode}")
        try:
            return bool(self.status()["connected"])
        except (OSError, ValueError, KeyError):
            return False

    def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.daemon = self.daemon, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def start_recorder(self) -> None:
        self.recorder = Recorder(
            self.broker.port, "lasers/#", client_id=f"campaign-{os.getpid()}", persistent=True
        )

    def close(self) -> None:
        self.stop_daemon()
        if self.watch is not None:
            self.watch.close()
        if self.sim is not None and self.sim.poll() is None:
            self.sim.send_signal(signal.SIGTERM)
            try:
                self.sim.wait(5)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()
        if self.sim is not None and self.sim.stdout is not None:
            self.sim.stdout.close()
        if self.relay is not None:
            self.relay.close()
        if self.recorder is not None:
            self.recorder.close()
        self.broker.stop()

    # ---- talking to them

    def call(self, command: str, **fields: Any) -> dict[str, Any]:
        if command in IDENTIFIED:
            fields.setdefault("auth", OPERATOR_AUTH)
        reply = _jsonline(self.control, {"command": command, **fields}, timeout=10)
        if not reply.get("ok"):
            raise RuntimeError(f"{command}: {reply.get('error')}")
        result: dict[str, Any] = reply["result"]
        return result

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def sim_cmd(self, words: str) -> Any:
        reply = _jsonline(self.sim_control, {"command": words.split()})
        if not reply.get("ok"):
            raise RuntimeError(f"sim-control {words}: {reply.get('error')}")
        return reply["result"]

    def sim_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.sim_cmd("status")
        return result

    def open_session(
        self,
        energy_uj: int = ENERGY_UJ,
        width_us: int = 500,
        rate_hz: float = RATE_HZ,
        spot_um: int = 300,
    ) -> None:
        started = self.call(**SESSION)
        self.session = int(started["session"])
        self.call("session_zone", zone="forehead")
        self.call(
            "params_set", energy_uj=energy_uj, width_us=width_us, rate_hz=rate_hz, spot_um=spot_um
        )

    def emit(self, seconds: float) -> None:
        self.call("arm")
        self.sim_cmd("footswitch down")
        count = self.sim_status()["pulse_count"]
        _wait(lambda: self.sim_status()["pulse_count"] > count + 5, 10, "pulses flowing")
        time.sleep(seconds)

    def daemon_rss_kib(self) -> int:
        """The daemon process's resident set (VmRSS), KiB."""
        assert self.daemon is not None
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def wind_down(self, notes: list[str]) -> None:
        """Footswitch up, injected faults cleared, the device reachable again, the session ended."""
        with contextlib.suppress(RuntimeError, OSError):
            self.sim_cmd("footswitch up")
        with contextlib.suppress(RuntimeError, OSError):
            self.sim_cmd("clear-faults")
        if self.daemon is None:
            return
        try:
            _wait(self._connected, 15, "the daemon to reconnect")
        except (TimeoutError, RuntimeError) as exc:
            notes.append(f"no reconnection: {exc}")
            return
        with contextlib.suppress(RuntimeError, OSError):
            self.call("stop")
        if self.status().get("session") is None:
            return  # a restarted daemon closed it as interrupted (reconciled with the board)
        if self.status().get("breach_latched"):
            with contextlib.suppress(RuntimeError, OSError):
                self.call("fault_ack", **ACK)
        try:
            self.call("session_end", **END)
        except RuntimeError as exc:
            if "cannot be written" in str(exc):
                notes.append("session_end refused: the log cannot record it (right)")
            else:
                notes.append(f"session_end refused: {str(exc).splitlines()[0][:90]}")

    # ---- the books

    def outbox(self) -> tuple[dict[str, int], int]:
        """(per QoS 1 topic: last seq assigned, rows still waiting) from the daemon's outbox."""
        path = self.data / "telemetry-outbox.sqlite"
        if not path.exists():
            return {}, 0
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            counters = {
                name.removeprefix("seq:"): int(value)
                for name, value in conn.execute(
                    "SELECT name, value FROM counters WHERE name LIKE 'seq:%'"
                )
            }
            (pending,) = conn.execute("SELECT count(*) FROM outbox WHERE qos = 1").fetchone()
        finally:
            conn.close()
        return {t: v for t, v in counters.items() if not t.endswith("/metrics")}, int(pending)

    def delivered(self) -> dict[str, set[int]]:
        assert self.recorder is not None
        seen: dict[str, set[int]] = {}
        for msg in self.recorder.snapshot():
            if msg.qos != 1 or not msg.payload.startswith(b"{"):
                continue
            seq = json.loads(msg.payload).get("seq")
            if isinstance(seq, int) and seq > 0:
                seen.setdefault(msg.topic, set()).add(seq)
        return seen

    def telemetry_books(self) -> tuple[int, int, int]:
        counters, pending = self.outbox()
        seen = self.delivered()
        expected = sum(counters.values())
        delivered = sum(len(seen.get(t, set()) & set(range(1, n + 1))) for t, n in counters.items())
        return expected, delivered, pending

    def pulse_books(self, row: Row) -> None:
        end = int(self.sim_status()["pulse_count"])
        fired = set(range(self.start_count + 1, end + 1))
        row.board_pulses = len(fired)
        logged, charged, uncommanded = log_accounts(self.data / "sessions.db")
        row.logged, row.unlogged = len(logged), len(charged)
        accounted = logged + charged
        row.double_counted = len(accounted) - len(set(accounted))
        row.unaccounted = len(fired - set(accounted))
        extra = set(accounted) - fired
        if extra:
            row.notes.append(f"{len(extra)} logged pulse_no the board never fired")
        report = verify_log(self.data / "sessions.db")
        row.chain_ok = report.ok
        if not report.ok:
            row.notes.append(f"log verify: {report.first_break}")
        row.unsafe += uncommanded
        if uncommanded:
            row.notes.append(f"{uncommanded} uncommanded emission(s) in the log")

    def drain(self, row: Row, *, reconcile: bool) -> None:
        """Restart the daemon once with the broker up (when the log needs reconciling or the
        outbox still holds messages): reconcile the log, empty the outbox. Then close the books."""
        self.broker.start()
        if not reconcile and self.outbox()[1] == 0:
            with contextlib.suppress(TimeoutError):
                _wait(self._books_balanced, 5, "every QoS 1 message at the subscriber")
            row.tele_expected, row.tele_delivered, row.tele_pending = self.telemetry_books()
            return
        self.start_daemon()
        try:
            # connected first: the daemon hands its messages to its telemetry worker, which
            # queues them in the outbox in its own time, so an empty outbox alone proves nothing
            _wait(self._telemetry_connected, 30, "the telemetry worker to connect")
            _wait(lambda: self.outbox()[1] == 0, 30, "the outbox to drain")
        except TimeoutError as exc:
            row.notes.append(str(exc))
        code = self.stop_daemon()
        if code != 0:
            row.notes.append(f"drain run exited {code}")
        with contextlib.suppress(TimeoutError):
            _wait(self._books_balanced, 10, "every QoS 1 message at the subscriber")
        row.tele_expected, row.tele_delivered, row.tele_pending = self.telemetry_books()

    def _telemetry_connected(self) -> bool:
        telemetry = self.status().get("telemetry") or {}
        return bool(telemetry.get("connected"))

    def _books_balanced(self) -> bool:
        expected, delivered, pending = self.telemetry_books()
        return expected == delivered and pending == 0


# ------------------------------------------------------------------------------- the rows

Inject = Callable[[Campaign, Timing, Row], None]


def _fault_window(rig: Campaign, timing: Timing, row: Row, t0: float, *, must_stop: bool) -> None:
    """Watch the board after a fault: until safe (must_stop) or through the fault window."""
    assert rig.watch is not None
    deadline = t0 + (max(timing.fault_s, 5.0) if must_stop else timing.fault_s)
    while time.monotonic() < deadline:
        safe, _ = rig.watch.safe_after(t0)
        if must_stop and safe is not None:
            break
        time.sleep(0.02)
    time.sleep(timing.settle_s)
    safe, after = rig.watch.safe_after(t0)
    row.safe_s = safe
    if must_stop and safe is None:
        row.notes.append("the board never stopped")
        row.unsafe += 1
    if must_stop and after:
        row.unsafe += after
        row.notes.append(f"{after} pulse(s) after the board was safe")


def _sim_fault(words: str, *, must_stop: bool = False) -> Inject:
    def inject(rig: Campaign, timing: Timing, row: Row) -> None:
        t0 = time.monotonic()
        for part in words.split(";"):
            rig.sim_cmd(part.strip())
        _fault_window(rig, timing, row, t0, must_stop=must_stop)
        rig.sim_cmd("clear-faults")

    return inject


def _reboot(rig: Campaign, timing: Timing, row: Row) -> None:
    t0 = time.monotonic()
    rig.sim_cmd("reboot")
    _fault_window(rig, timing, row, t0, must_stop=True)


def _port_vanishes(rig: Campaign, timing: Timing, row: Row) -> None:
    assert rig.relay is not None
    t0 = time.monotonic()
    rig.relay.cut()
    _fault_window(rig, timing, row, t0, must_stop=True)
    rig.relay.restore()


def _broker_restart(rig: Campaign, timing: Timing, row: Row) -> None:
    rig.broker.stop()
    time.sleep(timing.fault_s)
    rig.broker.start()
    time.sleep(timing.settle_s)


def _daemon_kill(rig: Campaign, timing: Timing, row: Row) -> None:
    t0 = time.monotonic()
    rig.stop_daemon(signal.SIGKILL)
    _fault_window(rig, timing, row, t0, must_stop=True)
    rig.start_daemon()


def _daemon_term(rig: Campaign, timing: Timing, row: Row) -> None:
    t0 = time.monotonic()
    code = rig.stop_daemon(signal.SIGTERM)
    if code != 0:
        row.notes.append(f"SIGTERM exit {code}")
    _fault_window(rig, timing, row, t0, must_stop=True)
    rig.start_daemon()


def _combined_kill(rig: Campaign, timing: Timing, row: Row) -> None:
    """Noise and lost frames on the link and no broker, then the daemon killed in the middle."""
    rig.sim_cmd("fault line-noise 1e-4")
    rig.sim_cmd("fault drop-frames 0.01")
    rig.broker.stop()
    time.sleep(timing.fault_s / 2)
    _daemon_kill(rig, timing, row)
    rig.sim_cmd("clear-faults")
    rig.broker.start()


def _disk_full(rig: Campaign, timing: Timing, row: Row) -> None:
    assert rig.daemon is not None
    pid = rig.daemon.pid
    # The session log's WAL is recycled after each checkpoint, so "no file may grow past the
    # largest one" can leave it writing inside its old length for minutes. Checkpoint it to zero
    # first (from here, as any reader may), let it grow for a moment, and cap every file at
    # that: the log's next growing write fails, and so does every other file's, as on a full disk.
    wal = rig.data / "sessions.db-wal"
    with contextlib.closing(sqlite3.connect(rig.data / "sessions.db", timeout=5)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    time.sleep(0.2)
    limit = max(wal.stat().st_size if wal.exists() else 0, 4096)
    t0 = time.monotonic()
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    row.notes.append(f"files capped at {limit} B")
    _fault_window(rig, timing, row, t0, must_stop=True)
    if rig.daemon is not None and rig.daemon.poll() is None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        health = rig.status()
        row.notes.append(f"log_ok={health['log_ok']}")
    else:
        row.notes.append("the daemon died on the full disk")
        rig.daemon = None
        rig.start_daemon()


@dataclass(frozen=True, slots=True)
class Spec:
    inject: Inject
    tcp: bool = False
    broker_down_at_start: bool = False
    reconcile: bool = False  # the drain run must restart the daemon whatever the outbox holds


ROWS: dict[str, Spec] = {
    "none (baseline)": Spec(_sim_fault("clear-faults")),
    "line noise BER 1e-5": Spec(_sim_fault("fault line-noise 1e-5")),
    "line noise BER 1e-4": Spec(_sim_fault("fault line-noise 1e-4")),
    "line noise BER 1e-3": Spec(_sim_fault("fault line-noise 1e-3")),
    "drop frames 1 %": Spec(_sim_fault("fault drop-frames 0.01")),
    "drop frames 5 %": Spec(_sim_fault("fault drop-frames 0.05")),
    "slow replies 45 ms": Spec(_sim_fault("fault slow-replies 45")),
    "slow replies 49 ms": Spec(_sim_fault("fault slow-replies 49")),
    "device hang": Spec(_sim_fault("fault hang", must_stop=True)),
    "device reboot": Spec(_reboot),
    "port vanishes": Spec(_port_vanishes, tcp=True),
    "broker restart": Spec(_broker_restart),
    "broker unreachable": Spec(_sim_fault("clear-faults"), broker_down_at_start=True),
    "daemon SIGKILL": Spec(_daemon_kill),
    "daemon SIGTERM": Spec(_daemon_term),
    "disk full (log)": Spec(_disk_full, reconcile=True),
    "combined": Spec(
        _sim_fault("fault line-noise 1e-4; fault drop-frames 0.01; fault slow-replies 30")
    ),
    "combined + SIGKILL": Spec(_combined_kill),
}


def run_row(name: str, directory: Path, timing: Timing, *, seed: int = 1) -> Row:
    """Run one row of the campaign in ``directory``; never raises (errors land in the row)."""
    spec = ROWS[name]
    row = Row(name)
    rig = Campaign(directory, tcp=spec.tcp, seed=seed)
    try:
        rig.broker.start()
        rig.start_recorder()
        if spec.broker_down_at_start:
            rig.broker.stop()
        rig.start_sim()
        rig.start_daemon()
        rig.open_session()
        rig.emit(timing.emit_s)
        if name == "combined":
            rig.broker.stop()
        spec.inject(rig, timing, row)
        if name == "combined":
            rig.broker.start()
        time.sleep(timing.settle_s)
        rig.wind_down(row.notes)
        code = rig.stop_daemon()
        if code not in (0, None):
            row.notes.append(f"daemon exit {code}")
        rig.drain(row, reconcile=spec.reconcile)
        rig.pulse_books(row)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        rig.close()
    return row


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="devicectl-faults-") as tmp:
        yield Path(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI size of every row")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--keep", type=Path, help="keep every row's files under this directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="rows run at a time (CI: 2)")
    args = parser.parse_args()
    timing = Timing.short() if args.short else Timing.full()
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {list(ROWS)}")
    random.seed(args.seed)
    rows: list[Row] = []
    print(HEADER, flush=True)
    with _workdir(args.keep) as base, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [
            pool.submit(run_row, name, base / f"row{i:02d}", timing, seed=args.seed + i)
            for i, name in enumerate(names)
        ]
        for future in futures:
            rows.append(future.result())
            print(rows[-1].line(), flush=True)
    print()
    print(format_table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
