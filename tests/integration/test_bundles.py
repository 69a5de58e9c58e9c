"""Bundles against the real RabbitMQ: events published together travel in one message,
and each is still handled, retried and dead-lettered on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Sequence

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from integration.conftest import FAST_RETRIES
from pipeline_shared import tracing
from pipeline_shared.errors import PermanentFailure, TransientFailure
from pipeline_shared.events import JobFailed, JobRequested
from pipeline_shared.messaging import Broker, bundle, delivery_attempt
from pipeline_shared.topology import EXCHANGE, PROCESSOR
from support.queues import bind_probe, get, take_all
from support.rabbit import Management, messages_ready_now, new_vhost_name, url_for_vhost
from support.waiting import async_wait_for


def job(n: int = 1, **overrides: object) -> JobRequested:
    fields: dict[str, object] = {
        "job_id": uuid.uuid4(),
        "email": "ada@example.com",
        "data": {"n": n},
        "submitted_by": "caller-1",
    }
    fields.update(overrides)
    return JobRequested.model_validate(fields)


def make_broker(url: str, bundle_max_events: int = 64) -> Broker:
    return Broker(
        url,
        app_id="test-service",
        retry_delays=FAST_RETRIES,
        publish_timeout=5,
        bundle_max_events=bundle_max_events,
    )


async def send_bundle(
    channel: AbstractChannel,
    bodies: Sequence[bytes],
    lengths: object = None,
    headers: dict[str, object] | None = None,
) -> None:
    """A bundle written by hand onto the processor's queue, as a publisher would."""
    message = bundle.bundle_message(bodies, [{} for _ in bodies], "JobRequested", "hand")
    message.headers = {
        **(message.headers or {}),
        **(headers or {}),
        **({} if lengths is None else {bundle.LENGTHS_HEADER: lengths}),
    }
    await channel.default_exchange.publish(message, routing_key=PROCESSOR.queue)


async def test_events_published_together_travel_in_fewer_messages_and_each_arrives_once(
    broker: Broker, channel: AbstractChannel
) -> None:
    events = [job(n) for n in range(40)]
    await asyncio.gather(*(broker.publish(event) for event in events))

    messages = await take_all(channel, PROCESSOR.queue)
    received = [
        event
        for message in messages
        for event in bundle.decode_all(message.body, message.headers, JobRequested, 1 << 20)
    ]
    assert sorted(e.job_id for e in received) == sorted(e.job_id for e in events)
    assert received == sorted(received, key=lambda e: events.index(e))  # in publish order
    assert len(messages) < len(events)
    bundled = next(m for m in messages if bundle.LENGTHS_HEADER in (m.headers or {}))
    assert bundled.type == "JobRequested"
    assert bundled.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert isinstance(json.loads(bundled.body), list)  # readable in the management UI


async def test_a_lone_event_is_published_alone_with_its_own_properties(
    broker: Broker, channel: AbstractChannel
) -> None:
    event = job()
    await broker.publish(event)

    [message] = await take_all(channel, PROCESSOR.queue)
    assert bundle.LENGTHS_HEADER not in (message.headers or {})
    assert message.message_id == str(event.event_id)
    assert message.correlation_id == str(event.job_id)
    assert JobRequested.model_validate_json(message.body) == event


async def test_bundle_max_events_1_publishes_every_event_alone(
    broker_url: str, channel: AbstractChannel
) -> None:
    alone = make_broker(broker_url, bundle_max_events=1)
    await alone.connect()
    try:
        events = [job(n) for n in range(10)]
        await asyncio.gather(*(alone.publish(event) for event in events))
    finally:
        await alone.close()

    messages = await take_all(channel, PROCESSOR.queue)
    assert len(messages) == 10
    assert all(bundle.LENGTHS_HEADER not in (m.headers or {}) for m in messages)


async def test_each_event_of_a_bundle_is_handled_once_and_the_bundle_acked(
    broker: Broker, channel: AbstractChannel
) -> None:
    events = [job(n) for n in range(5)]
    await send_bundle(channel, [e.model_dump_json().encode() for e in events])
    handled: list[JobRequested] = []

    async def handler(received: JobRequested) -> None:
        handled.append(received)

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await async_wait_for(lambda: _true(len(handled) == 5), what="every event handled")
    await consumer.stop(5)

    assert sorted(e.job_id for e in handled) == sorted(e.job_id for e in events)
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0


async def test_one_unreadable_event_of_a_bundle_is_dead_lettered_alone_and_its_job_failed(
    broker: Broker, channel: AbstractChannel
) -> None:
    failures = await bind_probe(channel, "job.failed")
    good = [job(1), job(2)]
    bad_job = uuid.uuid4()
    bad = json.dumps({"job_id": str(bad_job), "event_type": "JobRequested"}).encode()
    await send_bundle(
        channel, [good[0].model_dump_json().encode(), bad, good[1].model_dump_json().encode()]
    )
    handled: list[JobRequested] = []

    async def handler(received: JobRequested) -> None:
        handled.append(received)

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    dead = await get(channel, PROCESSOR.dead_letter_queue)
    reported = JobFailed.model_validate_json((await get(channel, failures)).body)
    await async_wait_for(lambda: _true(len(handled) == 2), what="the readable events")
    await consumer.stop(5)

    assert dead.body == bad
    assert dead.correlation_id == str(bad_job)
    assert bundle.LENGTHS_HEADER not in (dead.headers or {})
    assert (dead.headers or {})["x-error-type"] == "PoisonMessage"
    assert "email" in str((dead.headers or {})["x-error-reason"])
    assert reported.job_id == bad_job
    assert sorted(e.job_id for e in handled) == sorted(e.job_id for e in good)
    assert await take_all(channel, PROCESSOR.dead_letter_queue) == []
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0


async def test_one_failing_event_of_a_bundle_is_retried_alone_as_its_own_message(
    broker: Broker, channel: AbstractChannel
) -> None:
    events = [job(n) for n in range(3)]
    flaky = events[1].job_id
    attempts: dict[uuid.UUID, list[int]] = {e.job_id: [] for e in events}
    done = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        attempts[received.job_id].append(delivery_attempt.get())
        if received.job_id == flaky and len(attempts[flaky]) == 1:
            raise TransientFailure("try again")
        if all(attempts.values()) and len(attempts[flaky]) == 2:
            done.set()

    await send_bundle(channel, [e.model_dump_json().encode() for e in events])
    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop(5)

    assert attempts[flaky] == [1, 2]
    assert [attempts[e.job_id] for e in events if e.job_id != flaky] == [[1], [1]]
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0


async def test_a_dead_lettered_event_of_a_bundle_keeps_its_own_id_and_trace(
    broker: Broker, channel: AbstractChannel
) -> None:
    traced = job(1)
    trace_id = uuid.uuid4().hex
    carrier = {"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"}
    message = bundle.bundle_message(
        [traced.model_dump_json().encode(), job(2).model_dump_json().encode()],
        [carrier, {}],
        "JobRequested",
        "hand",
    )
    await channel.default_exchange.publish(message, routing_key=PROCESSOR.queue)
    seen: dict[uuid.UUID, str | None] = {}

    async def handler(received: JobRequested) -> None:
        seen[received.job_id] = tracing.current_trace_id()
        if received.job_id == traced.job_id:
            raise PermanentFailure("no")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    dead = await get(channel, PROCESSOR.dead_letter_queue)
    await async_wait_for(lambda: _true(len(seen) == 2), what="both events")
    await consumer.stop(5)

    assert dead.message_id == str(traced.event_id)
    assert dead.correlation_id == str(traced.job_id)
    assert (dead.headers or {})["traceparent"] == carrier["traceparent"]
    assert JobRequested.model_validate_json(dead.body) == traced
    assert seen[traced.job_id] == trace_id
    assert len(set(seen.values())) == 2  # the other event has a trace of its own


@pytest.mark.parametrize(
    ("lengths", "reason"),
    [
        ([5, 5], "does not match"),
        ("12", "not a list"),
        ([0], "not a list"),
        (list(range(1, 1002)), "not a list"),
    ],
    ids=["wrong-lengths", "not-a-list", "zero", "too-many"],
)
async def test_each_event_of_a_bundle_whose_layout_does_not_hold_fails_alone_with_its_job(
    broker: Broker, channel: AbstractChannel, lengths: object, reason: str
) -> None:
    failures = await bind_probe(channel, "job.failed")
    events = [job(1), job(2)]
    await send_bundle(channel, [e.model_dump_json().encode() for e in events], lengths=lengths)

    async def handler(received: JobRequested) -> None:
        raise AssertionError("must not be called")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    dead = [await get(channel, PROCESSOR.dead_letter_queue) for _ in events]
    reported = await failed_jobs(channel, failures, len(events))
    await consumer.stop(5)

    for message in dead:
        assert reason in str((message.headers or {})["x-error-reason"])
        assert bundle.LENGTHS_HEADER not in (message.headers or {})
    jobs = sorted(str(e.job_id) for e in events)
    assert sorted(str(m.correlation_id) for m in dead) == jobs
    assert sorted(str(JobRequested.model_validate_json(m.body).job_id) for m in dead) == jobs
    assert sorted(str(r.job_id) for r in reported) == jobs
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0


async def test_a_bundle_that_is_not_readable_at_all_is_dead_lettered_whole(
    broker: Broker, channel: AbstractChannel
) -> None:
    message = aio_pika.Message(b"[not json", headers={bundle.LENGTHS_HEADER: [2, 2]})
    await channel.default_exchange.publish(message, routing_key=PROCESSOR.queue)

    async def handler(received: JobRequested) -> None:
        raise AssertionError("must not be called")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    dead = await get(channel, PROCESSOR.dead_letter_queue)
    await consumer.stop(5)

    assert dead.body == b"[not json"
    assert "does not match" in str((dead.headers or {})["x-error-reason"])


async def test_each_event_of_a_bundle_is_held_to_the_consumers_own_size_limit(
    broker: Broker, channel: AbstractChannel
) -> None:
    failures = await bind_probe(channel, "job.failed")
    small = [job(n) for n in range(3)]
    large = job(9, data={"pad": "x" * 3000})
    bodies = [e.model_dump_json().encode() for e in [small[0], large, *small[1:]]]
    await send_bundle(channel, bodies)
    handled: list[JobRequested] = []

    async def handler(received: JobRequested) -> None:
        handled.append(received)

    # The bundle as a whole is over the limit; only the large event is.
    assert len(bundle.join(bodies)) > 2048
    consumer = await broker.consume(
        PROCESSOR, JobRequested, handler, prefetch=4, max_event_bytes=2048
    )
    dead = await get(channel, PROCESSOR.dead_letter_queue)
    reported = JobFailed.model_validate_json((await get(channel, failures)).body)
    await async_wait_for(lambda: _true(len(handled) == 3), what="the small events")
    await consumer.stop(5)

    assert "exceeds the limit of 2048 bytes" in str((dead.headers or {})["x-error-reason"])
    assert dead.correlation_id == str(large.job_id)
    assert reported.job_id == large.job_id
    assert sorted(e.job_id for e in handled) == sorted(e.job_id for e in small)


async def test_an_event_whose_outcome_cannot_be_copied_goes_back_alone_not_its_bundle(
    broker: Broker, channel: AbstractChannel, management: Management, vhost: str
) -> None:
    # Without its retry queues, a retry copy cannot be routed; the dead-letter queue is there.
    for delay in FAST_RETRIES:
        management.delete_queue(vhost, PROCESSOR.retry_queue(delay))
    failures = await bind_probe(channel, "job.failed")
    doomed, flaky = job(1), job(2)
    await send_bundle(
        channel, [doomed.model_dump_json().encode(), flaky.model_dump_json().encode()]
    )
    calls = {doomed.job_id: 0, flaky.job_id: 0}

    async def handler(received: JobRequested) -> None:
        calls[received.job_id] += 1
        if received.job_id == doomed.job_id:
            raise PermanentFailure("bad job")
        raise TransientFailure("later")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)

    async def flaky_dead_lettered_by_the_delivery_limit() -> list[AbstractIncomingMessage]:
        dead = await take_all(channel, PROCESSOR.dead_letter_queue)
        seen.extend(dead)
        return [m for m in seen if m.correlation_id == str(flaky.job_id)]

    seen: list[AbstractIncomingMessage] = []
    [flaky_dead] = await async_wait_for(
        flaky_dead_lettered_by_the_delivery_limit, what="the flaky job's last redelivery"
    )
    await consumer.stop(5)

    # The doomed job was dead-lettered and reported once, however often its
    # neighbour came back; the neighbour came back alone, until the broker's
    # delivery limit took it.
    assert [m.correlation_id for m in seen].count(str(doomed.job_id)) == 1
    assert calls[doomed.job_id] == 1
    assert len(await take_all(channel, failures)) == 1
    assert bundle.LENGTHS_HEADER not in (flaky_dead.headers or {})
    assert JobRequested.model_validate_json(flaky_dead.body) == flaky
    assert calls[flaky.job_id] > 2


async def test_prefetch_bounds_the_events_handled_at_once_whatever_the_bundles(
    broker: Broker, channel: AbstractChannel
) -> None:
    events = [job(n) for n in range(12)]
    await send_bundle(channel, [e.model_dump_json().encode() for e in events])
    running = peak = done = 0

    async def handler(received: JobRequested) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        done += 1

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=3)
    await async_wait_for(lambda: _true(done == 12), what="every event")
    await consumer.stop(5)
    assert peak == 3


async def test_at_a_stop_only_a_bundles_unfinished_events_go_back_each_alone(
    broker: Broker, channel: AbstractChannel
) -> None:
    events = [job(n) for n in range(4)]
    stuck_jobs = {events[1].job_id, events[3].job_id}
    await send_bundle(channel, [e.model_dump_json().encode() for e in events])
    finished: list[uuid.UUID] = []
    stuck = asyncio.Event()

    async def handler(received: JobRequested) -> None:
        if received.job_id in stuck_jobs:
            stuck.set()
            await asyncio.sleep(60)
        finished.append(received.job_id)

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await asyncio.wait_for(stuck.wait(), 10)
    await async_wait_for(lambda: _true(len(finished) == 2), what="the quick events")
    await consumer.stop(0.2)

    back = await take_all(channel, PROCESSOR.queue)
    assert all(bundle.LENGTHS_HEADER not in (m.headers or {}) for m in back)
    returned = {JobRequested.model_validate_json(m.body).job_id for m in back}
    assert returned == stuck_jobs
    assert {m.message_id for m in back} == {
        str(e.event_id) for e in events if e.job_id in stuck_jobs
    }


async def test_publishes_of_a_bundle_all_fail_together_when_no_queue_is_bound(
    broker: Broker, channel: AbstractChannel
) -> None:
    await channel.get_queue(PROCESSOR.queue, ensure=True)
    queue = await channel.get_queue(PROCESSOR.queue)
    await queue.unbind(EXCHANGE, JobRequested.routing_key)

    outcomes = await asyncio.gather(
        *(broker.publish(job(n)) for n in range(5)), return_exceptions=True
    )
    assert all(type(outcome).__name__ == "BrokerUnavailable" for outcome in outcomes)


async def failed_jobs(channel: AbstractChannel, queue: str, count: int) -> list[JobFailed]:
    """The first ``count`` JobFailed events published, alone or bundled."""
    found: list[JobFailed] = []

    async def enough() -> bool:
        for message in await take_all(channel, queue):
            found.extend(bundle.decode_all(message.body, message.headers, JobFailed, 1 << 20))
        return len(found) >= count

    await async_wait_for(enough, what=f"{count} JobFailed")
    return found


async def _true(value: bool) -> bool:
    return value


Fate = str  # "ok", "permanent", "transient" (fails its first attempt) or "poison"


async def settle_a_bundle(fates: list[Fate], prefetch: int, retries_gone: bool = False) -> None:
    async with contextlib.AsyncExitStack() as stack:
        management = Management.connect()
        stack.callback(management.close)
        vhost = new_vhost_name("bundle-fates")
        management.create_vhost(vhost)
        stack.callback(management.delete_vhost, vhost)
        broker = Broker(
            url_for_vhost(vhost), app_id="test-service", retry_delays=(0.05,), publish_timeout=5
        )
        await broker.connect()
        stack.push_async_callback(broker.close)
        if retries_gone:  # a retry copy cannot be routed: the events that need one go back
            management.delete_queue(vhost, PROCESSOR.retry_queue(0.05))
        connection = await aio_pika.connect_robust(url_for_vhost(vhost))
        stack.push_async_callback(connection.close)
        await settle_in(broker, await connection.channel(), fates, prefetch, retries_gone)


async def settle_in(
    broker: Broker, channel: AbstractChannel, fates: list[Fate], prefetch: int, retries_gone: bool
) -> None:
    failures = await bind_probe(channel, "job.failed")
    events = [job(n) for n in range(len(fates))]
    fate_of = {e.job_id: fate for e, fate in zip(events, fates, strict=True)}
    bodies = [
        json.dumps({"job_id": str(e.job_id)}).encode()
        if fate == "poison"
        else e.model_dump_json().encode()
        for e, fate in zip(events, fates, strict=True)
    ]
    await send_bundle(channel, bodies)
    calls: dict[uuid.UUID, list[int]] = {e.job_id: [] for e in events}
    expected = {"ok": [1], "transient": [1, 2], "permanent": [1], "poison": []}

    async def handler(received: JobRequested) -> None:
        calls[received.job_id].append(delivery_attempt.get())
        fate = fate_of[received.job_id]
        if fate == "permanent":
            raise PermanentFailure("no")
        if fate == "transient" and len(calls[received.job_id]) == 1:
            raise TransientFailure("later")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=prefetch)
    try:
        doomed = {e.job_id for e in events if fate_of[e.job_id] in ("permanent", "poison")}
        if retries_gone:
            # Its retry copy refused, a failing event goes back to the queue alone and
            # comes again as the same attempt (it succeeds then).
            expected["transient"] = [1, 1]
        reported = await failed_jobs(channel, failures, len(doomed))
        dead: list[AbstractIncomingMessage] = []

        async def done() -> bool:
            dead.extend(await take_all(channel, PROCESSOR.dead_letter_queue))
            return len(dead) == len(doomed) and all(
                len(calls[e.job_id]) >= len(expected[fate_of[e.job_id]]) for e in events
            )

        await async_wait_for(done, timeout=10, what="every event's fate")
    finally:
        await consumer.stop(5)

    assert sorted(str(m.correlation_id) for m in dead) == sorted(map(str, doomed))
    assert sorted(r.job_id for r in reported) == sorted(doomed)
    assert await take_all(channel, failures) == []  # each reported once
    assert await messages_ready_now(channel, PROCESSOR.queue) == 0
    for e in events:
        assert calls[e.job_id] == expected[fate_of[e.job_id]]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fates=st.lists(
        st.sampled_from(["ok", "permanent", "transient", "poison"]), min_size=2, max_size=10
    ),
    prefetch=st.integers(1, 4),
    retries_gone=st.booleans(),
)
def test_whatever_becomes_of_each_event_of_a_bundle_happens_to_it_alone_and_once(
    fates: list[Fate], prefetch: int, retries_gone: bool
) -> None:
    asyncio.run(settle_a_bundle(fates, prefetch, retries_gone))


async def test_the_metrics_count_events_and_the_messages_that_carried_them(
    broker: Broker, channel: AbstractChannel
) -> None:
    def figure(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"event_type": "JobRequested", **labels}) or 0.0

    events_before = figure("pipeline_events_published_total", outcome="confirmed")
    messages_before = figure("pipeline_messages_published_total")
    await asyncio.gather(*(broker.publish(job(n)) for n in range(40)))

    messages = await take_all(channel, PROCESSOR.queue)
    assert figure("pipeline_events_published_total", outcome="confirmed") - events_before == 40
    assert figure("pipeline_messages_published_total") - messages_before == len(messages) < 40
