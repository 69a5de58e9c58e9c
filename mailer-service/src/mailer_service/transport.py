"""The port every email transport implements, and the outcomes a send can have."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailer_service.compose import OutgoingEmail
from pipeline_shared.errors import TransientFailure


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the transport reports for an accepted email."""

    message_id: str | None


class SendOutcomeUnknown(TransientFailure):
    """The request may have reached the provider and been accepted, but no answer says
    so (a timeout after the request was written, a connection lost while waiting,
    500/502/504). Sending again could send the email twice: the mailer records the
    job as uncertain and asks the provider before any new attempt."""


class EmailTransport(Protocol):
    """Sends one email without blocking the event loop.

    ``send`` raises ``PermanentFailure`` when sending again cannot help,
    ``TransientFailure`` when the email provably was not taken and may be
    sent again, and ``SendOutcomeUnknown`` when it may have been taken.
    """

    name: str

    async def send(self, email: OutgoingEmail) -> Receipt: ...

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        """The receipt of ``email`` if the provider took it at or after ``since`` (a
        Unix time), else None. Raises ``TransientFailure`` when it cannot tell now."""
        ...

    @property
    def reconciles(self) -> bool:
        """Whether ``find_sent`` can answer (Mailtrap needs an account id for it)."""
        ...

    @property
    def settle_seconds(self) -> float:
        """How long after a send ``find_sent`` may still miss it (the provider's
        log indexing delay)."""
        ...

    async def close(self) -> None: ...
