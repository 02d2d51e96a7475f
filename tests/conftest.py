"""Suite-wide fixtures.

``no_leaks`` (autouse) fails any test that leaves a thread, a child process or an open socket
behind: a component that does not shut down cleanly in a test will not shut down cleanly on a
device either. In CI (``CI=true``) a missing tool is a failure, never a skip: see ``require_tool``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """The path of executable ``name``; skip when missing, except in CI, where it fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {name})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def _sockets() -> set[str]:
    found: set[str] = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads, children, sockets = _threads(), _children(), _sockets()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        # asyncio's default executor threads may linger briefly after a loop closes.
        new_threads = {t for t in _threads() - threads if not t.name.startswith("asyncio_")}
        new_children = _children() - children
        new_sockets = _sockets() - sockets
        if not (new_threads or new_children or new_sockets) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    leaks = []
    if new_threads:
        leaks.append(f"threads {sorted(t.name for t in new_threads)}")
    if new_children:
        leaks.append(f"child processes {sorted(new_children)}")
    if new_sockets:
        leaks.append(f"{len(new_sockets)} open socket(s)")
    if leaks:
        pytest.fail("test left behind: " + ", ".join(leaks))


pytest_plugins = ["tests.brokers", "tests.postgres"]


# A test that starts a real service (a broker, a PostgreSQL cluster) is a system test whatever its
# module says, so the fast lane (`-m "not system"`) never waits for one.
_SERVICE_FIXTURES = frozenset({"mosquitto", "pki", "postgres_cluster", "postgres_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
