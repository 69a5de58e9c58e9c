"""Acks written many at a time, against the real broker: nothing is left unacked or
acked twice, and a slow handler does not hold the acks of the messages after it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiormq
import pytest

from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker
from pipeline_shared.topology import PROCESSOR

pytestmark = pytest.mark.integration


def job(n: int) -> JobRequested:
    return JobRequested(job_id=uuid.uuid4(), email="ada@example.com", data={"n": n})


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    broker = Broker(broker_url, app_id="test-service", publish_timeout=5)
    await broker.connect()
    yield broker
    await broker.close()


async def ready_and_consumers(broker_url: str) -> tuple[int, int]:
    """Messages ready in the processor's queue and its consumers, from a passive
    declare on a connection of the test's own. Once the consumer stopped, a message
    it had not acked is ready again."""
    connection = await aiormq.connect(broker_url)
    try:
        channel = await connection.channel()
        declared = await channel.queue_declare(PROCESSOR.queue, passive=True)
        assert declared.message_count is not None
        assert declared.consumer_count is not None
        return declared.message_count, declared.consumer_count
    finally:
        await connection.close()


async def test_a_burst_is_acked_in_fewer_frames_than_messages_and_nothing_stays_unacked(
    broker: Broker, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames: list[tuple[int, bool]] = []
    original = aiormq.Channel.basic_ack

    async def counted(self: aiormq.Channel, delivery_tag: int, multiple: bool = False) -> None:
        frames.append((delivery_tag, multiple))
        await original(self, delivery_tag, multiple)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    count = 300
    handled: list[int] = []

    async def handler(event: JobRequested) -> None:
        handled.append(int(event.data["n"]))  # type: ignore[call-overload]

    for n in range(count):
        await broker.publish(job(n))
    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=100)
    deadline = asyncio.get_running_loop().time() + 30
    while len(handled) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await consumer.stop(5)  # waits for the handlers, which wait for their acks

    # Each handled once: a delivery settled twice closes the channel, and the
    # broker then delivers again what the channel held.
    assert sorted(handled) == list(range(count))
    assert await ready_and_consumers(broker_url) == (0, 0)
    assert len(frames) < count * 0.8, f"{len(frames)} ack frames for {count} messages"
    assert any(multiple for _, multiple in frames)


async def test_a_slow_handler_does_not_hold_the_acks_of_the_messages_after_it(
    broker: Broker, broker_url: str
) -> None:
    # With a prefetch of 3, the broker sends message 4 only once one of the first
    # three is acked: if the slow first one held the acks of the next two, the
    # rest would never arrive and the first would wait for them forever.
    count = 10
    others_done = asyncio.Event()
    handled: list[int] = []

    async def handler(event: JobRequested) -> None:
        n = int(event.data["n"])  # type: ignore[call-overload]
        if n == 0:
            await asyncio.wait_for(others_done.wait(), 20)
        handled.append(n)
        if len(handled) == count - 1 and 0 not in handled:
            others_done.set()

    for n in range(count):
        await broker.publish(job(n))
    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=3)
    deadline = asyncio.get_running_loop().time() + 25
    while len(handled) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await consumer.stop(5)

    assert sorted(handled) == list(range(count))
    assert handled[-1] == 0
    assert await ready_and_consumers(broker_url) == (0, 0)
