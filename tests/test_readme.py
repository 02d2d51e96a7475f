"""The README's walk-through ("Running a session by hand"), run as a reader would paste it.

The commands are read from the README itself, so this test follows whatever the README says: the
first block starts the daemon (in its own process, as in its own terminal), the second block runs
line by line in one bash shell, each line's exit code checked against what its comment promises
(``(exit N)``, else 0). The directory holds a ``.venv`` that is this interpreter's environment, so
``.venv/bin/devicectl`` and ``source .venv/bin/activate`` work verbatim.
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Running a session by hand"
_FENCE = re.compile(r"```sh\n(.*?)```", re.DOTALL)
_EXPECTED_EXIT = re.compile(r"\(exit (\d)\)")


def walkthrough_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return _FENCE.findall(text[start : end if end != -1 else None])


def logical_lines(block: str) -> list[str]:
    """Lines with their backslash continuations joined; blank lines dropped."""
    lines: list[str] = []
    pending = ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    return lines


def expected_exit(line: str) -> int:
    """What a line's comment promises: ``# refused (exit 1)``, else success."""
    _, _, comment = line.partition("  #")
    match = _EXPECTED_EXIT.search(comment)
    return int(match.group(1)) if match else 0


# The PINs the reader types at the prompts: every `users add` asks twice, a treatment-changing
# command once (the README says a script may set DEVICECTL_PIN / DEVICECTL_SUPERVISOR_PIN instead).
PINS = {"OP-7": "op7-pin-7777", "SUP-1": "sup1-pin-1111"}


def test_the_walkthrough_is_where_the_test_reads_it() -> None:
    daemon, session = walkthrough_blocks()
    assert logical_lines(daemon)[-1].split()[:3] == [".venv/bin/devicectl", "run", "--port"]
    assert any(line.startswith("devicectl arm") for line in logical_lines(session))


class Shell:
    """One bash process fed one line at a time, as a terminal would be."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self._proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, line: str, timeout: float = 60.0) -> tuple[int, str]:
        marker = f"__exit_{time.monotonic_ns()}__"
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{line}\necho {marker}$?\n")
        self._proc.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._proc.stdout.readline()
            if not text:
                break
            if text.startswith(marker):
                return int(text[len(marker) :].strip()), "".join(output)
            output.append(text)
        raise AssertionError(f"no end of {line!r} within {timeout} s: {''.join(output)}")

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=10)
        self._proc.stdout.close()


@pytest.fixture
def walkthrough_dir(tmp_path: Path) -> Path:
    """A fresh directory whose ``.venv`` is the environment running these tests."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return tmp_path


def _typed_at_a_terminal(line: str, cwd: Path, env: dict[str, str], typed: str) -> int:
    """Run ``line`` on a fresh pty of its own (no controlling terminal, so getpass reads the pty)
    and type ``typed`` into it, as a reader answers the prompts."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            shlex.split(line),
            cwd=cwd,
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
        )
        os.write(controller, typed.encode())
        code = proc.wait(timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    return code


@pytest.fixture
def daemon(walkthrough_dir: Path) -> Iterator[subprocess.Popen[str]]:
    *registrations, line = logical_lines(walkthrough_blocks()[0])
    env = _environment()
    for registration in registrations:  # `users add ID ...`: the PIN, typed twice
        pin = PINS[registration.split()[3]]
        assert _typed_at_a_terminal(registration, walkthrough_dir, env, f"{pin}\n{pin}\n") == 0
    proc = subprocess.Popen(
        shlex.split(line),
        cwd=walkthrough_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _environment() -> dict[str, str]:
    """A reader's shell: no DEVICECTL_* settings of ours, the venv not yet on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICECTL_")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.pop("VIRTUAL_ENV", None)
    env["COLUMNS"] = "120"
    return env


def _wait_for_daemon(shell: Shell, daemon: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert daemon.poll() is None, "the daemon exited before the walk-through began"
        code, out = shell.run(".venv/bin/devicectl status --control ./devicectl.sock --json")
        if code == 0 and '"connected": true' in out:
            return
        time.sleep(0.2)
    raise AssertionError("the daemon never connected to its simulator")


@pytest.mark.system
def test_the_readme_walkthrough_works_verbatim(
    walkthrough_dir: Path, daemon: subprocess.Popen[str]
) -> None:
    env = _environment() | {  # the PINs the reader would type at each prompt
        "DEVICECTL_PIN": PINS["OP-7"],
        "DEVICECTL_SUPERVISOR_PIN": PINS["SUP-1"],
    }
    shell = Shell(walkthrough_dir, env)
    try:
        _wait_for_daemon(shell, daemon)
        transcript: list[str] = []
        for line in logical_lines(walkthrough_blocks()[1]):
            code, out = shell.run(line)
            transcript.append(f"$ {line}\n{out}[exit {code}]")
            assert code == expected_exit(line), "\n".join(transcript)
            if "footswitch down" in line:
                time.sleep(0.5)  # a reader takes that long to type the next line: pulses flow
    finally:
        shell.close()
    assert (walkthrough_dir / "report.html").stat().st_size > 0
    assert "intact" in transcript[-1]
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
