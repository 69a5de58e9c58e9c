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
from collections.abc import Callable, Sequence

from api_service.read_model import JobEvent, JobRecord, apply

log = logging.getLogger("api.recorder")

MAX_BATCH = 500
"""Events in one transaction at most (bounded by the follower's prefetch anyway)."""

WriteBatch = Callable[[Sequence[JobEvent]], None]


class JobRecorder:
    """Writes job events through ``write_batch`` (blocking, run in a thread), in batches."""

    def __init__(self, write_batch: WriteBatch, *, max_batch: int = MAX_BATCH) -> None:
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._waiting: list[tuple[JobEvent, asyncio.Future[None]]] = []
        self._unwritten: dict[str, list[JobEvent]] = {}
        self._writer: asyncio.Task[None] | None = None

    async def record(self, event: JobEvent) -> None:
        """Return once ``event`` is committed; raise what the write raised."""
        await self._enqueue(event)

    def note(self, event: JobEvent) -> None:
        """Record ``event`` without waiting for the commit (an accepted job: the
        broker holds it, and its event comes back through the status queue)."""
        done = self._enqueue(event)
        done.add_done_callback(_log_failure)

    def pending(self, job_id: str, stored: JobRecord | None) -> JobRecord | None:
        """``stored`` with this replica's events for the job that are not written yet,
        so a job reads back the moment it was accepted."""
        record = stored
        for event in self._unwritten.get(job_id, ()):
            record = apply(record, event)
        return record

    async def close(self) -> None:
        """Write what is waiting."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _enqueue(self, event: JobEvent) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, done))
        self._unwritten.setdefault(str(event.job_id), []).append(event)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        return done

    async def _write_waiting(self) -> None:
        # Deliveries that arrive in the same turn of the loop join the first batch.
        await asyncio.sleep(0)
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            events = [event for event, _ in batch]
            try:
                await asyncio.to_thread(self._write_batch, events)
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
            finally:
                self._forget(events)

    def _forget(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            job_id = str(event.job_id)
            unwritten = self._unwritten.get(job_id)
            if unwritten is None:
                continue
            unwritten.remove(event)
            if not unwritten:
                del self._unwritten[job_id]


def _log_failure(done: asyncio.Future[None]) -> None:
    if done.cancelled():
        return
    exc = done.exception()
    if exc is not None:
        # The job is safe with the broker; its event, coming back through the
        # status queue, records it.
        log.warning("an accepted job is not recorded yet (%s)", type(exc).__name__)
