"""What the mailer does with a DataProcessed."""

from __future__ import annotations

from typing import Protocol

from mailer_service.compose import Sender, compose_email
from mailer_service.transport import EmailTransport
from pipeline_shared.events import DataProcessed, EmailSent, Event


class EventPublisher(Protocol):
    async def publish(self, event: Event) -> None: ...


class SendEmail:
    """Compose the job's email, send it, then publish ``EmailSent``.

    Transport failures propagate as ``PermanentFailure``/``TransientFailure``
    and the messaging layer turns them into a dead letter or a delayed retry.
    """

    def __init__(
        self, transport: EmailTransport, publisher: EventPublisher, sender: Sender
    ) -> None:
        self._transport = transport
        self._publisher = publisher
        self._sender = sender

    async def __call__(self, event: DataProcessed) -> None:
        email = compose_email(event, self._sender)
        receipt = await self._transport.send(email)
        await self._publisher.publish(
            EmailSent(
                job_id=event.job_id,
                email=event.email,
                transport=self._transport.name,
                provider_message_id=receipt.message_id,
            )
        )
