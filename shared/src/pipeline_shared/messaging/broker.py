"""``Broker``: one service's connection to RabbitMQ, its publishing, and the consumers it starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused
from opentelemetry.trace import SpanKind
from pydantic import TypeAdapter

from pipeline_shared import metrics, tracing
from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.events import Event
from pipeline_shared.messaging import bundle, refusals
from pipeline_shared.messaging.coalesce import Coalescer, Item
from pipeline_shared.messaging.consumer import Consumer
from pipeline_shared.messaging.declare import close_quietly, declare_topology, verify_topology
from pipeline_shared.messaging.handling import E, Handler
from pipeline_shared.messaging.policy import DEFAULT_RETRY_DELAYS
from pipeline_shared.messaging.wire import DEFAULT_MAX_EVENT_BYTES, event_message
from pipeline_shared.settings import DEFAULT_BUNDLE_EVENTS, PipelineSettings, redact_url
from pipeline_shared.topology import EXCHANGE, QUEUE_EXCHANGE, STAGES, Stage

log = logging.getLogger("pipeline.messaging")

# Bundles awaiting their confirm per routing key before the next one waits to fill.
BUNDLES_IN_FLIGHT = 2

# Routing keys some queue is bound to: publishing to one of them must reach a
# queue (mandatory). Other events are notifications that may have no listener.
_BOUND_ROUTING_KEYS = frozenset(key for stage in STAGES.values() for key in stage.routing_keys)
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
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._queue_exchange: AbstractExchange | None = None
        self.passive = False
        """Whether the broker user may not configure, so the topology is only
        checked (``verify_topology``), never declared; set by ``connect``."""
        self._lost = False
        self.user = unquote(urlsplit(url).username or "guest")
        self.vhost = vhost_of(url)
        self._coalescer = (
            Coalescer(
                self._publish_items,
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
        await close_quietly(channel)
        await verify_topology(connection, self.retry_delays, vhost_of(self._url))
        self.passive = True
        return await connection.channel(publisher_confirms=True, on_return_raises=True)

    def _on_connection_lost(self, sender: object, exc: BaseException | None) -> None:
        # The robust connection calls this when the connection drops and again
        # for every failed attempt to reconnect: one line for the loss, and
        # the attempts at DEBUG.
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return
        if self._lost:
            log.debug("still no broker connection (%s); retrying", refusals.loss_reason(exc))
            return
        self._lost = True
        log.warning("lost the broker connection (%s); reconnecting", refusals.loss_reason(exc))

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
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._exchange = self._queue_exchange = None

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
        if self._exchange is None:
            raise BrokerUnavailable("not connected to the message broker")
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
        if self._exchange is None:
            raise BrokerUnavailable("not connected to the message broker")
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
        await self._publish(
            self._exchange, message, routing_key, routing_key in _BOUND_ROUTING_KEYS
        )
        metrics.MESSAGES_PUBLISHED.labels(items[0].event.event_type).inc()

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
            assert self._channel is not None  # is_ready
            channel = await self._channel.get_underlay_channel()
            assert isinstance(channel, aiormq.Channel)  # whose basic_publish takes ``wait``
            # aio-pika's Exchange.publish, but without waiting for the frame to be
            # written out: aiormq holds the channel's lock until then, which let one
            # publish at a time through. The broker's confirm is still awaited.
            await channel.basic_publish(
                message.body,
                exchange=exchange.name,
                routing_key=routing_key,
                properties=message.properties,
                mandatory=mandatory,
                timeout=self._publish_timeout,
                wait=False,
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
                f"with routing key {routing_key!r} ({refusals.reply_text(exc)})"
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
