"""The mailer handler consults the ledger so that a job's email goes out once."""

from __future__ import annotations

import asyncio

import pytest

from mailer_service.compose import OutgoingEmail, Sender
from mailer_service.handlers import SendEmail
from mailer_service.ledger import Claim, LedgerUnavailable
from mailer_service.transport import Receipt, SendOutcomeUnknown
from pipeline_shared.errors import Deferred, PermanentFailure, TransientFailure
from pipeline_shared.events import EmailSent
from unit.fakes import FakeLedger, FakePublisher, FakeTransport, data_processed

SENDER = Sender(email="pipeline@example.com", name="Email Pipeline", category="background-job")
LEASE = 15.0


async def test_a_redelivered_job_is_not_sent_twice_but_email_sent_is_published_again() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FakeLedger()
    handler = SendEmail(transport, publisher, ledger, SENDER, lease_seconds=LEASE)
    event = data_processed(submitted_by="key-ada")

    await handler(event)
    await handler(event)

    assert len(transport.sent) == 1
    assert [type(e) for e in publisher.published] == [EmailSent, EmailSent]
    first, second = publisher.published
    assert isinstance(first, EmailSent)
    assert isinstance(second, EmailSent)
    assert second.provider_message_id == first.provider_message_id == "fake-message-1"
    assert first.submitted_by == second.submitted_by == "key-ada"


async def test_a_job_another_mailer_is_sending_is_deferred_without_sending() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FakeLedger()
    event = data_processed()
    await ledger.claim(str(event.job_id))  # another mailer holds the claim

    with pytest.raises(Deferred, match="another mailer"):
        await SendEmail(transport, publisher, ledger, SENDER, lease_seconds=LEASE)(event)

    assert transport.sent == []
    assert publisher.published == []


@pytest.mark.parametrize("failure", [TransientFailure("503"), PermanentFailure("401")])
async def test_a_failed_send_releases_the_claim_so_a_retry_can_send(
    failure: Exception,
) -> None:
    ledger = FakeLedger()
    event = data_processed()

    with pytest.raises(type(failure)):
        await SendEmail(
            FakeTransport(failure=failure), FakePublisher(), ledger, SENDER, lease_seconds=LEASE
        )(event)
    transport = FakeTransport()
    await SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)

    assert len(transport.sent) == 1


class HangingTransport:
    name = "hanging"

    reconciles = False
    settle_seconds = 0.0

    async def send(self, email: OutgoingEmail) -> Receipt:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        return None

    async def close(self) -> None:
        return None


async def test_a_send_cancelled_at_shutdown_keeps_its_claim_for_the_lease_to_decide() -> None:
    ledger = FakeLedger()
    event = data_processed()
    task = asyncio.create_task(
        SendEmail(HangingTransport(), FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)
    )
    await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert ledger.rows[str(event.job_id)][0] == "sending"
    assert len(ledger.abandoned) == 1  # no longer renewed: it lapses into uncertain


class FlakyLedger(FakeLedger):
    """A ledger whose database refuses the first ``failures`` writes of ``sent``."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    async def mark_sent(
        self, job_id: str, claim: Claim, transport: str, provider_message_id: str | None
    ) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise LedgerUnavailable("OperationalError")
        await super().mark_sent(job_id, claim, transport, provider_message_id)


async def test_a_sent_email_is_recorded_as_sent_however_long_the_ledger_refuses() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FlakyLedger(failures=5)
    event = data_processed()

    await SendEmail(
        transport,
        publisher,
        ledger,
        SENDER,
        lease_seconds=LEASE,
        ledger_retry_seconds=(0.001, 0.01),
    )(event)

    assert len(transport.sent) == 1
    assert ledger.attempts == 6
    assert ledger.sent[str(event.job_id)] == ("fake", "fake-message-1")
    assert [type(e) for e in publisher.published] == [EmailSent]


async def test_a_stop_while_waiting_for_the_ledger_keeps_the_claim_and_sends_nothing_more() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FlakyLedger(failures=10**6)
    event = data_processed()
    send = SendEmail(
        transport, publisher, ledger, SENDER, lease_seconds=LEASE, ledger_retry_seconds=(0.01, 0.01)
    )

    handling = asyncio.create_task(send(event))
    await asyncio.sleep(0.1)
    handling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handling

    assert len(transport.sent) == 1
    assert ledger.rows[str(event.job_id)][0] == "sending"  # the claim is kept, not released
    assert publisher.published == []
    await send.close()  # the stop gives up the recording still waiting


async def test_a_handler_cancelled_while_the_ledger_is_away_still_records_the_send() -> None:
    # HANDLER_TIMEOUT_SECONDS ends the handling; the send went out, so its
    # record must still be written once the database is back.
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FlakyLedger(failures=20)
    event = data_processed()
    send = SendEmail(
        transport, publisher, ledger, SENDER, lease_seconds=LEASE, ledger_retry_seconds=(0.01, 0.01)
    )
    handling = asyncio.create_task(send(event))
    await asyncio.sleep(0.05)
    handling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handling

    for _ in range(200):
        if ledger.rows[str(event.job_id)][0] == "sent":
            break
        await asyncio.sleep(0.01)

    assert ledger.rows[str(event.job_id)][0] == "sent"
    assert ledger.sent[str(event.job_id)] == ("fake", "fake-message-1")
    await send(event)  # the redelivery finds it sent
    assert len(transport.sent) == 1


# --- sends whose outcome is unknown -------------------------------------------


class ReconcilingTransport(FakeTransport):
    """A transport whose provider keeps logs: ``logged`` is what ``find_sent`` finds."""

    reconciles = True
    settle_seconds = 60.0

    def __init__(self, logged: Receipt | None = None, lookup_failure: Exception | None = None):
        super().__init__()
        self.logged = logged
        self.lookup_failure = lookup_failure
        self.lookups: list[float] = []

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        self.lookups.append(since)
        if self.lookup_failure is not None:
            raise self.lookup_failure
        return self.logged


async def test_an_unknown_outcome_keeps_the_claim_uncertain_instead_of_releasing_it() -> None:
    ledger = FakeLedger()
    event = data_processed()
    unknown = SendOutcomeUnknown("Mailtrap did not answer in time: ReadTimeout")

    with pytest.raises(SendOutcomeUnknown):
        await SendEmail(
            FakeTransport(failure=unknown), FakePublisher(), ledger, SENDER, lease_seconds=LEASE
        )(event)

    assert ledger.rows[str(event.job_id)][0] == "uncertain"


@pytest.mark.parametrize("age", [0.0, 9.0, LEASE - 0.5])
async def test_without_provider_logs_an_uncertain_email_waits_out_the_lease(age: float) -> None:
    transport, ledger = FakeTransport(), FakeLedger(uncertain_age=age)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    with pytest.raises(Deferred, match="MAILTRAP_ACCOUNT_ID") as deferred:
        await SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)

    assert deferred.value.wait_seconds == pytest.approx(LEASE - age)
    assert transport.sent == []
    assert ledger.rows[str(event.job_id)][0] == "uncertain"  # given back, still uncertain


async def test_without_provider_logs_an_uncertain_email_is_sent_again_after_the_lease() -> None:
    transport, publisher, ledger = FakeTransport(), FakePublisher(), FakeLedger(uncertain_age=LEASE)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    await SendEmail(transport, publisher, ledger, SENDER, lease_seconds=LEASE)(event)

    assert len(transport.sent) == 1
    assert ledger.sent[str(event.job_id)] == ("fake", "fake-message-1")


async def test_the_provider_logs_are_not_asked_before_they_can_show_the_send() -> None:
    transport, ledger = ReconcilingTransport(), FakeLedger(uncertain_age=20.0)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    with pytest.raises(Deferred, match="logs") as deferred:
        await SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)

    assert deferred.value.wait_seconds == pytest.approx(40.0)
    assert transport.lookups == []
    assert transport.sent == []


async def test_an_uncertain_email_found_in_the_provider_logs_is_recorded_not_sent() -> None:
    transport = ReconcilingTransport(logged=Receipt(message_id="mt-from-the-logs"))
    publisher, ledger = FakePublisher(), FakeLedger(uncertain_age=61.0)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    await SendEmail(transport, publisher, ledger, SENDER, lease_seconds=LEASE)(event)

    assert transport.sent == []
    assert len(transport.lookups) == 1
    assert ledger.sent[str(event.job_id)] == ("fake", "mt-from-the-logs")
    [sent] = publisher.published
    assert isinstance(sent, EmailSent)
    assert sent.provider_message_id == "mt-from-the-logs"


async def test_an_uncertain_email_missing_from_the_settled_logs_is_sent_again() -> None:
    transport, ledger = ReconcilingTransport(logged=None), FakeLedger(uncertain_age=61.0)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    await SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)

    assert len(transport.sent) == 1
    assert ledger.rows[str(event.job_id)][0] == "sent"


async def test_a_failed_lookup_keeps_the_email_uncertain_and_sends_nothing() -> None:
    failure = TransientFailure("could not ask Mailtrap's Email Logs")
    transport, ledger = ReconcilingTransport(lookup_failure=failure), FakeLedger(uncertain_age=61.0)
    event = data_processed()
    ledger.rows[str(event.job_id)] = ("uncertain", "earlier-token")

    with pytest.raises(TransientFailure, match="Email Logs"):
        await SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=LEASE)(event)

    assert transport.sent == []
    assert ledger.rows[str(event.job_id)][0] == "uncertain"
