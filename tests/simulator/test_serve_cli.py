"""``devicectl sim`` and ``devicectl sim-control`` as separate processes, as an engineer runs them:
the printed port, a raw pty, HELLO/IDENT, sim-control, TCP client replacement, scenarios, exit codes
and a clean exit on SIGTERM/SIGINT. Every process started here is reaped."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import serial
from typer.testing import CliRunner

from devicectl.cli import app
from protocols import GetStatus, Hello, HostCodec, Ident, InputEvent, StatusReply
from protocols.codec import NEED_DATA, Frame
from protocols.messages import Message

pytestmark = pytest.mark.system

DEVICECTL = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'devicectl'; from devicectl.cli import main; main()",
]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="simcli", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SimProcess:
    process: subprocess.Popen[bytes]
    address: str
    control: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + 10
        while text not in self.log():
            assert self.process.poll() is None, f"the simulator exited: {self.log()}"
            assert time.monotonic() < deadline, f"{text!r} never logged: {self.log()}"
            time.sleep(0.02)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=10)


@contextmanager
def running_sim(workdir: Path, *args: str) -> Iterator[SimProcess]:
    control = workdir / "sim.sock"
    stderr = workdir / "sim.err"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*DEVICECTL, "sim", "--control", str(control), "--seed", "1", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, f"no address printed: {stderr.read_text()}"
        first = process.stdout.readline().decode().rstrip("\n")
        yield SimProcess(process, first, control, stderr)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def sim_control_process(control: Path, *words: str) -> Ran:
    """``devicectl sim-control`` as its own process, exactly as an engineer runs it."""
    done = subprocess.run(
        [*DEVICECTL, "sim-control", "--socket", str(control), *words],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def cli(*args: str) -> Ran:
    """A ``devicectl`` command run in this process: the same code, without a second interpreter
    start-up per call (the simulator it talks to is still a separate process)."""
    result = CliRunner().invoke(app, list(args))
    return Ran(result.exit_code, result.stdout, result.stderr)


def sim_control(control: Path, *words: str) -> Ran:
    return cli("sim-control", "--socket", str(control), *words)


def _take(codec: HostCodec, want: type[Message], seq: int | None) -> Frame[Message] | None:
    while (frame := codec.next_event()) is not NEED_DATA:
        if isinstance(frame.message, want) and (seq is None or frame.seq == seq):
            return frame
    return None


def read_until(
    read: Any, wait_fd: int, codec: HostCodec, want: type[Message], seq: int | None = None
) -> Frame[Message]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([wait_fd], [], [], 0.2)
        if ready:
            data = read(4096)
            if not data:
                raise ConnectionError("the simulator closed the link")
            codec.receive_data(data)
            if (frame := _take(codec, want, seq)) is not None:
                return frame
    raise TimeoutError(f"no {want.__name__} from the simulator")


def test_sim_over_a_pty_end_to_end(short_dir: Path) -> None:
    with running_sim(short_dir, "--serial", "31337") as sim:
        assert re.fullmatch(r"/dev/pts/\d+", sim.address), sim.address
        # The control socket exists before the address is printed.
        assert sim.control.is_socket()

        fd = os.open(sim.address, os.O_RDWR | os.O_NOCTTY)
        try:
            iflag, oflag, _, lflag = termios.tcgetattr(fd)[:4]
            assert not lflag & (termios.ECHO | termios.ICANON)
            assert not iflag & termios.ICRNL
            assert not oflag & termios.OPOST
            host = HostCodec()
            # SEQ 0x0D (CR) and 0x0A (LF): any CR/LF translation would break the frames.
            os.write(fd, host.send(0x0D, Hello()))
            ident = read_until(lambda n: os.read(fd, n), fd, host, Ident, 0x0D).message
            assert isinstance(ident, Ident)
            assert ident.serial == 31337
            os.write(fd, host.send(0x0A, GetStatus()))
            read_until(lambda n: os.read(fd, n), fd, host, StatusReply, 0x0A)

            done = sim_control_process(sim.control, "footswitch", "down")
            assert (done.returncode, done.stdout.strip()) == (0, "footswitch down"), done.stderr
            pressed = read_until(lambda n: os.read(fd, n), fd, host, InputEvent).message
            assert isinstance(pressed, InputEvent)
            assert pressed.footswitch == 1
        finally:
            os.close(fd)

        # pyserial, as the daemon opens it, and again after closing: the port stays servable.
        for seq in (20, 21):
            with serial.Serial(sim.address, 115200, timeout=0.1) as port:
                host = HostCodec()
                port.write(host.send(seq, Hello()))
                read_until(
                    lambda _n: port.read(port.in_waiting or 1), port.fileno(), host, Ident, seq
                )

        status = sim_control(sim.control, "status")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["footswitch"] is True
        assert report["serial"] == 31337
        assert report["link"]["naks"] == 0  # no echo fed the board its own frames

        assert sim.stop(signal.SIGTERM) == 0
        assert not sim.control.exists()
        assert f"control socket: {sim.control}" in sim.log()


def test_sim_over_tcp_a_new_client_replaces_the_old(short_dir: Path) -> None:
    with running_sim(short_dir, "--tcp", "127.0.0.1:0") as sim:
        match = re.fullmatch(r"socket://127\.0\.0\.1:(\d+)", sim.address)
        assert match, sim.address
        port = int(match.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            host = HostCodec()
            first.sendall(host.send(1, Hello()))
            read_until(first.recv, first.fileno(), host, Ident, 1)

            with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
                # The first client is disconnected...
                with pytest.raises(ConnectionError):
                    read_until(first.recv, first.fileno(), HostCodec(), Ident, 99)
                # ...and the second is the host now.
                host = HostCodec()
                second.sendall(host.send(2, Hello()))
                read_until(second.recv, second.fileno(), host, Ident, 2)

        assert sim.stop(signal.SIGINT) == 0
        assert not sim.control.exists()


def test_sim_plays_a_scenario_file(short_dir: Path) -> None:
    scenario = short_dir / "bench.toml"
    scenario.write_text(
        "[[step]]\nat = 0\ncommand = 'interlock door open'\n"
        "[[step]]\nat = 0.05\ncommand = ['fault', 'energy-drift', '1.3']\n"
        "[[step]]\nat = 0.1\ncommand = 'interlock door close'\n"
    )
    with running_sim(short_dir, "--scenario", str(scenario)) as sim:
        sim.wait_for_log("scenario_finished")
        status = sim_control(sim.control, "status")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["interlocks"] == []
        assert report["injected"] == {"energy-drift": 1.3}
        assert sim.stop(signal.SIGTERM) == 0


def test_sim_control_exit_codes(short_dir: Path) -> None:
    absent = short_dir / "absent.sock"
    unreachable = sim_control(absent, "status")
    assert unreachable.returncode == 3
    assert unreachable.stdout == ""
    assert unreachable.stderr.count("\n") == 1
    assert str(absent) in unreachable.stderr

    with running_sim(short_dir) as sim:
        assert sim_control(sim.control, "interlock", "door", "open").returncode == 0
        for words in (["footswich", "down"], ["fault", "drop-frames", "7"], ["interlock", "door"]):
            usage = sim_control(sim.control, *words)
            assert usage.returncode == 2, usage
            assert usage.stderr.count("\n") == 1
            assert "bad simulator command" in usage.stderr
        missing = sim_control(sim.control)
        assert missing.returncode == 2
        assert json.loads(sim_control(sim.control, "status").stdout)["interlocks"] == ["door"]
        assert sim.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--pty", "--tcp", "127.0.0.1:0"], "--pty and --tcp exclude each other"),
        (["--tcp", "nowhere"], "--tcp: 'nowhere' is not HOST:PORT"),
        (["--max-rate", "0"], "--max-rate 0 Hz is out of range"),
        (["--scenario", "/nonexistent/plan.toml"], "scenario /nonexistent/plan.toml: cannot read"),
    ],
)
def test_sim_usage_errors_exit_2_naming_the_cause(
    short_dir: Path, args: list[str], named: str
) -> None:
    result = cli("sim", "--control", str(short_dir / "sim.sock"), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert named in result.stderr
    assert not (short_dir / "sim.sock").exists()


def test_sim_control_reports_a_refusal_by_the_simulator_as_2(short_dir: Path) -> None:
    # A peer on the control socket that refuses whatever it is asked, as a simulator whose board
    # says no would: the words are valid, so only the simulator's answer can fail the command.
    path = short_dir / "refusing.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(30)
        process = subprocess.Popen(
            [*DEVICECTL, "sim-control", "--socket", str(path), "fault", "hang"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            peer, _ = listener.accept()
            with peer, peer.makefile("rwb") as stream:
                assert json.loads(stream.readline()) == {"command": ["fault", "hang"]}
                stream.write(b'{"ok": false, "kind": "refused", "error": "the board is busy"}\n')
                stream.flush()
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
    assert process.returncode == 2
    assert out == ""
    assert err == "devicectl sim-control: the board is busy\n"
