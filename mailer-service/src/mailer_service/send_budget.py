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

Within the limit, requests are also paced: at most a tenth of the budget
(``burst``) goes at once, then one request per ``window / max_requests``
(the "generic cell rate" rule, its next due time kept in the budget's row).
Without it a burst of small requests spent the whole window's budget in its
first second and every email then waited for the window to slide; paced, the
emails that gather while a request waits for its turn go out together, so a
mailer held to the provider's rate sends as many emails per request as it has
in hand. A lone email still goes at once.

A lost write here (the budget's commits do not wait for the disk) costs at most
a few requests too many after a power cut; the ledger, not the budget, guards
against duplicate emails.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Column, Engine, Float, Index, MetaData, String, Table, text

from pipeline_shared.database import (
    add_missing_columns,
    build_engine,
    create_tables,
    database_now,
    for_writing,
)

log = logging.getLogger("mailer.budget")

metadata = MetaData()

budgets = Table(
    "mailer_send_budgets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("blocked_until", Float, nullable=False),
    # When the next request is due if requests are to be evenly spaced; NULL
    # (a table made before pacing) is "now".
    Column("paced_until", Float, nullable=True),
)
requests = Table(
    "mailer_send_requests",
    metadata,
    Column("name", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Index("mailer_send_requests_name_at", "name", "at"),
)

_LOCK = "SELECT blocked_until, paced_until FROM mailer_send_budgets WHERE name = :name"
# The provider's window may start a little before ours ends (its clock, the network).
WINDOW_MARGIN = 1.05
BURST_SHARE = 10
"""At most ``max_requests // BURST_SHARE`` requests (at least one) go back to back."""


class SendBudget:
    def __init__(
        self, engine: Engine, *, max_requests: int, window_seconds: float, name: str = "mailtrap"
    ) -> None:
        self._writer = for_writing(engine)
        self._engine = engine
        self._max = max_requests
        self._window = window_seconds * WINDOW_MARGIN
        self._interval = self._window / max_requests
        # How far ahead of its even pace the budget may run: ``burst`` requests at once.
        self._tolerance = self._interval * (max(max_requests // BURST_SHARE, 1) - 1)
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
        self._pace = text("UPDATE mailer_send_budgets SET paced_until = :due WHERE name = :name")

    @classmethod
    def open(cls, database_url: str, *, max_requests: int, window_seconds: float) -> SendBudget:
        engine = build_engine(database_url, durable=False)
        create_tables(engine, metadata)
        add_missing_columns(engine, budgets)
        return cls(engine, max_requests=max_requests, window_seconds=window_seconds)

    async def acquire(self) -> None:
        """Return once this replica may make one request (and it is counted)."""
        await asyncio.to_thread(self.acquire_blocking)

    def acquire_blocking(self) -> None:
        """``acquire`` in a worker thread, right before its request."""
        told = False
        while True:
            wait, why = self._try_take()
            if wait <= 0:
                return
            if why and not told:  # a wait for its turn in the pace is not news
                log.info("%s; waiting %.2f s", why, wait)
                told = True
            time.sleep(wait)

    async def block_for(self, seconds: float) -> None:
        """The provider said 429: no replica sends for ``seconds``."""
        await asyncio.to_thread(self._block_for, seconds)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    def _try_take(self) -> tuple[float, str | None]:
        """0 when a request was counted, else how long to wait before asking again,
        and why unless it is only the pace."""
        with self._writer.begin() as connection:
            connection.execute(self._ensure, {"name": self._name})
            budget = connection.execute(self._lock, {"name": self._name}).one()
            now = float(connection.execute(self._now).scalar_one())
            if budget.blocked_until > now:
                return float(budget.blocked_until) - now, "the provider answered 429"
            due = max(float(budget.paced_until or 0.0), now)
            if due - now > self._tolerance:
                return due - now - self._tolerance, None
            connection.execute(self._forget, {"name": self._name, "before": now - self._window})
            counted = connection.execute(self._count, {"name": self._name}).one()
            if counted.n < self._max:
                connection.execute(self._record, {"name": self._name, "at": now})
                connection.execute(self._pace, {"name": self._name, "due": due + self._interval})
                return 0.0, None
            wait = max(float(counted.oldest) + self._window - now, 0.01)
            return wait, "provider request budget used up"

    def _block_for(self, seconds: float) -> None:
        with self._writer.begin() as connection:
            connection.execute(self._ensure, {"name": self._name})
            now = float(connection.execute(self._now).scalar_one())
            connection.execute(self._block, {"name": self._name, "until": now + seconds})
