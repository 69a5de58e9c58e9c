"""Sends whose outcome is unknown, settled through the provider's logs: the real SDK
against the HTTPS stand-in, the real ledger in SQLite."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailer_service.compose import OutgoingEmail, Sender, compose_email
from mailer_service.handlers import SendEmail
from mailer_service.ledger import ClaimState, SqlLedger
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.transport import SendOutcomeUnknown
from pipeline_shared.errors import Deferred, TransientFailure
from pipeline_shared.events import EmailSent
from support.mailtrap_stub import MailtrapStub
from support.services import free_port
from unit.fakes import FakePublisher, data_processed

SENDER = Sender(email="pipeline@example.com", name="Pipeline", category="test")
TIMEOUT = 0.5


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MailtrapStub]:
    stub = MailtrapStub(tmp_path, log_page_size=2)
    stub.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stub.ca_bundle))
    yield stub
    stub.stop()


def transport_for(
    stub: MailtrapStub, *, account_id: str | None = "4242", settle: float = 0.0
) -> MailtrapTransport:
    return MailtrapTransport(
        token=stub.token,
        api_host=stub.host,
        inbox_id=None,
        concurrency=2,
        timeout_seconds=TIMEOUT,
        account_id=account_id,
        general_api_host=stub.host,
        settle_seconds=settle,
    )


@pytest.fixture
async def transport(stub: MailtrapStub) -> AsyncIterator[MailtrapTransport]:
    transport = transport_for(stub)
    yield transport
    await transport.close()


def email_for(to: str = "ada@example.com") -> OutgoingEmail:
    return compose_email(data_processed(email=to), SENDER)


async def test_an_email_taken_but_never_answered_is_an_unknown_outcome_found_in_the_logs(
    stub: MailtrapStub, transport: MailtrapTransport
) -> None:
    email = email_for()
    before = time.time()
    stub.accept_then_hang()

    with pytest.raises(SendOutcomeUnknown, match="did not answer in time"):
        await transport.send(email)
    found = await transport.find_sent(email, before)

    [delivered] = stub.delivered
    assert found is not None
    assert found.message_id == delivered.message_id
    assert stub.log_searches, "the Email Logs API was not asked"
    assert stub.log_searches[0]["filters[to][value]"] == ["ada@example.com"]


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_a_server_error_after_taking_the_email_is_an_unknown_outcome(
    stub: MailtrapStub, transport: MailtrapTransport, status: int
) -> None:
    stub.accept_then_fail(1, status)

    with pytest.raises(SendOutcomeUnknown, match=str(status)):
        await transport.send(email_for())

    assert len(stub.delivered) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_a_status_saying_not_taken_is_a_plain_transient_failure(
    stub: MailtrapStub, transport: MailtrapTransport, status: int
) -> None:
    stub.fail_next(1, status)

    with pytest.raises(TransientFailure) as caught:
        await transport.send(email_for())

    assert not isinstance(caught.value, SendOutcomeUnknown)
    assert stub.delivered == []


async def test_a_provider_that_refuses_the_connection_did_not_take_the_email() -> None:
    host = f"127.0.0.1:{free_port()}"  # a port nobody listens on
    transport = MailtrapTransport(
        token="t", api_host=host, inbox_id=None, concurrency=1, timeout_seconds=TIMEOUT
    )
    try:
        with pytest.raises(TransientFailure, match="could not reach") as caught:
            await transport.send(email_for())
    finally:
        await transport.close()

    assert not isinstance(caught.value, SendOutcomeUnknown)


async def test_an_email_the_logs_do_not_show_yet_is_not_found(
    stub: MailtrapStub, transport: MailtrapTransport
) -> None:
    stub.log_delay = 30.0
    email = email_for()
    before = time.time()
    stub.accept_then_fail(1, 500)
    with pytest.raises(SendOutcomeUnknown):
        await transport.send(email)

    assert await transport.find_sent(email, before) is None


async def test_the_job_is_found_among_many_emails_to_its_recipient_over_several_pages(
    stub: MailtrapStub, transport: MailtrapTransport
) -> None:
    before = time.time()
    wanted = email_for("grace@example.org")
    await transport.send(wanted)
    for _ in range(5):  # newer emails to the same recipient push it to page 3
        await transport.send(email_for("grace@example.org"))
    await transport.send(email_for("ada@example.com"))

    found = await transport.find_sent(wanted, before)

    sent = {request.job_id: request.message_id for request in stub.delivered}
    assert found is not None
    assert found.message_id == sent[wanted.job_id]
    assert len(stub.log_searches) == 3  # pages of two, newest first
    assert await transport.find_sent(email_for("grace@example.org"), before) is None


async def test_without_an_account_id_the_logs_are_not_asked(stub: MailtrapStub) -> None:
    transport = transport_for(stub, account_id=None)
    try:
        await transport.send(email := email_for())
        assert transport.reconciles is False
        assert await transport.find_sent(email, 0) is None
    finally:
        await transport.close()
    assert stub.log_searches == []


# --- the handler, start to end ---------------------------------------------------


async def test_a_send_taken_but_never_answered_is_recorded_from_the_logs_not_sent_again(
    stub: MailtrapStub, tmp_path: Path
) -> None:
    ledger = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", lease_seconds=15)
    transport = transport_for(stub, settle=0.3)
    publisher = FakePublisher()
    handler = SendEmail(transport, publisher, ledger, SENDER, lease_seconds=15)
    event = data_processed()
    stub.accept_then_hang()
    try:
        with pytest.raises(SendOutcomeUnknown):
            await handler(event)
        with pytest.raises(Deferred, match="logs"):  # too early for the logs to tell
            await handler(event)
        time.sleep(0.3)
        stub.release()

        await handler(event)
        claim = await ledger.claim(str(event.job_id))
    finally:
        await transport.close()
        await ledger.close()

    [delivered] = stub.delivered
    assert delivered.job_id == str(event.job_id)
    [sent] = publisher.published
    assert isinstance(sent, EmailSent)
    assert sent.provider_message_id == delivered.message_id
    assert claim.state is ClaimState.ALREADY_SENT
    assert claim.provider_message_id == delivered.message_id


async def test_a_send_that_the_settled_logs_do_not_show_is_sent_again_once(
    stub: MailtrapStub, tmp_path: Path
) -> None:
    ledger = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", lease_seconds=15)
    transport = transport_for(stub, settle=0.0)
    handler = SendEmail(transport, FakePublisher(), ledger, SENDER, lease_seconds=15)
    event = data_processed()
    # Answered 504 and not taken after all: the logs never show it.
    stub.fail_next(1, 504)
    try:
        with pytest.raises(SendOutcomeUnknown):
            await handler(event)
        await handler(event)
        await handler(event)  # a repeat finds it sent
    finally:
        await transport.close()
        await ledger.close()

    assert [request.job_id for request in stub.delivered] == [str(event.job_id)]
    assert len(stub.log_searches) == 1
    assert uuid.UUID(str(stub.delivered[0].message_id))
