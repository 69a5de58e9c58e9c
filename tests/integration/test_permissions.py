"""Each service's least-privilege broker user, against the real RabbitMQ.

The test's vhost gets the topology of rabbitmq/definitions.json, loaded as the
broker loads it at boot, and the file's service users (with test-unique
names) get the file's permissions on it. The services then run as those users:
they find the topology passively, publish their own events and consume their
own queue, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from pipeline_shared.errors import (
    BrokerRefused,
    BrokerUnavailable,
    PermanentFailure,
    TopologyMissing,
    TransientFailure,
)
from pipeline_shared.events import DataProcessed, EmailSent, Event, JobFailed, JobRequested
from pipeline_shared.messaging import DEFAULT_RETRY_DELAYS, Broker, copy_message
from pipeline_shared.topology import EXCHANGE, MAILER, PROCESSOR, QUEUE_EXCHANGE, STATUS, Stage
from support.broker_users import (
    ServiceUsers,
    amqp_url,
    committed_definitions,
    service_user_names,
    topology_of,
)
from support.rabbit import Management, new_vhost_name
from support.waiting import async_wait_for

API, STATUS_USER = "api-service", "status-service"
PROCESSOR_USER, MAILER_USER = "processor-service", "mailer-service"


def job_requested() -> JobRequested:
    return JobRequested(
        job_id=uuid.uuid4(), email="ada@example.com", data={"n": 1}, submitted_by="key-ada"
    )


def data_processed() -> DataProcessed:
    return DataProcessed(
        job_id=uuid.uuid4(), email="ada@example.com", step="echo", data={}, result={"n": 1}
    )


def email_sent() -> EmailSent:
    return EmailSent(job_id=uuid.uuid4(), email="ada@example.com", transport="outbox")


def job_failed() -> JobFailed:
    return JobFailed(job_id=uuid.uuid4(), stage="x", reason="r", error_type="PermanentFailure")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return committed_definitions()


@pytest.fixture
def users(management: Management, definitions: dict[str, Any]) -> Iterator[ServiceUsers]:
    created = ServiceUsers.create(management, definitions)
    yield created
    created.delete()


@pytest.fixture
def topology_vhost(
    vhost: str, management: Management, definitions: dict[str, Any], users: ServiceUsers
) -> str:
    """The test's vhost with the file's topology loaded and the users granted on it."""
    management.load_definitions(vhost, topology_of(definitions))
    users.grant(vhost)
    return vhost


@pytest.fixture
def bare_vhost(management: Management, users: ServiceUsers) -> Iterator[str]:
    """A second vhost, without the topology, where the users have their permissions."""
    name = new_vhost_name("bare")
    management.create_vhost(name)
    users.grant(name)
    yield name
    management.delete_vhost(name)


@pytest.fixture
async def brokers(topology_vhost: str, users: ServiceUsers) -> AsyncIterator[dict[str, Broker]]:
    """A connected ``Broker`` per service, each logged in as the service's user."""
    made: dict[str, Broker] = {}
    try:
        for service in users.names:
            broker = Broker(users.url(service, topology_vhost), app_id=service, publish_timeout=5)
            await broker.connect()
            made[service] = broker
        yield made
    finally:
        for broker in made.values():
            await broker.close()


@pytest.fixture
async def admin_channel(broker_url: str, topology_vhost: str) -> AsyncIterator[AbstractChannel]:
    """A channel of the test's administrator, to look at queues from outside."""
    connection: AbstractRobustConnection = await aio_pika.connect_robust(broker_url)
    yield await connection.channel()
    await connection.close()


async def ignore(message: AbstractIncomingMessage) -> None:
    pass


async def ready(broker: Broker) -> None:
    """Wait for the broker's publishing channel, which the broker closes on a refusal."""

    async def is_ready() -> bool:
        return broker.is_ready

    await async_wait_for(is_ready, timeout=10, what=f"{broker.app_id}'s channel to reopen")


async def connect_as(url: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url)


async def ready_count(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue`` now (the management API's figures lag)."""
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue, passive=True)
    return declared.message_count or 0


async def take(
    channel: AbstractChannel, queue: str, timeout: float = 10
) -> aio_pika.IncomingMessage:
    declared = await channel.get_queue(queue, ensure=True)

    async def probe() -> Any:
        return await declared.get(no_ack=True, fail=False)

    message: aio_pika.IncomingMessage = await async_wait_for(
        probe, timeout=timeout, what=f"a message in {queue}"
    )
    return message


# --- the file's permissions ----------------------------------------------------------------------


def test_the_file_has_the_four_service_users_and_an_administrator(
    definitions: dict[str, Any],
) -> None:
    assert sorted(service_user_names(definitions)) == sorted(
        [API, STATUS_USER, PROCESSOR_USER, MAILER_USER]
    )
    tags = {user["name"]: user["tags"] for user in definitions["users"]}
    assert tags["admin"] == ["administrator"]
    assert all(tags[name] == [] for name in service_user_names(definitions))


def renamed(definitions: dict[str, Any], vhost: str, suffix: str) -> dict[str, Any]:
    """The whole file, its users renamed ``<name>-<suffix>`` and its vhost ``/`` made ``vhost``."""
    text = json.dumps(definitions).replace('"vhost": "/"', f'"vhost": "{vhost}"')
    copy: dict[str, Any] = json.loads(text)
    copy["vhosts"] = [{"name": vhost}]
    for key in ("permissions", "topic_permissions"):
        for rule in copy[key]:
            rule["user"] = f"{rule['user']}-{suffix}"
    for user in copy["users"]:
        user["name"] = f"{user['name']}-{suffix}"
    return copy


async def test_the_whole_file_imports_and_its_users_log_in_with_the_development_passwords(
    management: Management, definitions: dict[str, Any], vhost: str
) -> None:
    # Imported as the broker imports it at boot (users, permissions, topic
    # permissions, topology), under test names so the broker's own users stay.
    suffix = uuid.uuid4().hex[:8]
    names = [user["name"] for user in definitions["users"]]
    try:
        response = management.client.post(
            "/api/definitions", json=renamed(definitions, vhost, suffix)
        )
        response.raise_for_status()
        for name in names:
            url = amqp_url(f"{name}-{suffix}", f"{name}-dev", vhost)
            broker = Broker(url, app_id=name)
            await broker.connect()
            try:
                assert broker.passive == (name != "admin"), name
            finally:
                await broker.close()
        assert management.topic_permissions(vhost, f"processor-service-{suffix}") != []
    finally:
        for name in names:
            management.delete_user(f"{name}-{suffix}")


# --- connecting and publishing -------------------------------------------------------------------


async def test_each_service_user_connects_checking_the_topology_passively(
    brokers: dict[str, Broker],
) -> None:
    assert set(brokers) == {API, STATUS_USER, PROCESSOR_USER, MAILER_USER}
    for broker in brokers.values():
        assert broker.is_ready
        assert broker.passive, f"{broker.app_id} declared the topology: it may configure"


@pytest.mark.parametrize(
    ("service", "events"),
    [
        (API, [job_requested]),
        (PROCESSOR_USER, [data_processed, job_failed]),
        (MAILER_USER, [email_sent, job_failed]),
    ],
)
async def test_each_service_user_publishes_its_own_events(
    service: str,
    events: list[Any],
    brokers: dict[str, Broker],
    admin_channel: AbstractChannel,
) -> None:
    # The processor's queue takes JobRequested; the api's read model every later event.
    for make in events:
        event: Event = make()
        await brokers[service].publish(event)
        bound = PROCESSOR.queue if isinstance(event, JobRequested) else STATUS.queue
        received = await take(admin_channel, bound)
        assert received.message_id == str(event.event_id)
        assert received.app_id == service


# --- what each user may not do -------------------------------------------------------------------


async def test_the_api_user_cannot_consume_the_mailers_queue(
    users: ServiceUsers, topology_vhost: str
) -> None:
    connection = await connect_as(users.url(API, topology_vhost))
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(MAILER.queue, ensure=True)  # passive: allowed
        with pytest.raises(ChannelAccessRefused, match=r"ACCESS_REFUSED.*mailer\.data\.processed"):
            await queue.consume(ignore)
        channel = await connection.channel()
        queue = await channel.get_queue(MAILER.queue, ensure=True)
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            await queue.get(fail=False)
    finally:
        await connection.close()


@pytest.mark.parametrize("queue", [STATUS.queue, MAILER.queue])
async def test_the_api_user_reads_no_queue(
    users: ServiceUsers, topology_vhost: str, queue: str
) -> None:
    # The job events reach the read model through status-service, under its own user.
    connection = await connect_as(users.url(API, topology_vhost))
    try:
        channel = await connection.channel()
        found = await channel.get_queue(queue, ensure=True)  # passive: allowed
        with pytest.raises(ChannelAccessRefused, match=rf"ACCESS_REFUSED.*{re.escape(queue)}"):
            await found.consume(ignore)
    finally:
        await connection.close()


@pytest.mark.parametrize("make", [job_requested, data_processed, job_failed])
async def test_the_status_user_publishes_nothing(
    make: Any, brokers: dict[str, Broker], admin_channel: AbstractChannel
) -> None:
    event: Event = make()
    with pytest.raises(BrokerUnavailable, match="ACCESS_REFUSED"):
        await brokers[STATUS_USER].publish(event)
    assert await ready_count(admin_channel, PROCESSOR.queue) == 0
    assert await ready_count(admin_channel, STATUS.queue) == 0


async def test_the_processor_user_cannot_publish_email_sent(
    brokers: dict[str, Broker], admin_channel: AbstractChannel
) -> None:
    processor = brokers[PROCESSOR_USER]
    with pytest.raises(BrokerUnavailable) as refused:
        await processor.publish(email_sent())
    message = str(refused.value)
    assert "'events'" in message
    assert "'email.sent'" in message
    assert "ACCESS_REFUSED" in message
    assert await ready_count(admin_channel, STATUS.queue) == 0

    # The broker closed the publishing channel; the robust connection reopens
    # it, and the processor's own events go through again.
    async def publishes() -> bool:
        try:
            await processor.publish(data_processed())
        except BrokerUnavailable:
            return False
        return True

    await async_wait_for(publishes, timeout=10, what="the processor to publish again")


async def test_the_processor_user_cannot_put_a_message_into_the_mailers_queues(
    brokers: dict[str, Broker],
    users: ServiceUsers,
    topology_vhost: str,
    admin_channel: AbstractChannel,
) -> None:
    processor = brokers[PROCESSOR_USER]
    forged = aio_pika.Message(b"{}", correlation_id=str(uuid.uuid4()))
    for queue in (MAILER.dead_letter_queue, MAILER.queue, MAILER.retry_queue(1)):
        await ready(processor)
        with pytest.raises(BrokerUnavailable, match=f"'{QUEUE_EXCHANGE}'.*ACCESS_REFUSED"):
            await processor.send_to_queue(queue, forged)

    # Nor around pipeline.queues, through the default exchange.
    connection = await connect_as(users.url(PROCESSOR_USER, topology_vhost))
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused, match=r"amq\.default"):
            await channel.default_exchange.publish(forged, MAILER.dead_letter_queue)
    finally:
        await connection.close()
    for queue in (MAILER.dead_letter_queue, MAILER.queue, MAILER.retry_queue(1)):
        assert await ready_count(admin_channel, queue) == 0


async def test_the_processor_user_cannot_declare_or_bind_anything(
    users: ServiceUsers, topology_vhost: str, management: Management
) -> None:
    connection = await connect_as(users.url(PROCESSOR_USER, topology_vhost))
    try:
        attempts = {
            "a new queue": lambda ch: ch.declare_queue("sneaky", durable=True),
            "a server-named queue": lambda ch: ch.declare_queue(exclusive=True),
            "a new exchange": lambda ch: ch.declare_exchange("sneaky", "fanout"),
            "its work queue, actively": lambda ch: ch.declare_queue(
                PROCESSOR.queue, durable=True, arguments=PROCESSOR.queue_arguments()
            ),
        }
        for attempt in attempts.values():
            channel = await connection.channel()
            with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
                await attempt(channel)
        # Binding its own queue to more events would need write on the queue.
        channel = await connection.channel()
        queue = await channel.get_queue(PROCESSOR.queue, ensure=True)
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            await queue.bind(EXCHANGE, "email.sent")
    finally:
        await connection.close()
    assert management.queue(topology_vhost, "sneaky") is None


# --- a broker without the topology ---------------------------------------------------------------


async def test_a_restricted_user_on_a_vhost_without_the_topology_gets_topology_missing(
    users: ServiceUsers, bare_vhost: str, management: Management
) -> None:
    broker = Broker(users.url(PROCESSOR_USER, bare_vhost), app_id=PROCESSOR_USER)
    with pytest.raises(TopologyMissing) as missing:
        # Not retried: a configuration error needs an operator.
        await asyncio.wait_for(broker.connect_until_ready(first_delay=0.05), timeout=20)
    message = str(missing.value)
    assert f"exchange '{EXCHANGE}'" in message
    assert f"in vhost '{bare_vhost}'" in message
    assert "rabbitmq/definitions.json" in message
    assert len(missing.value.missing) == 2 + 3 * (2 + len(DEFAULT_RETRY_DELAYS))
    assert not broker.is_ready
    # Checking passively declared nothing.
    assert management.definitions(bare_vhost)["queues"] == []


async def test_retry_delays_the_definitions_do_not_have_are_named(
    users: ServiceUsers, topology_vhost: str
) -> None:
    broker = Broker(users.url(MAILER_USER, topology_vhost), app_id=MAILER_USER, retry_delays=(1, 7))
    with pytest.raises(TopologyMissing, match="RETRY_DELAYS") as missing:
        await broker.connect()
    assert missing.value.missing == (
        f"queue '{PROCESSOR.retry_queue(7)}'",
        f"queue '{MAILER.retry_queue(7)}'",
        f"queue '{STATUS.retry_queue(7)}'",
    )


async def test_a_refused_login_is_a_configuration_error_and_says_why(
    users: ServiceUsers, topology_vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Not retried: a broker importing definitions at boot does so before it
    # accepts connections (rabbitmq/rabbitmq.conf), so a refused login is a
    # wrong password or user, which only an operator can fix.
    url = users.url(PROCESSOR_USER, topology_vhost).replace(
        users.passwords[PROCESSOR_USER], "wrong-password"
    )
    broker = Broker(url, app_id=PROCESSOR_USER)
    caplog.set_level(logging.WARNING, logger="pipeline.messaging")
    with pytest.raises(BrokerRefused) as refused:
        await asyncio.wait_for(broker.connect_until_ready(first_delay=0.1, max_delay=0.2), 10)
    assert "ACCESS_REFUSED" in refused.value.reply_text
    assert "password" in refused.value.remedy
    assert "wrong-password" not in str(refused.value)
    assert not [r for r in caplog.records if "retrying" in r.message]


# --- consuming ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "stage", "make"),
    [
        (STATUS_USER, STATUS, data_processed),
        (PROCESSOR_USER, PROCESSOR, job_requested),
        (MAILER_USER, MAILER, data_processed),
    ],
)
async def test_each_service_user_consumes_its_queue_and_retries_through_pipeline_queues(
    service: str,
    stage: Stage,
    make: Any,
    brokers: dict[str, Broker],
    admin_channel: AbstractChannel,
) -> None:
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise TransientFailure("the first attempt fails")
        done.set()

    broker = brokers[service]
    model = JobRequested if make is job_requested else DataProcessed
    consumer = await broker.consume(stage, model, handler, prefetch=4)
    try:
        exchange = await admin_channel.get_exchange(EXCHANGE, ensure=True)
        event = make()
        await exchange.publish(
            aio_pika.Message(event.model_dump_json().encode()), event.routing_key
        )
        # The retry waits out the first of the file's retry delays.
        await asyncio.wait_for(done.wait(), timeout=DEFAULT_RETRY_DELAYS[0] + 15)
    finally:
        await consumer.stop(5)
    assert len(attempts) == 2

    queues = (stage.queue, stage.retry_queue(DEFAULT_RETRY_DELAYS[0]), stage.dead_letter_queue)
    for queue in queues:
        assert await ready_count(admin_channel, queue) == 0, queue


async def test_the_processor_user_dead_letters_and_reports_the_failure(
    brokers: dict[str, Broker], admin_channel: AbstractChannel
) -> None:
    async def handler(event: JobRequested) -> None:
        raise PermanentFailure("bad data")

    consumer = await brokers[PROCESSOR_USER].consume(PROCESSOR, JobRequested, handler, prefetch=4)
    try:
        event = job_requested()
        await brokers[API].publish(event)
        dead = await take(admin_channel, PROCESSOR.dead_letter_queue)
    finally:
        await consumer.stop(5)
    assert (dead.headers or {})["x-error-reason"] == "bad data"
    assert dead.message_id == str(event.event_id)
    # JobFailed went to the read model's queue (the JobRequested did not: the api
    # records its own jobs), naming the job's caller.
    failed = await take(admin_channel, STATUS.queue)
    assert failed.type == "JobFailed"
    assert JobFailed.model_validate_json(failed.body).submitted_by == "key-ada"


async def test_copying_a_message_back_to_its_own_work_queue_is_allowed(
    brokers: dict[str, Broker], admin_channel: AbstractChannel
) -> None:
    # What a retry does, done by hand: the processor's user may put a message
    # into its own work queue through pipeline.queues.
    exchange = await admin_channel.get_exchange(EXCHANGE, ensure=True)
    await exchange.publish(aio_pika.Message(b"{}", message_id="m-1"), "job.requested")
    original = await take(admin_channel, PROCESSOR.queue)
    await brokers[PROCESSOR_USER].send_to_queue(PROCESSOR.queue, copy_message(original, {}))
    again = await take(admin_channel, PROCESSOR.queue)
    assert again.message_id == "m-1"
