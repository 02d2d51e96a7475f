"""Driving a running simulator by hand or by script: command words and the control socket.

The simulator is controlled with short command words (docs/cli.md), the same on the command
line (``devicectl sim-control``), in scenario files and on the control socket::

    footswitch down|up
    interlock estop|door|key|contact|cooling open|close
    fault energy-drift FACTOR | stuck-shutter | overheat | line-noise BER | drop-frames P
          | slow-replies MS | hang
    clear-faults
    reboot
    status

:func:`parse_command` turns words into a typed command (or a :class:`CommandError` naming the bad
word); :func:`apply_command` applies one to the board a :class:`BoardRunner` drives.

The control socket is a Unix socket speaking JSON lines, one request per line, one reply per line,
the reply written only once the board has applied the command::

    -> {"command": ["footswitch", "down"]}          (or "footswitch down")
    <- {"ok": true, "result": "footswitch down"}
    -> {"command": "status"}
    <- {"ok": true, "result": {"state": "STANDBY", ...}}
    <- {"ok": false, "kind": "usage", "error": "one line naming the cause"}

``kind`` is ``usage`` (the request or its words are wrong), ``refused`` (the board would not do it)
or ``internal``. A malformed request is answered and never disturbs the simulator. The socket file
is created 0660, like the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.errors import DevicectlError
from protocols.messages import INTERLOCK_NAMES, BootReason

if TYPE_CHECKING:
    from simulator.runner import BoardRunner

__all__ = [
    "FAULT_NAMES",
    "MAX_REQUEST_BYTES",
    "ClearFaults",
    "CommandError",
    "ControlRefused",
    "ControlServer",
    "Footswitch",
    "InjectFault",
    "Reboot",
    "SetInterlock",
    "SimCommand",
    "SimulatorUnreachable",
    "Status",
    "apply_command",
    "default_control_path",
    "parse_command",
    "send_command",
]

MAX_REQUEST_BYTES: Final = 64 * 1024
SOCKET_MODE: Final = 0o660
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107


class CommandError(DevicectlError):
    """Command words the simulator does not understand; ``reason`` names the bad word."""

    def __init__(self, words: Sequence[str], reason: str) -> None:
        self.words, self.reason = tuple(words), reason
        shown = " ".join(self.words) or "(nothing)"
        super().__init__(f"bad simulator command {shown!r}: {reason}")


class ControlRefused(DevicectlError):
    """The simulator answered a control request with an error; ``kind`` says whose fault."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class SimulatorUnreachable(DevicectlError):
    """No simulator answers at the control socket ``path``."""

    def __init__(self, path: Path, cause: str) -> None:
        self.path, self.cause = path, cause
        super().__init__(f"no simulator at {path}: {cause}")


def default_control_path() -> Path:
    """Where ``devicectl sim`` listens and ``sim-control`` connects when no socket is named.

    ``$XDG_RUNTIME_DIR/devicectl-sim.sock`` (private to the user on systemd machines), else
    ``/tmp/devicectl-sim-<uid>.sock``: per user, so that two engineers on one box do not collide.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "devicectl-sim.sock"
    return Path(f"/tmp/devicectl-sim-{os.getuid()}.sock")  # noqa: S108 - per-user name, 0660


# ---------------------------------------------------------------- command words


@dataclass(frozen=True, slots=True)
class Footswitch:
    down: bool

    def words(self) -> tuple[str, ...]:
        return ("footswitch", "down" if self.down else "up")


@dataclass(frozen=True, slots=True)
class SetInterlock:
    name: str
    open_: bool

    def words(self) -> tuple[str, ...]:
        return ("interlock", self.name, "open" if self.open_ else "close")


@dataclass(frozen=True, slots=True)
class InjectFault:
    fault: str
    value: float | None

    def words(self) -> tuple[str, ...]:
        if self.value is None:
            return ("fault", self.fault)
        return ("fault", self.fault, f"{self.value:g}")


@dataclass(frozen=True, slots=True)
class ClearFaults:
    def words(self) -> tuple[str, ...]:
        return ("clear-faults",)


@dataclass(frozen=True, slots=True)
class Reboot:
    def words(self) -> tuple[str, ...]:
        return ("reboot",)


@dataclass(frozen=True, slots=True)
class Status:
    def words(self) -> tuple[str, ...]:
        return ("status",)


SimCommand = Footswitch | SetInterlock | InjectFault | ClearFaults | Reboot | Status


@dataclass(frozen=True, slots=True)
class _Argument:
    """The one numeric argument of a fault: its name in messages and its inclusive range."""

    name: str
    low: float
    high: float
    meaning: str
    low_excluded: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_excluded else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def describe(self) -> str:
        low = f"above {self.low:g}" if self.low_excluded else f"{self.low:g}"
        return f"{low}..{self.high:g}"


# fault name -> its argument, or None when it takes none (docs/cli.md).
FAULT_NAMES: Final[dict[str, _Argument | None]] = {
    "energy-drift": _Argument(
        "FACTOR", 0.0, 10.0, "measured energy = setpoint × FACTOR", low_excluded=True
    ),
    "stuck-shutter": None,
    "overheat": None,
    "line-noise": _Argument("BER", 0.0, 1.0, "bit error rate, both directions"),
    "drop-frames": _Argument("P", 0.0, 1.0, "probability of dropping a frame, both directions"),
    "slow-replies": _Argument("MS", 0.0, 60_000.0, "extra delay of every reply in ms"),
    "hang": None,
}

_BARE_COMMANDS: Final[dict[str, SimCommand]] = {
    "clear-faults": ClearFaults(),
    "reboot": Reboot(),
    "status": Status(),
}
_VERBS: Final = ("footswitch", "interlock", "fault", "clear-faults", "reboot", "status")


def _expect_arity(words: Sequence[str], count: int, usage: str) -> None:
    if len(words) != count:
        raise CommandError(words, f"expected `{usage}`")


def _choice(words: Sequence[str], word: str, choices: Sequence[str], what: str) -> str:
    if word not in choices:
        raise CommandError(words, f"unknown {what} {word!r} (expected {' or '.join(choices)})")
    return word


def _number(words: Sequence[str], text: str, arg: _Argument) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(words, f"{arg.name} must be a number, not {text!r}") from None
    if not arg.admits(value):
        raise CommandError(
            words, f"{arg.name} {text} is out of range {arg.describe()} ({arg.meaning})"
        )
    return value


def parse_command(command: str | Sequence[str]) -> SimCommand:
    """The command that ``command`` (words, or one string of them) names; CommandError if none."""
    words = tuple(command.split()) if isinstance(command, str) else tuple(command)
    if not words:
        raise CommandError(words, f"no command given (expected one of: {', '.join(_VERBS)})")
    verb = words[0]
    if verb == "footswitch":
        _expect_arity(words, 2, "footswitch down|up")
        return Footswitch(
            down=_choice(words, words[1], ("down", "up"), "footswitch position") == "down"
        )
    if verb == "interlock":
        _expect_arity(words, 3, "interlock estop|door|key|contact|cooling open|close")
        name = _choice(words, words[1], tuple(INTERLOCK_NAMES), "interlock")
        return SetInterlock(
            name, open_=_choice(words, words[2], ("open", "close"), "action") == "open"
        )
    if verb == "fault":
        if len(words) < 2:
            raise CommandError(
                words, f"expected `fault NAME` with NAME one of {', '.join(FAULT_NAMES)}"
            )
        fault = words[1]
        if fault not in FAULT_NAMES:
            raise CommandError(
                words, f"unknown fault {fault!r} (expected one of {', '.join(FAULT_NAMES)})"
            )
        arg = FAULT_NAMES[fault]
        if arg is None:
            _expect_arity(words, 2, f"fault {fault}")
            return InjectFault(fault, None)
        _expect_arity(words, 3, f"fault {fault} {arg.name}")
        return InjectFault(fault, _number(words, words[2], arg))
    bare = _BARE_COMMANDS.get(verb)
    if bare is not None:
        _expect_arity(words, 1, verb)
        return bare
    raise CommandError(words, f"unknown command {verb!r} (expected one of: {', '.join(_VERBS)})")


def apply_command(runner: BoardRunner, command: SimCommand) -> Any:
    """Apply ``command`` to the board ``runner`` drives, at the runner's time; JSON-able result.

    ``status`` returns the board's status object; every other command returns its canonical words
    as one string. The runner is woken so that the board's answer (an INPUT event, a FAULT, a BOOT)
    reaches the host and its next deadline is recomputed.
    """
    board = runner.board
    now_us = runner.now_us()
    match command:
        case Status():
            return board.status(now_us)
        case Footswitch(down=down):
            board.footswitch(down, now_us)
        case SetInterlock(name=name, open_=open_):
            board.interlock(name, open_, now_us)
        case InjectFault(fault=fault, value=value):
            board.inject(fault, value, now_us)
        case ClearFaults():
            board.clear_faults(now_us)
        case Reboot():
            board.reboot(now_us, reason=BootReason.POWER_ON)
    runner.wake()
    return " ".join(command.words())


# ---------------------------------------------------------------- the control socket


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | list[str] = Field(min_length=1)


def _parse_request(line: bytes) -> SimCommand:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlRefused("usage", f"request is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ControlRefused("usage", 'request must be a JSON object like {"command": "status"}')
    try:
        request = _Request.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise ControlRefused("usage", f"invalid request: {where}: {first['msg']}") from exc
    try:
        return parse_command(request.command)
    except CommandError as exc:
        raise ControlRefused("usage", str(exc)) from exc


def _reply(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, default=str) + "\n").encode()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


class ControlServer:
    """Serves the simulator's control socket at ``path`` while the context is open.

    ``transport_status`` adds the serving link's counters (bytes each way, dropped bytes, clients)
    to the ``status`` result under ``"transport"``.

    A stale socket file left by a killed simulator is replaced; a live one is an error (two
    simulators cannot share a socket). The file is removed on exit.
    """

    def __init__(
        self,
        runner: BoardRunner,
        path: Path,
        *,
        transport_status: Callable[[], dict[str, Any]] | None = None,
        log: Any = None,
    ) -> None:
        self.path = path
        self._runner = runner
        self._transport_status = transport_status
        self._log = log if log is not None else structlog.get_logger("simulator.control")
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ControlServer:
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            raise DevicectlError(
                f"control socket path {self.path} is longer than {_MAX_SOCKET_PATH} bytes"
            )
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise DevicectlError(f"control socket path {self.path} exists and is not a socket")
            if _socket_alive(self.path):
                raise DevicectlError(f"another simulator is already listening on {self.path}")
            self.path.unlink()
        old_umask = os.umask(0o117)  # born 0660, never world-writable even for an instant
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise DevicectlError(
                f"cannot create control socket {self.path}: {exc.strerror or exc}"
            ) from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        self._log.info("sim_control_listening", path=str(self.path))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the limit: answer, then drop the connection
                    writer.write(
                        _reply({"ok": False, "kind": "usage", "error": "request too long"})
                    )
                    await writer.drain()
                    return
                if not line:
                    return
                if line.strip():
                    writer.write(self.answer(line))
                    await writer.drain()
        except ConnectionError:
            return
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def answer(self, line: bytes) -> bytes:
        """The reply line to request ``line``, once the board has applied it."""
        try:
            command = _parse_request(line)
            result = apply_command(self._runner, command)
            if isinstance(command, Status) and self._transport_status is not None:
                result = {**result, "transport": self._transport_status()}
        except ControlRefused as exc:
            return _reply({"ok": False, "kind": exc.kind, "error": str(exc)})
        except (DevicectlError, ValueError) as exc:
            return _reply(
                {"ok": False, "kind": "refused", "error": f"the simulator refused: {exc}"}
            )
        except Exception as exc:  # noqa: BLE001 - a bug must never take the control socket down
            self._log.exception("sim_control_request_failed", error=str(exc))
            return _reply(
                {"ok": False, "kind": "internal", "error": f"internal error: {type(exc).__name__}"}
            )
        self._log.info("sim_control_applied", command=" ".join(command.words()))
        return _reply({"ok": True, "result": result})


async def send_command(
    path: Path, command: str | Sequence[str], *, answer_within_s: float = 10.0
) -> Any:
    """Send one command to the simulator at ``path`` and return its result.

    Raises :class:`CommandError` before connecting when the words are wrong,
    :class:`ControlRefused` when the simulator says no, and :class:`SimulatorUnreachable` when no
    simulator answers there.
    """
    words = tuple(command.split()) if isinstance(command, str) else tuple(command)
    parse_command(words)  # validate locally: a typo never needs a simulator to be reported
    try:
        async with asyncio.timeout(answer_within_s):
            reader, writer = await asyncio.open_unix_connection(
                str(path), limit=MAX_REQUEST_BYTES * 16
            )
            try:
                writer.write(_reply({"command": list(words)}))
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except FileNotFoundError:
        raise SimulatorUnreachable(
            path, "no control socket there (is `devicectl sim` running?)"
        ) from None
    except TimeoutError:
        raise SimulatorUnreachable(path, f"no answer within {answer_within_s:g} s") from None
    except OSError as exc:
        raise SimulatorUnreachable(path, exc.strerror or str(exc)) from exc
    if not line:
        raise SimulatorUnreachable(path, "the simulator closed the connection without answering")
    try:
        reply = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SimulatorUnreachable(path, f"the answer is not JSON: {exc}") from exc
    if reply.get("ok") is True:
        return reply.get("result")
    raise ControlRefused(str(reply.get("kind", "refused")), str(reply.get("error", "refused")))
