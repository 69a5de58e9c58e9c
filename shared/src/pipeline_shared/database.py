"""One way to open a SQL database, for the services that keep state.

A ``sqlite://`` URL names a file for one host; a ``postgresql://`` URL a
server that replicas on several hosts share. Both go through SQLAlchemy Core,
so a store has one code path for both. Needs the ``db`` extra
(``pipeline-shared[db]``).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

SQLITE_BUSY_TIMEOUT_MS = 30_000
_SQLITE_BEGIN = "sqlite_begin"


def engine_url(database_url: str) -> str:
    """``postgresql://`` and ``postgres://`` URLs use psycopg 3; others stay as they are."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url.removeprefix(prefix)
    return database_url


def build_engine(database_url: str, *, durable: bool = True) -> Engine:
    """An engine for ``database_url``. ``durable=False`` trades the last moments of
    commits before a power cut (or, on PostgreSQL, a crash of the server) for
    commits that do not wait for the disk: for state that can be rebuilt."""
    url = make_url(engine_url(database_url))
    if url.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
        if not durable:
            # For the session, once: the engine's connections serve nothing else, and
            # a SET LOCAL in each transaction was one more round trip per commit.
            @event.listens_for(engine, "connect")
            def _relaxed(connection: Any, record: Any) -> None:
                with connection.cursor() as cursor:
                    cursor.execute("SET synchronous_commit TO OFF")
                connection.commit()

        return engine
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    synchronous = "FULL" if durable else "NORMAL"

    @event.listens_for(engine, "connect")
    def _configure(connection: Any, record: Any) -> None:
        # Let SQLAlchemy's BEGIN below, not the driver, open transactions.
        connection.isolation_level = None
        cursor = connection.cursor()
        # First, so that the pragmas below wait for another process's lock.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers on one host go on while another process writes;
        # FULL sync makes a commit survive a power cut, NORMAL a crash only.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # A writer (see ``for_writing``) takes the write lock when its
        # transaction starts, so a read-then-write transaction waits for
        # another writer instead of failing at its first write; readers do
        # not take it at all.
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    @event.listens_for(engine, "handle_error")
    def _reopen_if_read_only(context: Any) -> None:
        # SQLite opens a file it may not write read-only, and the connection stays
        # so after the file's permissions are mended: treat it as gone, so that the
        # pool opens a fresh one and the next write works without a restart.
        if "readonly database" in str(context.original_exception):
            context.is_disconnect = True

    return engine


_NOW = {
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}


def database_now(engine: Engine) -> str:
    """SQL for the database's clock as Unix seconds: replicas whose clocks disagree
    still agree on it."""
    return _NOW[engine.dialect.name]


def create_tables(engine: Engine, metadata: MetaData, attempts: int = 5) -> None:
    """Create the tables ``metadata`` names that do not exist yet.

    Services sharing a database may start at the same moment: one may create a
    table after the other looked for it, so a failed attempt is tried again
    after a short pause (and then finds the table there).
    """
    for attempt in range(1, attempts + 1):
        try:
            metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)


def add_missing_columns(engine: Engine, table: Table, attempts: int = 5) -> None:
    """Bring ``table``, made by an earlier version, up to date: add the columns it
    lacks (each nullable, NULL meaning what the rows meant before). Replicas starting
    together may race to add a column: a failed attempt looks again."""
    for attempt in range(1, attempts + 1):
        present = {column["name"] for column in inspect(engine).get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in present]
        if not missing:
            return
        try:
            with for_writing(engine).begin() as connection:
                for column in missing:
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.execute(
                        text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
                    )
            return
        except DBAPIError:
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)


def for_writing(engine: Engine) -> Engine:
    """The same engine for transactions that write: on SQLite they begin IMMEDIATE
    (taking the database's write lock at once); elsewhere nothing changes."""
    return engine.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
