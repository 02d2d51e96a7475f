"""The SQLite file: where it lives, its schema and migrations, and how it is opened.

One file, WAL mode. The schema version is ``PRAGMA user_version``; :data:`MIGRATIONS` lists the
scripts that bring a file from version *i* to *i+1*, run in one transaction each. Tables are
STRICT so a stored value cannot silently change type.

    pulses      one row per pulse, chained; indexed by pulse_no and by session
    records     every other record (session start/end, zone, params, event, status, gap), chained,
                the body canonical JSON
    chain_head  the last seq and hash, so a deleted tail is detected
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from devicectl import config
from devicectl.errors import LogUnavailable

__all__ = [
    "DB_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "connect",
    "default_data_dir",
    "default_db_path",
    "migrate",
]

DB_FILENAME = "sessions.db"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pulses (
        seq INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL,
        pulse_no INTEGER NOT NULL,
        t_us INTEGER NOT NULL,
        host_ns INTEGER NOT NULL,
        energy_uj INTEGER NOT NULL,
        zone TEXT NOT NULL,
        hash BLOB NOT NULL
    ) STRICT;
    CREATE INDEX pulses_by_pulse_no ON pulses(pulse_no);
    CREATE INDEX pulses_by_session ON pulses(session_id, seq);
    CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        session_id INTEGER,
        kind TEXT NOT NULL,
        at_ns INTEGER NOT NULL,
        body TEXT NOT NULL,
        hash BLOB NOT NULL
    ) STRICT;
    CREATE INDEX records_by_session ON records(session_id, kind);
    CREATE INDEX records_by_kind ON records(kind);
    CREATE TABLE chain_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL
    ) STRICT;
    INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, zeroblob(32));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_data_dir() -> Path:
    """The daemon's default data directory (``/var/lib/devicectl`` for root under systemd, else
    ``$XDG_DATA_HOME/devicectl``): the settings' own rule, so the CLI finds the daemon's log."""
    return config.default_data_dir(os.environ, os.geteuid())


def default_db_path(data_dir: Path | None = None) -> Path:
    """``DIR/sessions.db``, ``DIR`` defaulting to :func:`default_data_dir`."""
    return (data_dir if data_dir is not None else default_data_dir()) / DB_FILENAME


def connect(path: Path, *, readonly: bool = False, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open the log at ``path`` (created, with its directory, unless ``readonly``), in WAL mode,
    migrated to :data:`SCHEMA_VERSION`. A failure is a :class:`LogUnavailable` naming the cause."""
    try:
        if readonly:
            if not path.is_file():
                raise LogUnavailable(f"no session log at {path}")
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The writer thread takes over the connection opened here; one thread at a time.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise LogUnavailable(f"session log {path} cannot be opened: {exc.strerror}{where}") from exc
    except sqlite3.Error as exc:
        raise LogUnavailable(f"session log {path} cannot be opened: {exc}") from exc
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {_synchronous(synchronous)}")
            migrate(conn, path)
        else:
            _check_readable_version(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise LogUnavailable(f"session log {path} is unusable: {exc}") from exc
    except LogUnavailable:
        conn.close()
        raise
    return conn


def _check_readable_version(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise LogUnavailable(
            f"session log {path} has schema version {version}, "
            f"this devicectl reads version {SCHEMA_VERSION}"
        )


def _synchronous(level: str) -> str:
    if level.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {level!r}")
    return level.upper()


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to :data:`SCHEMA_VERSION`, one transaction per step."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise LogUnavailable(
            f"session log {path} has schema version {version}, newer than this devicectl "
            f"({SCHEMA_VERSION}); upgrade devicectl"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
