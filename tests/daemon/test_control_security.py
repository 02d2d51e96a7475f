"""Who may drive the laser through the control socket."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devicectl.control import ControlError, ControlServer, StatusRequest, parse_request
from devicectl.errors import DevicectlError
from tests.conftest import IN_CI

NOBODY = 65534


async def _status(_request: Any) -> dict[str, Any]:
    assert isinstance(_request, StatusRequest)
    return {"state": "standby"}


def _as_nobody(path: Path) -> str:
    """Connect as uid/gid nobody in a forked child; what it read, or the error it hit."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try the socket, report, exit
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(b'{"command": "status"}\n')
                answer = sock.recv(4096).decode()
        except OSError as exc:
            answer = f"OSError {exc.errno}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


# Switching uid needs root. CI runs as root; in CI a non-root run fails rather than skips.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="switching uid needs root (CI runs as root)"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp root is 0700), so that only the
    socket's own mode and the peer check decide who gets in."""
    directory = Path(tempfile.mkdtemp(prefix="devicectl-ctl-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@needs_root
async def test_other_users_cannot_connect_to_a_0660_socket(open_dir: Path) -> None:
    path = open_dir / "ctl.sock"
    async with ControlServer(path, _status):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        answer = await asyncio.to_thread(_as_nobody, path)
        path.chmod(0o666)  # the control: with the mode loosened, the same child gets in
        loosened = await asyncio.to_thread(_as_nobody, path)
    assert answer == "OSError 13"  # EACCES: the file mode keeps them out
    assert json.loads(loosened)["ok"] is True


@needs_root
async def test_the_peer_is_checked_against_the_control_group(open_dir: Path) -> None:
    group = grp.getgrgid(0).gr_name  # nobody is not a member of root's group
    path = open_dir / "ctl.sock"
    async with ControlServer(path, _status, group=group) as server:
        path.chmod(0o666)  # even if the mode were loosened by mistake...
        answer = await asyncio.to_thread(_as_nobody, path)
        assert server.refused_peers == 1
        # ...while root (and the daemon's own user) still may.
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"command": "status"}\n')
        reply = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
    refusal = json.loads(answer)
    assert refusal["ok"] is False
    assert "permission denied: uid 65534" in refusal["error"]
    assert reply == {"ok": True, "result": {"state": "standby"}}


async def test_a_world_writable_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    unsafe = tmp_path / "shared"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    with pytest.raises(DevicectlError, match="world-writable without the sticky bit"):
        async with ControlServer(unsafe / "ctl.sock", _status):
            pass


async def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    async with ControlServer(path, _status):
        with pytest.raises(DevicectlError, match="already listening"):
            async with ControlServer(path, _status):
                pass


@pytest.mark.parametrize(
    ("request_body", "where"),
    [
        ({"command": "session_note", "text": "fine\x1b[8m hidden"}, "text"),
        ({"command": "session_note", "text": "line one\r\nfault ack by SUP-2"}, "text"),
        ({"command": "session_adverse_event", "severity": "mild", "action_taken": "a\u202eb"},
         "action_taken"),
        ({"command": "session_end", "post_care_declined": "           "}, "post_care_declined"),
        ({"command": "fault_ack", "signoff": {
            "user": "SUP-1", "pin": "123456", "reason_code": "handpiece_checked",
            "reason": "checked\x00\x00\x00\x00"}}, "reason"),
        ({"command": "fault_ack", "signoff": {
            "reason_code": "handpiece_checked", "reason": " " * 12}}, "reason"),
    ],
)  # fmt: skip
def test_free_text_with_control_characters_or_only_blanks_is_refused_at_the_edge(
    request_body: dict[str, Any], where: str
) -> None:
    """A note or a reason is read by people (terminal, report, broker): a terminal escape, a line
    break forging a line, a bidi override or a blank sign-off reason is refused in one line."""
    body = {**request_body, "auth": {"user": "OP-7", "pin": "123456"}}
    with pytest.raises(ControlError) as caught:
        parse_request(json.dumps(body).encode())
    assert caught.value.kind == "usage"
    message = str(caught.value)
    assert where in message and "\n" not in message, message
    assert parse_request(  # the same request with plain text is accepted
        json.dumps({"command": "session_note", "text": "patient comfortable, mild erythema"}
                   | {"auth": body["auth"]}).encode()
    ) is not None  # fmt: skip
