"""Where the recorder keeps what it receives: PostgreSQL (psycopg 3, async) or embedded SQLite.

:func:`open_store` takes a database URL — ``postgresql://user@host/db`` (psycopg's conninfo
URL) or ``sqlite:///path/recorder.sqlite`` (also ``sqlite:relative.sqlite`` or a bare path) —
connects, migrates the schema (``schema.MIGRATIONS``) and returns a :class:`RecorderStore`.

Both engines get the same SQL (``%s`` parameters; SQLite's ``?`` is substituted). Writes are
batched: one transaction per batch of messages, one ``executemany`` per table, which psycopg
sends as a pipeline (no round trip per row). Every insert is ``ON CONFLICT DO NOTHING`` on the
row's natural key, so a message delivered twice — a redelivery after a recorder died before its
acknowledgement, a replay from a device's outbox, a retained copy — is stored once. A batch that
the database refuses for one bad row is retried message by message, and only the rows it still
refuses go to ``rejects``: one bad message never holds up the others. A lost database connection
raises :class:`StoreUnavailable`; the caller keeps the batch (unacknowledged) and retries.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from devicectl.errors import ConfigError, DevicectlError
from devicectl.recorder.intake import Accepted, Refused
from devicectl.recorder.schema import KEYS, MIGRATIONS, TABLES

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "PostgresStore",
    "RecorderStore",
    "SqliteStore",
    "StoreUnavailable",
    "WriteResult",
    "describe_url",
    "open_store",
]

_MIGRATION_LOCK = 0x6465_7663_7472_6C  # "devctrl": one advisory lock id for every recorder
_SESSION_MERGE = ("site", "patient", "operator", "skin_type")
# From this many rows of one table in a batch, PostgreSQL gets them by COPY through a staging table.
_COPY_FROM_ROWS = 50


class StoreUnavailable(DevicectlError):
    """The database cannot be reached or written right now (retry later)."""


class WriteResult:
    """What one :meth:`RecorderStore.write` did: rows offered per table, messages refused."""

    __slots__ = ("refused", "rows")

    def __init__(self) -> None:
        self.rows = 0
        self.refused: list[Refused] = []


def _insert_sql(table: str) -> str:
    columns = TABLES[table]
    keys = ", ".join(KEYS[table])
    placeholders = ", ".join(["%s"] * len(columns))
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
    if table == "sessions":
        # The first message that names a patient, operator or skin type wins; others only fill.
        merge = ", ".join(f"{c} = COALESCE({table}.{c}, excluded.{c})" for c in _SESSION_MERGE)
        return head + f"ON CONFLICT ({keys}) DO UPDATE SET {merge}"
    return head + f"ON CONFLICT ({keys}) DO NOTHING"


_INSERTS = {table: _insert_sql(table) for table in TABLES}
_REJECT_SQL = (
    "INSERT INTO rejects (recorded, topic, reason, size, payload_hex) VALUES (%s, %s, %s, %s, %s)"
)


def _rows_by_table(batch: Sequence[Accepted]) -> dict[str, list[tuple[Any, ...]]]:
    """Rows grouped per table, each natural key once (a batch may hold a message twice)."""
    grouped: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {t: {} for t in TABLES}
    for message in batch:
        for table, row in message.rows.items():
            width = len(KEYS[table])
            grouped[table].setdefault(row[:width], row)
    return {table: list(rows.values()) for table, rows in grouped.items() if rows}


def _raw(message: Accepted) -> bytes:
    """The payload as received, for ``rejects`` (kept in the message's or the batch's row)."""
    for table in ("messages", "pulse_batches", "checkpoints"):
        row = message.rows.get(table)
        if row is not None and isinstance(row[-1], str):
            return row[-1].encode(errors="replace")
    return b""


def _reject_row(refused: Refused, recorded: str) -> tuple[Any, ...]:
    head = refused.payload[:512]
    return (recorded, refused.topic[:512], refused.reason[:300], len(refused.payload), head.hex())


class RecorderStore(ABC):
    """A migrated recorder database. Use as ``async with await open_store(url) as store``."""

    engine: str

    @abstractmethod
    async def _write_rows(
        self, tables: dict[str, list[tuple[Any, ...]]], rejects: list[tuple[Any, ...]]
    ) -> None:
        """One transaction: every row, or none (raises ValueError for data the engine refuses,
        StoreUnavailable when the database cannot be reached)."""

    @abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query (``%s`` parameters)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def migrate(self) -> int:
        """Apply the migrations not applied yet; return the schema version."""

    async def __aenter__(self) -> RecorderStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def write(
        self, batch: Sequence[Accepted], refused: Sequence[Refused], recorded: str
    ) -> WriteResult:
        """Store a batch and the refused messages in one transaction; a row the database
        refuses is retried alone and, refused again, kept in ``rejects`` instead."""
        result = WriteResult()
        tables = _rows_by_table(batch)
        rejects = [_reject_row(r, recorded) for r in refused]
        result.refused.extend(refused)
        try:
            await self._write_rows(tables, rejects)
        except ValueError:
            pass
        else:
            result.rows = sum(len(rows) for rows in tables.values()) + len(rejects)
            return result
        # Something in the batch is refused by the engine itself: find it, keep the rest.
        if rejects:
            await self._write_rows({}, rejects)
            result.rows += len(rejects)
        for message in batch:
            rows = _rows_by_table([message])
            try:
                await self._write_rows(rows, [])
                result.rows += sum(len(r) for r in rows.values())
            except ValueError as exc:
                bad = Refused(message.topic, f"the database refused it: {exc}"[:300], _raw(message))
                await self._write_rows({}, [_reject_row(bad, recorded)])
                result.refused.append(bad)
        return result

    async def schema_version(self) -> int:
        rows = await self.fetch("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)


class SqliteStore(RecorderStore):
    """The embedded default: one SQLite file (WAL), used from one worker thread."""

    engine = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="recorder-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # acknowledged to the broker = on disk
        self._conn = conn

    async def open(self) -> None:
        try:
            await self._run(self._connect)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the recorder database is closed")
        return self._conn

    def _migrate(self) -> int:
        conn = self._c()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, description TEXT NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, description, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                    (version, description),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return max(v for v, _d, _s in MIGRATIONS)

    async def migrate(self) -> int:
        version: int = await self._run(self._migrate)
        return version

    def _write(
        self, tables: dict[str, list[tuple[Any, ...]]], rejects: list[tuple[Any, ...]]
    ) -> None:
        conn = self._c()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        try:
            for table, rows in tables.items():
                conn.executemany(_INSERTS[table].replace("%s", "?"), rows)
            if rejects:
                conn.executemany(_REJECT_SQL.replace("%s", "?"), rejects)
            conn.execute("COMMIT")
        except (
            sqlite3.IntegrityError,
            sqlite3.DataError,
            sqlite3.InterfaceError,
            OverflowError,
            UnicodeError,
        ) as exc:  # the data itself: retried row by row, what is still refused goes to rejects
            conn.execute("ROLLBACK")
            raise ValueError(str(exc)) from exc
        except sqlite3.Error as exc:  # locked, no such table, disk full: retried, not refused
            conn.execute("ROLLBACK")
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        except BaseException:
            conn.execute("ROLLBACK")  # never leave the transaction open behind an exception
            raise

    async def _write_rows(
        self, tables: dict[str, list[tuple[Any, ...]]], rejects: list[tuple[Any, ...]]
    ) -> None:
        await self._run(self._write, tables, rejects)

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return list(self._c().execute(sql.replace("%s", "?"), tuple(params)).fetchall())

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._run(self._fetch, sql, params)
        return rows

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)


class PostgresStore(RecorderStore):
    """PostgreSQL through psycopg 3's async connection: one for writes, one for reads, so a
    history query or a course request never waits behind a batch."""

    engine = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._write_conn: psycopg.AsyncConnection[Any] | None = None
        self._read_conn: psycopg.AsyncConnection[Any] | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._staged: set[str] = set()  # staging tables created on the write connection

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg

        try:
            return await psycopg.AsyncConnection.connect(self.url, connect_timeout=5)
        except psycopg.OperationalError as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"cannot connect to {describe_url(self.url)}: {cause}") from exc

    async def open(self) -> None:
        self._write_conn = await self._connect()
        self._read_conn = await self._connect()
        await self._read_conn.set_autocommit(True)

    async def migrate(self) -> int:
        conn = self._write_conn
        if conn is None:
            raise StoreUnavailable("the recorder database is closed")
        async with self._write_lock, conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, description TEXT NOT NULL)"
            )
            await cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, description, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    await cur.execute(statement)
                await cur.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                    (version, description),
                )
        return max(v for v, _d, _s in MIGRATIONS)

    async def _reconnect_writer(self) -> psycopg.AsyncConnection[Any]:
        conn = self._write_conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await conn.close()
            self._write_conn = conn = await self._connect()
            self._staged.clear()  # temporary tables die with their connection
        return conn

    async def _write_rows(
        self, tables: dict[str, list[tuple[Any, ...]]], rejects: list[tuple[Any, ...]]
    ) -> None:
        import psycopg

        async with self._write_lock:
            conn = await self._reconnect_writer()
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    for table, rows in tables.items():
                        if len(rows) >= _COPY_FROM_ROWS and table != "sessions":
                            await self._copy_rows(cur, table, rows)
                        else:
                            await cur.executemany(_INSERTS[table], rows)
                    if rejects:
                        await cur.executemany(_REJECT_SQL, rejects)
            except (psycopg.DataError, psycopg.IntegrityError, UnicodeError) as exc:
                self._staged.clear()  # a rolled-back transaction may take a staging table along
                raise ValueError(str(exc).splitlines()[0]) from exc
            except psycopg.Error as exc:
                # The connection, the server, or a schema that is not ours: never a reason to
                # refuse (and acknowledge) the messages. Retried with backoff.
                self._staged.clear()
                raise StoreUnavailable(f"{describe_url(self.url)}: {exc}") from exc

    async def _copy_rows(
        self, cur: psycopg.AsyncCursor[Any], table: str, rows: list[tuple[Any, ...]]
    ) -> None:
        """COPY into a per-connection staging table, then one INSERT ... ON CONFLICT DO NOTHING:
        the rows still land once each, with far less work per row than one INSERT each."""
        stage = f"stage_{table}"
        columns = ", ".join(TABLES[table])
        if table not in self._staged:
            await cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
                f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self._staged.add(table)
        async with cur.copy(f"COPY {stage} ({columns}) FROM STDIN") as copy:
            for row in rows:
                await copy.write_row(row)
        keys = ", ".join(KEYS[table])
        await cur.execute(
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage} "  # noqa: S608
            f"ON CONFLICT ({keys}) DO NOTHING"
        )

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        async with self._read_lock:
            conn = self._read_conn
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    await conn.close()
                conn = self._read_conn = await self._connect()
                await conn.set_autocommit(True)
            try:
                cur = await conn.execute(sql, tuple(params))
                return list(await cur.fetchall())
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"{describe_url(self.url)}: {exc}") from exc

    async def close(self) -> None:
        for conn in (self._write_conn, self._read_conn):
            if conn is not None:
                await conn.close()
        self._write_conn = self._read_conn = None


def describe_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:`` URL or a bare path; None for a PostgreSQL URL."""
    parts = urlsplit(url)
    if parts.scheme in {"postgresql", "postgres"}:
        return None
    if parts.scheme == "sqlite":
        return Path(url.removeprefix("sqlite:").removeprefix("//"))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a path (a Windows drive letter too)
        return Path(url)
    raise ConfigError(
        "--db", url, "postgresql://USER@HOST/DB, sqlite:///PATH or a path to a SQLite file"
    )


async def open_store(url: str, *, migrate: bool = True) -> RecorderStore:
    """Connect to ``url`` and bring its schema up to date (raises StoreUnavailable, ConfigError)."""
    path = sqlite_path(url)
    store: RecorderStore
    if path is None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "--db", describe_url(url), "psycopg installed: pip install 'devicectl[recorder]'"
            ) from exc
        pg = PostgresStore(url)
        await pg.open()
        store = pg
    else:
        if not migrate and not path.exists():
            raise StoreUnavailable(f"no recorder database at {path}")
        lite = SqliteStore(path)
        await lite.open()
        store = lite
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store


def placeholders(values: Iterable[object]) -> str:
    """``%s, %s, ...`` for an IN list."""
    return ", ".join("%s" for _ in values)
