"""The mailer's own Prometheus metrics: what the provider answers, how fast, and how long
a job takes from its request to its email.

``MeasuredTransport`` wraps any ``EmailTransport`` in the composition root, so the
transports stay free of metrics. A send's outcome is the one the handler acts on
(see ``SendOutcomeUnknown`` and ``mailtrap_transport.classify``):

==============  ==========================================================
outcome         the send
==============  ==========================================================
``accepted``    returned a receipt
``rejected``    raised ``PermanentFailure`` (a 4xx other than 408/429)
``not_sent``    raised another failure the provider provably did not act
                on (408, 429, 503, no connection); the claim is released
``unknown``     raised ``SendOutcomeUnknown``, or was cancelled with the
                request in flight: the email may have gone out
==============  ==========================================================
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Histogram

from mailer_service.compose import OutgoingEmail
from mailer_service.transport import EmailTransport, Receipt, SendOutcomeUnknown
from pipeline_shared.errors import PermanentFailure
from pipeline_shared.events import DataProcessed, utc_now

# Up to MAILTRAP_TIMEOUT_SECONDS (30 s by default) per request.
PROVIDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A job takes milliseconds when all is well, and its retries up to
# RETRY_DELAYS' sum (about 13 minutes by default) when it is not.
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

PROVIDER_SENDS = Histogram(
    "mailer_provider_send_duration_seconds",
    "Time one send to the email provider took, by transport and outcome "
    "(its _count counts the sends).",
    ["transport", "outcome"],
    buckets=PROVIDER_BUCKETS,
)
PROVIDER_LOOKUPS = Counter(
    "mailer_provider_lookups",
    "Questions to the provider whether an uncertain send went out, by answer "
    "(found, not_found, failed).",
    ["transport", "answer"],
)
JOB_DURATION = Histogram(
    "mailer_job_duration_seconds",
    "Time from a job's JobRequested to its email being accepted and EmailSent published, "
    "for each email sent (repeats of a sent email are not counted).",
    buckets=JOB_BUCKETS,
)


def email_sent(event: DataProcessed) -> None:
    """Observe one job's time from request to sent, from its ``JobRequested``'s time that
    ``DataProcessed`` carries (``requested_at``; absent from older processors' events)."""
    if event.requested_at is not None:
        seconds = (utc_now() - event.requested_at).total_seconds()
        JOB_DURATION.observe(max(seconds, 0.0))


def send_outcome(failure: BaseException | None) -> str:
    """The ``outcome`` label of a send that raised ``failure`` (None: it returned)."""
    if failure is None:
        return "accepted"
    if isinstance(failure, SendOutcomeUnknown | asyncio.CancelledError):
        return "unknown"
    if isinstance(failure, PermanentFailure):
        return "rejected"
    return "not_sent"


class MeasuredTransport:
    """An ``EmailTransport`` that times each send and counts its outcome, then does
    what ``inner`` does."""

    def __init__(self, inner: EmailTransport) -> None:
        self._inner = inner
        self.name = inner.name

    @property
    def reconciles(self) -> bool:
        return self._inner.reconciles

    @property
    def settle_seconds(self) -> float:
        return self._inner.settle_seconds

    async def send(self, email: OutgoingEmail) -> Receipt:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await self._inner.send(email)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            PROVIDER_SENDS.labels(self.name, send_outcome(failure)).observe(
                time.perf_counter() - started
            )

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        answer = "failed"
        try:
            found = await self._inner.find_sent(email, since)
            answer = "not_found" if found is None else "found"
            return found
        finally:
            PROVIDER_LOOKUPS.labels(self.name, answer).inc()

    async def close(self) -> None:
        await self._inner.close()
