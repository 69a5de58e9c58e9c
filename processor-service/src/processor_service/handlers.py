"""What the processor does with a JobRequested."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Collection, Mapping
from concurrent.futures import Executor
from typing import Protocol

from pydantic import ValidationError

from pipeline_shared.contract import TRUSTED, ContractViolation, check_json_data, render_path
from pipeline_shared.errors import PermanentFailure
from pipeline_shared.events import (
    DataProcessed,
    Event,
    JobRequested,
    describe_validation_error,
)
from pipeline_shared.messaging import delivery_size
from processor_service.steps import Step, UnknownStep, get_step

log = logging.getLogger("processor.handlers")

INLINE_MAX_BYTES = 1024
"""A job delivered in at most this many bytes runs an inline step on the event loop:
tens of microseconds, less than handing it to a thread and back (0.6 ms, py-spy).
Kept small because a step's worst case grows fast: ``summarise``'s exact mean of
a 4 KiB job of floats with varied exponents took 3.6 ms."""


class EventPublisher(Protocol):
    async def publish(self, event: Event) -> None: ...


def describe_failure(exc: Exception) -> str:
    """Why a step failed, in words a caller can read (the exception's class is for the logs)."""
    if isinstance(exc, KeyError) and exc.args:
        return f"the data has no field {exc.args[0]!r}"
    message = str(exc).strip()
    if isinstance(exc, RecursionError | MemoryError):
        return "the data is too large or too deep for this step"
    return message or "the step raised an error without a message"


class ProcessJob:
    """Run the job's step (off the event loop, unless it is an inline step and the job
    small) and publish the result.

    The input is acked (by the messaging layer) only after ``DataProcessed``
    is confirmed. A redelivered job is simply processed again: steps are
    pure, and the mailer's ledger keeps the email from going out twice.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        executor: Executor,
        *,
        steps: Mapping[str, Step],
        inline: Collection[str] = frozenset(),
        delay_seconds: float = 0.0,
        max_event_bytes: int | None = None,
    ) -> None:
        self._publisher = publisher
        self._executor = executor
        self._steps = steps
        self._inline = frozenset(inline)
        self._delay = delay_seconds
        self._max_event_bytes = max_event_bytes

    async def __call__(self, event: JobRequested) -> None:
        try:
            step = get_step(event.step, self._steps)
        except UnknownStep as exc:
            raise PermanentFailure(str(exc)) from exc
        if self._delay:
            await asyncio.sleep(self._delay)
        try:
            size = delivery_size.get()
            if event.step in self._inline and size is not None and size <= INLINE_MAX_BYTES:
                result = step(event.data)  # promised not to change its input
            else:
                # A copy: a step that changes its input must not change the data emailed.
                result = await asyncio.get_running_loop().run_in_executor(
                    self._executor, step, copy.deepcopy(event.data)
                )
        except Exception as exc:
            log.warning("job %s: step %r raised %s", event.job_id, event.step, type(exc).__name__)
            raise PermanentFailure(f"step {event.step!r} failed: {describe_failure(exc)}") from exc
        if not isinstance(result, dict):
            raise PermanentFailure(
                f"step {event.step!r} returned {type(result).__name__}, not a dict"
            )
        try:
            # The job's own fields were validated at the edge; the result is new.
            check_json_data(result)
            processed = DataProcessed.model_validate(
                {
                    "job_id": event.job_id,
                    "email": event.email,
                    "subject": event.subject,
                    "step": event.step,
                    "data": event.data,
                    "result": result,
                    "requested_at": event.occurred_at,
                    "submitted_by": event.submitted_by,
                },
                context=TRUSTED,
            )
        except ContractViolation as exc:
            where = render_path(("result", *exc.path))
            raise PermanentFailure(
                f"step {event.step!r} returned a result that is not JSON within the limits "
                f"of a job (at {where}: {exc.problem})"
            ) from exc
        except ValidationError as exc:
            raise PermanentFailure(
                f"step {event.step!r} returned a result that is not JSON within the limits "
                f"of a job ({describe_validation_error(exc, 'DataProcessed')})"
            ) from exc
        if self._max_event_bytes is not None:
            size = len(processed.model_dump_json().encode())
            if size > self._max_event_bytes:
                # The mailer would dead-letter it as unreadable: say why here.
                raise PermanentFailure(
                    f"step {event.step!r} returned a result too large to carry: the "
                    f"DataProcessed event would be {size} bytes, over MAX_EVENT_BYTES "
                    f"({self._max_event_bytes})"
                )
        await self._publisher.publish(processed)
