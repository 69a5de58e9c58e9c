"""Taking many jobs in at once (``POST /jobs/batch``), and saying what became of each.

The route hands over a batch whose every item is valid: one bad item and the
whole batch was refused with a 422 before anything was published. Here all
the ``JobRequested`` events are published at once, their confirms awaited
together (pipelined on the broker's channel, not one round trip per job),
each under the single intake's rule (``intake.publish_settled``): an
unknown outcome publishes the same event again within the publish budget.
Each job then ends in one of three states, never a guess:

* ``queued``: the broker confirmed it;
* ``unknown``: it left but no confirm came, or it was refused on a retry
  after an earlier attempt whose outcome was unknown;
* ``not_accepted``: the broker provably did not take it.

Every job queued: 202. No job taken at all: a plain 503 (``BatchNotAccepted``),
like the single intake's, and a retry is a new attempt. Anything in between
is ``BatchIncomplete``, a 503 listing each job's state in the items' order.
With an ``Idempotency-Key`` the batch keeps its job ids through every outcome
but the plain refusal, and a retry publishes again only the jobs the broker
has not confirmed: the client ends with one job per item, never two.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID, uuid4

from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError

from api_service.intake import (
    IntakePolicy,
    NotAccepted,
    OutcomeUnknown,
    Publisher,
    publish_settled,
    requested_event,
    reserve_waiting,
    settle_quietly,
)
from api_service.schemas import BatchJobState, JobRequest
from api_service.store import KeyOutcome, KeyState, Reservation
from pipeline_shared import tracing
from pipeline_shared.events import JobRequested

log = logging.getLogger("api.batch")

RecordJobs = Callable[[Sequence[JobRequested], Mapping[str, str]], Awaitable[None]]
"""Writes accepted jobs (and each job's trace id, by job id) into the read model, all in
one transaction."""


class BatchKeys(Protocol):
    """What a batch needs of the idempotency keys (``api_service.store.JobStore``)."""

    async def reserve_batch_key(
        self, caller: str, key: str, request_hash: str, job_ids: Sequence[str], stale_after: float
    ) -> Reservation: ...

    async def settle_key(
        self, caller: str, key: str, outcome: KeyState, confirmed: Collection[int] = ()
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class JobOutcome:
    job_id: UUID
    state: BatchJobState
    reason: str = ""


class BatchNotAccepted(NotAccepted):
    """The broker took none of the batch's jobs; nothing was sent downstream."""


class BatchIncomplete(Exception):
    """Some of the batch's jobs are not known to be with the broker; ``jobs`` says which."""

    def __init__(self, jobs: Sequence[JobOutcome]) -> None:
        self.jobs = list(jobs)
        counts = {state: sum(1 for j in jobs if j.state == state) for state in _STATES}
        reasons = sorted({j.reason for j in jobs if j.state != "queued" and j.reason})
        self.summary = (
            f"{counts['queued']} of {len(jobs)} jobs queued, {counts['unknown']} with an "
            f"unknown outcome, {counts['not_accepted']} not accepted"
        )
        self.reason = "; ".join(reasons[:3]) or "no reason given"
        super().__init__(f"{self.summary} ({self.reason})")


_STATES: tuple[BatchJobState, ...] = ("queued", "unknown", "not_accepted")


def batch_fingerprint(jobs: Sequence[JobRequest]) -> str:
    """The batch's identity for an Idempotency-Key: its items as canonical JSON, in order.
    A list, so no batch (not even of one job) has the fingerprint of a single request."""
    canonical = json.dumps(
        [job.model_dump(mode="json") for job in jobs],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class BatchIntake:
    def __init__(
        self,
        broker: Publisher,
        keys: BatchKeys,
        policy: IntakePolicy,
        record: RecordJobs,
        record_later: Callable[[JobRequested, str | None], object],
    ) -> None:
        self._broker = broker
        self._keys = keys
        self._policy = policy
        self._record = record
        # Where jobs whose one-transaction write failed go to be written until it works.
        self._record_later = record_later

    async def accept(self, jobs: Sequence[JobRequest], caller: str) -> list[UUID]:
        """Publish every job; their ids in the items' order once the broker has them all."""
        job_ids = [uuid4() for _ in jobs]
        outcomes = await self._publish_all(jobs, caller, job_ids, frozenset(), resumed=False)
        _raise_unless_all_queued(outcomes)
        return job_ids

    async def accept_once(
        self, jobs: Sequence[JobRequest], caller: str, key: str
    ) -> tuple[list[UUID], bool]:
        """Accept the batch unless this caller's key was used before; (job ids, replayed)."""
        request_hash = batch_fingerprint(jobs)
        reservation = await reserve_waiting(
            lambda: self._keys.reserve_batch_key(
                caller,
                key,
                request_hash,
                [str(uuid4()) for _ in jobs],
                self._policy.key_stale_after,
            ),
            self._policy.key_wait,
        )
        job_ids = [UUID(job_id) for job_id in reservation.job_ids]
        if reservation.outcome is KeyOutcome.REPLAY:
            return job_ids, True
        resumed = reservation.outcome is KeyOutcome.RESUME
        try:
            outcomes = await self._publish_all(
                jobs, caller, job_ids, reservation.confirmed, resumed=resumed
            )
        except BaseException:
            await self._settle(caller, key, "unknown", reservation.confirmed)
            raise
        confirmed = {i for i, outcome in enumerate(outcomes) if outcome.state == "queued"}
        if len(confirmed) == len(outcomes):
            await self._settle(caller, key, "done", confirmed)
        elif all(outcome.state == "not_accepted" for outcome in outcomes):
            await self._settle(caller, key, "refused", ())
        else:
            await self._settle(caller, key, "unknown", confirmed)
        _raise_unless_all_queued(outcomes)
        return job_ids, False

    async def _publish_all(
        self,
        jobs: Sequence[JobRequest],
        caller: str,
        job_ids: Sequence[UUID],
        confirmed: Collection[int],
        *,
        resumed: bool,
    ) -> list[JobOutcome]:
        """Publish every job not ``confirmed`` on an earlier attempt, all in flight at once,
        and record those the broker confirms in the read model, in one transaction.

        The batch holds at most MAX_BATCH_JOBS jobs, which bounds the publishes in flight;
        each waits at most the publish timeout for its confirm, so the whole batch takes
        about as long as its slowest job, not the sum of them.
        """
        events = {
            position: requested_event(job, job_ids[position], caller)
            for position, job in enumerate(jobs)
            if position not in confirmed
        }
        request = trace.get_current_span()
        traced = await asyncio.gather(
            *(self._publish_traced(event, request, resumed=resumed) for event in events.values())
        )
        published = {p: state for p, (state, _) in zip(events, traced, strict=True)}
        accepted = [events[p] for p, (state, _) in published.items() if state == "queued"]
        traces = {
            str(event.job_id): trace_id
            for event, ((state, _), trace_id) in zip(events.values(), traced, strict=True)
            if state == "queued" and trace_id is not None
        }
        log.info(
            "batch of %d jobs: %d JobRequested published now, %d before",
            len(jobs),
            len(accepted),
            len(confirmed),
        )
        await self._record_quietly(accepted, traces)
        return [
            JobOutcome(job_id, *published.get(position, ("queued", "")))
            for position, job_id in enumerate(job_ids)
        ]

    async def _publish_traced(
        self, event: JobRequested, request: trace.Span, *, resumed: bool
    ) -> tuple[tuple[BatchJobState, str], str | None]:
        """Publish ``event`` in a trace of its own, linked to the batch's request: one
        trace per job (a thousand jobs in the request's trace would be one unreadable
        trace); (outcome, the job's trace id)."""
        with tracing.job_trace("accept job", str(event.job_id), link_to=request) as span:
            return await self._publish_one(event, resumed=resumed), tracing.trace_id_of(span)

    async def _publish_one(
        self, event: JobRequested, *, resumed: bool
    ) -> tuple[BatchJobState, str]:
        try:
            await publish_settled(self._broker, event, self._policy.publish_budget)
        except OutcomeUnknown as exc:
            return "unknown", exc.reason
        except NotAccepted as exc:
            # A job resumed under its key may have reached the broker on an earlier attempt.
            return ("unknown" if resumed else "not_accepted"), exc.reason
        except Exception as exc:
            # Not one of the broker's answers: the message may have left all the same.
            log.error("job %s: publishing failed unexpectedly (%r)", event.job_id, exc)
            return "unknown", f"unexpected {type(exc).__name__}"
        return "queued", ""

    async def _record_quietly(
        self, events: Sequence[JobRequested], traces: Mapping[str, str]
    ) -> None:
        if not events:
            return
        try:
            await self._record(events, traces)
        except SQLAlchemyError as exc:
            # The jobs are safe with the broker; their records are written later.
            log.warning(
                "%d accepted jobs not recorded yet (%s); trying again",
                len(events),
                type(exc).__name__,
            )
            for event in events:
                self._record_later(event, traces.get(str(event.job_id)))

    async def _settle(
        self, caller: str, key: str, outcome: KeyState, confirmed: Collection[int]
    ) -> None:
        await settle_quietly(lambda: self._keys.settle_key(caller, key, outcome, confirmed))


def _raise_unless_all_queued(outcomes: Sequence[JobOutcome]) -> None:
    if all(outcome.state == "queued" for outcome in outcomes):
        return
    if all(outcome.state == "not_accepted" for outcome in outcomes):
        raise BatchNotAccepted(outcomes[0].reason)
    raise BatchIncomplete(outcomes)
