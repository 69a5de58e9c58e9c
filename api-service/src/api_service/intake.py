"""Taking a job in: publish ``JobRequested``, and say exactly what became of it.

Three answers, never a guess:

* **accepted**: the broker confirmed the event;
* **not accepted** (``NotAccepted``): it provably did not take it (not
  connected, nacked, unroutable, refused), so a retry is a new attempt;
* **unknown** (``OutcomeUnknown``): the event left but no confirm came (a
  timeout, a connection lost while waiting). The *same* event is published
  again until ``publish_budget`` runs out: a repeat is harmless downstream
  (the processor repeats a pure step, the mailer's ledger sends one email
  per job), while answering "not accepted" would make the client submit a
  second job. Only if no republish is confirmed in time is the outcome
  reported unknown, with the job's id, so the client can ask for it.

With an ``Idempotency-Key`` the reservation holds the job's id through an
unknown outcome: a retry publishes that same job again instead of a new one,
and a key whose last state could not be written is taken over, never reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID, uuid4

from sqlalchemy.exc import SQLAlchemyError

from api_service.recorder import JobRecorder
from api_service.schemas import JobRequest
from api_service.store import JobStore, KeyOutcome, KeyState, Reservation
from pipeline_shared.contract import TRUSTED
from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.events import JobRequested

log = logging.getLogger("api.intake")

REPUBLISH_PAUSE_SECONDS = 0.2
SETTLE_ATTEMPTS = 3


class NotAccepted(Exception):
    """The broker did not take the job; nothing was sent downstream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutcomeUnknown(Exception):
    """The job may or may not be with the broker; ``GET /jobs/{job_id}`` will tell."""

    def __init__(self, job_id: UUID, reason: str) -> None:
        super().__init__(reason)
        self.job_id = job_id
        self.reason = reason


class KeyConflict(Exception):
    """The Idempotency-Key was used for another request, or is being used right now."""


class Publisher(Protocol):
    """What the intake needs of the broker (``pipeline_shared.messaging.Broker``)."""

    async def publish(self, event: JobRequested) -> None: ...


def fingerprint(job: JobRequest) -> str:
    """The request's identity for an Idempotency-Key: canonical JSON, so the same job with
    its keys in another order (or its defaults spelled out) is the same request."""
    canonical = json.dumps(
        job.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IntakePolicy:
    publish_budget: float
    """Seconds to keep republishing a job whose first publish had an unknown outcome."""
    key_stale_after: float
    """Seconds after which a reservation still pending is taken over by a retry."""
    key_wait: float
    """Seconds a request waits for another one holding the same key."""
    record_wait: float = 1.0
    """Seconds an answer waits at most for its accepted job's record to be written."""


def requested_event(job: JobRequest, job_id: UUID, caller: str) -> JobRequested:
    """The event of an accepted job. The route validated the job a moment ago: the
    event trusts it (the address is not parsed again, the data not walked or rebuilt)."""
    return JobRequested.model_validate(
        {
            "job_id": job_id,
            "email": job.email,
            "subject": job.subject,
            "step": job.step,
            "data": job.data,
            "submitted_by": caller,
        },
        context=TRUSTED,
    )


class JobIntake:
    def __init__(
        self, broker: Publisher, store: JobStore, policy: IntakePolicy, recorder: JobRecorder
    ) -> None:
        self._broker = broker
        self._store = store
        self._policy = policy
        self._recorder = recorder

    async def accept(self, job: JobRequest, caller: str, job_id: UUID | None = None) -> UUID:
        """Publish the job and record it in the read model, so that ``GET /jobs/{id}``
        knows it at once, on any replica.

        With a store other replicas read (``JobStore.shared``), the answer waits for
        the record's first write (up to ``record_wait``), so a job answered 202 is on
        record even if this process dies a moment later (nothing else records it: its
        ``JobRequested`` does not come back). A write that fails or takes longer does
        not hold the answer: the broker has the job, and the recorder keeps trying.
        With SQLite this api is the only reader, and shows the job from memory until
        it is written: the answer does not wait for a write that queues behind
        status-service's for the file's one lock (bench/README.md, "Session 9")."""
        job_id = job_id or uuid4()
        await self._until_recorded(await self._publish_and_note(job, caller, job_id))
        return job_id

    async def accept_once(self, job: JobRequest, caller: str, key: str) -> tuple[UUID, bool]:
        """Accept the job unless this caller's key was used before; (job id, replayed)."""
        reservation = await reserve_waiting(
            lambda: self._store.reserve_key(
                caller, key, fingerprint(job), str(uuid4()), self._policy.key_stale_after
            ),
            self._policy.key_wait,
        )
        job_id = UUID(reservation.job_id)
        if reservation.outcome is KeyOutcome.REPLAY:
            return job_id, True
        resumed = reservation.outcome is KeyOutcome.RESUME
        try:
            recorded = await self._publish_and_note(job, caller, job_id)
        except OutcomeUnknown:
            await self._settle(caller, key, "unknown")
            raise
        except NotAccepted:
            # A resumed job may have reached the broker on an earlier attempt.
            await self._settle(caller, key, "unknown" if resumed else "refused")
            raise
        except BaseException:
            await self._settle(caller, key, "unknown")
            raise
        # The key first: a request cancelled while its record is written has
        # its job with the broker, and its key must say so.
        await self._settle(caller, key, "done")
        await self._until_recorded(recorded)
        return job_id, False

    async def _publish_and_note(
        self, job: JobRequest, caller: str, job_id: UUID
    ) -> asyncio.Future[bool]:
        """Publish the job; its record's first write (see ``JobRecorder.note``)."""
        event = requested_event(job, job_id, caller)
        await self._publish(event)
        log.info("job %s: JobRequested published (step %s)", event.job_id, event.step)
        return self._recorder.note(event)

    async def _until_recorded(self, recorded: asyncio.Future[bool]) -> None:
        if not self._store.shared:
            return
        # asyncio.wait does not cancel the write if the client goes away meanwhile.
        await asyncio.wait({recorded}, timeout=self._policy.record_wait)

    async def _publish(self, event: JobRequested) -> None:
        await publish_settled(self._broker, event, self._policy.publish_budget)

    async def _settle(self, caller: str, key: str, outcome: KeyState) -> None:
        await settle_quietly(lambda: self._store.settle_key(caller, key, outcome))


async def publish_settled(broker: Publisher, event: JobRequested, budget: float) -> None:
    """Publish ``event`` and know what became of it: return once the broker confirmed it,
    raise ``NotAccepted`` if it provably did not take it, and on an unknown outcome publish
    the very same event again until ``budget`` seconds have passed, then ``OutcomeUnknown``."""
    deadline: float | None = None
    while True:
        try:
            await broker.publish(event)
            return
        except PublishOutcomeUnknown as exc:
            reason = str(exc)
            if deadline is None:
                deadline = time.monotonic() + budget
                log.warning("job %s: %s; publishing it again", event.job_id, reason)
        except BrokerUnavailable as exc:
            if deadline is None:
                raise NotAccepted(str(exc)) from exc
            reason = str(exc)  # this attempt failed, an earlier one may not have
        if time.monotonic() >= deadline:
            raise OutcomeUnknown(event.job_id, reason)
        await asyncio.sleep(REPUBLISH_PAUSE_SECONDS)


async def reserve_waiting(
    reserve: Callable[[], Awaitable[Reservation]], wait: float
) -> Reservation:
    """A reservation this request may act on (new, resumed or a replay), waiting up to
    ``wait`` seconds while another request holds the key; ``KeyConflict`` otherwise."""
    deadline = time.monotonic() + wait
    while True:
        reservation = await reserve()
        if reservation.outcome is KeyOutcome.CONFLICT:
            raise KeyConflict("this Idempotency-Key was already used with a different request")
        if reservation.outcome is not KeyOutcome.PENDING:
            return reservation
        # The same request is being accepted by another call: wait for it.
        if time.monotonic() > deadline:
            raise KeyConflict(
                "a request with this Idempotency-Key is still in progress; retry later"
            )
        await asyncio.sleep(0.05)


async def settle_quietly(settle: Callable[[], Awaitable[None]]) -> None:
    """Record what became of a reservation, best effort, a few times: a reservation left
    ``pending`` is taken over later by a retry with the same job ids, so a failure here
    never makes a second job."""
    for attempt in range(SETTLE_ATTEMPTS):
        try:
            await settle()
            return
        except SQLAlchemyError as exc:
            if attempt == SETTLE_ATTEMPTS - 1:
                log.warning(
                    "Idempotency-Key left pending (%s): a retry takes it over",
                    type(exc).__name__,
                )
            else:
                await asyncio.sleep(0.05 * (attempt + 1))
