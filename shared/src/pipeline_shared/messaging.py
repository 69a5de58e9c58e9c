"""The messaging layer over aio-pika that every service uses.

``Broker`` owns one robust connection: it declares the topology, publishes
events with publisher confirms and the ``mandatory`` flag, and starts
consumers. A ``Consumer`` decodes each delivery into an event, calls the
service's handler and applies the acknowledgement policy (``settle``):

============================  ===============================================
handler outcome               what happens to the message
============================  ===============================================
returns                       ack
``TransientFailure``,         copied to the stage's retry queue for the next
unexpected exception,         delay (header ``x-attempts`` + 1), then acked;
``BrokerUnavailable``         after the last delay: dead-lettered
``PermanentFailure``          dead-lettered at once
undecodable body (poison)     dead-lettered at once
============================  ===============================================

Dead-lettering copies the message, with its properties and the headers
``x-error-reason``, ``x-error-type``, ``x-attempts``, ``x-failed-service`` and
``x-failed-at``, to the stage's ``.dlq`` queue, publishes ``JobFailed`` when
the job is known, and only then acks. Every copy is confirmed by the broker
before the original is acked, so a crash in between duplicates a message
but never loses one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from uuid import UUID

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from pydantic import ValidationError

from pipeline_shared.errors import BrokerUnavailable, PermanentFailure, TransientFailure
from pipeline_shared.events import Event, JobFailed, describe_validation_error, utc_now
from pipeline_shared.settings import redact_url
from pipeline_shared.topology import (
    DEAD_LETTER_QUEUE_ARGUMENTS,
    EXCHANGE,
    STAGES,
    Stage,
    retry_queue_arguments,
)

log = logging.getLogger("pipeline.messaging")

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]

ATTEMPTS_HEADER = "x-attempts"
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1, 5, 30, 120, 600)
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

# Routing keys some queue is bound to: publishing to one of them must reach a
# queue (mandatory). Other events are notifications that may have no listener.
_BOUND_ROUTING_KEYS = frozenset(stage.routing_key for stage in STAGES.values())

_SETTLE_ERRORS = (BrokerUnavailable, ChannelInvalidStateError, *CONNECTION_EXCEPTIONS)


class Disposition(enum.Enum):
    """What becomes of a delivered message."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


def settle(
    failure: BaseException | None, attempts: int, retry_delays: Sequence[float]
) -> Disposition:
    """The acknowledgement policy: map a handler's outcome to a disposition.

    ``attempts`` counts this delivery (1 for the first); there is one retry per
    entry of ``retry_delays``.
    """
    if failure is None:
        return Disposition.ACK
    if isinstance(failure, PermanentFailure | PoisonMessage):
        return Disposition.DEAD_LETTER
    if attempts <= len(retry_delays):
        return Disposition.RETRY
    return Disposition.DEAD_LETTER


class PoisonMessage(Exception):
    """A body that cannot be an event for this queue: too big, not JSON, wrong schema."""


def decode_event(body: bytes, model: type[E], max_bytes: int) -> E:
    """Parse ``body`` as ``model``, or raise ``PoisonMessage`` saying why not."""
    if len(body) > max_bytes:
        raise PoisonMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise PoisonMessage(describe_validation_error(exc, model.__name__)) from exc


def event_message(event: Event, app_id: str) -> aio_pika.Message:
    """The AMQP message for ``event``, with properties that read well in the management UI."""
    return aio_pika.Message(
        body=event.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        correlation_id=str(event.job_id),
        type=event.event_type,
        app_id=app_id,
        timestamp=event.occurred_at,
    )


def attempts_of(message: AbstractIncomingMessage) -> int:
    """Which attempt this delivery is (1 for the first), from ``x-attempts``."""
    value = (message.headers or {}).get(ATTEMPTS_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def copy_message(
    message: AbstractIncomingMessage, headers: HeadersType, *, without: Collection[str] = ()
) -> aio_pika.Message:
    """A persistent copy of ``message`` with the same body and properties, plus
    ``headers`` and less the headers named in ``without``."""
    kept = {k: v for k, v in (message.headers or {}).items() if k not in without}
    return aio_pika.Message(
        body=message.body,
        headers={**kept, **headers},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def declare_topology(
    channel: AbstractChannel, retry_delays: Sequence[float]
) -> AbstractExchange:
    """Declare the exchange and every stage's queues (idempotent) and return the exchange."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    for stage in STAGES.values():
        queue = await channel.declare_queue(
            stage.queue, durable=True, arguments=stage.queue_arguments()
        )
        await queue.bind(exchange, stage.routing_key)
        await channel.declare_queue(
            stage.dead_letter_queue, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
        )
        for delay in retry_delays:
            await channel.declare_queue(
                stage.retry_queue(delay),
                durable=True,
                arguments=retry_queue_arguments(stage, delay),
            )
    return exchange


class Broker:
    """One service's connection to RabbitMQ.

    Make it in the service's composition root, ``await connect()`` (or
    ``connect_until_ready()``) and ``await close()`` on the way out.
    """

    def __init__(
        self,
        url: str,
        *,
        app_id: str,
        publish_timeout: float = 10.0,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        self._url = url
        self.app_id = app_id
        self._publish_timeout = publish_timeout
        self.retry_delays = tuple(retry_delays)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    @property
    def is_ready(self) -> bool:
        """True while the connection is open and publishing is possible."""
        return (
            self._connection is not None
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def connect(self) -> None:
        """Connect once and declare the topology; raises if the broker cannot be reached."""
        connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": self.app_id},
            timeout=self._publish_timeout,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await declare_topology(channel, self.retry_delays)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel, self._exchange = connection, channel, exchange
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info("connected to %s as %s", redact_url(self._url), self.app_id)

    def _on_connection_lost(self, sender: object, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.warning("lost the broker connection (%s); reconnecting", type(exc).__name__)

    def _on_reconnected(self, sender: object) -> None:
        log.info("reconnected to %s; topology and consumers restored", redact_url(self._url))

    async def connect_until_ready(
        self, *, first_delay: float = 0.5, max_delay: float = 10.0
    ) -> None:
        """Keep trying to connect, with growing pauses, until it works or the task is cancelled."""
        delay = first_delay
        while True:
            try:
                await self.connect()
                return
            except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
                log.warning(
                    "broker at %s not reachable (%s); retrying in %.1f s",
                    redact_url(self._url),
                    type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._exchange = None

    async def publish(self, event: Event) -> None:
        """Publish ``event`` on the exchange and wait for the broker's confirm.

        Raises ``BrokerUnavailable`` when not connected, or when the broker
        nacks the message, cannot route it, or does not confirm in time.
        """
        if self._exchange is None:
            raise BrokerUnavailable("not connected to the message broker")
        mandatory = event.routing_key in _BOUND_ROUTING_KEYS
        await self._publish(
            self._exchange, event_message(event, self.app_id), event.routing_key, mandatory
        )

    async def send_to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Put ``message`` straight into ``queue`` (default exchange), confirmed."""
        if self._channel is None:
            raise BrokerUnavailable("not connected to the message broker")
        await self._publish(self._channel.default_exchange, message, queue, mandatory=True)

    async def _publish(
        self,
        exchange: AbstractExchange,
        message: aio_pika.Message,
        routing_key: str,
        mandatory: bool,
    ) -> None:
        if not self.is_ready:
            raise BrokerUnavailable("not connected to the message broker")
        try:
            await exchange.publish(
                message, routing_key, mandatory=mandatory, timeout=self._publish_timeout
            )
        except PublishError as exc:
            raise BrokerUnavailable(f"no queue is bound to routing key {routing_key!r}") from exc
        except DeliveryError as exc:
            raise BrokerUnavailable("the broker refused the message (nack)") from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the broker did not confirm the message within {self._publish_timeout:g} s"
            ) from exc
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailable(f"lost the broker connection ({type(exc).__name__})") from exc

    async def consume(
        self,
        stage: Stage,
        model: type[E],
        handler: Handler[E],
        *,
        prefetch: int,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> Consumer[E]:
        """Start consuming ``stage``'s work queue with manual acks and a bounded prefetch."""
        if self._connection is None:
            raise BrokerUnavailable("not connected to the message broker")
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(
            stage.queue, durable=True, arguments=stage.queue_arguments()
        )
        consumer = Consumer(self, channel, queue, stage, model, handler, max_event_bytes)
        await consumer.start()
        return consumer


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    error_type: str


class Consumer(Generic[E]):
    """Delivers one queue's messages to a handler; see the module docstring for the policy."""

    def __init__(
        self,
        broker: Broker,
        channel: AbstractChannel,
        queue: AbstractQueue,
        stage: Stage,
        model: type[E],
        handler: Handler[E],
        max_event_bytes: int,
    ) -> None:
        self._broker = broker
        self._channel = channel
        self._queue = queue
        self._stage = stage
        self._model = model
        self._handler = handler
        self._max_event_bytes = max_event_bytes
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

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
            for task in pending:
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
        handling = asyncio.create_task(self._handle(message))
        self._in_flight.add(handling)
        handling.add_done_callback(self._in_flight.discard)
        await asyncio.shield(handling)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        attempts = attempts_of(message)
        event: E | None = None
        failure: BaseException | None = None
        try:
            event = decode_event(message.body, self._model, self._max_event_bytes)
            await self._handler(event)
        except asyncio.CancelledError:
            await self._return(message)
            raise
        except (PoisonMessage, PermanentFailure, TransientFailure, BrokerUnavailable) as exc:
            failure = exc
        except Exception as exc:  # a bug in a handler must not stop the consumer
            log.exception("unexpected error handling message %s", message.message_id)
            failure = exc

        job = str(event.job_id) if event is not None else (message.correlation_id or "?")
        disposition = settle(failure, attempts, self._broker.retry_delays)
        elapsed_ms = (time.perf_counter() - started) * 1000
        try:
            if disposition is Disposition.ACK:
                await message.ack()
                log.info("job %s: %s handled in %.0f ms", job, self._model.__name__, elapsed_ms)
                return
            assert failure is not None
            details = _describe(failure)
            if disposition is Disposition.RETRY:
                delay = self._broker.retry_delays[attempts - 1]
                await self._retry(message, attempts, delay, details)
                log.warning(
                    "job %s: attempt %d failed (%s); retrying in %g s",
                    job,
                    attempts,
                    details.reason,
                    delay,
                )
            else:
                await self._dead_letter(message, event, attempts, details)
                log.error(
                    "job %s: dead-lettered after %d attempt(s): %s: %s",
                    job,
                    attempts,
                    details.error_type,
                    details.reason,
                )
        except _SETTLE_ERRORS as exc:
            log.warning(
                "job %s: could not settle the message (%s); it will be redelivered", job, exc
            )
            await self._return(message)

    async def _retry(
        self, message: AbstractIncomingMessage, attempts: int, delay: float, failure: _Failure
    ) -> None:
        headers: HeadersType = {
            ATTEMPTS_HEADER: attempts + 1,
            "x-retry-reason": failure.reason,
            "x-retry-error-type": failure.error_type,
        }
        await self._broker.send_to_queue(
            self._stage.retry_queue(delay), copy_message(message, headers)
        )
        await message.ack()

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
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
        if job_id is not None:
            await self._broker.publish(
                JobFailed(
                    job_id=job_id,
                    stage=self._broker.app_id,
                    reason=failure.reason,
                    error_type=failure.error_type,
                )
            )
        await message.ack()

    async def _return(self, message: AbstractIncomingMessage) -> None:
        """Give the message back to the queue for another consumer (best effort: if
        the channel is gone, the broker requeues it anyway)."""
        if self._channel.is_closed:
            return
        try:
            await message.nack(requeue=True)
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS):
            pass


def _describe(failure: BaseException) -> _Failure:
    if isinstance(failure, PermanentFailure | TransientFailure):
        return _Failure(failure.reason, type(failure).__name__)
    return _Failure(str(failure) or type(failure).__name__, type(failure).__name__)


def _job_id_hint(message: AbstractIncomingMessage) -> UUID | None:
    """The job a poison message belonged to, if its correlation_id says so."""
    try:
        return UUID(message.correlation_id or "")
    except ValueError:
        return None
