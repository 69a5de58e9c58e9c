"""Looking at queues from outside the services, for the messaging tests."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pipeline_shared.topology import EXCHANGE
from support.waiting import async_wait_for


async def get(channel: AbstractChannel, queue: str, timeout: float = 10) -> AbstractIncomingMessage:
    """The next message in ``queue``, acked; fails if none comes within ``timeout``."""
    declared = await channel.get_queue(queue, ensure=True)

    async def probe() -> AbstractIncomingMessage | None:
        return await declared.get(no_ack=True, fail=False)

    return await async_wait_for(probe, timeout=timeout, what=f"a message in {queue}")


async def take_all(channel: AbstractChannel, queue: str) -> list[AbstractIncomingMessage]:
    """Every message ``queue`` holds now, taken off it."""
    declared = await channel.get_queue(queue, ensure=True)
    messages = []
    while (message := await declared.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


async def bind_probe(channel: AbstractChannel, routing_key: str) -> str:
    """A temporary queue receiving ``routing_key`` events, to watch what is published."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(EXCHANGE, routing_key)
    return queue.name
