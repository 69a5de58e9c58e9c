"""The mailer's ledger on real databases: SQLite always, PostgreSQL when one answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailer_service.ledger import ClaimState, SqlLedger


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    base: str = request.getfixturevalue("postgres_database")
    return base


@pytest.fixture
async def ledgers(database_url: str) -> AsyncIterator[tuple[SqlLedger, SqlLedger]]:
    """Two ledgers on one database, as two mailer replicas would have."""
    first = SqlLedger.open(database_url, lease_seconds=0.5)
    second = SqlLedger.open(database_url, lease_seconds=0.5)
    yield first, second
    for ledger in (first, second):
        await ledger.close()


def new_job() -> str:
    return str(uuid.uuid4())


async def test_a_job_once_sent_is_reported_sent_to_every_replica(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    claim = await first.claim(job)
    assert claim.state is ClaimState.CLAIMED
    await first.mark_sent(job, "mailtrap", "msg-1")

    again = await second.claim(job)

    assert again.state is ClaimState.ALREADY_SENT
    assert (again.transport, again.provider_message_id) == ("mailtrap", "msg-1")


async def test_a_live_claim_keeps_other_replicas_from_sending(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    await first.claim(job)

    assert (await second.claim(job)).state is ClaimState.BUSY


async def test_a_claim_left_by_a_dead_mailer_is_taken_over_after_the_lease(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    await first.claim(job)
    await asyncio.sleep(0.6)

    assert (await second.claim(job)).state is ClaimState.CLAIMED


async def test_a_released_claim_can_be_claimed_at_once(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    claim = await first.claim(job)
    await first.release(job, claim)

    assert (await second.claim(job)).state is ClaimState.CLAIMED


async def test_of_many_replicas_claiming_one_job_at_once_exactly_one_wins(
    database_url: str,
) -> None:
    replicas = [SqlLedger.open(database_url, lease_seconds=30) for _ in range(8)]
    job = new_job()
    try:
        claims = await asyncio.gather(*(ledger.claim(job) for ledger in replicas))
    finally:
        for ledger in replicas:
            await ledger.close()

    states = sorted(claim.state.value for claim in claims)
    assert states == ["busy"] * 7 + ["claimed"]


async def test_sent_emails_older_than_the_retention_are_forgotten(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, _ = ledgers
    job = new_job()
    await first.claim(job)
    await first.mark_sent(job, "outbox", None)

    assert await first.purge_sent_before(time.time() - 3600) == 0
    assert await first.purge_sent_before(time.time() + 1) >= 1
    assert (await first.claim(job)).state is ClaimState.CLAIMED
