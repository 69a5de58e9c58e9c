"""One event's handling: its handler, in its trace, under the handler timeout, then
its outcome by the policy (``policy.settle``): the retry or dead-letter copy and its
``JobFailed``, made before its delivery is settled, and the log line and metrics
once it is (``Handled.report``). ``Consumer`` owns the deliveries; this module owns
what happens to each event they carry."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar
from uuid import UUID

from aio_pika.abc import HeadersType
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
from opentelemetry.trace import Span, SpanKind, StatusCode

from pipeline_shared import metrics, tracing
from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    TransientFailure,
)
from pipeline_shared.events import Event, JobFailed, utc_now
from pipeline_shared.messaging.policy import Disposition, Outcome, deferral_delay, settle
from pipeline_shared.messaging.wire import ATTEMPTS_HEADER, MessageLike, copy_message
from pipeline_shared.topology import Stage

if TYPE_CHECKING:
    from pipeline_shared.messaging.broker import Broker

log = logging.getLogger("pipeline.messaging")

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]

delivery_attempt: ContextVar[int] = ContextVar("delivery_attempt", default=1)
"""Which attempt the message being handled is (1 for the first), for handlers
that report it; set by the consumer before each handler call."""
delivery_size: ContextVar[int | None] = ContextVar("delivery_size", default=None)
"""The size in bytes of the message being handled, for handlers whose work grows
with it; set by the consumer before each handler call (None outside one)."""

SETTLE_ERRORS = (BrokerUnavailable, ChannelInvalidStateError, *CONNECTION_EXCEPTIONS)
"""What making a copy or settling a delivery raises when the broker is away."""


def handled_fields(
    message: MessageLike,
    job_id: str | None,
    outcome: Outcome,
    attempt: int,
    duration_ms: float,
    trace_id: str | None = None,
) -> dict[str, object]:
    """The structured fields of the one line logged per handled message (passed as
    ``extra=``: JSON lines show them, text lines do not)."""
    return {
        "event_type": message.type,
        "job_id": job_id,
        "event_id": message.message_id,
        "outcome": outcome,
        "attempt": attempt,
        "duration_ms": round(duration_ms, 1),
        "trace_id": trace_id or tracing.current_trace_id(),
    }


@dataclass(frozen=True, slots=True)
class Handled:
    """One event handled: whether its outcome's copies (retry, dead letter) are
    confirmed, and how to report it once its delivery is settled (given why it will
    be delivered again, if it will)."""

    copied: bool
    report: Callable[[str | None], None]


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    error_type: str


class EventHandling(Generic[E]):
    """Handles the events of one consumer's queue (see the module)."""

    def __init__(
        self,
        broker: Broker,
        queue_name: str,
        stage: Stage,
        handler: Handler[E],
        handler_timeout: float | None,
        handled_level: int,
    ) -> None:
        self._broker = broker
        self._queue_name = queue_name
        self._stage = stage
        self._handler = handler
        self._handler_timeout = handler_timeout
        self._handled_level = handled_level

    async def handle(
        self,
        source: MessageLike,
        event: E | None,
        failure: BaseException | None,
        attempts: int,
        started: float,
    ) -> Handled:
        """Handle one event (``failure`` if it could not be read) in the trace its headers
        carry, and make the copies its outcome needs (``Handled``)."""
        with tracing.span(
            f"process {self._queue_name}",
            SpanKind.CONSUMER,
            parent=tracing.extract(source.headers),
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": self._queue_name,
                "messaging.message.id": source.message_id or "",
                "messaging.message.conversation_id": source.correlation_id or "",
            },
        ) as span:
            return await self._outcome(span, source, event, failure, attempts, started)

    async def _outcome(
        self,
        span: Span,
        message: MessageLike,
        event: E | None,
        failure: BaseException | None,
        attempts: int,
        started: float,
    ) -> Handled:
        if event is not None and failure is None:
            try:
                delivery_attempt.set(attempts)
                delivery_size.set(len(message.body))
                await self._run_handler(event)
            except (PermanentFailure, TransientFailure, BrokerUnavailable) as exc:
                failure = exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a handler must not stop the consumer
                log.exception("unexpected error handling message %s", message.message_id)
                failure = exc
        if failure is not None:
            # Kept until the delivery is settled: without its traceback, which holds
            # this frame, it is no reference cycle for the collector to find.
            failure.__traceback__ = None

        job_id = str(event.job_id) if event is not None else message.correlation_id
        job = job_id or "?"
        disposition = settle(failure, attempts, self._broker.retry_delays)
        details = _describe(failure) if failure is not None else None
        elapsed_ms = (time.perf_counter() - started) * 1000
        stage, message_type = self._stage.name, message.type
        # Reported after the delivery is settled, outside this span: its trace, kept.
        trace_id = tracing.current_trace_id()

        def mark(outcome: Outcome) -> None:
            # While the span is open: the report comes after it has ended.
            span.set_attribute("pipeline.outcome", outcome)
            if outcome in ("retried", "dead_lettered", "requeued"):
                why = details.reason if details is not None else "not settled"
                span.set_status(StatusCode.ERROR, why)

        def fields(outcome: Outcome) -> dict[str, object]:
            return handled_fields(message, job_id, outcome, attempts, elapsed_ms, trace_id)

        def requeued(why: str) -> None:
            log.warning("job %s: %s; it will be redelivered", job, why, extra=fields("requeued"))
            metrics.message_requeued(stage, event, message_type)

        if details is None:
            line = functools.partial(
                log.log,
                self._handled_level,
                "job %s: %s handled in %.0f ms",
                job,
                message_type or "event",
                elapsed_ms,
            )
            outcome: Outcome = "acked"
        else:
            try:
                if disposition is Disposition.DEFER:
                    assert isinstance(failure, Deferred)
                    delay = deferral_delay(failure.wait_seconds, self._broker.retry_delays)
                    await self._retry(message, attempts, delay, details)
                    line = functools.partial(
                        log.info, "job %s: deferred (%s); again in %g s", job, details.reason, delay
                    )
                    outcome = "deferred"
                elif disposition is Disposition.RETRY:
                    delay = self._broker.retry_delays[attempts - 1]
                    await self._retry(message, attempts + 1, delay, details)
                    line = functools.partial(
                        log.warning,
                        "job %s: attempt %d failed (%s); retrying in %g s",
                        job,
                        attempts,
                        details.reason,
                        delay,
                    )
                    outcome = "retried"
                else:
                    await self._dead_letter(message, event, attempts, details)
                    line = functools.partial(
                        log.error,
                        "job %s: dead-lettered after %d attempt(s): %s: %s",
                        job,
                        attempts,
                        details.error_type,
                        details.reason,
                    )
                    outcome = "dead_lettered"
            except SETTLE_ERRORS as exc:
                mark("requeued")
                reason = f"could not settle the message ({exc})"
                return Handled(False, lambda why: requeued(reason))
        mark(outcome)

        def report(why: str | None) -> None:
            if why is not None:
                requeued(why)
                return
            line(extra=fields(outcome))
            metrics.message_settled(stage, event, message_type, disposition.value, failure, started)

        return Handled(True, report)

    async def _retry(
        self, message: MessageLike, next_attempt: int, delay: float, failure: _Failure
    ) -> None:
        headers: HeadersType = {
            ATTEMPTS_HEADER: next_attempt,
            "x-retry-reason": failure.reason,
            "x-retry-error-type": failure.error_type,
        }
        await self._broker.send_to_queue(
            self._stage.retry_queue(delay), copy_message(message, headers)
        )

    async def _dead_letter(
        self,
        message: MessageLike,
        event: Event | None,
        attempts: int,
        failure: _Failure,
    ) -> None:
        headers: HeadersType = {
            "x-error-reason": failure.reason,
            "x-error-type": failure.error_type,
            ATTEMPTS_HEADER: attempts,
            "x-failed-service": self._broker.app_id,
            "x-failed-at": utc_now().isoformat(),
        }
        await self._broker.send_to_queue(
            self._stage.dead_letter_queue, copy_message(message, headers)
        )
        job_id = event.job_id if event is not None else _job_id_hint(message)
        if job_id is not None and self._stage.reports_failures:
            await self._broker.publish(
                JobFailed(
                    job_id=job_id,
                    stage=self._broker.app_id,
                    reason=failure.reason,
                    error_type=failure.error_type,
                    attempts=attempts,
                    submitted_by=event.submitted_by if event is not None else None,
                )
            )

    async def _run_handler(self, event: E) -> None:
        if self._handler_timeout is None:
            await self._handler(event)
            return
        try:
            async with asyncio.timeout(self._handler_timeout) as deadline:
                await self._handler(event)
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own timeout, not ours
            raise TransientFailure(
                f"handling took longer than {self._handler_timeout:g} s "
                "(HANDLER_TIMEOUT_SECONDS) and was cancelled"
            ) from None


def _describe(failure: BaseException) -> _Failure:
    if isinstance(failure, PermanentFailure | TransientFailure):
        return _Failure(failure.reason, type(failure).__name__)
    return _Failure(str(failure) or type(failure).__name__, type(failure).__name__)


def _job_id_hint(message: MessageLike) -> UUID | None:
    """The job a poison message belonged to, if its correlation_id says so."""
    try:
        return UUID(message.correlation_id or "")
    except ValueError:
        return None
