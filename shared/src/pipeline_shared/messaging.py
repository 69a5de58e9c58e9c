"""The messaging layer over aio-pika that every service uses.

``Broker`` owns one robust connection: it declares the topology (or, when
its broker user may not configure, only checks that it exists), publishes
events with publisher confirms and the ``mandatory`` flag, and starts
consumers. A ``Consumer`` decodes each delivery into an event, calls the
service's handler and applies the acknowledgement policy (``settle``):

============================  ===============================================
handler outcome               what happens to the message
============================  ===============================================
returns                       ack
``Deferred``                  copied to a retry queue (the longest delay within
                              its known wait, else the shortest) with
                              ``x-attempts`` unchanged, then acked
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
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)
from aiormq import spec as amqp
from aiormq.exceptions import (
    AuthenticationError,
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ConnectionClosed,
    ProbableAuthenticationError,
)
from pydantic import TypeAdapter, ValidationError

from pipeline_shared import metrics
from pipeline_shared.contract import TRUSTED
from pipeline_shared.errors import (
    BrokerRefused,
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    PublishOutcomeUnknown,
    TopologyMissing,
    TransientFailure,
)
from pipeline_shared.events import Event, JobFailed, describe_validation_error, utc_now
from pipeline_shared.settings import PipelineSettings, redact_url
from pipeline_shared.topology import (
    EXCHANGE,
    QUEUE_EXCHANGE,
    STAGES,
    Stage,
    stage_queues,
)

log = logging.getLogger("pipeline.messaging")

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]

ATTEMPTS_HEADER = "x-attempts"

delivery_attempt: ContextVar[int] = ContextVar("delivery_attempt", default=1)
"""Which attempt the message being handled is (1 for the first), for handlers
that report it; set by the consumer before each handler call."""
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1, 5, 30, 120, 600)
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

# Routing keys some queue is bound to: publishing to one of them must reach a
# queue (mandatory). Other events are notifications that may have no listener.
_BOUND_ROUTING_KEYS = frozenset(key for stage in STAGES.values() for key in stage.routing_keys)

_SETTLE_ERRORS = (BrokerUnavailable, ChannelInvalidStateError, *CONNECTION_EXCEPTIONS)
# At a stop, how long giving one message back may take before it is nacked instead.
GIVE_BACK_TIMEOUT_SECONDS = 2.0


class Disposition(enum.Enum):
    """What becomes of a delivered message."""

    ACK = "ack"
    DEFER = "defer"
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
    if isinstance(failure, Deferred) and retry_delays:
        return Disposition.DEFER
    if attempts <= len(retry_delays):
        return Disposition.RETRY
    return Disposition.DEAD_LETTER


Outcome = Literal["acked", "retried", "deferred", "dead_lettered", "requeued"]
"""What became of a handled message, as its log line's ``outcome`` field says."""


def handled_fields(
    message: AbstractIncomingMessage,
    job_id: str | None,
    outcome: Outcome,
    attempt: int,
    duration_ms: float,
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
        # No tracing yet: the field is there, always null, so that log queries and
        # dashboards written now keep working once a trace id fills it.
        "trace_id": None,
    }


def deferral_delay(wait_seconds: float, retry_delays: Sequence[float]) -> float:
    """The retry delay a deferred message takes: the longest one within the known
    wait, so a long wait costs few round trips; the shortest if none fits."""
    fitting = [delay for delay in retry_delays if delay <= wait_seconds]
    return max(fitting) if fitting else min(retry_delays)


class PoisonMessage(Exception):
    """A body that cannot be an event for this queue: too big, not JSON, wrong schema."""


def decode_event(body: bytes, model: type[E] | TypeAdapter[E], max_bytes: int) -> E:
    """Parse ``body`` as ``model`` (an event class, or an adapter for a union of
    them), or raise ``PoisonMessage`` saying why not."""
    if len(body) > max_bytes:
        raise PoisonMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # What the pipeline wrote was validated where it entered (the api).
        if isinstance(model, TypeAdapter):
            return model.validate_json(body, context=TRUSTED)
        return model.model_validate_json(body, context=TRUSTED)
    except ValidationError as exc:
        what = "event" if isinstance(model, TypeAdapter) else model.__name__
        raise PoisonMessage(describe_validation_error(exc, what)) from exc


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
    # The queue's own count of this message's deliveries means nothing on a copy.
    dropped = {*without, "x-delivery-count"}
    kept = {k: v for k, v in (message.headers or {}).items() if k not in dropped}
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


async def declare_topology(channel: AbstractChannel, retry_delays: Sequence[float]) -> None:
    """Declare both exchanges and every stage's queues and bindings (idempotent).

    Needs a broker user that may configure them all; ``rabbitmq/definitions.json``
    holds the same topology for brokers that load it instead. Raises
    ``BrokerRefused`` if one of them exists already with other arguments.
    """
    with _same_arguments_or_refused("exchange", EXCHANGE):
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
    with _same_arguments_or_refused("exchange", QUEUE_EXCHANGE):
        queues = await channel.declare_exchange(
            QUEUE_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
    for stage in STAGES.values():
        for spec in stage_queues(stage, retry_delays):
            with _same_arguments_or_refused("queue", spec.name):
                queue = await channel.declare_queue(
                    spec.name, durable=True, arguments=spec.arguments
                )
            if spec.name == stage.queue:
                for routing_key in stage.routing_keys:
                    await queue.bind(exchange, routing_key)
            await queue.bind(queues, spec.name)


@contextmanager
def _same_arguments_or_refused(kind: str, name: str) -> Iterator[None]:
    """Turn the broker's PRECONDITION_FAILED for an exchange or queue that exists
    with other arguments (a classic queue, another delivery limit, another
    exchange type) into ``BrokerRefused``: redeclaring never changes them."""
    try:
        yield
    except ChannelPreconditionFailed as exc:
        if kind == "queue":
            remedy = (
                f"delete the queue {name!r} (after moving out any messages it holds) or make "
                "its arguments match pipeline_shared/topology.py (rabbitmq/definitions.json)"
            )
        else:
            remedy = f"delete the exchange {name!r} or make it a durable topic exchange"
        raise BrokerRefused(f"to declare {kind} {name!r}", _reply_text(exc), remedy) from exc


def topology_names(retry_delays: Sequence[float]) -> list[tuple[str, str]]:
    """``(kind, name)`` of both exchanges and every stage's queues, in declaration order."""
    names = [("exchange", EXCHANGE), ("exchange", QUEUE_EXCHANGE)]
    for stage in STAGES.values():
        names.extend(("queue", spec.name) for spec in stage_queues(stage, retry_delays))
    return names


async def verify_topology(
    connection: AbstractConnection, retry_delays: Sequence[float], vhost: str
) -> None:
    """Check, without declaring anything, that both exchanges and every stage's
    queues exist; raise ``TopologyMissing`` naming those that do not.

    Passive declarations need no permission at all, so this works for a broker
    user that may not configure. (Bindings cannot be checked passively; the
    ``mandatory`` flag on publishing catches a missing one.)
    """
    missing: list[str] = []
    channel = await connection.channel(publisher_confirms=False)
    try:
        for kind, name in topology_names(retry_delays):
            try:
                if kind == "exchange":
                    await channel.get_exchange(name, ensure=True)
                else:
                    await channel.get_queue(name, ensure=True)
            except ChannelNotFoundEntity:
                # The broker closes the channel on a failed passive declaration.
                missing.append(f"{kind} {name!r}")
                await _close_quietly(channel)
                channel = await connection.channel(publisher_confirms=False)
    finally:
        await _close_quietly(channel)
    if missing:
        raise TopologyMissing(missing, vhost)


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS):
        pass


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none)."""
    return unquote(urlsplit(url).path[1:]) or "/"


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
        self._queue_exchange: AbstractExchange | None = None
        self.passive = False
        """Whether the broker user may not configure, so the topology is only
        checked (``verify_topology``), never declared; set by ``connect``."""
        self._lost = False
        self.user = unquote(urlsplit(url).username or "guest")
        self.vhost = vhost_of(url)

    @classmethod
    def from_settings(cls, settings: PipelineSettings, *, app_id: str) -> Broker:
        """The broker a service's settings describe."""
        return cls(
            settings.rabbitmq_url,
            app_id=app_id,
            publish_timeout=settings.publish_timeout_seconds,
            retry_delays=settings.retry_delays,
        )

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
        """Connect once and declare the topology, or, if the broker user may not
        configure it, check that it exists.

        Raises if the broker cannot be reached, ``TopologyMissing`` if the
        topology is not there and may not be declared, and ``BrokerRefused`` if
        the broker refuses what no retry changes (the login, the vhost, an
        exchange or queue declared before with other arguments).
        """
        try:
            connection = await aio_pika.connect_robust(
                self._url,
                client_properties={"connection_name": self.app_id},
                timeout=self._publish_timeout,
            )
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            refusal = self._refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise
        try:
            channel = await self._prepare_topology(connection)
            self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            self._queue_exchange = await channel.get_exchange(QUEUE_EXCHANGE, ensure=False)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel = connection, channel
        self._lost = False
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info(
            "connected to %s as %s%s",
            redact_url(self._url),
            self.app_id,
            " (topology checked: the broker user may not configure)" if self.passive else "",
        )

    async def _prepare_topology(self, connection: AbstractConnection) -> AbstractChannel:
        """The publishing channel, once the topology is declared or found."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # Declared on the publishing channel, the topology is declared
            # again whenever the robust connection reconnects.
            await declare_topology(channel, self.retry_delays)
            self.passive = False
            return channel
        except ChannelAccessRefused as exc:
            log.debug("may not declare the topology (%s); checking it instead", exc)
        await _close_quietly(channel)
        await verify_topology(connection, self.retry_delays, vhost_of(self._url))
        self.passive = True
        return await connection.channel(publisher_confirms=True, on_return_raises=True)

    def _refusal(self, exc: BaseException) -> BrokerRefused | None:
        """The configuration error a failed attempt to connect is, if it is one.

        The broker refuses a login with ACCESS_REFUSED, and a vhost that does
        not exist or that the user has no permissions on with NOT_ALLOWED. A
        NOT_ALLOWED for a connection limit (other connections free it) or a
        vhost that is down is left to be retried.
        """
        if isinstance(exc, AuthenticationError):
            offered = exc.args[0] if exc.args else "?"
            return BrokerRefused(
                "every authentication mechanism aio-pika has",
                f"it offers {offered}",
                "configure the broker for PLAIN, or choose one of those with ?auth= in "
                "RABBITMQ_URL: a configuration error, not retried",
            )
        reply = _closed_by_broker(exc)
        if reply is None:
            return None
        if reply.startswith("ACCESS_REFUSED"):
            return BrokerRefused(
                f"the login of user {self.user!r}",
                reply,
                "fix the user name or password in RABBITMQ_URL, or the user on the broker: "
                "a refused login is a configuration error, not retried",
            )
        if not reply.startswith("NOT_ALLOWED") or "limit" in reply or "is down" in reply:
            return None
        if "not found" in reply:
            return BrokerRefused(
                f"to open vhost {self.vhost!r}",
                reply,
                f"create the vhost (rabbitmqctl add_vhost {self.vhost}) or fix the vhost "
                "at the end of RABBITMQ_URL",
            )
        return BrokerRefused(
            f"to open vhost {self.vhost!r} for user {self.user!r}",
            reply,
            f"grant the user {self.user!r} permissions on the vhost {self.vhost!r} "
            f"(rabbitmqctl set_permissions -p {self.vhost} {self.user} ...) or fix RABBITMQ_URL",
        )

    def _on_connection_lost(self, sender: object, exc: BaseException | None) -> None:
        # The robust connection calls this when the connection drops and again
        # for every failed attempt to reconnect: one line for the loss, and
        # the attempts at DEBUG.
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return
        if self._lost:
            log.debug("still no broker connection (%s); retrying", _loss_reason(exc))
            return
        self._lost = True
        log.warning("lost the broker connection (%s); reconnecting", _loss_reason(exc))

    def _on_reconnected(self, sender: object) -> None:
        self._lost = False
        log.info("reconnected to %s; topology and consumers restored", redact_url(self._url))

    async def connect_until_ready(
        self, *, first_delay: float = 0.5, max_delay: float = 10.0
    ) -> None:
        """Keep trying to connect, with growing pauses, until it works or the task is cancelled.

        Only an unreachable broker, a dropped connection or a passing refusal
        (a connection limit) is retried. Configuration errors, ``TopologyMissing``
        and ``BrokerRefused``, are raised at once: they need an operator.
        """
        delay = first_delay
        while True:
            try:
                await self.connect()
                return
            except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
                reply = _closed_by_broker(exc)
                if reply is not None:
                    log.warning(
                        "broker at %s closed the connection (%s); retrying in %.1f s",
                        redact_url(self._url),
                        reply,
                        delay,
                    )
                else:
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
        self._connection = self._channel = self._exchange = self._queue_exchange = None

    @metrics.count_publishes
    async def publish(self, event: Event) -> None:
        """Publish ``event`` on the exchange and wait for the broker's confirm.

        Raises ``BrokerUnavailable`` when not connected, or when the broker
        nacks the message, cannot route it, or refuses it (the broker user may
        not publish this routing key): the message was not taken. Raises
        ``PublishOutcomeUnknown`` (a ``BrokerUnavailable``) when the confirm does
        not come in time or the connection drops while waiting: it may have been.
        """
        if self._exchange is None:
            raise BrokerUnavailable("not connected to the message broker")
        mandatory = event.routing_key in _BOUND_ROUTING_KEYS
        await self._publish(
            self._exchange, event_message(event, self.app_id), event.routing_key, mandatory
        )

    async def send_to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Put ``message`` into one of the stages' queues, by name, confirmed."""
        if self._queue_exchange is None:
            raise BrokerUnavailable("not connected to the message broker")
        await self._publish(self._queue_exchange, message, queue, mandatory=True)

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
            raise PublishOutcomeUnknown(
                f"the broker did not confirm the message within {self._publish_timeout:g} s"
            ) from exc
        except ChannelAccessRefused as exc:
            # The broker closes the channel; the robust connection reopens it.
            raise BrokerUnavailable(
                f"the broker refused to let this service publish to {exchange.name!r} "
                f"with routing key {routing_key!r} ({_reply_text(exc)})"
            ) from exc
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS) as exc:
            # The message may have left before the connection went.
            raise PublishOutcomeUnknown(
                f"lost the broker connection while publishing ({type(exc).__name__})"
            ) from exc

    async def consume(
        self,
        stage: Stage,
        model: type[E] | TypeAdapter[E],
        handler: Handler[E],
        *,
        prefetch: int,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        handler_timeout: float | None = None,
        handled_level: int = logging.INFO,
    ) -> Consumer[E]:
        """Start consuming ``stage``'s work queue with manual acks and a bounded prefetch.

        A handler still running after ``handler_timeout`` seconds is cancelled and its
        message retried as a transient failure, so a hung step cannot hold a message
        until the broker's ``consumer_timeout``. Each message handled is logged at
        ``handled_level`` (failures always at WARNING or ERROR)."""
        if self._connection is None:
            raise BrokerUnavailable("not connected to the message broker")
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            if self.passive:
                queue = await channel.get_queue(stage.queue, ensure=True)
            else:
                queue = await channel.declare_queue(
                    stage.queue, durable=True, arguments=stage.queue_arguments()
                )
            consumer = Consumer(
                self,
                channel,
                queue,
                stage,
                model,
                handler,
                max_event_bytes,
                handler_timeout,
                handled_level=handled_level,
            )
            await consumer.start()
        except BaseException:
            # Closed by us, the robust connection stops restoring it.
            with contextlib.suppress(Exception):
                await channel.close()
            raise
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
        model: type[E] | TypeAdapter[E],
        handler: Handler[E],
        max_event_bytes: int,
        handler_timeout: float | None = None,
        *,
        handled_level: int = logging.INFO,
    ) -> None:
        self._broker = broker
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
        started = time.perf_counter()
        attempts = attempts_of(message)
        event: E | None = None
        failure: BaseException | None = None
        try:
            event = decode_event(message.body, self._model, self._max_event_bytes)
            delivery_attempt.set(attempts)
            await self._run_handler(event)
        except asyncio.CancelledError:
            await self._give_back(message)
            metrics.message_requeued(self._stage.name, event, message.type)
            raise
        except (PoisonMessage, PermanentFailure, TransientFailure, BrokerUnavailable) as exc:
            failure = exc
        except Exception as exc:  # a bug in a handler must not stop the consumer
            log.exception("unexpected error handling message %s", message.message_id)
            failure = exc

        job_id = str(event.job_id) if event is not None else message.correlation_id
        job = job_id or "?"
        disposition = settle(failure, attempts, self._broker.retry_delays)
        elapsed_ms = (time.perf_counter() - started) * 1000

        def handled(outcome: Outcome) -> dict[str, object]:
            return handled_fields(message, job_id, outcome, attempts, elapsed_ms)

        try:
            if disposition is Disposition.ACK:
                await message.ack()
                metrics.message_settled(
                    self._stage.name, event, message.type, disposition.value, None, started
                )
                log.log(
                    self._handled_level,
                    "job %s: %s handled in %.0f ms",
                    job,
                    message.type or "event",
                    elapsed_ms,
                    extra=handled("acked"),
                )
                return
            assert failure is not None
            details = _describe(failure)
            if disposition is Disposition.DEFER:
                assert isinstance(failure, Deferred)
                delay = deferral_delay(failure.wait_seconds, self._broker.retry_delays)
                await self._retry(message, attempts, delay, details)
                log.info(
                    "job %s: deferred (%s); again in %g s",
                    job,
                    details.reason,
                    delay,
                    extra=handled("deferred"),
                )
            elif disposition is Disposition.RETRY:
                delay = self._broker.retry_delays[attempts - 1]
                await self._retry(message, attempts + 1, delay, details)
                log.warning(
                    "job %s: attempt %d failed (%s); retrying in %g s",
                    job,
                    attempts,
                    details.reason,
                    delay,
                    extra=handled("retried"),
                )
            else:
                await self._dead_letter(message, event, attempts, details)
                log.error(
                    "job %s: dead-lettered after %d attempt(s): %s: %s",
                    job,
                    attempts,
                    details.error_type,
                    details.reason,
                    extra=handled("dead_lettered"),
                )
            metrics.message_settled(
                self._stage.name, event, message.type, disposition.value, failure, started
            )
        except _SETTLE_ERRORS as exc:
            log.warning(
                "job %s: could not settle the message (%s); it will be redelivered",
                job,
                exc,
                extra=handled("requeued"),
            )
            await self._return(message)
            metrics.message_requeued(self._stage.name, event, message.type)

    async def _retry(
        self, message: AbstractIncomingMessage, next_attempt: int, delay: float, failure: _Failure
    ) -> None:
        headers: HeadersType = {
            ATTEMPTS_HEADER: next_attempt,
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
        if job_id is not None and self._stage.reports_failures:
            await self._broker.publish(
                JobFailed(
                    job_id=job_id,
                    stage=self._broker.app_id,
                    reason=failure.reason,
                    error_type=failure.error_type,
                    attempts=attempts,
                )
            )
        await message.ack()

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        """At a stop: put a copy of the message back at the end of its queue, then ack.
        A nack would count toward the quorum queue's delivery limit, and enough stops
        would dead-letter a healthy message without its ``JobFailed``."""
        try:
            async with asyncio.timeout(GIVE_BACK_TIMEOUT_SECONDS):
                await self._broker.send_to_queue(self._queue.name, copy_message(message, {}))
                await message.ack()
        except (TimeoutError, *_SETTLE_ERRORS):
            # Returned by nack instead (or by the broker when the channel goes);
            # a copy that did arrive is a repeat, which the handlers absorb.
            await self._return(message)

    async def _return(self, message: AbstractIncomingMessage) -> None:
        """Give the message back to the queue for another consumer (best effort: if
        the channel is gone, the broker requeues it anyway)."""
        if self._channel.is_closed:
            return
        try:
            await message.nack(requeue=True)
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS):
            pass


def _reply_text(exc: BaseException) -> str:
    """The broker's own words from an AMQP error, e.g. ``ACCESS_REFUSED - ...``."""
    texts = [arg for arg in exc.args if isinstance(arg, str)]
    return texts[-1] if texts else type(exc).__name__


def _closed_by_broker(exc: BaseException) -> str | None:
    """The broker's reply text if it closed the connection, e.g. ``NOT_ALLOWED - vhost x not
    found``; None for a failure of the network (refused, reset, timed out).

    aiormq reports a broker that closes the connection in reply to
    Connection.Open (an unknown vhost, one the user may not use, a connection
    limit) as an ``InvalidFrameError`` that has lost the broker's words; the
    Connection.Close frame is still a local of the frame that raised it (older
    aiormq versions put it in the error's arguments).
    """
    if isinstance(exc, ConnectionClosed | ProbableAuthenticationError):
        return _reply_text(exc)
    found: list[object] = list(exc.args)
    traceback = exc.__traceback__
    while traceback is not None:
        found.extend(traceback.tb_frame.f_locals.values())
        traceback = traceback.tb_next
    for value in found:
        if isinstance(value, amqp.Connection.Close):
            return value.reply_text or f"reply code {value.reply_code}"
    return None


def _loss_reason(exc: BaseException) -> str:
    """Why the connection was lost: the error's type, and the broker's words if
    the broker closed it (``ConnectionClosed: CONNECTION_FORCED - ...``)."""
    if isinstance(exc, ConnectionClosed):
        return f"{type(exc).__name__}: {_reply_text(exc)}"
    return type(exc).__name__


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
