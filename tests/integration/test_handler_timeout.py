"""A handler that hangs cannot hold its message: it is cancelled and retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pipeline_shared.messaging import Broker, delivery_attempt
from pipeline_shared.topology import PROCESSOR
from unit.fakes import job_requested


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    broker = Broker(broker_url, app_id="test-service", retry_delays=(0.1, 0.2), publish_timeout=5)
    await broker.connect()
    yield broker
    await broker.close()


async def test_a_hung_handler_is_cancelled_after_the_timeout_and_its_message_retried(
    broker: Broker,
) -> None:
    attempts: list[int] = []
    cancelled = asyncio.Event()
    done = asyncio.Event()

    async def handler(event: object) -> None:
        attempts.append(delivery_attempt.get())
        if len(attempts) == 1:
            try:
                await asyncio.Event().wait()  # hangs, as a stuck step would
            except asyncio.CancelledError:
                cancelled.set()
                raise
        done.set()

    consumer = await broker.consume(
        PROCESSOR, type(job_requested()), handler, prefetch=4, handler_timeout=0.3
    )
    await broker.publish(job_requested())
    await asyncio.wait_for(done.wait(), 15)
    await consumer.stop(5)

    assert cancelled.is_set()
    assert attempts == [1, 2]
