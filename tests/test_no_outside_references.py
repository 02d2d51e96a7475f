"""Nothing in the repository cites a file outside it: the project's own docs/ carry its contracts.

The two design files kept beside the repository (the original design and its measured figures)
are never named: spelled here in pieces so that this test does not name them either.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("DESIGN" + ".md", "MEASURED" + ".md")


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to list")  # an sdist has no history to check
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_file_cites_the_design_files_outside_the_repository() -> None:
    found = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if any(name in line for name in OUTSIDE):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cite docs/ instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "doc", ["protocol.md", "mqtt.md", "cli.md", "control-api.md", "safety-model.md"]
)
def test_the_cited_contracts_exist(doc: str) -> None:
    assert (ROOT / "docs" / doc).is_file()
