"""The mailer's ledger: which jobs have had their email sent, shared by every replica.

Before sending, a mailer *claims* the job: it writes a ``sending`` row with a
claim token and its own owner id, unless the job is already ``sent`` or
another mailer holds a live claim. After the provider accepted the email, the
row becomes ``sent`` (with the provider's message id) before the message is
acknowledged. So a redelivered or re-published ``DataProcessed`` finds
``sent`` and sends nothing.

A claim lives as long as its owner works on it: a running mailer renews the
claims it holds every few seconds (``heartbeat``), however slow its
provider, and a claim not renewed for the lease is taken over. So a survivor
takes a dead mailer's emails within seconds, and never a live one's.

A send whose outcome is unknown (the provider may have accepted it: a timeout
after the request went out, a 5xx, or a mailer that died or stopped with the
request in flight) leaves the row ``uncertain``, with ``attempted_at``. A
lapsed claim is uncertain too: its mailer may have sent before it died. The
next claim of an uncertain row says so (``Claim.uncertain``), and the handler
asks the provider before sending again (``mailer_service.handlers``).

SQLite (the default) serves the mailers of one host; PostgreSQL, named by
``DATABASE_URL``, serves replicas on any number of hosts. Both run the same
SQL through SQLAlchemy Core; the calls are blocking and are made in threads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    MetaData,
    String,
    Table,
    bindparam,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import BindParameter

from pipeline_shared.database import (
    add_missing_columns,
    build_engine,
    create_tables,
    database_now,
    for_writing,
)
from pipeline_shared.group_commit import GroupCommit

log = logging.getLogger("mailer.ledger")
metadata = MetaData()

sent_emails = Table(
    "mailer_sent_emails",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("state", String(16), nullable=False),  # sending | uncertain | sent
    Column("claim_token", String(36), nullable=False),
    Column("owner", String(36), nullable=True),  # the mailer process holding the claim
    Column("claimed_at", Float, nullable=False),  # renewed by the owner's heartbeat
    Column("first_claimed_at", Float, nullable=True),  # no send of the job is older
    Column("attempted_at", Float, nullable=True),  # the last send whose outcome is unknown
    Column("sent_at", Float, nullable=True),
    Column("transport", String(32), nullable=True),
    Column("provider_message_id", String(255), nullable=True),
)

# The lease is measured on the database's clock, not each host's: replicas
# whose clocks disagree must still agree on when a claim has lapsed. The
# statements that read the clock are templates, given the dialect's {now}.

# One statement, the same in SQLite and PostgreSQL: insert a claim, or take
# over an uncertain one or one whose lease has passed (which is uncertain from
# then on: its owner may have sent before it went); a sent row or a live claim
# is left alone.
_CLAIM = """
    INSERT INTO mailer_sent_emails
        (job_id, state, claim_token, owner, claimed_at, first_claimed_at)
    VALUES (:job_id, 'sending', :token, :owner, {now}, {now})
    ON CONFLICT (job_id) DO UPDATE
        SET state = 'sending', claim_token = excluded.claim_token, owner = excluded.owner,
            claimed_at = excluded.claimed_at,
            attempted_at = CASE WHEN mailer_sent_emails.state = 'sending'
                THEN mailer_sent_emails.claimed_at ELSE mailer_sent_emails.attempted_at END
        WHERE mailer_sent_emails.state = 'uncertain'
           OR (mailer_sent_emails.state = 'sending'
               AND mailer_sent_emails.claimed_at < {now} - :lease)
"""
_READ = """
    SELECT job_id, state, claim_token, transport, provider_message_id,
           COALESCE(first_claimed_at, claimed_at) AS first_claimed_at, attempted_at,
           {now} AS now
    FROM mailer_sent_emails WHERE job_id IN :job_ids
"""
_MARK_SENT = """
    UPDATE mailer_sent_emails
    SET state = 'sent', sent_at = {now}, transport = :transport,
        provider_message_id = :message_id
    WHERE job_id = :job_id
"""
# A claim given up after a send that provably did not happen: gone, unless an
# earlier send of the job is still uncertain.
_RELEASE = text(
    "DELETE FROM mailer_sent_emails WHERE job_id = :job_id AND claim_token = :token "
    "AND state = 'sending' AND attempted_at IS NULL"
)
_KEEP_UNCERTAIN = text(
    "UPDATE mailer_sent_emails SET state = 'uncertain', owner = NULL "
    "WHERE job_id = :job_id AND claim_token = :token AND state = 'sending'"
)
_MARK_UNCERTAIN = """
    UPDATE mailer_sent_emails SET state = 'uncertain', owner = NULL, attempted_at = {now}
    WHERE job_id = :job_id AND claim_token = :token AND state = 'sending'
"""
_HEARTBEAT = """
    UPDATE mailer_sent_emails SET claimed_at = {now}
    WHERE owner = :owner AND state = 'sending' AND claim_token IN :tokens
"""
_LOCK_HELD = """
    SELECT job_id FROM mailer_sent_emails
    WHERE owner = :owner AND state = 'sending' AND claim_token IN :tokens
    ORDER BY job_id FOR UPDATE
"""
# At a stop: whatever this mailer still holds may be at the provider.
_LEAVE_UNCERTAIN = """
    UPDATE mailer_sent_emails SET state = 'uncertain', owner = NULL, attempted_at = {now}
    WHERE owner = :owner AND state = 'sending' AND claim_token IN :tokens
"""
_PURGE = text("DELETE FROM mailer_sent_emails WHERE state = 'sent' AND sent_at < :before")


class LedgerUnavailable(Exception):
    """The ledger's database could not be written just now."""


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    ALREADY_SENT = "already-sent"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Uncertainty:
    """An earlier send of the job whose outcome is unknown, on the database's clock."""

    since: float
    """No send of the job is older than this (Unix time): where to start looking."""
    age: float
    """Seconds since the last uncertain attempt."""


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    token: str
    transport: str | None = None
    provider_message_id: str | None = None
    uncertain: Uncertainty | None = None
    """Set on a claim of a job an earlier send of which may have gone out."""


class SqlLedger:
    """The ledger in SQLite or PostgreSQL. Its async methods run the SQL in threads."""

    def __init__(self, engine: Engine, *, lease_seconds: float) -> None:
        self._engine = engine
        self._writer = for_writing(engine)
        self._lease = lease_seconds
        self.owner = str(uuid.uuid4())
        """This process's id on its claims, new at each start."""
        self._held: set[str] = set()
        """The tokens of the claims this process is working on: only these are renewed."""
        self._abandoned: set[str] = set()
        """Claims no longer renewed whose sends may yet complete: uncertain at a stop."""
        now = database_now(engine)
        tokens: BindParameter[list[str]] = bindparam("tokens", expanding=True)
        self._claim_sql, self._mark_sent_sql, self._mark_uncertain_sql = (
            text(template.format(now=now)) for template in (_CLAIM, _MARK_SENT, _MARK_UNCERTAIN)
        )
        self._read_sql = text(_READ.format(now=now)).bindparams(
            bindparam("job_ids", expanding=True)
        )
        # Concurrent deliveries' claims and records share transactions (and
        # disk syncs): see pipeline_shared.group_commit. Claims arrive one
        # delivery at a time; under load they wait 5 ms to share a sync, which
        # the email then spends in its batch's wait anyway (BATCH_WAIT_MS).
        self._claims = GroupCommit(self._claim_many, linger=0.005)
        self._marks = GroupCommit(self._mark_sent_many)
        self._lock_held_sql = (
            text(_LOCK_HELD).bindparams(tokens) if engine.dialect.name == "postgresql" else None
        )
        self._heartbeat_sql, self._leave_uncertain_sql = (
            text(template.format(now=now)).bindparams(tokens)
            for template in (_HEARTBEAT, _LEAVE_UNCERTAIN)
        )

    @classmethod
    def open(cls, database_url: str, *, lease_seconds: float) -> SqlLedger:
        ledger = cls(build_engine(database_url), lease_seconds=lease_seconds)
        ledger.create_schema()
        return ledger

    def create_schema(self) -> None:
        create_tables(self._engine, metadata)
        # A ledger made by an earlier version gains the columns added since.
        add_missing_columns(self._engine, sent_emails)

    @property
    def held(self) -> int:
        """How many claims this process is working on."""
        return len(self._held)

    async def claim(self, job_id: str) -> Claim:
        """Claim the job; raises ``LedgerUnavailable`` when the database cannot say."""
        try:
            claim = await self._claims.submit(job_id)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc
        if claim.state is ClaimState.CLAIMED:
            self._held.add(claim.token)
        return claim

    async def mark_sent(
        self, job_id: str, claim: Claim, transport: str, provider_message_id: str | None
    ) -> None:
        """Record the email as sent. Whoever holds the claim now, it was sent: say so.

        Raises ``LedgerUnavailable`` when the database cannot take the write (the
        claim is still renewed meanwhile)."""
        try:
            await self._marks.submit((job_id, transport, provider_message_id))
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc
        self._held.discard(claim.token)

    async def release(self, job_id: str, claim: Claim) -> None:
        """Give the claim up after a send that provably did not happen. If the write
        fails, the claim lapses after the lease and is then treated as uncertain."""
        self._held.discard(claim.token)
        await self._quietly(self._release, job_id, claim.token)

    async def mark_uncertain(self, job_id: str, claim: Claim) -> None:
        """Record that a send may have gone out, and give the claim up; its next claim
        says so. If the write fails, the claim lapses and is uncertain all the same."""
        self._held.discard(claim.token)
        await self._quietly(self._mark_uncertain, job_id, claim.token)

    def abandon(self, claim: Claim) -> None:
        """Stop renewing a claim without touching the database (a cancelled send): it
        lapses after the lease and is then treated as uncertain (at once, if this
        process stops first: ``leave_uncertain``)."""
        self._held.discard(claim.token)
        self._abandoned.add(claim.token)

    async def leave_uncertain(self) -> int:
        """At a stop: mark every claim this process still holds uncertain, so that the
        next mailer need not wait for the lease. How many."""
        tokens = [*self._held, *self._abandoned]
        self._held, self._abandoned = set(), set()
        if not tokens:
            return 0
        try:
            return await asyncio.to_thread(self._leave_uncertain, tokens)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc

    async def heartbeat(self) -> int:
        """Renew every claim this process works on; how many. Raises ``LedgerUnavailable``."""
        tokens = list(self._held)
        if not tokens:
            return 0
        try:
            return await asyncio.to_thread(self._heartbeat, tokens)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc

    async def purge_sent_before(self, before: float) -> int:
        return await asyncio.to_thread(self._purge, before)

    async def close(self) -> None:
        # What was handed in is written (or fails) before the engine goes.
        await self._claims.close()
        await self._marks.close()
        await asyncio.to_thread(self._engine.dispose)

    async def _quietly(self, write: Callable[[str, str], None], job_id: str, token: str) -> None:
        try:
            await asyncio.to_thread(write, job_id, token)
        except SQLAlchemyError as exc:
            log.warning(
                "job %s: could not update its claim (%s); it lapses after the lease",
                job_id,
                type(exc).__name__,
            )

    def _claim_many(self, job_ids: Sequence[str]) -> list[Claim]:
        """Claim each job (a job may appear twice: one claimant wins); one transaction."""
        tokens = [str(uuid.uuid4()) for _ in job_ids]
        # Sorted: one lock order for every replica.
        params = [
            {"job_id": job_id, "token": token, "owner": self.owner, "lease": self._lease}
            for job_id, token in sorted(zip(job_ids, tokens, strict=True))
        ]
        with self._writer.begin() as connection:
            connection.execute(self._claim_sql, params)
            rows = connection.execute(self._read_sql, {"job_ids": sorted(set(job_ids))}).all()
        by_job = {row.job_id: row for row in rows}
        return [
            _claim_of(by_job[job_id], token) for job_id, token in zip(job_ids, tokens, strict=True)
        ]

    def _mark_sent_many(self, sends: Sequence[tuple[str, str, str | None]]) -> list[None]:
        params = [
            {"job_id": job_id, "transport": transport, "message_id": message_id}
            for job_id, transport, message_id in sorted(sends)
        ]
        with self._writer.begin() as connection:
            connection.execute(self._mark_sent_sql, params)
        return [None] * len(sends)

    def _release(self, job_id: str, token: str) -> None:
        with self._writer.begin() as connection:
            connection.execute(_RELEASE, {"job_id": job_id, "token": token})
            connection.execute(_KEEP_UNCERTAIN, {"job_id": job_id, "token": token})

    def _mark_uncertain(self, job_id: str, token: str) -> None:
        with self._writer.begin() as connection:
            connection.execute(self._mark_uncertain_sql, {"job_id": job_id, "token": token})

    def _lock_in_order(self, connection: Connection, tokens: list[str]) -> None:
        # Claims lock rows in job-id order; an UPDATE locks them in scan order,
        # which could deadlock against a claim batch on PostgreSQL. (SQLite has
        # one write lock, taken when the transaction begins.)
        if self._lock_held_sql is not None:
            connection.execute(self._lock_held_sql, {"owner": self.owner, "tokens": tokens})

    def _heartbeat(self, tokens: list[str]) -> int:
        with self._writer.begin() as connection:
            self._lock_in_order(connection, tokens)
            result = connection.execute(
                self._heartbeat_sql, {"owner": self.owner, "tokens": tokens}
            )
            return result.rowcount

    def _leave_uncertain(self, tokens: list[str]) -> int:
        with self._writer.begin() as connection:
            self._lock_in_order(connection, tokens)
            result = connection.execute(
                self._leave_uncertain_sql, {"owner": self.owner, "tokens": tokens}
            )
            return result.rowcount

    def _purge(self, before: float) -> int:
        with self._writer.begin() as connection:
            return connection.execute(_PURGE, {"before": before}).rowcount


def _claim_of(row: Any, token: str) -> Claim:
    if row.state == "sent":
        return Claim(ClaimState.ALREADY_SENT, token, row.transport, row.provider_message_id)
    if row.claim_token != token:
        return Claim(ClaimState.BUSY, token)
    uncertain = None
    if row.attempted_at is not None:
        # PostgreSQL's clock comes back as a Decimal.
        uncertain = Uncertainty(
            since=float(row.first_claimed_at), age=float(row.now) - float(row.attempted_at)
        )
    return Claim(ClaimState.CLAIMED, token, uncertain=uncertain)
