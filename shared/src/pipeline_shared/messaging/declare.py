"""Declaring the pipeline's exchanges and queues, or checking that they exist."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
)
from aiormq.exceptions import ChannelPreconditionFailed

from pipeline_shared.errors import BrokerRefused, TopologyMissing
from pipeline_shared.messaging.refusals import reply_text
from pipeline_shared.topology import (
    EXCHANGE,
    QUEUE_EXCHANGE,
    RETIRED_BINDINGS,
    STAGES,
    stage_queues,
)


async def declare_topology(channel: AbstractChannel, retry_delays: Sequence[float]) -> None:
    """Declare both exchanges and every stage's queues and bindings, and remove the
    bindings earlier versions declared and this one does not (idempotent).

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
    for name, routing_key in RETIRED_BINDINGS:
        # Unbinding what is not bound is no error: this is a no-op once done.
        queue = await channel.get_queue(name, ensure=False)
        await queue.unbind(exchange, routing_key)


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
        raise BrokerRefused(f"to declare {kind} {name!r}", reply_text(exc), remedy) from exc


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
                await close_quietly(channel)
                channel = await connection.channel(publisher_confirms=False)
    finally:
        await close_quietly(channel)
    if missing:
        raise TopologyMissing(missing, vhost)


async def close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS):
        pass
