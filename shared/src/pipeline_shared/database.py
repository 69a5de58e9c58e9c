"""One way to open a SQL database, for the services that keep state.

A ``sqlite://`` URL names a file for one host; a ``postgresql://`` URL a
server that replicas on several hosts share. Both go through SQLAlchemy Core,
so a store has one code path for both. Needs the ``db`` extra
(``pipeline-shared[db]``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 30_000


def engine_url(database_url: str) -> str:
    """``postgresql://`` and ``postgres://`` URLs use psycopg 3; others stay as they are."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url.removeprefix(prefix)
    return database_url


def build_engine(database_url: str) -> Engine:
    url = make_url(engine_url(database_url))
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _configure(connection: Any, record: Any) -> None:
        # Let SQLAlchemy's BEGIN below, not the driver, open transactions.
        connection.isolation_level = None
        cursor = connection.cursor()
        # WAL lets readers on one host go on while another process writes;
        # FULL sync makes a commit survive a power cut, not just a crash.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # Take the write lock when the transaction starts: a read-then-write
        # transaction then waits for another writer instead of failing at
        # its first write.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
