"""What the mailer does with a DataProcessed."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mailer_service.compose import Sender, compose_email
from mailer_service.ledger import Claim, ClaimState
from mailer_service.transport import EmailTransport
from pipeline_shared.errors import Deferred
from pipeline_shared.events import DataProcessed, EmailSent, Event
from pipeline_shared.messaging import delivery_attempt

log = logging.getLogger("mailer.handlers")


class EventPublisher(Protocol):
    async def publish(self, event: Event) -> None: ...


class Ledger(Protocol):
    async def claim(self, job_id: str) -> Claim: ...

    async def mark_sent(
        self, job_id: str, transport: str, provider_message_id: str | None
    ) -> None: ...

    async def release(self, job_id: str, claim: Claim) -> None: ...


class SendEmail:
    """Send the job's email once, whatever the number of deliveries, then publish ``EmailSent``.

    The ledger is checked before sending and written before the message is
    acked (see ``mailer_service.ledger`` for the one window that remains).
    Transport failures propagate as ``PermanentFailure``/``TransientFailure``
    and the messaging layer turns them into a dead letter or a delayed retry.
    """

    def __init__(
        self,
        transport: EmailTransport,
        publisher: EventPublisher,
        ledger: Ledger,
        sender: Sender,
    ) -> None:
        self._transport = transport
        self._publisher = publisher
        self._ledger = ledger
        self._sender = sender

    async def __call__(self, event: DataProcessed) -> None:
        job_id = str(event.job_id)
        claim = await self._ledger.claim(job_id)
        if claim.state is ClaimState.BUSY:
            raise Deferred("another mailer is sending this job's email right now")
        if claim.state is ClaimState.ALREADY_SENT:
            log.info("job %s: email already sent; not sending it again", job_id)
            await self._publish_sent(event, claim.transport, claim.provider_message_id)
            return

        email = compose_email(event, self._sender)
        try:
            receipt = await self._transport.send(email)
        except asyncio.CancelledError:
            # The send may still complete in its thread: keep the claim, so
            # the lease, not this cancellation, decides when to try again.
            raise
        except BaseException:
            await self._ledger.release(job_id, claim)
            raise
        await self._ledger.mark_sent(job_id, self._transport.name, receipt.message_id)
        await self._publish_sent(event, self._transport.name, receipt.message_id)

    async def _publish_sent(
        self, event: DataProcessed, transport: str | None, message_id: str | None
    ) -> None:
        await self._publisher.publish(
            EmailSent(
                job_id=event.job_id,
                email=event.email,
                transport=transport or self._transport.name,
                provider_message_id=message_id,
                attempts=delivery_attempt.get(),
            )
        )
