"""Group commit for the job read model: many events, one transaction.

Every job event the api follows (and each job it accepts) is handed to a
``JobRecorder``. Events that arrive while a transaction is being written wait
and go into the next one together, so under load one commit (and one thread
hop) serves a whole batch of deliveries, and a lone event is written at once.
A delivery's handler awaits its event's commit, so its message is acked only
once its fact is in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from api_service.read_model import JobEvent, JobRecord, apply
from pipeline_shared import tracing
from pipeline_shared.group_commit import GroupCommit

log = logging.getLogger("api.recorder")

MAX_BATCH = 500
"""Events in one transaction at most (bounded by the follower's prefetch anyway)."""

WriteBatch = Callable[[Sequence[JobEvent], Mapping[str, str]], None]
"""Writes events, and each job's trace id by job id, in one transaction."""


class JobRecorder:
    """Writes job events through ``write_batch`` (blocking, run in a thread), in batches.

    Each event is recorded with the trace it is handled in (the current one), which
    is its job's trace."""

    def __init__(self, write_batch: WriteBatch, *, max_batch: int = MAX_BATCH) -> None:
        # Each item carries its job's trace, read on the event loop: the write's
        # thread touches nothing the loop changes.
        def write(items: Sequence[tuple[JobEvent, str | None]]) -> list[None]:
            traces = {str(event.job_id): trace for event, trace in items if trace is not None}
            write_batch([event for event, _ in items], traces)
            return [None] * len(items)

        # Under load, 5 ms for company (see GroupCommit): the follower's small
        # prefetch hands events in a few at a time.
        self._batches = GroupCommit(write, max_batch=max_batch, linger=0.005)
        self._unwritten: dict[str, list[JobEvent]] = {}
        self._traces: dict[str, str] = {}
        self._noted: set[asyncio.Future[None]] = set()

    async def record(self, event: JobEvent) -> None:
        """Return once ``event`` is committed; raise what the write raised."""
        self._track(event)
        await self._submit(event)

    def note(self, event: JobEvent) -> None:
        """Record ``event`` without waiting for the commit (an accepted job: the
        broker holds it, and its event comes back through the status queue)."""
        self._track(event)
        noted = asyncio.ensure_future(self._submit(event))
        self._noted.add(noted)
        noted.add_done_callback(self._noted.discard)
        noted.add_done_callback(_log_failure)

    def pending(self, job_id: str, stored: JobRecord | None) -> JobRecord | None:
        """``stored`` with this replica's events for the job that are not written yet,
        so a job reads back the moment it was accepted."""
        record = stored
        for event in self._unwritten.get(job_id, ()):
            record = apply(record, event, self._traces.get(job_id))
        return record

    async def close(self) -> None:
        """Write what is waiting."""
        await asyncio.gather(*self._noted, return_exceptions=True)
        await self._batches.close()

    def _track(self, event: JobEvent) -> None:
        job_id = str(event.job_id)
        self._unwritten.setdefault(job_id, []).append(event)
        trace_id = tracing.current_trace_id()
        if trace_id is not None:
            self._traces.setdefault(job_id, trace_id)

    async def _submit(self, event: JobEvent) -> None:
        try:
            await self._batches.submit((event, self._traces.get(str(event.job_id))))
        finally:
            job_id = str(event.job_id)
            unwritten = self._unwritten[job_id]
            unwritten.remove(event)
            if not unwritten:
                del self._unwritten[job_id]
                self._traces.pop(job_id, None)


def _log_failure(done: asyncio.Future[None]) -> None:
    if done.cancelled():
        return
    exc = done.exception()
    if exc is not None:
        # The job is safe with the broker; its event, coming back through the
        # status queue, records it.
        log.warning("an accepted job is not recorded yet (%s)", type(exc).__name__)
