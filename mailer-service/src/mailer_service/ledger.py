"""The mailer's ledger: which jobs have had their email sent, shared by every replica.

Before sending, a mailer *claims* the job: it writes a ``sending`` row with a
claim token and its own owner id, unless the job is already ``sent`` or
another mailer holds a live claim. After the provider accepted the email, the
row becomes ``sent`` (with the provider's message id) before the message is
acknowledged. So a redelivered or re-published ``DataProcessed`` finds
``sent`` and sends nothing.

A claim lives as long as its owner does: a running mailer renews all its
claims every few seconds (``heartbeat``), however slow its provider, and a
claim not renewed for the lease is taken over. So a survivor sends a dead
mailer's emails within seconds, and never a live one's.

The one window left: a mailer that dies (or is stopped past its grace period)
while its email is at the provider leaves a ``sending`` claim behind. Once the
lease has passed, another attempt takes the claim over and sends again, which
duplicates the email if the provider had accepted the first one. At most the
emails in flight at that moment (``MAILER_CONCURRENCY`` per mailer) are
exposed to this.

SQLite (the default) serves the mailers of one host; PostgreSQL, named by
``DATABASE_URL``, serves replicas on any number of hosts. Both run the same
SQL through SQLAlchemy Core; the calls are blocking and are made in threads.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from dataclasses import dataclass

from sqlalchemy import Column, Engine, Float, MetaData, String, Table, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from pipeline_shared.database import build_engine, create_tables, for_writing

metadata = MetaData()

sent_emails = Table(
    "mailer_sent_emails",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("state", String(16), nullable=False),  # sending | sent
    Column("claim_token", String(36), nullable=False),
    Column("owner", String(36), nullable=True),  # the mailer process holding the claim
    Column("claimed_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("transport", String(32), nullable=True),
    Column("provider_message_id", String(255), nullable=True),
)

# The lease is measured on the database's clock, not each host's: replicas
# whose clocks disagree must still agree on when a claim has lapsed. The
# statements that read the clock are templates, given the dialect's {now}.
_DATABASE_NOW = {
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}

# One statement, the same in SQLite and PostgreSQL: insert a claim, or take
# over one whose lease has passed; a sent row or a live claim is left alone.
_CLAIM = """
    INSERT INTO mailer_sent_emails (job_id, state, claim_token, owner, claimed_at)
    VALUES (:job_id, 'sending', :token, :owner, {now})
    ON CONFLICT (job_id) DO UPDATE
        SET claim_token = excluded.claim_token, owner = excluded.owner,
            claimed_at = excluded.claimed_at
        WHERE mailer_sent_emails.state = 'sending'
          AND mailer_sent_emails.claimed_at < {now} - :lease
"""
_READ = text(
    "SELECT state, claim_token, transport, provider_message_id "
    "FROM mailer_sent_emails WHERE job_id = :job_id"
)
_MARK_SENT = """
    UPDATE mailer_sent_emails
    SET state = 'sent', sent_at = {now}, transport = :transport,
        provider_message_id = :message_id
    WHERE job_id = :job_id
"""
_RELEASE = text(
    "DELETE FROM mailer_sent_emails "
    "WHERE job_id = :job_id AND claim_token = :token AND state = 'sending'"
)
_HEARTBEAT = """
    UPDATE mailer_sent_emails SET claimed_at = {now}
    WHERE owner = :owner AND state = 'sending'
"""
_PURGE = text("DELETE FROM mailer_sent_emails WHERE state = 'sent' AND sent_at < :before")


class LedgerUnavailable(Exception):
    """The ledger's database could not be written just now."""


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    ALREADY_SENT = "already-sent"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    token: str
    transport: str | None = None
    provider_message_id: str | None = None


class SqlLedger:
    """The ledger in SQLite or PostgreSQL. Its async methods run the SQL in threads."""

    def __init__(self, engine: Engine, *, lease_seconds: float) -> None:
        self._engine = engine
        self._writer = for_writing(engine)
        self._lease = lease_seconds
        self.owner = str(uuid.uuid4())
        """This process's id on its claims: renewed by ``heartbeat``, new at each start."""
        now = _DATABASE_NOW[engine.dialect.name]
        self._claim_sql, self._mark_sent_sql, self._heartbeat_sql = (
            text(template.format(now=now)) for template in (_CLAIM, _MARK_SENT, _HEARTBEAT)
        )

    @classmethod
    def open(cls, database_url: str, *, lease_seconds: float) -> SqlLedger:
        ledger = cls(build_engine(database_url), lease_seconds=lease_seconds)
        ledger.create_schema()
        return ledger

    def create_schema(self) -> None:
        create_tables(self._engine, metadata)
        # A ledger made before claims had owners gains the column.
        if "owner" not in {c["name"] for c in inspect(self._engine).get_columns(sent_emails.name)}:
            with self._writer.begin() as connection:
                connection.execute(
                    text("ALTER TABLE mailer_sent_emails ADD COLUMN owner VARCHAR(36)")
                )

    async def claim(self, job_id: str) -> Claim:
        return await asyncio.to_thread(self._claim, job_id)

    async def mark_sent(self, job_id: str, transport: str, provider_message_id: str | None) -> None:
        """Record the email as sent. Whoever holds the claim now, it was sent: say so.

        Raises ``LedgerUnavailable`` when the database cannot take the write."""
        try:
            await asyncio.to_thread(self._mark_sent, job_id, transport, provider_message_id)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc

    async def release(self, job_id: str, claim: Claim) -> None:
        await asyncio.to_thread(self._release, job_id, claim)

    async def heartbeat(self) -> int:
        """Renew every claim this process holds; how many. Raises ``LedgerUnavailable``."""
        try:
            return await asyncio.to_thread(self._heartbeat)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc

    async def purge_sent_before(self, before: float) -> int:
        return await asyncio.to_thread(self._purge, before)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    def _claim(self, job_id: str) -> Claim:
        token = str(uuid.uuid4())
        with self._writer.begin() as connection:
            connection.execute(
                self._claim_sql,
                {"job_id": job_id, "token": token, "owner": self.owner, "lease": self._lease},
            )
            row = connection.execute(_READ, {"job_id": job_id}).one()
        if row.state == "sent":
            return Claim(ClaimState.ALREADY_SENT, token, row.transport, row.provider_message_id)
        if row.claim_token != token:
            return Claim(ClaimState.BUSY, token)
        return Claim(ClaimState.CLAIMED, token)

    def _mark_sent(self, job_id: str, transport: str, provider_message_id: str | None) -> None:
        with self._writer.begin() as connection:
            connection.execute(
                self._mark_sent_sql,
                {"job_id": job_id, "transport": transport, "message_id": provider_message_id},
            )

    def _release(self, job_id: str, claim: Claim) -> None:
        with self._writer.begin() as connection:
            connection.execute(_RELEASE, {"job_id": job_id, "token": claim.token})

    def _heartbeat(self) -> int:
        with self._writer.begin() as connection:
            return connection.execute(self._heartbeat_sql, {"owner": self.owner}).rowcount

    def _purge(self, before: float) -> int:
        with self._writer.begin() as connection:
            return connection.execute(_PURGE, {"before": before}).rowcount
