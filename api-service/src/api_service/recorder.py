"""Group commit for the job read model: many events, one transaction.

Every job event status-service follows, and each job the api accepts, is
handed to a ``JobRecorder``. Events that arrive while a transaction is being
written wait and go into the next one together, so under load one commit (and
one thread hop) serves a whole batch of deliveries, and a lone event is written
at once.
A delivery's handler awaits its event's commit, so its message is acked only
once its fact is in the store.

An accepted job's ``JobRequested`` does not come back through the broker: the
recorder is the only writer of it, and while the database is away it keeps
trying, with back-off, up to ``MAX_HELD_BACK`` jobs at once (each holds its
event in memory). A job it gives up on (past that bound, a write that fails
for another reason, or the api stopping first) is recorded by its next
event, with its caller: every event carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api_service.read_model import JobEvent, JobRecord, apply
from pipeline_shared import tracing
from pipeline_shared.group_commit import GroupCommit

log = logging.getLogger("api.recorder")

MAX_BATCH = 500
"""Events in one transaction at most (bounded by the follower's prefetch anyway)."""

NOTE_FIRST_PAUSE = 0.5
NOTE_LONGEST_PAUSE = 30.0
"""Seconds between attempts to write an accepted job whose write failed: doubling."""

MAX_HELD_BACK = 10_000
"""Accepted jobs whose write failed that are kept to be tried again, at most."""

DATABASE_AWAY = (OperationalError, InterfaceError, PoolTimeout)
"""Failures that pass when the database is back; any other is not tried again."""

WriteBatch = Callable[[Sequence[JobEvent], Mapping[str, str]], None]
"""Writes events, and each job's trace id by job id, in one transaction."""


@dataclass(frozen=True, slots=True)
class Unwritten:
    """A job's events not written yet, as they were at one moment (``JobRecorder.pending``)."""

    events: tuple[JobEvent, ...]
    trace_id: str | None

    def onto(self, stored: JobRecord | None) -> JobRecord | None:
        record = stored
        for event in self.events:
            record = apply(record, event, self.trace_id)
        return record


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

        # Under load, 5 ms for company (see GroupCommit): the follower's prefetch
        # hands events in a few at a time, and the api's jobs come one by one.
        self._batches = GroupCommit(write, max_batch=max_batch, linger=0.005)
        self._unwritten: dict[str, list[JobEvent]] = {}
        self._traces: dict[str, str] = {}
        self._noted: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._held_back = 0  # noted jobs waiting to be tried again, now
        self._outage = [0, 0]  # since the first failure: jobs written later, given up

    async def record(self, event: JobEvent) -> None:
        """Return once ``event`` is committed; raise what the write raised."""
        self._track(event)
        try:
            await self._submit(event)
        finally:
            self._untrack(event)

    def note(self, event: JobEvent, trace_id: str | None = None) -> asyncio.Future[bool]:
        """Record ``event`` (an accepted job: the broker holds it), in trace ``trace_id``
        (default: the current one), trying again while the database is away (see the
        module's docstring). The returned future says how the first attempt went
        (True: committed); nothing needs to await it."""
        self._track(event, trace_id)
        first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        noted = asyncio.create_task(self._write_noted(event, first))
        self._noted.add(noted)
        noted.add_done_callback(self._noted.discard)
        return first

    def pending(self, job_id: str) -> Unwritten:
        """This replica's events for the job that are not written yet, so a job reads back
        the moment it was accepted: take them *before* reading the store, then fold them
        ``onto`` what it holds. A write that lands in between is then in one or the
        other (in both, it changes nothing); taken after the read, it would be in neither."""
        return Unwritten(tuple(self._unwritten.get(job_id, ())), self._traces.get(job_id))

    async def close(self) -> None:
        """Write what is waiting; stop trying again for what failed to be written."""
        self._closing.set()  # each failed write is tried once more, now
        await asyncio.gather(*self._noted, return_exceptions=True)
        await self._batches.close()

    def _track(self, event: JobEvent, trace_id: str | None = None) -> None:
        job_id = str(event.job_id)
        self._unwritten.setdefault(job_id, []).append(event)
        trace_id = trace_id or tracing.current_trace_id()
        if trace_id is not None:
            self._traces.setdefault(job_id, trace_id)

    def _untrack(self, event: JobEvent) -> None:
        job_id = str(event.job_id)
        unwritten = self._unwritten[job_id]
        unwritten.remove(event)
        if not unwritten:
            del self._unwritten[job_id]
            self._traces.pop(job_id, None)

    async def _submit(self, event: JobEvent) -> None:
        await self._batches.submit((event, self._traces.get(str(event.job_id))))

    async def _write_noted(self, event: JobEvent, first: asyncio.Future[bool]) -> None:
        held = written = False
        try:
            pause = NOTE_FIRST_PAUSE
            while True:
                try:
                    await self._submit(event)
                    _settle(first, True)
                    written = True
                    return
                except DATABASE_AWAY as exc:
                    _settle(first, False)
                    if self._closing.is_set():
                        log.warning(
                            "job %s: not recorded before stopping (%s); its next event records it",
                            event.job_id,
                            type(exc).__name__,
                        )
                        return
                    if not held:
                        if self._held_back >= MAX_HELD_BACK:
                            log.warning(
                                "job %s: not recorded (%s) and %d jobs are already held "
                                "back; its next event records it",
                                event.job_id,
                                type(exc).__name__,
                                self._held_back,
                            )
                            return
                        held = True
                        self._hold(exc)
                    # Until written, GET /jobs/{id} on this replica still shows the
                    # job (``pending``); the broker holds the job itself.
                    log.debug("job %s: not recorded yet; again in %g s", event.job_id, pause)
                except Exception as exc:
                    _settle(first, False)
                    log.error(
                        "job %s: could not record it (%r); its next event records it",
                        event.job_id,
                        exc,
                    )
                    return
                await self._pause(pause)
                pause = min(2 * pause, NOTE_LONGEST_PAUSE)
        finally:
            _settle(first, False)
            self._untrack(event)
            if held:
                self._release(written)

    def _hold(self, exc: BaseException) -> None:
        # One line when an outage starts and one when it is over, not one per job.
        if self._held_back == 0:
            log.warning(
                "could not record an accepted job (%s); trying again with back-off "
                "(the broker has the jobs)",
                type(exc).__name__,
            )
        self._held_back += 1

    def _release(self, written: bool) -> None:
        self._held_back -= 1
        self._outage[0 if written else 1] += 1
        if self._held_back == 0:
            later, given_up = self._outage
            log.info(
                "accepted jobs held back: %d recorded, %d left to their next events",
                later,
                given_up,
            )
            self._outage = [0, 0]

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)


def _settle(first: asyncio.Future[bool], written: bool) -> None:
    if not first.done():
        first.set_result(written)
