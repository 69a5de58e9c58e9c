"""``Broker``: one service's connection to RabbitMQ, its publishing, and the consumers it starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Sequence
from functools import partial
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import ChannelAccessRefused, ConnectionClosed
from opentelemetry.trace import SpanKind
from pydantic import TypeAdapter

from pipeline_shared import metrics, tracing
from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.events import Event
from pipeline_shared.messaging import bundle, refusals
from pipeline_shared.messaging.coalesce import Coalescer, Item, Settle, resolve
from pipeline_shared.messaging.consumer import Consumer
from pipeline_shared.messaging.declare import close_quietly, declare_topology, verify_topology
from pipeline_shared.messaging.handling import E, Handler
from pipeline_shared.messaging.policy import DEFAULT_RETRY_DELAYS
from pipeline_shared.messaging.publish_connection import (
    BrokerClosed,
    ChannelClosed,
    ConfirmTimeout,
    ConnectionLost,
    Nacked,
    NotSent,
    PublishFailed,
    Unroutable,
    client_properties,
)
from pipeline_shared.messaging.publisher import Publisher
from pipeline_shared.messaging.wire import DEFAULT_MAX_EVENT_BYTES, event_message
from pipeline_shared.probe_server import NOT_CONNECTED
from pipeline_shared.settings import DEFAULT_BUNDLE_EVENTS, PipelineSettings, redact_url
from pipeline_shared.topology import EXCHANGE, QUEUE_EXCHANGE, STAGES, Stage

log = logging.getLogger("pipeline.messaging")

ACCESS_REFUSED = 403

# Bundles awaiting their confirm per routing key before the next one waits to fill.
BUNDLES_IN_FLIGHT = 2

# Routing keys some queue is bound to: publishing to one of them must reach a
# queue (mandatory). Other events are notifications that may have no listener.
# How many queues each is bound to, for what a nack means.
_QUEUES_BY_KEY = Counter(key for stage in STAGES.values() for key in stage.routing_keys)
_MESSAGING_ATTRIBUTES = {"messaging.system": "rabbitmq", "messaging.operation.type": "send"}


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none)."""
    return unquote(urlsplit(url).path[1:]) or "/"


def connection_name(app_id: str) -> str:
    """What the management UI calls this process's connection: the service, and which
    replica it is (the host, a container's id under compose, and the process)."""
    return f"{app_id} on {socket.gethostname()} (pid {os.getpid()})"


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
        bundle_max_events: int = DEFAULT_BUNDLE_EVENTS,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self._url = url
        self.app_id = app_id
        self._publish_timeout = publish_timeout
        self.retry_delays = tuple(retry_delays)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None  # the one the topology is declared on
        self._publisher: Publisher | None = None
        self.passive = False
        """Whether the broker user may not configure, so the topology is only
        checked (``verify_topology``), never declared; set by ``connect``."""
        self._down: set[str] = set()
        """Which of the two connections (consuming, publishing) are lost right now."""
        self.user = unquote(urlsplit(url).username or "guest")
        self.vhost = vhost_of(url)
        self._coalescer = (
            Coalescer(
                self._start_items,
                max_events=bundle_max_events,
                max_bytes=max_event_bytes,
                in_flight=BUNDLES_IN_FLIGHT,
            )
            if bundle_max_events > 1
            else None
        )

    @classmethod
    def from_settings(cls, settings: PipelineSettings, *, app_id: str) -> Broker:
        """The broker a service's settings describe."""
        return cls(
            settings.rabbitmq_url,
            app_id=app_id,
            publish_timeout=settings.publish_timeout_seconds,
            retry_delays=settings.retry_delays,
            bundle_max_events=settings.bundle_max_events,
            max_event_bytes=settings.max_event_bytes,
        )

    @property
    def is_ready(self) -> bool:
        """True while both connections are open and publishing is possible."""
        return (
            self._connection is not None
            and self._connection.connected.is_set()
            and self._publisher is not None
            and self._publisher.ready
        )

    async def connect(self) -> None:
        """Connect once and declare the topology, or, if the broker user may not
        configure it, check that it exists.

        Raises if the broker cannot be reached, ``TopologyMissing`` if the
        topology is not there and may not be declared, and ``BrokerRefused`` if
        the broker refuses what no retry changes (the login, the vhost, an
        exchange or queue declared before with other arguments).
        """
        if self._connection is not None:
            # Connecting again (a follower whose consumer stopped does): the old
            # connections go first, not left open beside the new ones.
            await self.close()
        try:
            connection = await aio_pika.connect_robust(
                self._url,
                client_properties={"connection_name": connection_name(self.app_id)},
                timeout=self._publish_timeout,
            )
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            refusal = refusals.refusal(exc, self.user, self.vhost)
            if refusal is not None:
                raise refusal from exc
            raise
        try:
            channel = await self._prepare_topology(connection)
            publisher = Publisher(
                self._url,
                client_properties=client_properties(connection_name(self.app_id) + ", publishing"),
                connect_timeout=self._publish_timeout,
                reporter=self,
            )
            await publisher.open()
        except BrokerClosed as exc:
            # Read as the consuming connection's refusals are: a configuration error,
            # or a passing one (a connection limit) that connect_until_ready retries.
            await connection.close()
            closed = ConnectionClosed(exc.reply_code, exc.reply_text)
            refusal = refusals.refusal(closed, self.user, self.vhost)
            raise (refusal or closed) from exc
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel, self._publisher = connection, channel, publisher
        self._down.clear()
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info(
            "connected to %s as %s%s",
            redact_url(self._url),
            self.app_id,
            " (topology checked: the broker user may not configure)" if self.passive else "",
        )

    async def _prepare_topology(self, connection: AbstractConnection) -> AbstractChannel:
        """A channel the topology was declared on, or found through (publishing has a
        connection of its own)."""
        channel = await connection.channel(publisher_confirms=False)
        try:
            # Declared on a channel of the robust connection, the topology is
            # declared again whenever it reconnects.
            await declare_topology(channel, self.retry_delays)
            self.passive = False
            return channel
        except ChannelAccessRefused as exc:
            log.debug("may not declare the topology (%s); checking it instead", exc)
        await close_quietly(channel)
        await verify_topology(connection, self.retry_delays, vhost_of(self._url))
        self.passive = True
        return await connection.channel(publisher_confirms=False)

    def _on_connection_lost(self, sender: object, exc: BaseException | None) -> None:
        # The robust connection calls this when the connection drops and again
        # for every failed attempt to reconnect.
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return
        self.went_down("consuming", refusals.loss_reason(exc))

    def _on_reconnected(self, sender: object) -> None:
        self.came_back("consuming")

    def went_down(self, which: str, reason: str) -> None:
        """One of the two connections is lost, or failed to come back: one line when the
        first goes, and every failed attempt at DEBUG."""
        if self._down:
            log.debug("still no broker connection (%s); retrying", reason)
        else:
            log.warning("lost the broker connection (%s); reconnecting", reason)
        self._down.add(which)

    def came_back(self, which: str) -> None:
        """One of the two connections is back: one line when both are."""
        if which not in self._down:
            return
        self._down.discard(which)
        if not self._down:
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
                reply = refusals.closed_by_broker(exc)
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
        if self._publisher is not None:
            await self._publisher.close()
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._publisher = None

    @metrics.count_publishes
    async def publish(self, event: Event) -> None:
        """Publish ``event`` on the exchange and wait for the broker's confirm; events
        published at about the same time travel together (``coalesce``).

        Raises ``BrokerUnavailable`` when not connected, or when the broker
        nacks the message, cannot route it, or refuses it (the broker user may
        not publish this routing key): the message was not taken. Raises
        ``PublishOutcomeUnknown`` (a ``BrokerUnavailable``) when the confirm does
        not come in time or the connection drops while waiting: it may have been.
        """
        if self._publisher is None:
            raise BrokerUnavailable(NOT_CONNECTED)
        with tracing.span(
            f"publish {event.routing_key}",
            SpanKind.PRODUCER,
            attributes={
                **_MESSAGING_ATTRIBUTES,
                "messaging.destination.name": EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": event.routing_key,
                "messaging.message.id": str(event.event_id),
                "messaging.message.conversation_id": str(event.job_id),
            },
        ):
            headers: HeadersType = {}
            tracing.inject(headers)
            item = Item(event, event.model_dump_json().encode(), headers)
            if self._coalescer is None:
                await self._publish_items(event.routing_key, [item])
            else:
                await self._coalescer.submit(event.routing_key, item)

    async def _publish_items(self, routing_key: str, items: list[Item]) -> None:
        """Publish the events of ``items`` (one routing key) as one message, confirmed."""
        done = asyncio.get_running_loop().create_future()
        self._start_items(routing_key, items, partial(resolve, done))
        await done

    def _start_items(self, routing_key: str, items: list[Item], settle: Settle) -> None:
        """Send the events of ``items`` (one routing key) as one message; ``settle`` hears
        how it went (``_start``)."""
        if len(items) == 1:
            [item] = items
            message = event_message(item.event, self.app_id, item.trace, item.body)
        else:
            message = bundle.bundle_message(
                [item.body for item in items],
                [item.trace for item in items],
                items[0].event.event_type,
                self.app_id,
            )
        event_type = items[0].event.event_type

        def counted(outcome: BaseException | None) -> None:
            if outcome is None:
                metrics.MESSAGES_PUBLISHED.labels(event_type).inc()
            settle(outcome)

        self._start(EXCHANGE, message, routing_key, routing_key in _QUEUES_BY_KEY, counted)

    async def send_to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Put ``message`` into one of the stages' queues, by name, confirmed."""
        done = asyncio.get_running_loop().create_future()
        self._start(QUEUE_EXCHANGE, message, queue, True, partial(resolve, done))
        await done

    def _start(
        self,
        exchange: str,
        message: aio_pika.Message,
        routing_key: str,
        mandatory: bool,
        settle: Settle,
    ) -> None:
        """Send ``message``; ``settle`` is called once, with None when the broker has
        confirmed it, ``BrokerUnavailable`` when it did not take it, or
        ``PublishOutcomeUnknown`` when it may have. Raises ``BrokerUnavailable``,
        having sent nothing, when it cannot be sent now."""
        if self._publisher is None:
            raise BrokerUnavailable(NOT_CONNECTED)

        def settled(outcome: BaseException | None) -> None:
            settle(
                None
                if outcome is None
                else publish_failure(outcome, exchange, routing_key, self._publish_timeout)
            )

        try:
            self._publisher.publish(
                exchange,
                routing_key,
                message.body,
                message.properties,
                mandatory=mandatory,
                timeout=self._publish_timeout,
                settle=settled,
            )
        except NotSent as exc:
            raise BrokerUnavailable(str(exc)) from exc

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
        """Start consuming ``stage``'s work queue with manual acks and a bounded prefetch,
        which also bounds the events handled at once (a bundle carries many).

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
                concurrency=prefetch,
                handled_level=handled_level,
            )
            await consumer.start()
        except BaseException:
            # Closed by us, the robust connection stops restoring it.
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        return consumer


def publish_failure(
    outcome: BaseException, exchange: str, routing_key: str, timeout: float
) -> Exception:
    """What a failed publish means to its caller: ``BrokerUnavailable`` when the broker
    did not take the message, ``PublishOutcomeUnknown`` when it may have."""
    if isinstance(outcome, Unroutable):
        failure: Exception = BrokerUnavailable(f"no queue is bound to routing key {routing_key!r}")
    elif isinstance(outcome, Nacked) and _QUEUES_BY_KEY.get(routing_key, 1) > 1:
        # One of its queues refused it; another may have taken it.
        failure = PublishOutcomeUnknown(
            "the broker refused the message for one of its queues (nack)"
        )
    elif isinstance(outcome, Nacked):
        failure = BrokerUnavailable("the broker refused the message (nack)")
    elif isinstance(outcome, ChannelClosed) and not outcome.outcome_known:
        failure = PublishOutcomeUnknown(
            f"the broker closed the publishing channel while this message awaited "
            f"its confirm ({outcome.reply_text})"
        )
    elif isinstance(outcome, ChannelClosed) and outcome.reply_code == ACCESS_REFUSED:
        failure = BrokerUnavailable(
            f"the broker refused to let this service publish to {exchange!r} "
            f"with routing key {routing_key!r} ({outcome.reply_text})"
        )
    elif isinstance(outcome, ChannelClosed):
        failure = BrokerUnavailable(f"the broker refused the message ({outcome.reply_text})")
    elif isinstance(outcome, ConfirmTimeout):
        failure = PublishOutcomeUnknown(
            f"the broker did not confirm the message within {timeout:g} s"
        )
    elif isinstance(outcome, ConnectionLost):
        # The message may have left before the connection went.
        failure = PublishOutcomeUnknown(f"lost the broker connection while publishing ({outcome})")
    elif isinstance(outcome, PublishFailed) and outcome.outcome_known:
        failure = BrokerUnavailable(str(outcome))
    else:
        failure = PublishOutcomeUnknown(f"publishing failed ({outcome!r})")
    failure.__cause__ = outcome
    return failure
