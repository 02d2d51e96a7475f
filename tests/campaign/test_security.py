"""Security: who may drive the laser, and what never reaches a log.

- The control socket is created 0660: only its owner and group may connect; a peer without
  permission is refused by the kernel before a byte reaches the daemon (tested by connecting as
  another uid, which needs root: CI runs as root; elsewhere the test skips with the reason).
- MQTT over TLS with a password: the right one connects, a wrong one is refused and not echoed.
- The example systemd unit runs unprivileged and hardened.
- No secret ever appears in a log line: the daemon is run as a process with an MQTT password in
  the broker URL and another in the environment, through a broker outage (connection errors are
  logged) and a session, and its whole log is searched for both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.faults import Campaign
from devicectl.config import load_settings
from devicectl.simlink import compose
from tests.brokers import Broker, Pki
from tests.conftest import IN_CI, require_tool
from tests.daemon.conftest import TEST_POLICY

NOBODY = 65534
URL_SECRET = "url-Secret-7f3a9c"
ENV_SECRET = "env-Secret-b81d2e"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may traverse, so a refusal can only come from the socket's mode."""
    path = Path(tempfile.mkdtemp(prefix="devicectl-sec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        path.rmdir()


def _probe(sock: Path, *, uid: int, gid: int) -> str:
    """Connect to ``sock`` from a forked child running as ``uid``:``gid`` (no other groups)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, try, report through the pipe, never return
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                try:
                    peer.connect(str(sock))
                except PermissionError:
                    answer = b"refused"
                else:
                    peer.sendall(b'{"command": "status"}\n')
                    answer = b"connected " + peer.makefile("rb").readline()[:40]
            os.write(write_end, answer)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reply = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, reply
    return reply


async def test_the_control_socket_is_0660_and_refuses_peers_without_permission(
    open_dir: Path,
) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI must run as root to test a peer under another uid")
        pytest.skip("needs root to connect as another uid (CI runs as root)")
    policy = open_dir / "policy.toml"
    policy.write_text(TEST_POLICY)
    settings = load_settings(
        None,
        port="sim",
        data_dir=open_dir / "data",
        control=open_dir / "ctl.sock",
        policy=policy,
    )
    async with compose(settings) as daemon:
        sock = Path(daemon.settings.control)
        info = os.stat(sock)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
        assert info.st_uid == os.geteuid()
        # Another uid in no group of the socket: refused by the kernel.
        result = await _run(sock, uid=NOBODY, gid=NOBODY)
        assert result == "refused", result
        # The same uid given the socket's group may drive the laser: the mode is what decides.
        os.chown(sock, -1, NOBODY)
        result = await _run(sock, uid=NOBODY, gid=NOBODY)
        assert result.startswith("connected"), result
        assert '"ok": true' in result


async def _run(sock: Path, *, uid: int, gid: int) -> str:
    return await asyncio.to_thread(_probe, sock, uid=uid, gid=gid)


def _logged(rig: Campaign, event: str, times: int = 1, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout  # the daemon's MQTT backoff caps at 30 s
    while rig.daemon_log.read_text().count(f'"event": "{event}"') < times:
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon never logged {event}")
        time.sleep(0.1)


def test_no_secret_appears_in_any_log_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("mosquitto")
    rig = Campaign(tmp_path)
    url = rig.broker.url.replace("mqtt://", f"mqtt://campaign:{URL_SECRET}@")
    rig.config.write_text(
        rig.config.read_text().replace(f'url = "{rig.broker.url}"', f'url = "{url}"')
    )
    try:
        rig.start_sim()
        # The broker is down at first: the daemon logs its failed connections.
        rig.start_daemon()
        rig.open_session()
        rig.emit(0.3)
        rig.broker.start()
        rig.start_recorder()
        _logged(rig, "mqtt_connected")  # the secrets were used: connected with them
        rig.wind_down([])
        assert rig.stop_daemon(signal.SIGTERM) == 0
        # The password from the environment instead, with a user name from the config.
        rig.config.write_text(
            rig.config.read_text().replace(url, rig.broker.url) + 'username = "campaign"\n'
        )
        monkeypatch.setenv("DEVICECTL_MQTT__PASSWORD", ENV_SECRET)
        rig.broker.stop()
        rig.start_daemon()
        rig.broker.start()
        _logged(rig, "mqtt_connected", times=2)  # with the password from the environment
        assert rig.stop_daemon(signal.SIGTERM) == 0
    finally:
        rig.close()
    log = rig.daemon_log.read_text()
    leaks = [line for line in log.splitlines() if URL_SECRET in line or ENV_SECRET in line]
    assert not leaks, "\n".join(leaks[:5])


UNIT = Path(__file__).resolve().parents[2] / "examples" / "devicectl.service"


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a systemd unit (repeated keys kept in order)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_example_unit_runs_unprivileged_and_hardened() -> None:
    unit = _unit_settings(UNIT)
    assert unit["User"] != ["root"] and unit["User"], unit.get("User")
    assert unit["Group"] != ["root"] and unit["Group"], unit.get("Group")
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "DevicePolicy": "closed",
        "Type": "notify",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert "WatchdogSec" in unit
    # open files above systemd's default 1,024: the control socket's cap keeps half of them free
    assert int(unit["LimitNOFILE"][0]) >= 1024, unit.get("LimitNOFILE")
    # the safety loop's SCHED_FIFO (priority 40 by default) and locked memory, granted by limits
    # rather than capabilities, and not refused by the sandbox
    assert int(unit["LimitRTPRIO"][0]) >= 40, unit.get("LimitRTPRIO")
    assert unit["LimitMEMLOCK"] == ["infinity"], unit.get("LimitMEMLOCK")
    assert "RestrictRealtime" not in unit
    assert not any("@resources" in f for f in unit["SystemCallFilter"] if f.startswith("~"))
    # Secrets come from a root-owned file, never from the unit itself.
    assert not any("PASSWORD" in e.upper() for e in unit.get("Environment", []))
    assert unit.get("EnvironmentFile"), "no EnvironmentFile for the MQTT credentials"


def test_the_kernel_workers_unit_holds_one_capability_and_no_network() -> None:
    """The one job that needs a privilege (raising the kernel's tty workers) is a unit of its
    own, so that the daemon's holds none."""
    unit = _unit_settings(UNIT.with_name("devicectl-kernel-workers.service"))
    assert unit["CapabilityBoundingSet"] == ["CAP_SYS_NICE"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "PrivateNetwork": "yes",
        "PrivateDevices": "yes",
        "ProtectSystem": "strict",
        "AmbientCapabilities": "",
    }.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert "devicectl kernel-workers --priority 39" in unit["ExecStart"][0]
    daemon = _unit_settings(UNIT)
    assert "devicectl-kernel-workers.service" in daemon["Wants"]


@pytest.fixture
def tls_password_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    """mosquitto with a TLS listener (the test CA) and user ``laser1``, password ``ENV_SECRET``."""
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(
        [require_tool("mosquitto_passwd"), "-b", str(passwords), "laser1", ENV_SECRET],
        check=True,
        timeout=30,
    )
    passwords.chmod(0o644)
    extra = (f"password_file {passwords}",)
    with Broker(tmp_path / "mosquitto", tls=pki, extra_config=extra) as broker:
        yield broker


@pytest.mark.parametrize(("password", "connects"), [(ENV_SECRET, True), ("wrong-pass", False)])
async def test_telemetry_over_tls_with_credentials(
    tmp_path: Path, pki: Pki, tls_password_broker: Broker, password: str, connects: bool
) -> None:
    """The daemon's telemetry reaches a TLS broker that checks passwords with the right one, is
    refused with a wrong one (the laser still works: only telemetry waits), and the password never
    appears in the refusal it reports."""
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    settings = load_settings(
        None,
        port="sim",
        data_dir=tmp_path / "data",
        control=tmp_path / "ctl.sock",
        policy=policy,
        mqtt__url=tls_password_broker.tls_url,
        mqtt__ca_file=pki.ca,
        mqtt__username="laser1",
        mqtt__password=password,
        mqtt__device="laser1",
    )
    async with compose(settings) as daemon:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            telemetry = daemon.telemetry
            stats = telemetry.stats if telemetry is not None else None
            if stats is not None and (stats.connected or stats.connect_failures):
                break
            assert loop.time() < deadline, "telemetry neither connected nor failed"
            await asyncio.sleep(0.02)
        assert stats.connected is connects, stats
        if not connects:
            assert stats.last_error, stats
            assert password not in stats.last_error
        assert daemon.link is not None and daemon.link.connected.is_set()
