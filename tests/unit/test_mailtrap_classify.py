"""Translating Mailtrap SDK failures, building the SDK's Mail, and the SendEmail handler."""

from __future__ import annotations

from datetime import UTC, datetime
from http.client import RemoteDisconnected
from ssl import SSLCertVerificationError

import mailtrap
import pytest
import requests
from mailtrap.exceptions import APIError, AuthorizationError, ClientConfigurationError
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError

from mailer_service.compose import OutgoingEmail, Sender, compose_email
from mailer_service.handlers import SendEmail
from mailer_service.mailtrap_transport import (
    RateLimited,
    classify,
    is_transient_status,
    retry_after_seconds,
    to_mail,
)
from mailer_service.transport import SendOutcomeUnknown
from pipeline_shared.errors import Deferred, PermanentFailure, TransientFailure
from pipeline_shared.events import EmailSent
from unit.fakes import FakeLedger, FakePublisher, FakeTransport, data_processed

SENDER = Sender(email="pipeline@example.com", name="Email Pipeline", category="background-job")
LEASE = 15.0

# --- status codes -----------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_a_status_that_may_pass_later_is_transient(status: int) -> None:
    assert is_transient_status(status) is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_any_other_client_error_status_is_not_transient(status: int) -> None:
    assert is_transient_status(status) is False


# --- classify ---------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_an_api_error_with_a_client_status_is_permanent_and_names_the_status(
    status: int,
) -> None:
    failure = classify(APIError(status, ["'from' address is not verified", "bad domain"]))

    assert type(failure) is PermanentFailure
    assert failure.reason == (
        f"Mailtrap answered {status}: 'from' address is not verified; bad domain"
    )


@pytest.mark.parametrize("status", [408, 429, 503])
def test_a_status_saying_the_email_was_not_taken_is_a_plain_transient_failure(
    status: int,
) -> None:
    failure = classify(APIError(status, ["try again later"]))

    assert type(failure) is TransientFailure
    assert failure.reason == f"Mailtrap answered {status}: try again later"


@pytest.mark.parametrize("status", [500, 502, 504, 599])
def test_a_server_error_that_may_follow_acceptance_is_an_unknown_outcome(status: int) -> None:
    failure = classify(APIError(status, ["internal error"]))

    assert type(failure) is SendOutcomeUnknown
    assert isinstance(failure, TransientFailure)  # retried, after asking the provider
    assert failure.reason == f"Mailtrap answered {status}: internal error"


def test_an_authorization_error_is_permanent_with_status_401() -> None:
    failure = classify(AuthorizationError(["Unauthorized"]))

    assert type(failure) is PermanentFailure
    assert failure.reason == "Mailtrap answered 401: Unauthorized"


def test_an_api_error_without_details_still_names_the_status() -> None:
    failure = classify(APIError(502, []))

    assert type(failure) is SendOutcomeUnknown
    assert "502" in failure.reason


def _wrapped(reason: Exception) -> requests.ConnectionError:
    """What requests raises: its ConnectionError around urllib3's MaxRetryError."""
    return requests.ConnectionError(MaxRetryError(None, "/api/send", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(NewConnectionError(None, "Connection refused")),  # type: ignore[arg-type]
        _wrapped(NameResolutionError("send.api.mailtrap.io", None, OSError("no name"))),  # type: ignore[arg-type]
        requests.exceptions.SSLError(
            MaxRetryError(None, "/api/send", SSLCertVerificationError("certificate verify failed"))  # type: ignore[arg-type]
        ),
        requests.exceptions.ConnectTimeout("connect timed out"),
    ],
    ids=["refused", "dns", "tls", "connect-timeout"],
)
def test_a_request_that_never_left_is_a_plain_transient_failure(exc: Exception) -> None:
    failure = classify(exc)

    assert type(failure) is TransientFailure
    assert failure.reason == f"could not reach Mailtrap: {type(exc).__name__}"


def test_a_tls_error_after_the_handshake_is_an_unknown_outcome() -> None:
    # A corrupt record while the answer is read: the request had gone out.
    failure = classify(requests.exceptions.SSLError("[SSL: DECRYPTION_FAILED] bad record"))

    assert type(failure) is SendOutcomeUnknown


def test_a_read_timeout_is_an_unknown_outcome() -> None:
    failure = classify(requests.exceptions.ReadTimeout("read timed out"))

    assert type(failure) is SendOutcomeUnknown
    assert failure.reason == "Mailtrap did not answer in time: ReadTimeout"


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError(
            ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        ),
        requests.ConnectionError(ProtocolError("Connection aborted.", RemoteDisconnected("x"))),
        requests.exceptions.ChunkedEncodingError("connection broken"),
    ],
    ids=["reset", "remote-disconnected", "chunked"],
)
def test_a_connection_lost_while_waiting_for_the_answer_is_an_unknown_outcome(
    exc: Exception,
) -> None:
    failure = classify(exc)

    assert type(failure) is SendOutcomeUnknown
    assert type(exc).__name__ in failure.reason


def test_a_client_configuration_error_is_permanent() -> None:
    failure = classify(ClientConfigurationError("Please provide inbox_id for sandbox mode"))

    assert type(failure) is PermanentFailure
    assert failure.reason == "Mailtrap client error: Please provide inbox_id for sandbox mode"


def test_an_unexpected_exception_is_an_unknown_outcome_and_named() -> None:
    failure = classify(RuntimeError("connection pool is full"))

    assert type(failure) is SendOutcomeUnknown
    assert failure.reason == (
        "unexpected error sending through Mailtrap: RuntimeError: connection pool is full"
    )


# --- to_mail ----------------------------------------------------------------


def test_the_mailtrap_mail_carries_everything_the_api_needs() -> None:
    event = data_processed(email="grace@example.org", subject="Weekly visits")
    composed = compose_email(event, SENDER)

    mail = to_mail(composed)

    assert isinstance(mail, mailtrap.Mail)
    assert mail.api_data == {
        "from": {"email": "pipeline@example.com", "name": "Email Pipeline"},
        "to": [{"email": "grace@example.org"}],
        "subject": "Weekly visits",
        "text": composed.text,
        "category": "background-job",
        "custom_variables": {"job_id": str(event.job_id)},
    }


def test_the_mailtrap_mail_has_no_html_part() -> None:
    mail = to_mail(compose_email(data_processed(), SENDER))

    assert "html" not in mail.api_data
    assert mail.html is None


# --- SendEmail --------------------------------------------------------------


async def test_sending_an_email_publishes_email_sent_with_the_receipt() -> None:
    transport = FakeTransport(message_id="mt-0001")
    publisher = FakePublisher()
    event = data_processed(email="grace@example.org")

    await SendEmail(transport, publisher, FakeLedger(), SENDER, lease_seconds=LEASE)(event)

    [sent] = publisher.published
    assert isinstance(sent, EmailSent)
    assert sent.job_id == event.job_id
    assert sent.email == "grace@example.org"
    assert sent.transport == "fake"
    assert sent.provider_message_id == "mt-0001"


async def test_the_transport_is_given_the_composed_email() -> None:
    transport = FakeTransport()
    event = data_processed(subject=None)

    await SendEmail(transport, FakePublisher(), FakeLedger(), SENDER, lease_seconds=LEASE)(event)

    [email] = transport.sent
    assert isinstance(email, OutgoingEmail)
    assert email == compose_email(event, SENDER)


async def test_a_receipt_without_a_message_id_publishes_none() -> None:
    publisher = FakePublisher()

    await SendEmail(
        FakeTransport(message_id=None), publisher, FakeLedger(), SENDER, lease_seconds=LEASE
    )(data_processed())

    assert publisher.published[0].provider_message_id is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "failure",
    [TransientFailure("Mailtrap answered 503: busy"), PermanentFailure("Mailtrap answered 422: x")],
    ids=["transient", "permanent"],
)
async def test_a_transport_failure_propagates_and_nothing_is_published(
    failure: Exception,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(type(failure)) as caught:
        await SendEmail(
            FakeTransport(failure=failure), publisher, FakeLedger(), SENDER, lease_seconds=LEASE
        )(data_processed())

    assert caught.value is failure
    assert publisher.published == []


# --- 429 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), ("0.25", 0.25), ("-5", 0.0), ("99999", 600.0), (None, None), ("soon", None)],
)
def test_retry_after_in_seconds(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)

    assert retry_after_seconds("Sun, 29 Nov 2026 12:00:07 GMT", now) == 7.0


def test_a_429_is_deferred_for_its_retry_after_without_spending_an_attempt() -> None:
    failure = classify(RateLimited(4.5))

    assert isinstance(failure, Deferred)
    assert failure.wait_seconds == 4.5


def test_a_429_without_retry_after_is_deferred_briefly() -> None:
    failure = classify(RateLimited(None))

    assert isinstance(failure, Deferred)
    assert failure.wait_seconds == 1.0
