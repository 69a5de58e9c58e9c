"""``Consumer``: delivers one queue's messages, one event or a bundle each, to the
handling of their events (``handling``), and settles each delivery: acked once every
event's outcome is safe, an event that is not sent back alone, the whole message
returned only when nothing else will do."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, FieldValue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
from pydantic import TypeAdapter

from pipeline_shared import metrics
from pipeline_shared.messaging import bundle
from pipeline_shared.messaging.acks import Settlements
from pipeline_shared.messaging.handling import (
    SETTLE_ERRORS,
    E,
    EventHandling,
    Handled,
    Handler,
)
from pipeline_shared.messaging.wire import (
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

# At a stop, how long giving one message back may take before it is nacked instead.
GIVE_BACK_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class _Item:
    """One event a delivery carries, undecoded: its body, and in a bundle its trace
    headers (None when the event is the delivery itself); ``poison`` when the
    delivery cannot be read whatever the body holds."""

    delivery: AbstractIncomingMessage
    body: bytes
    trace: Mapping[str, FieldValue] | None
    poison: PoisonMessage | None = None


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
        self._events = EventHandling(
            broker, queue.name, stage, handler, handler_timeout, handled_level
        )
        # Events handled at once: the prefetch bounds messages, and a bundle is many.
        self._slots = asyncio.Semaphore(concurrency)
        self._channel = channel
        self._queue = queue
        self._stage = stage
        self._model = model
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
        handled: list[Handled | None] = [None] * len(items)

        async def run(index: int) -> None:
            async with self._slots:
                try:
                    source, event, failure = self._decode(items[index])
                    handled[index] = await self._events.handle(
                        source, event, failure, attempts, started
                    )
                except Exception:  # a bug here must not leave the delivery unsettled
                    log.exception("unexpected error settling an event of %s", message.message_id)
                    handled[index] = Handled(False, self._requeued_unreported(message))

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
        handled: list[Handled | None],
    ) -> None:
        """Ack ``message`` once every event's outcome is safe (sending back alone those
        whose copies failed), then report each; else return it whole."""
        if len(items) > 1:
            unsettled = [item for item, done in zip(items, handled, strict=True) if not _ok(done)]
            try:
                await self._put_back(self._alone(unsettled))
            except SETTLE_ERRORS:
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

    async def _give_back(
        self,
        message: AbstractIncomingMessage,
        items: list[_Item],
        handled: list[Handled | None],
    ) -> None:
        """At a stop: put a copy of what is not done back at the end of the queue (the
        message, or a bundle's unfinished events alone), then ack. A nack would count
        toward the quorum queue's delivery limit, and enough stops would dead-letter a
        healthy message without its ``JobFailed``."""
        if len(items) == 1:
            copies = [copy_message(message, {})]
        else:
            copies = self._alone(
                [item for item, done in zip(items, handled, strict=True) if not _ok(done)]
            )
        acked = False
        try:
            async with asyncio.timeout(GIVE_BACK_TIMEOUT_SECONDS):
                await self._put_back(copies)
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

    def _alone(self, items: list[_Item]) -> list[aio_pika.Message]:
        """Each of a bundle's ``items`` as the message it would have been alone."""
        return [copy_message(self._decode(item)[0], {}) for item in items]

    async def _put_back(self, copies: list[aio_pika.Message]) -> None:
        """Put ``copies`` at the end of this consumer's queue, each confirmed."""
        for copy in copies:
            await self._broker.send_to_queue(self._queue.name, copy)

    async def _return_all(
        self, message: AbstractIncomingMessage, handled: list[Handled | None], why: str
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


def _ok(handled: Handled | None) -> bool:
    return handled is not None and handled.copied
