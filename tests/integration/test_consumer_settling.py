"""What the consumer leaves behind once a delivery is settled: its span's outcome, no
reference cycles, and at a stop a message whose outcomes are being settled finished."""

from __future__ import annotations

import asyncio
import gc
import logging

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from integration.conftest import FAST_RETRIES
from integration.test_bundles import failed_jobs, job, send_bundle
from pipeline_shared.errors import PermanentFailure, TransientFailure
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker, bundle
from pipeline_shared.messaging.handling import EventHandling
from pipeline_shared.topology import PROCESSOR
from support.queues import bind_probe, take_all
from support.rabbit import Management
from support.waiting import async_wait_for


@pytest.mark.parametrize("fail", [False, True], ids=["acked", "dead-lettered"])
async def test_the_process_span_carries_the_outcome_set_while_it_was_open(
    broker: Broker,
    exported: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    fail: bool,
) -> None:
    caplog.set_level(logging.WARNING)

    async def handler(received: JobRequested) -> None:
        if fail:
            raise PermanentFailure("nope")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await broker.publish(job())

    async def process_span() -> bool:
        spans = exported.get_finished_spans()
        return any(s.name == f"process {PROCESSOR.queue}" for s in spans)

    await async_wait_for(process_span, what="the process span")
    await consumer.stop(5)

    [span] = [s for s in exported.get_finished_spans() if s.name.startswith("process ")]
    assert dict(span.attributes or {})["pipeline.outcome"] == ("dead_lettered" if fail else "acked")
    assert span.status.status_code == (StatusCode.ERROR if fail else StatusCode.UNSET)
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


async def test_a_failed_event_leaves_no_reference_cycle_through_the_consumer(
    broker: Broker, channel: AbstractChannel
) -> None:
    async def handler(received: JobRequested) -> None:
        raise PermanentFailure("nope")

    gc.collect()
    gc.disable()
    try:
        consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
        await asyncio.gather(*(broker.publish(job(n)) for n in range(10)))
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def all_dead() -> bool:
            dead.extend(await take_all(channel, PROCESSOR.dead_letter_queue))
            return len(dead) == 10

        await async_wait_for(all_dead, what="every event dead-lettered")
        await consumer.stop(5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        frames = [o.f_code.co_name for o in gc.garbage if type(o).__name__ == "frame"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # A failure kept with its traceback would keep its handling frame (with the
    # message and the event) alive until a full collection.
    assert EventHandling._outcome.__code__.co_name not in frames


async def test_a_stop_while_a_bundle_is_settled_lets_it_finish(
    broker: Broker,
    channel: AbstractChannel,
    management: Management,
    vhost: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    for delay in FAST_RETRIES:  # the flaky event's retry copy cannot be routed
        management.delete_queue(vhost, PROCESSOR.retry_queue(delay))
    failures = await bind_probe(channel, "job.failed")
    doomed, flaky = job(1), job(2)
    await send_bundle(
        channel, [doomed.model_dump_json().encode(), flaky.model_dump_json().encode()]
    )

    async def handler(received: JobRequested) -> None:
        if received.job_id == doomed.job_id:
            raise PermanentFailure("bad job")
        raise TransientFailure("later")

    # The flaky event's way back to its queue is slow to confirm (a real send, late).
    sending_back = asyncio.Event()
    send = broker.send_to_queue

    async def slow_send(queue: str, message: aio_pika.Message) -> None:
        if queue == PROCESSOR.queue:
            sending_back.set()
            await asyncio.sleep(0.5)
        await send(queue, message)

    broker.send_to_queue = slow_send  # type: ignore[method-assign]
    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    await asyncio.wait_for(sending_back.wait(), 10)
    await consumer.stop(0.1)

    back = await take_all(channel, PROCESSOR.queue)
    assert [JobRequested.model_validate_json(m.body).job_id for m in back] == [flaky.job_id]
    assert bundle.LENGTHS_HEADER not in (back[0].headers or {})
    assert len(await take_all(channel, PROCESSOR.dead_letter_queue)) == 1
    assert [f.job_id for f in await failed_jobs(channel, failures, 1)] == [doomed.job_id]
    assert any(f"job {doomed.job_id}: dead-lettered" in r.getMessage() for r in caplog.records)
