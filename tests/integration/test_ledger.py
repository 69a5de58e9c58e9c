"""The mailer's ledger on real databases: SQLite always, PostgreSQL when one answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text

from mailer_service.compose import OutgoingEmail, Sender
from mailer_service.handlers import SendEmail
from mailer_service.ledger import ClaimState, SqlLedger
from mailer_service.transport import Receipt
from pipeline_shared.database import engine_url
from support.postgres import ADMIN_URL
from unit.fakes import FakePublisher, FakeTransport, data_processed


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
    await first.mark_sent(job, claim, "mailtrap", "msg-1")

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
    await first.mark_sent(job, await first.claim(job), "outbox", None)

    assert await first.purge_sent_before(time.time() - 3600) == 0
    assert await first.purge_sent_before(time.time() + 1) >= 1
    assert (await first.claim(job)).state is ClaimState.CLAIMED


# --- the database goes away just after a send --------------------------------


def set_connections_allowed(database_url: str, allowed: bool) -> None:
    """Open or close the database to new connections, and cut the existing ones."""
    name = database_url.rsplit("/", 1)[1]
    admin = create_engine(engine_url(ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(
                text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            )
            if not allowed:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": name},
                )
    finally:
        admin.dispose()


class OutageAfterSend(FakeTransport):
    """Sends, then makes the ledger's database refuse connections."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        self._database_url = database_url

    async def send(self, email: OutgoingEmail) -> Receipt:
        receipt = await super().send(email)
        await asyncio.to_thread(set_connections_allowed, self._database_url, False)
        return receipt


async def test_a_send_is_recorded_once_its_database_is_back_and_never_sent_twice(
    postgres_database: str,
) -> None:
    ledger = SqlLedger.open(postgres_database, lease_seconds=60)
    transport, publisher = OutageAfterSend(postgres_database), FakePublisher()
    sender = Sender(email="pipeline@example.com", name="Pipeline", category="test")
    handler = SendEmail(
        transport, publisher, ledger, sender, lease_seconds=15, ledger_retry_seconds=(0.05, 0.2)
    )
    event = data_processed()
    outage = 1.5

    async def reopen_later() -> None:
        await asyncio.sleep(outage)
        await asyncio.to_thread(set_connections_allowed, postgres_database, True)

    started = time.monotonic()
    try:
        reopening = asyncio.create_task(reopen_later())
        await asyncio.wait_for(handler(event), 30)
        await reopening
    finally:
        await asyncio.to_thread(set_connections_allowed, postgres_database, True)
    took = time.monotonic() - started

    assert took >= outage  # it waited for the database rather than giving up
    assert len(transport.sent) == 1
    assert [type(e).__name__ for e in publisher.published] == ["EmailSent"]
    # A redelivery now finds the job sent and sends nothing.
    await handler(event)
    assert len(transport.sent) == 1
    assert (await ledger.claim(str(event.job_id))).state is ClaimState.ALREADY_SENT
    await ledger.close()


async def test_a_replica_whose_clock_runs_ahead_does_not_take_over_a_live_claim(
    ledgers: tuple[SqlLedger, SqlLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is measured on the database's clock: a host an hour ahead
    # (a clock no one can fake but through time.time) sees a fresh claim as fresh.
    first, second = ledgers
    job = new_job()
    assert (await first.claim(job)).state is ClaimState.CLAIMED
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    claim = await second.claim(job)

    assert claim.state is ClaimState.BUSY


async def test_a_claim_its_live_owner_renews_is_never_taken_over(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    # The lease is 0.5 s; the owner renews every 0.1 s for three leases.
    first, second = ledgers
    job = new_job()
    assert (await first.claim(job)).state is ClaimState.CLAIMED

    for _ in range(15):
        assert await first.heartbeat() == 1
        assert (await second.claim(job)).state is ClaimState.BUSY
        await asyncio.sleep(0.1)


async def test_a_claim_whose_owner_stopped_renewing_is_taken_over_after_the_lease(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    await first.claim(job)
    await first.heartbeat()
    await asyncio.sleep(0.7)  # one lease (0.5 s) and a little: the owner is gone

    assert (await second.claim(job)).state is ClaimState.CLAIMED
    assert await first.heartbeat() == 0  # the claim is no longer the first's


async def test_a_ledger_from_before_claims_had_owners_gains_the_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old-ledger.sqlite3'}"
    old = create_engine(url)
    with old.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE mailer_sent_emails (job_id VARCHAR(36) PRIMARY KEY, "
                "state VARCHAR(16) NOT NULL, claim_token VARCHAR(36) NOT NULL, "
                "claimed_at FLOAT NOT NULL, sent_at FLOAT, transport VARCHAR(32), "
                "provider_message_id VARCHAR(255))"
            )
        )
    old.dispose()

    ledger = SqlLedger.open(url, lease_seconds=5)
    job = new_job()

    claim = await ledger.claim(job)
    assert claim.state is ClaimState.CLAIMED
    assert await ledger.heartbeat() == 1
    await ledger.mark_uncertain(job, claim)
    assert (await ledger.claim(job)).uncertain is not None
    await ledger.close()


# --- sends whose outcome is unknown ---------------------------------------------


async def test_a_fresh_claim_is_not_uncertain_and_a_released_one_stays_so(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    claim = await first.claim(job)
    assert claim.uncertain is None
    await first.release(job, claim)  # the send provably did not happen

    again = await second.claim(job)

    assert again.state is ClaimState.CLAIMED
    assert again.uncertain is None


async def test_an_unknown_outcome_makes_the_next_claim_uncertain_at_once(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    before = time.time()
    claim = await first.claim(job)
    await first.mark_uncertain(job, claim)

    again = await second.claim(job)  # no lease to wait for: nobody holds it

    assert again.state is ClaimState.CLAIMED
    assert again.uncertain is not None
    assert 0 <= again.uncertain.age < 5
    assert before - 5 <= again.uncertain.since <= time.time() + 5
    assert await first.heartbeat() == 0  # the first no longer renews it


async def test_an_uncertain_claim_given_back_stays_uncertain_with_its_first_time(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job = new_job()
    await first.mark_uncertain(job, await first.claim(job))
    deferred = await second.claim(job)
    assert deferred.uncertain is not None
    await second.release(job, deferred)  # deferred: nobody can tell yet
    await asyncio.sleep(0.05)

    third = await first.claim(job)

    assert third.uncertain is not None
    assert third.uncertain.since == deferred.uncertain.since
    assert third.uncertain.age > deferred.uncertain.age


async def test_a_lapsed_claim_is_taken_over_as_uncertain(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    # Its owner may have sent before it went: the takeover must not assume not.
    first, second = ledgers
    job = new_job()
    await first.claim(job)
    await asyncio.sleep(0.7)  # the lease (0.5 s) passes without a heartbeat

    taken = await second.claim(job)

    assert taken.state is ClaimState.CLAIMED
    assert taken.uncertain is not None
    assert taken.uncertain.age >= 0.5


async def test_a_cancelled_send_is_no_longer_renewed(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    job, other = new_job(), new_job()
    abandoned = await first.claim(job)
    await first.claim(other)
    first.abandon(abandoned)

    assert await first.heartbeat() == 1  # only the claim still worked on
    await asyncio.sleep(0.7)
    await first.heartbeat()
    assert (await second.claim(job)).uncertain is not None
    assert (await second.claim(other)).state is ClaimState.BUSY


async def test_at_a_stop_the_claims_in_flight_are_left_uncertain_for_the_next_mailer(
    ledgers: tuple[SqlLedger, SqlLedger],
) -> None:
    first, second = ledgers
    in_flight, cancelled, done = new_job(), new_job(), new_job()
    await first.claim(in_flight)
    first.abandon(await first.claim(cancelled))
    await first.mark_sent(done, await first.claim(done), "mailtrap", "msg-1")

    assert await first.leave_uncertain() == 2

    for job in (in_flight, cancelled):  # at once, not after the lease
        claim = await second.claim(job)
        assert claim.state is ClaimState.CLAIMED
        assert claim.uncertain is not None
    assert (await second.claim(done)).state is ClaimState.ALREADY_SENT


# --- concurrent deliveries share transactions ------------------------------------


async def test_concurrent_claims_share_transactions_and_one_job_still_has_one_claimant(
    database_url: str,
) -> None:
    ledger = SqlLedger.open(database_url, lease_seconds=30)
    commits = 0

    def count(connection: object) -> None:
        nonlocal commits
        commits += 1

    event.listen(ledger._engine, "commit", count)  # the engine the writes go through
    jobs = [new_job() for _ in range(40)]
    contested = new_job()
    try:
        claims = await asyncio.gather(
            *(ledger.claim(job) for job in jobs), *(ledger.claim(contested) for _ in range(5))
        )
        sent = await asyncio.gather(
            *(
                ledger.mark_sent(job, claim, "mailtrap", f"msg-{n}")
                for n, (job, claim) in enumerate(zip(jobs, claims, strict=False))
            )
        )
        again = await asyncio.gather(*(ledger.claim(job) for job in jobs))
    finally:
        await ledger.close()

    assert [claim.state for claim in claims[:40]] == [ClaimState.CLAIMED] * 40
    assert sorted(claim.state.value for claim in claims[40:]) == ["busy"] * 4 + ["claimed"]
    assert len(sent) == 40
    assert [(c.state, c.provider_message_id) for c in again] == [
        (ClaimState.ALREADY_SENT, f"msg-{n}") for n in range(40)
    ]
    # 125 writes in a handful of transactions, not 125.
    assert 0 < commits <= 12, commits
