"""A throwaway PostgreSQL cluster for tests (a pytest plugin: ``pytest_plugins``).

``postgres_cluster`` (session scope) runs ``initdb`` and ``pg_ctl start`` in a temporary
directory on a free port of 127.0.0.1 (trust authentication, fsync off: a test cluster), and
stops it at the end of the session. ``initdb`` is looked for on PATH, then under
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package). Missing: skipped locally, a
failure in CI. Run as root (containers), the server runs as the ``postgres`` user, as PostgreSQL
refuses to run as root.

``postgres_url`` (function scope) is a fresh, empty database on that cluster, dropped after.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.brokers import free_port
from tests.conftest import IN_CI

__all__ = ["PostgresCluster", "find_pg_bin", "postgres_cluster", "postgres_url"]

_counter = itertools.count(1)


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


@dataclass
class PostgresCluster:
    bin_dir: Path
    directory: Path
    port: int
    user: str | None  # the OS user the server runs as (None: the current one)

    @property
    def admin_url(self) -> str:
        return f"postgresql://devicectl@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://devicectl@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=timeout,
            user=self.user,
            cwd=self.directory,
        )

    def start(self) -> None:
        data = self.directory / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "devicectl", "--no-sync")
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=on -c max_connections=100"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed (postgresql)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    user = None
    directory = Path(tempfile.mkdtemp(prefix="devicectl-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(bin_dir, directory, free_port(), user)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(postgres_cluster.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_cluster.url(name)
    finally:
        with psycopg.connect(postgres_cluster.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
