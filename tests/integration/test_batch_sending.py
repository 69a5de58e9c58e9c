"""Batch sending through the real SDK against the HTTPS stand-in: each email's own
outcome, whatever happens to its request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailer_service.batching import BatchingTransport, BatchLimits
from mailer_service.compose import OutgoingEmail, Sender, compose_email
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.send_budget import SendBudget
from mailer_service.transport import Receipt, SendOutcomeUnknown
from pipeline_shared.errors import PermanentFailure, TransientFailure
from support.mailtrap_stub import MailtrapStub
from unit.fakes import data_processed

SENDER = Sender(email="pipeline@example.com", name="Pipeline", category="test")


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MailtrapStub]:
    stub = MailtrapStub(tmp_path)
    stub.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stub.ca_bundle))
    yield stub
    stub.stop()


@pytest.fixture
async def transport(stub: MailtrapStub) -> AsyncIterator[BatchingTransport]:
    mailtrap = MailtrapTransport(
        token=stub.token,
        api_host=stub.host,
        inbox_id=None,
        concurrency=4,
        timeout_seconds=0.5,
        account_id=stub.account_id,
        general_api_host=stub.host,
        settle_seconds=0,
    )
    transport = BatchingTransport(mailtrap, BatchLimits(wait_seconds=0.05), concurrency=4)
    yield transport
    await transport.close()


def emails(count: int) -> list[OutgoingEmail]:
    return [
        compose_email(data_processed(email=f"user{n}@example.com"), SENDER) for n in range(count)
    ]


async def send_all(
    transport: BatchingTransport, batch: list[OutgoingEmail]
) -> list[Receipt | BaseException]:
    return await asyncio.gather(*(transport.send(e) for e in batch), return_exceptions=True)


async def test_emails_in_hand_go_in_one_request_and_each_job_gets_its_own_message_id(
    stub: MailtrapStub, transport: BatchingTransport
) -> None:
    batch = emails(30)

    outcomes = await send_all(transport, batch)

    assert stub.batch_sizes == [30]
    ids = {request.job_id: request.message_id for request in stub.delivered}
    assert len(ids) == 30
    for email, outcome in zip(batch, outcomes, strict=True):
        assert isinstance(outcome, Receipt), outcome
        assert outcome.message_id == ids[email.job_id]


async def test_an_email_refused_within_its_batch_fails_alone(
    stub: MailtrapStub, transport: BatchingTransport
) -> None:
    batch = emails(5)
    stub.refused_recipients = {batch[2].to}

    outcomes = await send_all(transport, batch)

    assert isinstance(outcomes[2], PermanentFailure)
    assert "is not allowed" in outcomes[2].reason
    assert all(isinstance(outcomes[n], Receipt) for n in (0, 1, 3, 4))
    assert sorted(r.job_id or "" for r in stub.delivered) == sorted(
        e.job_id for n, e in enumerate(batch) if n != 2
    )


async def test_a_batch_refused_as_a_whole_is_sent_email_by_email(
    stub: MailtrapStub, transport: BatchingTransport
) -> None:
    batch = emails(4)
    stub.refused_recipients = {batch[1].to}
    stub.refuse_whole_batch = True

    outcomes = await send_all(transport, batch)

    assert isinstance(outcomes[1], PermanentFailure)
    assert all(isinstance(outcomes[n], Receipt) for n in (0, 2, 3))
    assert stub.deliveries_by_job() == {e.job_id: 1 for n, e in enumerate(batch) if n != 1}


async def test_a_batch_taken_but_never_answered_is_unknown_for_every_email_and_found_after(
    stub: MailtrapStub, transport: BatchingTransport
) -> None:
    batch = emails(6)
    before = time.time()
    stub.accept_then_hang(1)

    outcomes = await send_all(transport, batch)
    stub.release()

    assert all(isinstance(outcome, SendOutcomeUnknown) for outcome in outcomes), outcomes
    sent = {request.job_id: request.message_id for request in stub.delivered}
    for email in batch:  # reconciled, one by one, from the logs
        found = await transport.find_sent(email, before)
        assert found is not None
        assert found.message_id == sent[email.job_id]


async def test_a_batch_not_taken_is_a_plain_transient_failure_for_every_email(
    stub: MailtrapStub, transport: BatchingTransport
) -> None:
    stub.fail_next(1, 503)

    outcomes = await send_all(transport, emails(3))

    for outcome in outcomes:
        assert isinstance(outcome, TransientFailure)
        assert not isinstance(outcome, SendOutcomeUnknown)
    assert stub.delivered == []


async def test_a_refused_batchs_emails_sent_alone_leave_out_one_whose_handler_gave_up(
    stub: MailtrapStub, tmp_path: Path
) -> None:
    # Sent one by one after a 400, each email waits for its own budget slot, which
    # a 429 can make minutes; one whose handler gave up meanwhile must not go.
    budget = SendBudget.open(
        f"sqlite:///{tmp_path / 'budget.sqlite3'}", max_requests=150, window_seconds=10
    )
    mailtrap = MailtrapTransport(
        token=stub.token, api_host=stub.host, inbox_id=None, concurrency=4, budget=budget
    )
    batch = emails(3)
    stub.refused_recipients = {batch[0].to}
    stub.refuse_whole_batch = True
    still = [True, True, True]
    try:
        await budget.block_for(0.5)  # the one-by-one sends wait for their slots
        sending = asyncio.create_task(
            mailtrap.send_batch(batch, [lambda n=n: still[n] for n in range(3)])
        )
        await asyncio.sleep(0.2)
        still[2] = False  # its handler timed out while the budget held it
        outcomes = await asyncio.wait_for(sending, 10)
    finally:
        await mailtrap.close()

    assert isinstance(outcomes[0], PermanentFailure)
    assert isinstance(outcomes[1], Receipt)
    assert not isinstance(outcomes[2], Receipt)
    assert stub.deliveries_by_job() == {batch[1].job_id: 1}
