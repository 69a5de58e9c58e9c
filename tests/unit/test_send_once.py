"""The mailer handler consults the ledger so that a job's email goes out once."""

from __future__ import annotations

import asyncio

import pytest

from mailer_service.compose import OutgoingEmail, Sender
from mailer_service.handlers import SendEmail
from mailer_service.ledger import LedgerUnavailable
from mailer_service.transport import Receipt
from pipeline_shared.errors import Deferred, PermanentFailure, TransientFailure
from pipeline_shared.events import EmailSent
from unit.fakes import FakeLedger, FakePublisher, FakeTransport, data_processed

SENDER = Sender(email="pipeline@example.com", name="Email Pipeline", category="background-job")


async def test_a_redelivered_job_is_not_sent_twice_but_email_sent_is_published_again() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FakeLedger()
    handler = SendEmail(transport, publisher, ledger, SENDER)
    event = data_processed()

    await handler(event)
    await handler(event)

    assert len(transport.sent) == 1
    assert [type(e) for e in publisher.published] == [EmailSent, EmailSent]
    first, second = publisher.published
    assert isinstance(first, EmailSent)
    assert isinstance(second, EmailSent)
    assert second.provider_message_id == first.provider_message_id == "fake-message-1"


async def test_a_job_another_mailer_is_sending_is_deferred_without_sending() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FakeLedger()
    event = data_processed()
    await ledger.claim(str(event.job_id))  # another mailer holds the claim

    with pytest.raises(Deferred, match="another mailer"):
        await SendEmail(transport, publisher, ledger, SENDER)(event)

    assert transport.sent == []
    assert publisher.published == []


@pytest.mark.parametrize("failure", [TransientFailure("503"), PermanentFailure("401")])
async def test_a_failed_send_releases_the_claim_so_a_retry_can_send(
    failure: Exception,
) -> None:
    ledger = FakeLedger()
    event = data_processed()

    with pytest.raises(type(failure)):
        await SendEmail(FakeTransport(failure=failure), FakePublisher(), ledger, SENDER)(event)
    transport = FakeTransport()
    await SendEmail(transport, FakePublisher(), ledger, SENDER)(event)

    assert len(transport.sent) == 1


class HangingTransport:
    name = "hanging"

    async def send(self, email: OutgoingEmail) -> Receipt:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def test_a_send_cancelled_at_shutdown_keeps_its_claim_for_the_lease_to_decide() -> None:
    ledger = FakeLedger()
    event = data_processed()
    task = asyncio.create_task(
        SendEmail(HangingTransport(), FakePublisher(), ledger, SENDER)(event)
    )
    await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert ledger.rows[str(event.job_id)][0] == "sending"


class FlakyLedger(FakeLedger):
    """A ledger whose database refuses the first ``failures`` writes of ``sent``."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    async def mark_sent(self, job_id: str, transport: str, provider_message_id: str | None) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise LedgerUnavailable("OperationalError")
        await super().mark_sent(job_id, transport, provider_message_id)


async def test_a_sent_email_is_recorded_as_sent_however_long_the_ledger_refuses() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FlakyLedger(failures=5)
    event = data_processed()

    await SendEmail(transport, publisher, ledger, SENDER, ledger_retry_seconds=(0.001, 0.01))(event)

    assert len(transport.sent) == 1
    assert ledger.attempts == 6
    assert ledger.sent[str(event.job_id)] == ("fake", "fake-message-1")
    assert [type(e) for e in publisher.published] == [EmailSent]


async def test_a_stop_while_waiting_for_the_ledger_keeps_the_claim_and_sends_nothing_more() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FlakyLedger(failures=10**6)
    event = data_processed()
    send = SendEmail(transport, publisher, ledger, SENDER, ledger_retry_seconds=(0.01, 0.01))

    handling = asyncio.create_task(send(event))
    await asyncio.sleep(0.1)
    handling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handling

    assert len(transport.sent) == 1
    assert ledger.rows[str(event.job_id)][0] == "sending"  # the claim is kept, not released
    assert publisher.published == []
