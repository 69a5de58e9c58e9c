"""One budget of provider requests for every mailer replica, kept in the shared database.

Mailtrap allows a number of requests per API token in a window of time (150 per
10 s) and answers 429 beyond. The limit is the token's, not one process's: a
budget counted in each replica's memory lets N replicas send N times too much.
So every replica records each request it is about to make in the database the
ledger lives in (``DATABASE_URL``: one SQLite file per host, or PostgreSQL for
replicas on several hosts), in one transaction that first takes the budget's
row lock, and makes the request only if fewer than ``max_requests`` were
recorded in the last ``window_seconds``; otherwise it waits until the oldest
one leaves the window. The window is measured on the database's clock, like
the ledger's leases, and a little widened for the provider's. A 429 that still
comes (another client on the same token) blocks the budget for its
``Retry-After``, for every replica.

A lost write here (the budget's commits do not wait for the disk) costs at most
a few requests too many after a power cut; the ledger, not the budget, guards
against duplicate emails.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Column, Engine, Float, Index, MetaData, String, Table, text

from pipeline_shared.database import build_engine, create_tables, database_now, for_writing

log = logging.getLogger("mailer.budget")

metadata = MetaData()

budgets = Table(
    "mailer_send_budgets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("blocked_until", Float, nullable=False),
)
requests = Table(
    "mailer_send_requests",
    metadata,
    Column("name", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Index("mailer_send_requests_name_at", "name", "at"),
)

_LOCK = "SELECT blocked_until FROM mailer_send_budgets WHERE name = :name"
# The provider's window may start a little before ours ends (its clock, the network).
WINDOW_MARGIN = 1.05


class SendBudget:
    def __init__(
        self, engine: Engine, *, max_requests: int, window_seconds: float, name: str = "mailtrap"
    ) -> None:
        self._writer = for_writing(engine)
        self._engine = engine
        self._max = max_requests
        self._window = window_seconds * WINDOW_MARGIN
        self._name = name
        # SQLite has no FOR UPDATE: its writers hold the database's one write lock.
        locking = _LOCK + (" FOR UPDATE" if engine.dialect.name == "postgresql" else "")
        now = database_now(engine)
        self._now = text(f"SELECT {now}")
        self._ensure = text(
            "INSERT INTO mailer_send_budgets (name, blocked_until) VALUES (:name, 0) "
            "ON CONFLICT (name) DO NOTHING"
        )
        self._lock = text(locking)
        self._forget = text("DELETE FROM mailer_send_requests WHERE name = :name AND at <= :before")
        self._count = text(
            "SELECT COUNT(*) AS n, MIN(at) AS oldest FROM mailer_send_requests WHERE name = :name"
        )
        self._record = text("INSERT INTO mailer_send_requests (name, at) VALUES (:name, :at)")
        self._block = text(
            "UPDATE mailer_send_budgets SET blocked_until = :until "
            "WHERE name = :name AND blocked_until < :until"
        )

    @classmethod
    def open(cls, database_url: str, *, max_requests: int, window_seconds: float) -> SendBudget:
        engine = build_engine(database_url, durable=False)
        create_tables(engine, metadata)
        return cls(engine, max_requests=max_requests, window_seconds=window_seconds)

    async def acquire(self) -> None:
        """Return once this replica may make one request (and it is counted)."""
        await asyncio.to_thread(self.acquire_blocking)

    def acquire_blocking(self) -> None:
        """``acquire`` in a worker thread, right before its request."""
        waited = False
        while (wait := self._try_take()) > 0:
            if not waited:
                log.info("provider request budget used up; waiting %.2f s", wait)
                waited = True
            time.sleep(wait)

    async def block_for(self, seconds: float) -> None:
        """The provider said 429: no replica sends for ``seconds``."""
        await asyncio.to_thread(self._block_for, seconds)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    def _try_take(self) -> float:
        """0 when a request was counted, else how long to wait before asking again."""
        with self._writer.begin() as connection:
            connection.execute(self._ensure, {"name": self._name})
            blocked_until = float(connection.execute(self._lock, {"name": self._name}).scalar_one())
            now = float(connection.execute(self._now).scalar_one())
            if blocked_until > now:
                return blocked_until - now
            connection.execute(self._forget, {"name": self._name, "before": now - self._window})
            counted = connection.execute(self._count, {"name": self._name}).one()
            if counted.n < self._max:
                connection.execute(self._record, {"name": self._name, "at": now})
                return 0.0
            return max(float(counted.oldest) + self._window - now, 0.01)

    def _block_for(self, seconds: float) -> None:
        with self._writer.begin() as connection:
            connection.execute(self._ensure, {"name": self._name})
            now = float(connection.execute(self._now).scalar_one())
            connection.execute(self._block, {"name": self._name, "until": now + seconds})
