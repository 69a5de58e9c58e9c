"""The Mailtrap transport: the official, synchronous ``mailtrap`` SDK, in worker threads.

This is the only module that imports the SDK. Its blocking calls run in a
thread pool of ``concurrency`` threads, which bounds how many emails are at
the provider at once, and its exceptions are translated into our
``PermanentFailure`` / ``TransientFailure``.
"""

from __future__ import annotations

import asyncio
import threading

import mailtrap
import requests
from mailtrap.api.sending import SendingApi
from mailtrap.config import SANDBOX_HOST, SENDING_HOST
from mailtrap.exceptions import APIError, MailtrapError
from mailtrap.http import HttpClient

from mailer_service.blocking_pool import DaemonThreadPool
from mailer_service.compose import OutgoingEmail
from mailer_service.transport import Receipt
from pipeline_shared.errors import HandlerFailure, PermanentFailure, TransientFailure

DEFAULT_TIMEOUT_SECONDS = 30.0


def is_transient_status(status: int) -> bool:
    """429 (rate limited), 408 and 5xx may pass later; any other 4xx will not."""
    return status in {408, 429} or status >= 500


def classify(exc: BaseException) -> HandlerFailure:
    """Translate an SDK or network exception into a permanent or transient failure."""
    if isinstance(exc, APIError):
        reason = f"Mailtrap answered {exc.status}: {'; '.join(exc.errors)}"
        if is_transient_status(exc.status):
            return TransientFailure(reason)
        return PermanentFailure(reason)
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidHeader):
        return PermanentFailure(f"Mailtrap request is malformed: {type(exc).__name__}: {exc}")
    if isinstance(exc, requests.Timeout):
        return TransientFailure(f"Mailtrap did not answer in time: {type(exc).__name__}")
    if isinstance(exc, requests.RequestException):
        return TransientFailure(f"could not reach Mailtrap: {type(exc).__name__}")
    if isinstance(exc, MailtrapError):
        return PermanentFailure(f"Mailtrap client error: {exc}")
    return TransientFailure(
        f"unexpected error sending through Mailtrap: {type(exc).__name__}: {exc}"
    )


def to_mail(email: OutgoingEmail) -> mailtrap.Mail:
    return mailtrap.Mail(
        sender=mailtrap.Address(email=email.sender.email, name=email.sender.name),
        to=[mailtrap.Address(email=email.to)],
        subject=email.subject,
        text=email.text,
        category=email.sender.category,
        custom_variables=email.custom_variables,
    )


class MailtrapTransport:
    name = "mailtrap"

    def __init__(
        self,
        *,
        token: str,
        api_host: str | None,
        inbox_id: str | None,
        concurrency: int,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._client = mailtrap.MailtrapClient(
            token=token, api_host=api_host, sandbox=inbox_id is not None, inbox_id=inbox_id
        )
        self._host = api_host or (SANDBOX_HOST if inbox_id is not None else SENDING_HOST)
        self._inbox_id = inbox_id
        self._timeout = timeout_seconds
        self._pool = DaemonThreadPool(concurrency, name="mailtrap")
        self._local = threading.local()

    def _sending_api(self) -> SendingApi:
        # The client's ``send`` opens a new HTTP session, so a new TLS
        # connection, per email; one sending API per thread keeps its
        # connection alive across emails. Built here rather than by the client
        # so that it takes our timeout (requests applies it to connecting and
        # again to each read).
        api: SendingApi | None = getattr(self._local, "api", None)
        if api is None:
            client = HttpClient(self._host, self._client.headers, timeout=self._timeout)
            api = self._local.api = SendingApi(client=client, inbox_id=self._inbox_id)
        return api

    def _send_blocking(self, mail: mailtrap.Mail) -> Receipt:
        response = self._sending_api().send(mail)
        return Receipt(message_id=response.message_ids[0] if response.message_ids else None)

    async def send(self, email: OutgoingEmail) -> Receipt:
        try:
            mail = to_mail(email)
        except Exception as exc:
            # The same email fails the same way every time: retrying cannot help.
            raise PermanentFailure(f"could not build the email: {exc}") from exc
        try:
            return await self._pool.run(lambda: self._send_blocking(mail))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    async def close(self) -> None:
        # Does not wait for requests still at the provider: they are bounded by
        # MAILTRAP_TIMEOUT_SECONDS, the process's stop is bounded by
        # SHUTDOWN_TIMEOUT_SECONDS, and their messages are back in the queue.
        self._pool.close()
