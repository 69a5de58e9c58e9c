"""The messaging layer against the real RabbitMQ, in a vhost of each test's own."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from integration.conftest import FAST_RETRIES
from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    TransientFailure,
)
from pipeline_shared.events import DataProcessed, JobFailed, JobRequested
from pipeline_shared.messaging import Broker, delivery_attempt
from pipeline_shared.topology import DELIVERY_LIMIT, EXCHANGE, MAILER, PROCESSOR, STAGES, STATUS
from support.queues import bind_probe, get
from support.rabbit import Management, messages_ready_now
from support.waiting import async_wait_for


def job(**overrides: object) -> JobRequested:
    fields: dict[str, object] = {
        "job_id": uuid.uuid4(),
        "email": "ada@example.com",
        "data": {"n": 1},
    }
    fields.update(overrides)
    return JobRequested.model_validate(fields)


async def test_every_stage_has_durable_quorum_queues_bound_to_its_routing_key(
    broker: Broker, management: Management, vhost: str
) -> None:
    for stage in STAGES.values():
        work = management.queue(vhost, stage.queue)
        assert work is not None
        assert work["durable"] is True
        assert work["arguments"]["x-queue-type"] == "quorum"
        dead = management.queue(vhost, stage.dead_letter_queue)
        assert dead is not None
        assert dead["arguments"]["x-queue-type"] == "quorum"
        for delay in FAST_RETRIES:
            assert management.queue(vhost, stage.retry_queue(delay)) is not None
    bindings = management.client.get(f"/api/exchanges/{vhost}/{EXCHANGE}/bindings/source").json()
    assert {(b["destination"], b["routing_key"]) for b in bindings} == {
        (PROCESSOR.queue, "job.requested"),
        (MAILER.queue, "data.processed"),
        (STATUS.queue, "data.processed"),
        (STATUS.queue, "email.sent"),
        (STATUS.queue, "job.failed"),
    }


def status_bindings(management: Management, vhost: str) -> set[str]:
    bindings = management.client.get(f"/api/exchanges/{vhost}/{EXCHANGE}/bindings/source").json()
    return {b["routing_key"] for b in bindings if b["destination"] == STATUS.queue}


async def test_declaring_the_topology_removes_the_binding_earlier_versions_made(
    broker: Broker, management: Management, vhost: str, broker_url: str
) -> None:
    # Earlier versions bound the read model's queue to job.requested too; a broker
    # that still has that binding loses it when a service declares the topology.
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(STATUS.queue)
        await queue.bind(EXCHANGE, "job.requested")
    assert "job.requested" in status_bindings(management, vhost)

    again = Broker(broker_url, app_id="upgraded-service", retry_delays=FAST_RETRIES)
    await again.connect()
    await again.close()

    assert status_bindings(management, vhost) == {"data.processed", "email.sent", "job.failed"}


async def test_a_second_service_declaring_the_topology_again_is_harmless(broker_url: str) -> None:
    for _ in range(2):
        other = Broker(broker_url, app_id="other-service", retry_delays=FAST_RETRIES)
        await other.connect()
        await other.close()


async def test_a_published_event_carries_properties_that_read_well_in_the_ui(
    broker: Broker, channel: AbstractChannel
) -> None:
    event = job()
    await broker.publish(event)

    message = await get(channel, PROCESSOR.queue)

    assert message.message_id == str(event.event_id)
    assert message.correlation_id == str(event.job_id)
    assert message.type == "JobRequested"
    assert message.app_id == "test-service"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert isinstance(message.timestamp, datetime)
    assert json.loads(message.body)["job_id"] == str(event.job_id)


async def test_publishing_without_a_connection_raises_broker_unavailable(broker_url: str) -> None:
    broker = Broker(broker_url, app_id="test-service")
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await broker.publish(job())


async def test_an_event_nobody_is_bound_to_is_refused_not_dropped(
    broker: Broker, channel: AbstractChannel
) -> None:
    for stage in (PROCESSOR, STATUS):
        queue = await channel.get_queue(stage.queue, ensure=True)
        await queue.unbind(EXCHANGE, "job.requested")

    with pytest.raises(BrokerUnavailable, match="no queue is bound"):
        await broker.publish(job())


async def test_an_event_published_while_its_consumer_is_down_waits_in_its_queue(
    broker: Broker, broker_url: str
) -> None:
    event = job()
    await broker.publish(event)

    seen: list[JobRequested] = []

    async def handler(received: JobRequested) -> None:
        seen.append(received)

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await async_wait_for(lambda: _true(seen), what="the waiting event")
    await consumer.stop(5)
    assert [e.event_id for e in seen] == [event.event_id]


async def _true(items: Sequence[object]) -> bool:
    return bool(items)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_a_consumer_logs_each_handled_message_at_the_level_it_was_given(
    broker: Broker, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    done = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        done.set()

    caplog.set_level(logging.INFO)
    consumer = await broker.consume(
        PROCESSOR, JobRequested, handler, prefetch=4, handled_level=level
    )
    event = job()
    await broker.publish(event)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop(5)

    lines = [r for r in caplog.records if f"job {event.job_id}: JobRequested handled" in r.message]
    assert len(lines) == (1 if level == logging.INFO else 0)


async def test_a_handled_message_is_acked_and_leaves_the_queue(
    broker: Broker, channel: AbstractChannel
) -> None:
    done = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        done.set()

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await broker.publish(job())
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop(5)

    # Stopping closed the consumer's channel: a message it had not acked would
    # be back in the queue now. Asked of the broker itself, not of the
    # management API, whose figures lag and are dropped with a closed channel.
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0


async def test_a_permanent_failure_is_dead_lettered_with_its_reason_and_reported_as_job_failed(
    broker: Broker, channel: AbstractChannel
) -> None:
    failures = await bind_probe(channel, "job.failed")

    async def handler(received: JobRequested) -> None:
        raise PermanentFailure("the data makes no sense")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    event = job()
    await broker.publish(event)

    dead = await get(channel, PROCESSOR.dead_letter_queue)
    reported = JobFailed.model_validate_json((await get(channel, failures)).body)
    await consumer.stop(5)

    headers = dead.headers or {}
    assert headers["x-error-reason"] == "the data makes no sense"
    assert headers["x-error-type"] == "PermanentFailure"
    assert headers["x-attempts"] == 1
    assert headers["x-failed-service"] == "test-service"
    assert datetime.fromisoformat(str(headers["x-failed-at"])).tzinfo is not None
    assert dead.message_id == str(event.event_id)
    assert dead.type == "JobRequested"
    assert JobRequested.model_validate_json(dead.body) == event
    assert reported.job_id == event.job_id
    assert reported.reason == "the data makes no sense"
    assert reported.stage == "test-service"


async def test_a_transient_failure_is_retried_through_the_retry_queues_until_it_succeeds(
    broker: Broker,
) -> None:
    calls: list[float] = []
    done = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) < 3:
            raise TransientFailure("provider said 503")
        done.set()

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await broker.publish(job())
    await asyncio.wait_for(done.wait(), 15)
    await consumer.stop(5)

    assert len(calls) == 3
    # The second try waited out the first delay, the third the second one.
    assert calls[1] - calls[0] >= FAST_RETRIES[0] * 0.9
    assert calls[2] - calls[1] >= FAST_RETRIES[1] * 0.9


async def test_a_deferred_message_waits_without_spending_its_attempts(broker: Broker) -> None:
    # Deferred far more often than there are retries: waiting for another
    # worker must never use up a job's attempts.
    deferrals = 3 * len(FAST_RETRIES)
    seen: list[int] = []
    done = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        seen.append(delivery_attempt.get())
        if len(seen) <= deferrals:
            raise Deferred("another worker holds this job")
        if len(seen) == deferrals + 1:
            raise TransientFailure("provider said 503")
        done.set()

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await broker.publish(job())
    await asyncio.wait_for(done.wait(), 20)
    await consumer.stop(5)

    # Every deferred delivery was still the first attempt; the one real
    # failure made the next delivery the second.
    assert seen == [1] * (deferrals + 1) + [2]


async def test_a_message_failing_every_attempt_ends_in_the_dead_letter_queue(
    broker: Broker, channel: AbstractChannel
) -> None:
    calls = 0

    async def handler(received: JobRequested) -> None:
        nonlocal calls
        calls += 1
        raise TransientFailure("still down")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await broker.publish(job())
    dead = await get(channel, PROCESSOR.dead_letter_queue, timeout=15)
    await consumer.stop(5)

    assert calls == len(FAST_RETRIES) + 1
    assert (dead.headers or {})["x-attempts"] == len(FAST_RETRIES) + 1
    assert (dead.headers or {})["x-error-type"] == "TransientFailure"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"this is not json", "invalid JobRequested"),
        (b'{"event_type": "JobRequested", "job_id": "not-a-uuid"}', "job_id"),
        (
            json.dumps(
                {
                    **json.loads(job().model_dump_json()),
                    "schema_version": 99,
                }
            ).encode(),
            "unsupported schema_version 99",
        ),
        (b"{" + b" " * (64 * 1024) + b"}", "exceeds the limit"),
    ],
    ids=["not-json", "wrong-schema", "unknown-version", "too-big"],
)
async def test_a_poison_message_is_dead_lettered_and_the_next_message_is_handled(
    broker: Broker, channel: AbstractChannel, body: bytes, reason: str
) -> None:
    handled: list[JobRequested] = []

    async def handler(received: JobRequested) -> None:
        handled.append(received)

    consumer = await broker.consume(
        PROCESSOR, JobRequested, handler, prefetch=4, max_event_bytes=32 * 1024
    )
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=PROCESSOR.queue)
    good = job()
    await broker.publish(good)

    dead = await get(channel, PROCESSOR.dead_letter_queue)
    await async_wait_for(lambda: _true(handled), what="the good message")
    await consumer.stop(5)

    assert reason in str((dead.headers or {})["x-error-reason"])
    assert (dead.headers or {})["x-error-type"] == "PoisonMessage"
    assert dead.body == body
    assert [e.job_id for e in handled] == [good.job_id]


async def test_an_event_of_the_wrong_type_on_a_queue_is_poison(
    broker: Broker, channel: AbstractChannel
) -> None:
    async def handler(received: JobRequested) -> None:
        raise AssertionError("must not be called")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    wrong = DataProcessed(
        job_id=uuid.uuid4(), email="ada@example.com", step="echo", data={}, result={}
    )
    await channel.default_exchange.publish(
        aio_pika.Message(wrong.model_dump_json().encode()), routing_key=PROCESSOR.queue
    )
    dead = await get(channel, PROCESSOR.dead_letter_queue)
    await consumer.stop(5)
    assert "event_type" in str((dead.headers or {})["x-error-reason"])


async def test_stopping_a_consumer_lets_in_flight_messages_finish_within_the_grace_period(
    broker: Broker, management: Management, vhost: str
) -> None:
    started = asyncio.Event()
    finished: list[uuid.UUID] = []

    async def slow(received: JobRequested) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(received.job_id)

    consumer = await broker.consume(PROCESSOR, JobRequested, slow, prefetch=4)
    event = job()
    await broker.publish(event)
    await asyncio.wait_for(started.wait(), 10)
    await consumer.stop(5)

    assert finished == [event.job_id]
    assert management.consumers(vhost, PROCESSOR.queue) == 0


async def test_a_message_still_running_when_the_grace_period_ends_is_returned_to_the_queue(
    broker: Broker, channel: AbstractChannel, management: Management, vhost: str
) -> None:
    started = asyncio.Event()

    async def stuck(received: JobRequested) -> None:
        started.set()
        await asyncio.sleep(60)

    consumer = await broker.consume(PROCESSOR, JobRequested, stuck, prefetch=4)
    await broker.publish(job())
    await asyncio.wait_for(started.wait(), 10)
    await consumer.stop(0.2)

    # From the broker itself: the management API's messages_ready is a
    # snapshot that may be from the moment between the publish and the delivery.
    async def back_in_queue() -> bool:
        return await messages_ready_now(channel, PROCESSOR.queue) == 1

    await async_wait_for(back_in_queue, what="the message to be requeued")
    assert management.consumers(vhost, PROCESSOR.queue) == 0


async def test_clean_stops_past_the_delivery_limit_never_dead_letter_a_message(
    broker: Broker, channel: AbstractChannel
) -> None:
    # More stops than the queue's delivery limit, each with the message in
    # flight: the message is given back as a copy (a nack would count), so it
    # is still there, unchanged, and was never marked redelivered.
    started = asyncio.Event()

    async def stuck(received: JobRequested) -> None:
        started.set()
        await asyncio.sleep(60)

    event = job()
    await broker.publish(event)
    for _ in range(DELIVERY_LIMIT + 2):
        started.clear()
        consumer = await broker.consume(PROCESSOR, JobRequested, stuck, prefetch=1)
        await asyncio.wait_for(started.wait(), 10)
        await consumer.stop(0.05)

    assert await messages_ready_now(channel, PROCESSOR.dead_letter_queue) == 0
    message = await get(channel, PROCESSOR.queue)
    assert message.redelivered is False
    assert (message.headers or {}).get("x-delivery-count", 0) == 0
    assert JobRequested.model_validate_json(message.body).job_id == event.job_id
    assert message.message_id == str(event.event_id)


async def test_a_message_that_keeps_coming_back_is_dead_lettered_by_the_delivery_limit(
    broker: Broker, channel: AbstractChannel, management: Management, vhost: str
) -> None:
    # What a consumer that crashes on a message looks like to the broker: the
    # message is delivered, never settled, and requeued, again and again.
    info = management.queue(vhost, PROCESSOR.queue)
    assert info is not None
    assert info["arguments"]["x-delivery-limit"] == DELIVERY_LIMIT
    await broker.publish(job())
    queue = await channel.get_queue(PROCESSOR.queue, ensure=True)
    for _ in range(DELIVERY_LIMIT + 1):
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        await message.nack(requeue=True)

    dead = await get(channel, PROCESSOR.dead_letter_queue)
    assert (dead.headers or {})["x-first-death-reason"] == "delivery_limit"
