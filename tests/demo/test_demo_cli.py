"""``devicectl demo`` as a user runs it: the installed console script, in a subprocess.

The whole run is checked from the outside: exit 0, the session log verifies, the report exists,
and the counts printed match the log read back independently. Ctrl-C half-way must exit promptly
with nothing left listening and the log intact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devicectl.sessionlog import verify_log
from tests.brokers import Broker

pytestmark = pytest.mark.system


def _devicectl() -> list[str]:
    script = Path(sys.executable).with_name("devicectl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from devicectl.cli import main; main()"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _line(output: str, label: str) -> str:
    found = re.search(rf"^{re.escape(label)}: (.+)$", output, re.MULTILINE)
    assert found is not None, f"no {label!r} line in:\n{output}"
    return found.group(1).strip()


def _refused(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) != 0


def test_demo_plays_the_session_as_scripted(tmp_path: Path) -> None:
    data = tmp_path / "run"
    done = subprocess.run(
        [*_devicectl(), "demo", "--duration", "10", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_env(),
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert "demo OK" in out

    log = Path(_line(out, "session log"))
    report = Path(_line(out, "report"))
    assert log == data.resolve() / "sessions.db"
    assert report.is_file()
    assert "<html" in report.read_text(encoding="utf-8").lower()

    verified = verify_log(log)
    assert verified.ok
    printed_verify = re.fullmatch(
        r"intact, (\d+) records \((\d+) pulses\)", _line(out, "log verify")
    )
    assert printed_verify is not None, out
    # The daemon records its own stop after the demo verified: one record more, no pulse more.
    assert int(printed_verify.group(1)) < verified.records
    assert int(printed_verify.group(2)) == verified.pulses

    session = re.search(r"^session (\d+): ([\d,]+) pulses", out, re.MULTILINE)
    assert session is not None, out
    session_id, printed = int(session.group(1)), int(session.group(2).replace(",", ""))
    with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as conn:
        logged = conn.execute(
            "SELECT COUNT(*), MIN(pulse_no), MAX(pulse_no) FROM pulses WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        zones = dict(
            conn.execute(
                "SELECT zone, SUM(energy_uj) FROM pulses WHERE session_id = ? GROUP BY zone",
                (session_id,),
            ).fetchall()
        )
    assert printed == logged[0] > 0
    assert set(zones) == {"forehead", "cheeks"}
    for zone, energy in zones.items():
        assert f"{zone} {energy / 1e6:.3f} J" in out

    breach = re.search(r"^breach: energy_out_of_tolerance at pulse (\d+)", out, re.MULTILINE)
    assert breach is not None, out
    assert logged[1] < int(breach.group(1)) < logged[2]  # pulses before and after it
    # The address printed at the start says how long it lives, and is not repeated at the end:
    # without --keep-running it closes with the demo.
    dashboard = _line(out, "dashboard")
    assert "--keep-running" in dashboard
    assert out.count("dashboard: ") == 1
    assert _refused(dashboard.split()[0])
    assert _refused(_line(out, "MQTT broker").split()[0])
    assert not list(data.glob("*.sock"))


def test_ctrl_c_midway_exits_promptly_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "run"
    proc = subprocess.Popen(
        [*_devicectl(), "demo", "--duration", "8", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[3/7]"):  # emitting on the cheeks
                break
        else:
            pytest.fail("the demo ended before emitting:\n" + "".join(seen))
        output = "".join(seen)
        assert (data / "control.sock").exists()
        # The embedded broker's dashboard has the Stop emission button docs/dashboard.md shows.
        url = _line(output, "dashboard").split()[0]
        with urllib.request.urlopen(url + "/api/snapshot", timeout=5) as response:
            assert json.load(response)["stop_enabled"] is True
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest, err = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "interrupted" in err
    assert len(err.strip().splitlines()) == 1, err
    assert took < 10, f"took {took:.1f} s to stop"
    assert "stopped: laser made safe" in rest
    assert not list(data.glob("*.sock"))
    assert _refused(_line(output, "dashboard").split()[0])
    assert _refused(_line(output, "MQTT broker").split()[0])
    assert verify_log(data / "sessions.db").ok
    assert not list(data.glob(".*.partial"))
    # Interrupted, it still writes what docs/demo.md lists: the result and the report.
    result = json.loads((data / "demo-result.json").read_text(encoding="utf-8"))
    assert result["ok"] is False
    assert result["reason"].startswith("interrupted during the ")
    assert "interrupted during the " in err and str(data.resolve()) in err
    assert (data / f"session-{result['session_id']}.html").is_file()
    with sqlite3.connect(f"file:{data / 'sessions.db'}?mode=ro", uri=True) as conn:
        events = [
            json.loads(body)["event"]
            for (body,) in conn.execute(
                "SELECT body FROM records WHERE kind = 'event' ORDER BY seq"
            )
        ]
    # Emission was stopped after the last arming, and the daemon shut down in order.
    last_armed = len(events) - 1 - events[::-1].index("armed")
    assert "stop" in events[last_armed:]
    assert events[-1] == "daemon_stopped"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--speed", "0"], "--speed 0 Hz"),
        (["--duration", "1"], "--duration 1 s"),
        (["--mqtt", "http://broker"], "mqtt.url"),
    ],
)
def test_bad_options_are_named_in_one_line(tmp_path: Path, args: list[str], named: str) -> None:
    done = subprocess.run(
        [*_devicectl(), "demo", *args, "--data-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=_env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_keep_running_with_a_named_broker_serves_until_ctrl_c(
    tmp_path: Path, mosquitto: Broker
) -> None:
    """--mqtt: no embedded broker; the telemetry reaches the named one, the dashboard shows the
    device and the daemon answers while it keeps running; Ctrl-C leaves the Last Will state."""
    data = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *_devicectl(),
            "demo",
            "--mqtt",
            mosquitto.url,
            "--duration",
            "4",
            "--keep-running",
            "--data-dir",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "press Ctrl-C to stop" in line:
                break
        else:
            pytest.fail("the demo did not keep running:\n" + "".join(seen))
        output = "".join(seen)
        assert _line(output, "MQTT broker") == mosquitto.url
        with urllib.request.urlopen(
            _line(output, "dashboard").split()[0] + "/api/snapshot", timeout=5
        ) as r:
            snapshot = json.load(r)
        assert len(snapshot["devices"]) == 1
        control = data / "control.sock"
        status = subprocess.run(
            [*_devicectl(), "status", "--control", str(control), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["armed"] is False
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "demo OK" in rest
    assert not control.exists()
    retained = subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            mosquitto.url.rsplit(":", 1)[1],
            "-t",
            "lasers/+/+/availability",
            "-C",
            "1",
            "-W",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert retained.stdout.strip() == "offline"
