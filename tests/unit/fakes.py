"""Small recording fakes and event builders shared by the unit tests."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from mailer_service.compose import OutgoingEmail
from mailer_service.ledger import Claim, ClaimState, Uncertainty
from mailer_service.transport import Receipt
from pipeline_shared.events import DataProcessed, Event, JobRequested


class FakePublisher:
    """Records every event it is asked to publish, serialised as the broker would."""

    def __init__(self) -> None:
        self.published: list[Event] = []

    async def publish(self, event: Event) -> None:
        # The real broker serialises the event before confirming it: do the same,
        # so an event that could never reach the wire is not recorded as published.
        event.model_dump_json()
        self.published.append(event)


class FakeTransport:
    """An email transport that records what it sends, or raises ``failure`` if given one."""

    name = "fake"

    def __init__(
        self, *, message_id: str | None = "fake-message-1", failure: Exception | None = None
    ) -> None:
        self.sent: list[OutgoingEmail] = []
        self.closed = False
        self._message_id = message_id
        self._failure = failure

    async def send(self, email: OutgoingEmail) -> Receipt:
        if self._failure is not None:
            raise self._failure
        self.sent.append(email)
        return Receipt(message_id=self._message_id)

    reconciles = False
    settle_seconds = 0.0

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        return None

    async def close(self) -> None:
        self.closed = True


def job_requested(**overrides: Any) -> JobRequested:
    fields: dict[str, Any] = {
        "job_id": uuid4(),
        "email": "ada@example.com",
        "subject": "Your report",
        "step": "summarise",
        "data": {"visits": [3, 5, 8], "score": 7},
    }
    return JobRequested(**{**fields, **overrides})


def data_processed(**overrides: Any) -> DataProcessed:
    fields: dict[str, Any] = {
        "job_id": uuid4(),
        "email": "ada@example.com",
        "subject": "Your report",
        "step": "summarise",
        "data": {"name": "Ada", "score": 7},
        "result": {"field_count": 2},
    }
    return DataProcessed(**{**fields, **overrides})


FIXED_JOB_ID = UUID("3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60")


class FakeLedger:
    """The ledger's protocol in memory: ``rows`` maps job id to (state, claim token).

    An uncertain job's next claim reports an attempt ``uncertain_age`` seconds old."""

    def __init__(self, uncertain_age: float = 0.0) -> None:
        self.rows: dict[str, tuple[str, str]] = {}
        self.sent: dict[str, tuple[str, str | None]] = {}
        self.abandoned: list[str] = []
        self.uncertain_age = uncertain_age

    async def claim(self, job_id: str) -> Claim:
        token = str(uuid4())
        state, _ = self.rows.get(job_id, ("", ""))
        if state == "sent":
            transport, message_id = self.sent[job_id]
            return Claim(ClaimState.ALREADY_SENT, token, transport, message_id)
        if state.startswith("sending"):
            return Claim(ClaimState.BUSY, token)
        if state == "uncertain":
            self.rows[job_id] = ("sending-uncertain", token)
            uncertainty = Uncertainty(since=0.0, age=self.uncertain_age)
            return Claim(ClaimState.CLAIMED, token, uncertain=uncertainty)
        self.rows[job_id] = ("sending", token)
        return Claim(ClaimState.CLAIMED, token)

    async def mark_sent(
        self, job_id: str, claim: Claim, transport: str, provider_message_id: str | None
    ) -> None:
        self.rows[job_id] = ("sent", self.rows[job_id][1])
        self.sent[job_id] = (transport, provider_message_id)

    async def release(self, job_id: str, claim: Claim) -> None:
        state, token = self.rows.get(job_id, ("", ""))
        if token != claim.token:
            return
        if state == "sending":
            del self.rows[job_id]
        elif state == "sending-uncertain":
            self.rows[job_id] = ("uncertain", token)

    async def mark_uncertain(self, job_id: str, claim: Claim) -> None:
        if self.rows.get(job_id, ("", ""))[1] == claim.token:
            self.rows[job_id] = ("uncertain", claim.token)

    def abandon(self, claim: Claim) -> None:
        self.abandoned.append(claim.token)
