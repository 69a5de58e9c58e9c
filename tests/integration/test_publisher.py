"""The publishing connection against the real RabbitMQ: confirms, refusals, losses.

``Publisher`` and ``PublishConnection`` speak AMQP 0-9-1 themselves (see
``pipeline_shared.messaging.publish_connection``); these tests hold them to what
the broker really says. A TCP proxy of the test's own stands between them and
the broker where a connection must be lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import pytest
import uvloop
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from pipeline_shared.messaging.publish_connection import (
    BrokerClosed,
    ChannelClosed,
    ConnectionLost,
    Endpoint,
    NotSent,
    PublishConnection,
    PublishFailed,
    Unroutable,
    client_properties,
)
from pipeline_shared.messaging.publisher import Publisher
from support.rabbit import Management
from support.tcp_proxy import TcpProxy
from support.waiting import async_wait_for

QUEUE = "publisher-test"


@pytest.fixture
async def looking(broker_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel of the test's own, with a quorum queue to publish into."""
    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    yield channel
    await connection.close()


def through(proxy: TcpProxy, broker_url: str, query: str = "") -> str:
    return (
        urlsplit(broker_url)
        ._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}", query=query)
        .geturl()
    )


class Reports:
    """A ``Reporter`` that keeps what it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, str]] = []

    def went_down(self, which: str, reason: str) -> None:
        self.heard.append(("down", reason))

    def came_back(self, which: str) -> None:
        self.heard.append(("back", which))


async def connect(url: str) -> PublishConnection:
    return await PublishConnection.connect(Endpoint.from_url(url), client_properties("test"), 5)


def send(
    connection: PublishConnection | Publisher,
    routing_key: str = QUEUE,
    *,
    exchange: str = "",
    body: bytes = b"{}",
    message_id: str = "m",
) -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(outcome: BaseException | None) -> None:
        if outcome is None:
            done.set_result(None)
        else:
            done.set_exception(outcome)

    connection.publish(
        exchange,
        routing_key,
        body,
        Basic.Properties(message_id=message_id, delivery_mode=2),
        mandatory=True,
        timeout=5,
        settle=settle,
    )
    return done


async def ready_in(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def test_many_publishes_in_flight_are_each_confirmed_and_in_the_queue(
    broker_url: str, looking: AbstractChannel
) -> None:
    connection = await connect(broker_url)
    # A third over a frame (128 KiB), each split across several; 10 MB in all.
    bodies = [f'{{"n": {n:06}}}'.encode() * (1 + (n % 3) * 5000) for n in range(150)]
    await asyncio.wait_for(
        asyncio.gather(
            *(send(connection, body=b, message_id=str(n)) for n, b in enumerate(bodies))
        ),
        30,
    )
    await connection.close()
    assert connection.lost.done()

    queue = await looking.declare_queue(QUEUE, passive=True)
    got = []
    async with queue.iterator() as messages:
        async for message in messages:
            got.append(message.body)
            await message.ack()
            if len(got) == len(bodies):
                break
    assert got == bodies  # whole, in order, the large ones across several frames


async def test_a_mandatory_message_no_queue_takes_is_unroutable_and_the_next_one_goes(
    broker_url: str, looking: AbstractChannel
) -> None:
    connection = await connect(broker_url)
    with pytest.raises(Unroutable, match="NO_ROUTE"):
        await asyncio.wait_for(send(connection, "no-such-queue", message_id="lost"), 5)
    await asyncio.wait_for(send(connection), 5)
    assert await ready_in(looking, QUEUE) == 1
    await connection.close()


async def test_an_exchange_that_does_not_exist_closes_the_channel_which_opens_again(
    broker_url: str, looking: AbstractChannel
) -> None:
    connection = await connect(broker_url)
    with pytest.raises(ChannelClosed) as refused:
        await asyncio.wait_for(send(connection, exchange="no-such-exchange"), 5)
    assert refused.value.reply_code == 404
    assert "no-such-exchange" in refused.value.reply_text

    async def reopened() -> bool:
        return connection.ready

    await async_wait_for(reopened, timeout=5, what="the channel to reopen")
    await asyncio.wait_for(send(connection), 5)
    assert await ready_in(looking, QUEUE) == 1
    await connection.close()


def publish_many(connection: PublishConnection, count: int) -> list[BaseException | None]:
    """``count`` small persistent messages to the queue, not awaited; their outcomes."""
    outcomes: list[BaseException | None] = []
    for n in range(count):
        connection.publish(
            "",
            QUEUE,
            b"{}",
            Basic.Properties(message_id=str(n), delivery_mode=2),
            mandatory=True,
            timeout=10,
            settle=outcomes.append,
        )
    return outcomes


async def channel_closed_under_many_publishes(broker_url: str) -> None:
    async with await aio_pika.connect(broker_url) as looking_connection:
        looking = await looking_connection.channel()
        await looking.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        connection = await connect(broker_url)
        outcomes = publish_many(connection, 2000)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(send(connection, exchange="no-such-exchange"), 10)

        async def all_settled() -> bool:
            return len(outcomes) == 2000

        await async_wait_for(all_settled, timeout=10, what="every publish to settle")
        taken = await ready_in(looking, QUEUE)
        # What the broker took was confirmed or is of unknown outcome: never refused.
        refused = [o for o in outcomes if isinstance(o, PublishFailed) and o.outcome_known]
        assert refused == []
        assert sum(o is None for o in outcomes) <= taken <= 2000
        await connection.close()


async def closing_right_after_many_publishes(broker_url: str) -> None:
    async with await aio_pika.connect(broker_url) as looking_connection:
        looking = await looking_connection.channel()
        await looking.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        connection = await connect(broker_url)
        outcomes = publish_many(connection, 2000)
        await connection.close(within=10)
        # Closing waited for every confirm: nothing left unknown.
        assert outcomes == [None] * 2000
        assert await ready_in(looking, QUEUE) == 2000


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "scenario", [channel_closed_under_many_publishes, closing_right_after_many_publishes]
)
def test_outcomes_hold_on_both_event_loops(scenario: Any, loop: str, broker_url: str) -> None:
    # The services run on uvloop, whose transports and timing differ from asyncio's.
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(broker_url), 60))


async def test_a_refused_login_is_the_brokers_words(broker_url: str) -> None:
    wrong = urlsplit(broker_url)._replace(netloc="guest:wrong@127.0.0.1:5672").geturl()
    with pytest.raises(BrokerClosed, match="ACCESS_REFUSED"):
        await connect(wrong)


async def test_a_vhost_that_does_not_exist_is_the_brokers_words(broker_url: str) -> None:
    missing = urlsplit(broker_url)._replace(path="/no-such-vhost-here").geturl()
    with pytest.raises(BrokerClosed, match="NOT_ALLOWED"):
        await connect(missing)


async def test_a_connection_cut_while_confirms_are_awaited_leaves_their_outcome_unknown(
    broker_url: str, proxy: TcpProxy, looking: AbstractChannel
) -> None:
    connection = await connect(through(proxy, broker_url))
    proxy.cut_after_next_publish()
    with pytest.raises(ConnectionLost) as lost:
        await asyncio.wait_for(send(connection), 10)
    assert not lost.value.outcome_known
    # It was taken: which is why its outcome is unknown, not a refusal.
    assert await ready_in(looking, QUEUE) == 1
    with pytest.raises(NotSent):
        send(connection)


async def test_the_publisher_reconnects_after_the_broker_closes_it_and_says_so_once_each(
    broker_url: str, vhost: str, management: Management, looking: AbstractChannel
) -> None:
    reports = Reports()
    publisher = Publisher(
        f"{broker_url}?reconnect_interval=0.1",
        client_properties=client_properties(f"publisher-test-{vhost}"),
        connect_timeout=5,
        reporter=reports,
    )
    await publisher.open()
    await asyncio.wait_for(send(publisher), 5)

    def named() -> list[str]:
        connections = management.client.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
        return [
            c["name"]
            for c in connections.json()
            if c.get("client_properties", {}).get("connection_name") == f"publisher-test-{vhost}"
        ]

    deadline = time.monotonic() + 10
    while not (names := named()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    [name] = names
    management.client.delete(
        f"/api/connections/{quote(name, safe='')}", headers={"X-Reason": "test outage"}
    ).raise_for_status()

    async def back() -> bool:
        return ("back", "publishing") in reports.heard

    await async_wait_for(back, timeout=10, what="the publisher to reconnect")
    assert reports.heard == [
        ("down", "ConnectionClosed: CONNECTION_FORCED - test outage"),
        ("back", "publishing"),
    ]
    await asyncio.wait_for(send(publisher), 5)
    assert await ready_in(looking, QUEUE) == 2
    await publisher.close()
    assert not publisher.ready


async def test_a_publisher_whose_broker_is_away_refuses_at_once_and_retries_until_it_is_back(
    broker_url: str, proxy: TcpProxy, looking: AbstractChannel
) -> None:
    reports = Reports()
    publisher = Publisher(
        through(proxy, broker_url, "reconnect_interval=0.1"),
        client_properties=client_properties("test"),
        connect_timeout=1,
        reporter=reports,
    )
    await publisher.open()
    proxy.cut()

    async def down_a_while() -> bool:
        return len(reports.heard) >= 3  # the loss, and failed attempts to come back

    await async_wait_for(down_a_while, timeout=10, what="attempts to reconnect")
    assert not publisher.ready
    with pytest.raises(NotSent, match="not connected"):
        send(publisher)
    proxy.open()

    async def back() -> bool:
        return publisher.ready

    await async_wait_for(back, timeout=10, what="the publisher to reconnect")
    assert reports.heard[-1] == ("back", "publishing")
    assert all(kind == "down" for kind, _ in reports.heard[:-1])
    await asyncio.wait_for(send(publisher), 5)
    await publisher.close()
