"""Fixtures of the messaging tests: a service's broker, and a channel to look from."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from pipeline_shared.messaging import Broker

FAST_RETRIES = (0.1, 0.2)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    """A service's broker, connected, with retry delays short enough for a test (modules
    that need another define their own ``broker``)."""
    broker = Broker(broker_url, app_id="test-service", retry_delays=FAST_RETRIES, publish_timeout=5)
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
async def channel(broker: Broker, broker_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain channel of the test's own, to look at queues from outside."""
    connection = await aio_pika.connect_robust(broker_url)
    yield await connection.channel()
    await connection.close()
