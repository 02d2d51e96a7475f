"""The package layers (README, "Architecture"), enforced: devicectl above drivers and simulator,
which never import each other, above protocols, which does no I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_cli_starts_without_loading_heavy_optional_parts() -> None:
    """`devicectl --help` and sim-control must start fast on a small device: matplotlib, the MQTT
    client, the web server and the embedded broker load only for the commands that use them."""
    probe = (
        "import sys; from devicectl.cli import app; "
        "heavy = {'matplotlib', 'aiomqtt', 'paho', 'uvicorn', 'starlette', 'amqtt'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
