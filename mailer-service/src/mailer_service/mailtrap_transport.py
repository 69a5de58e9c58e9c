"""The Mailtrap transport: the official, synchronous ``mailtrap`` SDK, in worker threads.

This is the only module that imports the SDK. Its blocking calls run in a
thread pool of ``concurrency`` threads, which bounds how many requests are at
the provider at once, and its exceptions are translated into our
``PermanentFailure`` / ``TransientFailure`` / ``SendOutcomeUnknown``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from ssl import SSLCertVerificationError
from typing import Any

import mailtrap
import requests
from mailtrap.api.resources.email_logs import EmailLogsApi
from mailtrap.api.sending import SendingApi
from mailtrap.config import GENERAL_HOST, SANDBOX_HOST, SENDING_HOST
from mailtrap.exceptions import APIError, MailtrapError
from mailtrap.http import HttpClient
from mailtrap.models.email_logs import EmailLogsListFilters, filter_ci_equal
from mailtrap.models.mail.batch_mail import (
    BatchEmailRequest,
    BatchMail,
    BatchSendEmailParams,
    BatchSendResponse,
)
from requests import Response
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from mailer_service.blocking_pool import DaemonThreadPool, still_wanted
from mailer_service.compose import OutgoingEmail
from mailer_service.send_budget import SendBudget
from mailer_service.transport import Receipt, SendOutcomeUnknown
from pipeline_shared.errors import Deferred, HandlerFailure, PermanentFailure, TransientFailure

log = logging.getLogger("mailer.mailtrap")

DEFAULT_TIMEOUT_SECONDS = 30.0
# A provider asking for longer is waited out through the retry delays.
MAX_RETRY_AFTER_SECONDS = 600.0
# How long Mailtrap's Email Logs may take to show an accepted email.
DEFAULT_SETTLE_SECONDS = 60.0
CLOCK_MARGIN_SECONDS = 300.0
# One recipient's emails since an uncertain send: a few pages at most.
MAX_LOG_PAGES = 20


# Statuses that say the provider did not take the request: sending again is safe.
_NOT_TAKEN_STATUSES = frozenset({408, 429, 503})


def is_transient_status(status: int) -> bool:
    """429 (rate limited), 408 and 5xx may pass later; any other 4xx will not."""
    return status in _NOT_TAKEN_STATUSES or status >= 500


def _never_left(exc: BaseException) -> bool:
    """Whether a connection error happened before the request was written: the
    connection was never made (refused, DNS, connect timeout) or TLS failed."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        # A certificate is checked in the handshake, before the request is written;
        # other TLS errors may come while the answer is read.
        if isinstance(current, NewConnectionError | ConnectTimeoutError | SSLCertVerificationError):
            return True
        pending.extend([*current.args, current.__cause__, current.__context__])
        pending.append(getattr(current, "reason", None))  # urllib3's MaxRetryError
    return False


Wanted = Callable[[], bool]
"""Whether the handler of an email still waits for it to be sent (callable from any thread)."""


def _always() -> bool:
    return True


class SendAbandoned(Exception):
    """A send dropped before its request: the handler that wanted it had given up."""


class RateLimited(Exception):
    """Mailtrap answered 429: too many requests for the token just now."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__(f"Mailtrap answered 429 (Retry-After: {retry_after})")
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: a number, or an HTTP date; None if neither."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS) if math.isfinite(seconds) else None


class _HttpClient(HttpClient):  # type: ignore[misc]  # the SDK ships no types
    """The SDK's HTTP client, keeping a 429's ``Retry-After``, which its errors drop."""

    def _process_response(self, response: Response) -> Any:
        if response.status_code == 429:
            raise RateLimited(retry_after_seconds(response.headers.get("Retry-After")))
        return super()._process_response(response)


def classify(exc: BaseException) -> HandlerFailure:
    """Translate an SDK or network exception into what it says about the email.

    Rejected (a 4xx other than 408/429): ``PermanentFailure``. Not taken (408,
    429, 503, no connection, TLS failure): ``TransientFailure``. Anything that
    may have followed the provider's acceptance (a timeout or a lost connection
    after the request went out, 500, 502, 504, an answer we cannot read):
    ``SendOutcomeUnknown``.
    """
    if isinstance(exc, RateLimited):
        # Not taken; waiting spends no attempt, however long the provider asks for.
        wait = exc.retry_after if exc.retry_after is not None else 1.0
        return Deferred(f"{exc}; waiting {wait:g} s", wait_seconds=wait)
    if isinstance(exc, APIError):
        reason = f"Mailtrap answered {exc.status}: {'; '.join(exc.errors)}"
        if exc.status in _NOT_TAKEN_STATUSES:
            return TransientFailure(reason)
        if exc.status >= 500:
            return SendOutcomeUnknown(reason)
        return PermanentFailure(reason)
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidHeader):
        return PermanentFailure(f"Mailtrap request is malformed: {type(exc).__name__}: {exc}")
    if isinstance(exc, requests.RequestException) and _never_left(exc):
        return TransientFailure(f"could not reach Mailtrap: {type(exc).__name__}")
    if isinstance(exc, requests.Timeout):
        return SendOutcomeUnknown(f"Mailtrap did not answer in time: {type(exc).__name__}")
    if isinstance(exc, requests.RequestException):
        return SendOutcomeUnknown(
            f"lost the connection to Mailtrap while waiting for its answer: {type(exc).__name__}"
        )
    if isinstance(exc, MailtrapError):
        return PermanentFailure(f"Mailtrap client error: {exc}")
    return SendOutcomeUnknown(
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


def to_batch(emails: Sequence[OutgoingEmail]) -> BatchSendEmailParams:
    """One batch request: what all share (the sender) in ``base``, the rest per email."""
    first = emails[0]
    return BatchSendEmailParams(
        base=BatchMail(
            sender=mailtrap.Address(email=first.sender.email, name=first.sender.name),
            subject=first.subject,
            category=first.sender.category,
        ),
        requests=[
            BatchEmailRequest(
                to=[mailtrap.Address(email=email.to)],
                subject=email.subject,
                text=email.text,
                custom_variables=email.custom_variables,
            )
            for email in emails
        ],
    )


def batch_outcomes(response: BatchSendResponse, count: int) -> list[Receipt | HandlerFailure]:
    """Each email's outcome from the provider's answer to its batch."""
    if len(response.responses) != count:
        # Which answer is whose cannot be told: nobody knows what went out.
        unknown = SendOutcomeUnknown(
            f"Mailtrap answered {len(response.responses)} results for {count} emails"
        )
        return [unknown] * count
    outcomes: list[Receipt | HandlerFailure] = []
    for item in response.responses:
        if item.success:
            outcomes.append(Receipt(message_id=item.message_ids[0] if item.message_ids else None))
        else:
            errors = "; ".join(item.errors or []) or "no reason given"
            outcomes.append(PermanentFailure(f"Mailtrap refused the email: {errors}"))
    return outcomes


class MailtrapTransport:
    """Sends through Mailtrap's sending API and, given an account id, finds past sends
    in its Email Logs API (on the general API host)."""

    name = "mailtrap"

    def __init__(
        self,
        *,
        token: str,
        api_host: str | None,
        inbox_id: str | None,
        concurrency: int,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        account_id: str | None = None,
        general_api_host: str = GENERAL_HOST,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        budget: SendBudget | None = None,
    ) -> None:
        self._client = mailtrap.MailtrapClient(
            token=token, api_host=api_host, sandbox=inbox_id is not None, inbox_id=inbox_id
        )
        self._host = api_host or (SANDBOX_HOST if inbox_id is not None else SENDING_HOST)
        self._inbox_id = inbox_id
        self._timeout = timeout_seconds
        self._account_id = account_id
        self._general_host = general_api_host
        self._settle = settle_seconds
        self._budget = budget
        self._pool = DaemonThreadPool(concurrency, name="mailtrap")
        self._local = threading.local()

    @property
    def reconciles(self) -> bool:
        return self._account_id is not None

    @property
    def settle_seconds(self) -> float:
        return self._settle

    def _sending_api(self) -> SendingApi:
        # The client's ``send`` opens a new HTTP session, so a new TLS
        # connection, per email; one sending API per thread keeps its
        # connection alive across emails. Built here rather than by the client
        # so that it takes our timeout (requests applies it to connecting and
        # again to each read).
        api: SendingApi | None = getattr(self._local, "api", None)
        if api is None:
            client = _HttpClient(self._host, self._client.headers, timeout=self._timeout)
            api = self._local.api = SendingApi(client=client, inbox_id=self._inbox_id)
        return api

    def _email_logs(self) -> EmailLogsApi:
        assert self._account_id is not None
        logs: EmailLogsApi | None = getattr(self._local, "logs", None)
        if logs is None:
            # The SDK's own client fixes the general host to mailtrap.io.
            client = _HttpClient(self._general_host, self._client.headers, timeout=self._timeout)
            logs = self._local.logs = EmailLogsApi(client=client, account_id=self._account_id)
        return logs

    def _take_slot(self) -> None:
        # In the worker thread, right before the request: a slot taken earlier,
        # while the request waited for a thread, would be counted in a window
        # the request does not go out in.
        if self._budget is not None:
            self._budget.acquire_blocking()

    def _send_blocking(
        self, mail: mailtrap.Mail, *, slot_taken: bool, wanted: Wanted = _always
    ) -> Receipt:
        if not slot_taken:
            self._take_slot()
            if not (still_wanted() and wanted()):
                # The budget can hold a request for minutes (a 429's Retry-After).
                # Its handler gave up meanwhile and its message went back to the
                # queue: sending now would race the next attempt's search of the
                # Email Logs, and could send the email twice.
                log.info("dropped a send its handler gave up on while it waited its turn")
                raise SendAbandoned("the handler gave up before the email was sent")
        response = self._sending_api().send(mail)
        return Receipt(message_id=response.message_ids[0] if response.message_ids else None)

    def _find_blocking(self, email: OutgoingEmail, since: float) -> Receipt | None:
        # The provider's clock may differ from ours: widen the window.
        after = datetime.fromtimestamp(since - CLOCK_MARGIN_SECONDS, UTC)
        filters = EmailLogsListFilters(
            sent_after=after.isoformat(timespec="seconds").replace("+00:00", "Z"),
            to=filter_ci_equal(email.to),
        )
        cursor: str | None = None
        for _ in range(MAX_LOG_PAGES):
            page = self._email_logs().get_list(filters=filters, search_after=cursor)
            for message in page.messages:
                if str(message.custom_variables.get("job_id")) == email.job_id:
                    return Receipt(message_id=message.message_id)
            cursor = page.next_page_cursor
            if not cursor or not page.messages:
                return None
        raise TransientFailure(
            f"the Email Logs search for {email.job_id} went past {MAX_LOG_PAGES} pages"
        )

    async def send(self, email: OutgoingEmail) -> Receipt:
        return await self._send_one(email, slot_taken=False)

    async def _send_one(
        self, email: OutgoingEmail, *, slot_taken: bool, wanted: Wanted = _always
    ) -> Receipt:
        try:
            mail = to_mail(email)
        except Exception as exc:
            # The same email fails the same way every time: retrying cannot help.
            raise PermanentFailure(f"could not build the email: {exc}") from exc
        try:
            return await self._pool.run(
                lambda: self._send_blocking(mail, slot_taken=slot_taken, wanted=wanted)
            )
        except asyncio.CancelledError:
            raise
        except SendAbandoned as exc:
            raise TransientFailure(str(exc)) from exc  # nobody waits for this answer
        except Exception as exc:
            await self._honour_rate_limit(exc)
            raise classify(exc) from exc

    async def _honour_rate_limit(self, exc: Exception) -> None:
        """A 429 slows every replica down, not just this request's sender."""
        if isinstance(exc, RateLimited) and self._budget is not None:
            await self._budget.block_for(exc.retry_after or 1.0)

    async def take_slot(self) -> None:
        if self._budget is not None:
            await self._budget.acquire()

    async def send_batch(
        self, emails: Sequence[OutgoingEmail], wanted: Sequence[Wanted] | None = None
    ) -> list[Receipt | HandlerFailure]:
        """Send ``emails`` in one batch request, its budget slot taken by the caller;
        one outcome per email, in order.

        A request refused as a whole for its content (400, 422) may be refused for
        one email's sake: each is then sent alone (each taking its own slot), to
        get its own answer, unless ``wanted`` (one per email) says its handler gave
        up while it waited for that slot."""
        wanted = wanted or [_always] * len(emails)
        if len(emails) == 1:
            # Alone, it gets the plain answer of the sending endpoint.
            return [await self._outcome_of_one(emails[0], slot_taken=True)]
        try:
            params = to_batch(emails)
        except Exception:
            # One email the SDK cannot take: find it by building each alone.
            return [
                await self._outcome_of_one(email, wanted=w)
                for email, w in zip(emails, wanted, strict=True)
            ]
        try:
            response = await self._pool.run(lambda: self._sending_api().batch_send(params))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._honour_rate_limit(exc)
            failure = classify(exc)
            if isinstance(exc, APIError) and exc.status in {400, 422}:
                log.warning(
                    "Mailtrap refused a batch of %d (%s); sending each alone", len(emails), failure
                )
                return list(
                    await asyncio.gather(
                        *(
                            self._outcome_of_one(email, wanted=w)
                            for email, w in zip(emails, wanted, strict=True)
                        )
                    )
                )
            return [failure] * len(emails)
        return batch_outcomes(response, len(emails))

    async def _outcome_of_one(
        self, email: OutgoingEmail, *, slot_taken: bool = False, wanted: Wanted = _always
    ) -> Receipt | HandlerFailure:
        try:
            return await self._send_one(email, slot_taken=slot_taken, wanted=wanted)
        except HandlerFailure as failure:
            return failure

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        if self._account_id is None:
            return None
        try:
            return await self._pool.run(lambda: self._find_blocking(email, since))
        except (asyncio.CancelledError, TransientFailure):
            raise
        except Exception as exc:
            raise TransientFailure(
                f"could not ask Mailtrap's Email Logs whether the email went out: "
                f"{classify(exc).reason}"
            ) from exc

    async def close(self) -> None:
        # Does not wait for requests still at the provider: they are bounded by
        # MAILTRAP_TIMEOUT_SECONDS, the process's stop is bounded by
        # SHUTDOWN_TIMEOUT_SECONDS, and their messages are back in the queue.
        self._pool.close()
        if self._budget is not None:
            await self._budget.close()
