"""``Consumer``: delivers one queue's messages to a handler and settles each by the policy."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from uuid import UUID

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    FieldValue,
    HeadersType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
from opentelemetry.trace import Span, SpanKind, StatusCode
from pydantic import TypeAdapter

from pipeline_shared import metrics, tracing
from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    TransientFailure,
)
from pipeline_shared.events import Event, JobFailed, utc_now
from pipeline_shared.messaging import bundle
from pipeline_shared.messaging.acks import Settlements
from pipeline_shared.messaging.policy import Disposition, Outcome, deferral_delay, settle
from pipeline_shared.messaging.wire import (
    ATTEMPTS_HEADER,
    MessageLike,
    PoisonMessage,
    attempts_of,
    copy_message,
    decode_event,
)
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
# At a stop, how long giving one message back may take before it is nacked instead.
GIVE_BACK_TIMEOUT_SECONDS = 2.0


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
class _Item:
    """One event a delivery carries, undecoded: its body, and in a bundle its trace
    headers (None when the event is the delivery itself); ``poison`` when the
    delivery cannot be read whatever the body holds."""

    delivery: AbstractIncomingMessage
    body: bytes
    trace: Mapping[str, FieldValue] | None
    poison: PoisonMessage | None = None


@dataclass(frozen=True, slots=True)
class _Handled:
    """One event handled: whether its outcome's copies (retry, dead letter) are
    confirmed, and how to report it once its delivery is settled (given why it will
    be delivered again, if it will)."""

    copied: bool
    report: Callable[[str | None], None]


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    error_type: str


class Consumer(Generic[E]):
    """Delivers one queue's messages to a handler; the policy is in the package's
    docstring (``pipeline_shared.messaging``)."""

    def __init__(
        self,
        broker: Broker,
        channel: AbstractChannel,
        queue: AbstractQueue,
        stage: Stage,
        model: type[E] | TypeAdapter[E],
        handler: Handler[E],
        max_event_bytes: int,
        handler_timeout: float | None = None,
        *,
        concurrency: int,
        handled_level: int = logging.INFO,
    ) -> None:
        self._broker = broker
        # Events handled at once: the prefetch bounds messages, and a bundle is many.
        self._slots = asyncio.Semaphore(concurrency)
        self._handler_timeout = handler_timeout
        self._handled_level = handled_level
        self._channel = channel
        self._queue = queue
        self._stage = stage
        self._model = model
        self._handler = handler
        self._max_event_bytes = max_event_bytes
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[Any]] = set()
        self._settlements = Settlements()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def is_consuming(self) -> bool:
        """True while the channel is open and the broker has not cancelled the consumer
        (as it does when its queue is deleted)."""
        if self._tag is None or self._channel.is_closed:
            return False
        try:
            underlay = await self._channel.get_underlay_channel()
        except Exception:  # closed in between
            return False
        # aiormq drops a consumer the broker cancels from ``consumers``; its
        # abstract type does not declare the attribute.
        consumers: Collection[str] = getattr(underlay, "consumers", {})
        return self._tag in consumers

    async def stop(self, grace_seconds: float) -> None:
        """Stop taking messages, let the in-flight ones finish for up to
        ``grace_seconds``, return the rest to the queue, close the channel."""
        if self._tag is not None and not self._channel.is_closed:
            await self._queue.cancel(self._tag)
        self._tag = None
        if self._in_flight:
            log.info(
                "waiting up to %g s for %d in-flight message(s)",
                grace_seconds,
                len(self._in_flight),
            )
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_seconds)
            # Handlers still running are cancelled (their messages given back); a
            # message whose outcomes are being settled gets a moment more to finish.
            settling = pending & self._settling
            for task in pending - settling:
                task.cancel()
            if settling:
                await asyncio.wait(settling, timeout=GIVE_BACK_TIMEOUT_SECONDS)
                for task in settling:
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The AMQP library cancels its delivery tasks when the connection
        # drops. A handler stopped half-way (an email at the provider, its
        # ledger entry unwritten) would turn the redelivery into a duplicate,
        # so the handling runs in a task of its own that only ``stop`` cancels;
        # its ack then fails and the broker redelivers, which the handlers'
        # idempotency makes harmless.
        self._settlements.delivered(message)
        handling = asyncio.create_task(self._handle(message))
        self._in_flight.add(handling)
        handling.add_done_callback(self._in_flight.discard)
        handling.add_done_callback(metrics.track_in_flight(self._stage.name))
        await asyncio.shield(handling)

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

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Handle and settle ``message``: one event, or a bundle of them (``bundle``).

        Each event is handled on its own (at most ``concurrency`` at once in this
        consumer) and its outcome's copies made; then the message is acked, and only
        then is each outcome logged and counted. In a bundle, an event whose copies
        could not be made, or that was still being handled at a stop, goes back to
        the queue alone, so that the others are not handled again."""
        started = time.perf_counter()
        attempts = attempts_of(message)
        items = self._items(message)
        handled: list[_Handled | None] = [None] * len(items)

        async def run(index: int) -> None:
            async with self._slots:
                try:
                    handled[index] = await self._traced(items[index], attempts, started)
                except Exception:  # a bug here must not leave the delivery unsettled
                    log.exception("unexpected error settling an event of %s", message.message_id)
                    handled[index] = _Handled(False, self._requeued_unreported(message))

        try:
            if len(items) == 1:
                await run(0)
            else:
                await asyncio.gather(*(run(index) for index in range(len(items))))
        except asyncio.CancelledError:
            await self._give_back(message, items, handled)
            raise
        # A stop lets this part finish (see ``stop``): cut short, it would leave the
        # whole message, done events and all, to be delivered again.
        task = asyncio.current_task()
        assert task is not None
        self._settling.add(task)
        try:
            await self._settle(message, items, handled)
        finally:
            self._settling.discard(task)

    def _requeued_unreported(
        self, message: AbstractIncomingMessage
    ) -> Callable[[str | None], None]:
        return lambda why: metrics.message_requeued(self._stage.name, None, message.type)

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        items: list[_Item],
        handled: list[_Handled | None],
    ) -> None:
        """Ack ``message`` once every event's outcome is safe (sending back alone those
        whose copies failed), then report each; else return it whole."""
        if len(items) > 1:
            unsettled = [item for item, done in zip(items, handled, strict=True) if not _ok(done)]
            if unsettled and not await self._send_back(unsettled):
                await self._return_all(message, handled, "could not give its events back")
                return
        elif not _ok(handled[0]):
            await self._return_all(message, handled, "could not settle the message")
            return
        try:
            await self._settlements.ack(message)
        except SETTLE_ERRORS as exc:
            await self._return_all(message, handled, f"could not ack the message ({exc})")
            return
        for done in handled:
            assert done is not None
            done.report(None)

    def _items(self, message: AbstractIncomingMessage) -> list[_Item]:
        """The events ``message`` carries (their bodies), or why it cannot be read."""
        try:
            lengths = bundle.lengths_of(message.headers)
            if lengths is None:
                return [_Item(message, message.body, None)]
            bodies = bundle.split(message.body, lengths)
        except PoisonMessage as exc:
            # Whatever events the body still readably holds fail alone, each with
            # its job named; else the whole message does.
            salvaged = bundle.salvage(message.body, self._max_event_bytes)
            if not salvaged:
                return [_Item(message, message.body, None, exc)]
            return [_Item(message, body, {}, exc) for body in salvaged]
        traces = bundle.traces_of(message.headers, len(bodies))
        return [_Item(message, body, trace) for body, trace in zip(bodies, traces, strict=True)]

    def _decode(self, item: _Item) -> tuple[MessageLike, E | None, BaseException | None]:
        """The message ``item`` is (alone), its event, and why it cannot be handled if so."""
        event: E | None = None
        failure: BaseException | None = item.poison
        if failure is None:
            try:
                event = decode_event(item.body, self._model, self._max_event_bytes)
            except PoisonMessage as exc:
                failure = exc
        if item.trace is None:
            return item.delivery, event, failure
        return bundle.item_message(item.delivery, item.body, event, item.trace), event, failure

    async def _traced(self, item: _Item, attempts: int, started: float) -> _Handled:
        """Handle one event in the trace its headers carry."""
        source, event, failure = self._decode(item)
        with tracing.span(
            f"process {self._queue.name}",
            SpanKind.CONSUMER,
            parent=tracing.extract(source.headers),
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": self._queue.name,
                "messaging.message.id": source.message_id or "",
                "messaging.message.conversation_id": source.correlation_id or "",
            },
        ) as span:
            return await self._handle_item(span, source, event, failure, attempts, started)

    async def _handle_item(
        self,
        span: Span,
        message: MessageLike,
        event: E | None,
        failure: BaseException | None,
        attempts: int,
        started: float,
    ) -> _Handled:
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
                return _Handled(False, lambda why: requeued(reason))
        mark(outcome)

        def report(why: str | None) -> None:
            if why is not None:
                requeued(why)
                return
            line(extra=fields(outcome))
            metrics.message_settled(stage, event, message_type, disposition.value, failure, started)

        return _Handled(True, report)

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

    async def _give_back(
        self,
        message: AbstractIncomingMessage,
        items: list[_Item],
        handled: list[_Handled | None],
    ) -> None:
        """At a stop: put a copy of what is not done back at the end of the queue (the
        message, or a bundle's unfinished events alone), then ack. A nack would count
        toward the quorum queue's delivery limit, and enough stops would dead-letter a
        healthy message without its ``JobFailed``."""
        if len(items) == 1:
            copies = [copy_message(message, {})]
        else:
            copies = [
                copy_message(self._decode(item)[0], {})
                for item, done in zip(items, handled, strict=True)
                if not _ok(done)
            ]
        acked = False
        try:
            async with asyncio.timeout(GIVE_BACK_TIMEOUT_SECONDS):
                for copy in copies:
                    await self._broker.send_to_queue(self._queue.name, copy)
                await self._settlements.ack(message)
                acked = True
        except (TimeoutError, *SETTLE_ERRORS):
            # Returned by nack instead (or by the broker when the channel goes);
            # a copy that did arrive is a repeat, which the handlers absorb.
            await self._return(message)
        for done in handled:
            if done is not None:
                done.report(None if acked and done.copied else "the consumer stopped")
        for _ in range(sum(done is None for done in handled)):
            metrics.message_requeued(self._stage.name, None, message.type)

    async def _send_back(self, unsettled: list[_Item]) -> bool:
        """Put a bundle's unsettled events back in the queue alone; whether they are."""
        try:
            for item in unsettled:
                source = self._decode(item)[0]
                await self._broker.send_to_queue(self._queue.name, copy_message(source, {}))
        except SETTLE_ERRORS:
            return False
        return True

    async def _return_all(
        self, message: AbstractIncomingMessage, handled: list[_Handled | None], why: str
    ) -> None:
        """Give the whole message back: each of its events will be delivered again."""
        await self._return(message)
        for done in handled:
            if done is not None:
                done.report(why)

    async def _return(self, message: AbstractIncomingMessage) -> None:
        """Give the message back to the queue for another consumer (best effort: if
        the channel is gone, the broker requeues it anyway)."""
        if self._channel.is_closed:
            self._settlements.forget(message)
            return
        try:
            await self._settlements.nack(message)
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS):
            self._settlements.forget(message)


def _ok(handled: _Handled | None) -> bool:
    return handled is not None and handled.copied


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
