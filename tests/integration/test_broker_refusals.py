"""Refusals no retry can fix are configuration errors; the rest is retried.

Each refusal is provoked for real on the test broker: a vhost that does not
exist, a user without permissions on the vhost or on its queue, a wrong
password, queues and an exchange declared before with other arguments. The
messaging layer must stop at once with ``BrokerRefused`` quoting the broker;
a connection limit, which frees up by itself, and an unreachable broker are
retried.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from pipeline_shared.definitions import HASHING_ALGORITHM, hash_password
from pipeline_shared.errors import BrokerRefused
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker
from pipeline_shared.topology import DELIVERY_LIMIT, EXCHANGE, PROCESSOR
from pipeline_shared.worker import serve_stage
from support.broker_users import amqp_url
from support.rabbit import Management, new_vhost_name, url_for_vhost
from support.services import free_port
from support.tcp_proxy import TcpProxy
from support.waiting import async_wait_for

# A configuration error is reported at the first attempt; a retry would come
# within the first delay, so a refusal still pending after this was retried.
DEADLINE = 10.0


@pytest.fixture
def user(management: Management) -> Iterator[tuple[str, str]]:
    """A broker user of the test's own, with no permissions anywhere (yet)."""
    name, password = f"refusals-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(12)
    management.create_user(name, hash_password(password), HASHING_ALGORITHM)
    yield name, password
    management.delete_user(name)


async def refusal(url: str) -> BrokerRefused:
    """What ``connect_until_ready`` raises for ``url``; fails if it keeps retrying."""
    broker = Broker(url, app_id="processor-service", publish_timeout=5)
    try:
        with pytest.raises(BrokerRefused) as refused:
            await asyncio.wait_for(broker.connect_until_ready(first_delay=0.05), DEADLINE)
    finally:
        await broker.close()
    assert not broker.is_ready
    return refused.value


def retries(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeline.messaging" and r.levelno == logging.WARNING and words in r.message
    ]


# --- refused connections ------------------------------------------------------------------------


async def test_a_vhost_that_does_not_exist_is_a_configuration_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = new_vhost_name("missing")
    refused = await refusal(url_for_vhost(missing))
    assert refused.reply_text == f"NOT_ALLOWED - vhost {missing} not found"
    assert str(refused).startswith(f"the broker refused to open vhost '{missing}'")
    assert "create the vhost" in refused.remedy
    assert "RABBITMQ_URL" in refused.remedy
    assert retries(caplog, "retrying") == []


async def test_a_user_without_permissions_on_the_vhost_is_a_configuration_error(
    user: tuple[str, str], vhost: str
) -> None:
    name, password = user
    refused = await refusal(amqp_url(name, password, vhost))
    assert (
        refused.reply_text == f"NOT_ALLOWED - access to vhost '{vhost}' refused for user '{name}'"
    )
    assert f"grant the user '{name}' permissions on the vhost '{vhost}'" in refused.remedy


async def test_a_wrong_password_is_a_configuration_error_and_the_password_is_not_shown(
    user: tuple[str, str], vhost: str, management: Management
) -> None:
    name, _ = user
    management.set_permissions(vhost, name, ".*", ".*", ".*")
    refused = await refusal(amqp_url(name, "not-the-password", vhost))
    assert refused.reply_text.startswith("ACCESS_REFUSED - Login was refused")
    assert f"the login of user '{name}'" in str(refused)
    assert "password in RABBITMQ_URL" in refused.remedy
    assert "configuration error" in refused.remedy
    assert "not-the-password" not in str(refused)


# --- queues and exchanges declared with other arguments ------------------------------------------


async def predeclare(broker_url: str, declare: Any) -> None:
    connection = await aio_pika.connect_robust(broker_url)
    try:
        await declare(await connection.channel())
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("arguments", "inequivalent"),
    [
        # A classic queue: the broker names the first argument that differs.
        ({}, "[^']+"),
        (
            {**PROCESSOR.queue_arguments(), "x-delivery-limit": DELIVERY_LIMIT + 5},
            "x-delivery-limit",
        ),
    ],
    ids=["classic", "other-delivery-limit"],
)
async def test_a_queue_declared_with_other_arguments_is_a_configuration_error(
    arguments: dict[str, Any], inequivalent: str, broker_url: str, vhost: str
) -> None:
    await predeclare(
        broker_url,
        lambda channel: channel.declare_queue(PROCESSOR.queue, durable=True, arguments=arguments),
    )
    refused = await refusal(broker_url)
    assert re.match(
        f"PRECONDITION_FAILED - inequivalent arg '{inequivalent}' "
        f"for queue '{re.escape(PROCESSOR.queue)}' in vhost '{vhost}': received ",
        refused.reply_text,
    ), refused.reply_text
    assert str(refused).startswith(f"the broker refused to declare queue '{PROCESSOR.queue}'")
    assert f"delete the queue '{PROCESSOR.queue}'" in refused.remedy
    assert "make its arguments match" in refused.remedy


async def test_an_exchange_of_another_type_is_a_configuration_error(broker_url: str) -> None:
    await predeclare(
        broker_url,
        lambda channel: channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        ),
    )
    refused = await refusal(broker_url)
    assert refused.reply_text.startswith(
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{EXCHANGE}'"
    )
    assert f"delete the exchange '{EXCHANGE}'" in refused.remedy


# --- a user refused its queue ---------------------------------------------------------------------


async def test_a_worker_refused_its_queue_stops_with_one_line_saying_what_to_grant(
    user: tuple[str, str], broker_url: str, vhost: str, management: Management
) -> None:
    # The topology is there (declared by the test's administrator); the user
    # may check it passively but read no queue.
    admin = Broker(broker_url, app_id="admin")
    await admin.connect()
    await admin.close()
    name, password = user
    management.set_permissions(vhost, name, "^$", "^$", "^$")

    async def handler(event: JobRequested) -> None:
        raise AssertionError("nothing may be consumed")

    broker = Broker(amqp_url(name, password, vhost), app_id="processor-service")
    # Not in a task of its own: asyncio lets a SystemExit in a task escape the loop.
    with pytest.raises(SystemExit) as stopped:
        async with asyncio.timeout(DEADLINE):
            await serve_stage(
                broker,
                PROCESSOR,
                JobRequested,
                handler,
                prefetch=1,
                max_event_bytes=1024,
                shutdown_timeout=1,
                stop=asyncio.Event(),
            )
    line = str(stopped.value.code)
    assert line.startswith(
        f"processor-service: the broker refused to let it consume '{PROCESSOR.queue}'"
    )
    assert f"ACCESS_REFUSED - access to queue '{PROCESSOR.queue}' in vhost '{vhost}'" in line
    assert f"grant the user '{name}' read permission on the queue" in line
    assert "\n" not in line


# --- what is still retried ------------------------------------------------------------------------


async def test_a_connection_limit_is_retried_with_the_brokers_words_until_it_is_lifted(
    broker_url: str, vhost: str, management: Management, caplog: pytest.LogCaptureFixture
) -> None:
    # Connections free up by themselves, so a reached limit is not a
    # configuration error.
    quoted = vhost.replace("/", "%2F")
    management.client.put(
        f"/api/vhost-limits/{quoted}/max-connections", json={"value": 0}
    ).raise_for_status()
    broker = Broker(broker_url, app_id="processor-service")
    caplog.set_level(logging.WARNING, logger="pipeline.messaging")
    connecting = asyncio.create_task(broker.connect_until_ready(first_delay=0.05, max_delay=0.1))
    try:

        async def retried_twice() -> bool:
            assert not connecting.done(), connecting.exception()
            return len(retries(caplog, "closed the connection")) >= 2

        await async_wait_for(retried_twice, timeout=DEADLINE, what="two retries")
        assert "connection limit (0) is reached" in retries(caplog, "closed the connection")[0]
        management.client.delete(f"/api/vhost-limits/{quoted}/max-connections").raise_for_status()
        await asyncio.wait_for(connecting, DEADLINE)
        assert broker.is_ready
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await broker.close()


async def test_an_unreachable_broker_is_retried_until_it_answers(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Kept behaviour, next to the refusals: no broker at all is a passing outage.
    target = urlsplit(broker_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672, free_port())
    through_proxy = target._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    broker = Broker(through_proxy, app_id="processor-service")
    caplog.set_level(logging.WARNING, logger="pipeline.messaging")
    connecting = asyncio.create_task(broker.connect_until_ready(first_delay=0.05, max_delay=0.1))
    try:

        async def retried_twice() -> bool:
            assert not connecting.done(), connecting.exception()
            return len(retries(caplog, "not reachable")) >= 2

        await async_wait_for(retried_twice, timeout=DEADLINE, what="two retries")
        proxy.open()
        await asyncio.wait_for(connecting, DEADLINE)
        assert broker.is_ready
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await broker.close()
        proxy.close()
