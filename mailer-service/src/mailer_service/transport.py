"""The port every email transport implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailer_service.compose import OutgoingEmail


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the transport reports for an accepted email."""

    message_id: str | None


class EmailTransport(Protocol):
    """Sends one email without blocking the event loop.

    Raises ``PermanentFailure`` when sending again cannot help and
    ``TransientFailure`` when it may.
    """

    name: str

    async def send(self, email: OutgoingEmail) -> Receipt: ...

    async def close(self) -> None: ...
