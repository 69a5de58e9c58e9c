"""What the mailer does with a DataProcessed."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from opentelemetry.trace import SpanKind

from mailer_service.compose import OutgoingEmail, Sender, compose_email
from mailer_service.ledger import Claim, ClaimState, LedgerUnavailable, Uncertainty
from mailer_service.metrics import email_sent
from mailer_service.transport import EmailTransport, Receipt, SendOutcomeUnknown
from pipeline_shared import tracing
from pipeline_shared.contract import TRUSTED
from pipeline_shared.errors import Deferred, TransientFailure
from pipeline_shared.events import DataProcessed, EmailSent, Event
from pipeline_shared.messaging import delivery_attempt

log = logging.getLogger("mailer.handlers")


class EventPublisher(Protocol):
    async def publish(self, event: Event) -> None: ...


class Ledger(Protocol):
    async def claim(self, job_id: str) -> Claim: ...

    async def mark_sent(
        self, job_id: str, claim: Claim, transport: str, provider_message_id: str | None
    ) -> None: ...

    async def release(self, job_id: str, claim: Claim) -> None: ...

    async def mark_uncertain(self, job_id: str, claim: Claim) -> None: ...

    def abandon(self, claim: Claim) -> None: ...


class SendEmail:
    """Send the job's email once, whatever the number of deliveries, then publish ``EmailSent``.

    The ledger is checked before sending and written before the message is
    acked. What the transport says decides the claim: accepted, recorded as
    sent; provably not sent, released for a retry; *unknown* (the provider may
    have taken it), kept as uncertain. Before any new send of an uncertain job
    the transport is asked whether the email went out (``find_sent``), once
    its logs can show it (``settle_seconds``); a transport that cannot tell
    sends again only when ``lease_seconds`` have passed since the uncertain
    attempt. Failures propagate as ``PermanentFailure``/``TransientFailure``
    and the messaging layer turns them into a dead letter or a delayed retry.
    """

    def __init__(
        self,
        transport: EmailTransport,
        publisher: EventPublisher,
        ledger: Ledger,
        sender: Sender,
        *,
        lease_seconds: float,
        ledger_retry_seconds: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._transport = transport
        self._publisher = publisher
        self._ledger = ledger
        self._sender = sender
        self._lease = lease_seconds
        # The first and the longest wait between attempts to record a send.
        self._ledger_retry = ledger_retry_seconds
        self._recording: set[asyncio.Task[None]] = set()

    async def __call__(self, event: DataProcessed) -> None:
        job_id = str(event.job_id)
        try:
            claim = await self._ledger.claim(job_id)
        except LedgerUnavailable as exc:
            raise TransientFailure(f"the ledger of sent emails cannot be read ({exc})") from exc
        if claim.state is ClaimState.BUSY:
            raise Deferred("another mailer is sending this job's email right now")
        if claim.state is ClaimState.ALREADY_SENT:
            log.info("job %s: email already sent; not sending it again", job_id)
            await self._publish_sent(event, claim.transport, claim.provider_message_id)
            return

        email = compose_email(event, self._sender)
        if claim.uncertain is not None:
            found = await self._settle_uncertain(job_id, claim, claim.uncertain, email)
            if found is not None:
                log.info("job %s: an earlier send went out after all; not sending again", job_id)
                await self._recorded(job_id, claim, found.message_id)
                await self._publish_sent(event, self._transport.name, found.message_id)
                email_sent(event)
                return
        try:
            with tracing.span(
                "send email", SpanKind.CLIENT, attributes={"email.transport": self._transport.name}
            ) as span:
                receipt = await self._transport.send(email)
                span.set_attribute("email.provider_message_id", receipt.message_id or "")
        except asyncio.CancelledError:
            # The send may still complete in its thread: the claim lapses and
            # is then uncertain, so the provider is asked before a new send.
            self._ledger.abandon(claim)
            raise
        except SendOutcomeUnknown:
            await self._ledger.mark_uncertain(job_id, claim)
            raise
        except BaseException:
            await self._ledger.release(job_id, claim)
            raise
        await self._recorded(job_id, claim, receipt.message_id)
        await self._publish_sent(event, self._transport.name, receipt.message_id)
        email_sent(event)

    async def _settle_uncertain(
        self, job_id: str, claim: Claim, uncertain: Uncertainty, email: OutgoingEmail
    ) -> Receipt | None:
        """Whether an earlier send went out: its receipt, or None when sending again is
        safe. Raises ``Deferred`` (the claim given back) while nobody can tell yet."""
        if not self._transport.reconciles:
            if uncertain.age < self._lease:
                await self._ledger.release(job_id, claim)
                raise Deferred(
                    "an earlier send may have gone out; without the provider's logs "
                    "(MAILTRAP_ACCOUNT_ID) it is sent again only after SEND_LEASE_SECONDS",
                    wait_seconds=self._lease - uncertain.age,
                )
            return None
        settle = self._transport.settle_seconds
        if uncertain.age < settle:
            await self._ledger.release(job_id, claim)
            raise Deferred(
                "an earlier send may have gone out; waiting for the provider's logs to show it",
                wait_seconds=settle - uncertain.age,
            )
        try:
            with tracing.span(
                "find sent email",
                SpanKind.CLIENT,
                attributes={"email.transport": self._transport.name},
            ) as span:
                found = await self._transport.find_sent(email, uncertain.since)
                span.set_attribute("email.found", found is not None)
                return found
        except BaseException:
            await self._ledger.release(job_id, claim)
            raise

    async def _recorded(self, job_id: str, claim: Claim, message_id: str | None) -> None:
        """Record the send in a task of its own: a handler cancelled meanwhile (its
        HANDLER_TIMEOUT_SECONDS while the database is away) must not leave an email
        that went out unrecorded, its claim renewed by nobody's intent, forever."""
        recording = asyncio.ensure_future(self._record_sent(job_id, claim, message_id))
        self._recording.add(recording)
        recording.add_done_callback(self._recording.discard)
        await asyncio.shield(recording)

    async def close(self) -> None:
        """At a stop: give up the recordings still waiting for the database (their
        claims are then left uncertain by the ledger)."""
        for recording in list(self._recording):
            recording.cancel()
        await asyncio.gather(*self._recording, return_exceptions=True)

    async def _record_sent(self, job_id: str, claim: Claim, message_id: str | None) -> None:
        """Write ``sent`` to the ledger, however long the database takes to come back.

        Giving up here would leave the claim to lapse and the email to be sent
        again; holding the message unacked while waiting costs nothing. Only a
        stop (cancellation) ends the wait.
        """
        delay, longest = self._ledger_retry
        failures = 0
        while True:
            try:
                await self._ledger.mark_sent(job_id, claim, self._transport.name, message_id)
            except LedgerUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "job %s: email sent, but the ledger cannot record it yet (%s); "
                        "trying again until it can",
                        job_id,
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(2 * delay, longest)
                continue
            if failures:
                log.info("job %s: recorded as sent after %d failed write(s)", job_id, failures)
            return

    async def _publish_sent(
        self, event: DataProcessed, transport: str | None, message_id: str | None
    ) -> None:
        await self._publisher.publish(
            EmailSent.model_validate(
                {
                    "job_id": event.job_id,
                    "email": event.email,
                    "transport": transport or self._transport.name,
                    "provider_message_id": message_id,
                    "attempts": delivery_attempt.get(),
                    "submitted_by": event.submitted_by,
                },
                context=TRUSTED,
            )
        )
