"""Fault injection on the running pipeline: crashes, broker outages, stops and poison.

Each test streams real jobs through the services and strikes while they flow.
The promise checked is the README's: every accepted job ends in exactly one
email, except that a mailer killed while emails are at the provider may send
those again (at most MAILER_CONCURRENCY of them), which the test reports.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest

from e2e.conftest import Pipeline
from pipeline_shared.topology import MAILER, PROCESSOR, STATUS, Stage
from support.mailtrap_stub import MailtrapStub
from support.rabbit import job_ids_of
from support.streams import JobStream
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

JOBS = 200
MAILER_CONCURRENCY = 8


def wait_all_delivered(mailtrap: MailtrapStub, jobs: list[str], timeout: float = 90) -> None:
    wanted = set(jobs)
    wait_for(
        lambda: wanted <= set(mailtrap.deliveries_by_job()),
        timeout=timeout,
        what=f"emails for all {len(wanted)} accepted jobs",
    )


def duplicates(mailtrap: MailtrapStub) -> dict[str | None, int]:
    return {job: n for job, n in mailtrap.deliveries_by_job().items() if n > 1}


@pytest.fixture
def pipeline(pipeline_factory: PipelineFactory, mailtrap_settings: dict[str, str]) -> Pipeline:
    pipeline = pipeline_factory(**mailtrap_settings, MAILER_CONCURRENCY=str(MAILER_CONCURRENCY))
    pipeline.start()
    return pipeline


def test_a_processor_killed_mid_stream_neither_loses_nor_duplicates_an_email(
    pipeline: Pipeline, mailtrap: MailtrapStub
) -> None:
    stream = JobStream(pipeline.api.url, JOBS).start()
    stream.wait_answered(JOBS // 4)

    pipeline.processor.kill()
    stream.wait_answered(JOBS // 2)
    pipeline.processor.start()
    pipeline.wait_consuming()
    stream.wait_done()

    assert stream.refused == []
    wait_all_delivered(mailtrap, stream.accepted)
    assert set(mailtrap.deliveries_by_job()) == set(stream.accepted)
    assert duplicates(mailtrap) == {}


def test_a_mailer_killed_mid_stream_loses_no_email_and_repeats_only_those_in_flight(
    pipeline: Pipeline, mailtrap: MailtrapStub
) -> None:
    mailtrap.latency = 0.05  # as a real provider: emails are at the provider when it dies
    stream = JobStream(pipeline.api.url, JOBS).start()
    wait_for(lambda: len(mailtrap.delivered) >= JOBS // 4, timeout=60, what="some emails")

    pipeline.mailer.kill()
    stream.wait_answered(JOBS // 2)
    pipeline.mailer.start()
    pipeline.wait_consuming()
    stream.wait_done()

    assert stream.refused == []
    wait_all_delivered(mailtrap, stream.accepted)
    assert set(mailtrap.deliveries_by_job()) == set(stream.accepted)
    repeated = duplicates(mailtrap)
    if repeated:
        print(f"emails sent twice after the kill (in flight at the provider): {repeated}")
    # The README's window: only the emails that were at the provider when the
    # mailer died may go out again, at most one per sending thread.
    assert sum(n - 1 for n in repeated.values()) <= MAILER_CONCURRENCY


LOSS = "lost the broker connection"
ROUTED_PROBE = "test.job.requested"


async def bind_probe(url: str, queue: str, routing_key: str) -> None:
    """A queue of the test's own that receives a copy of every event with ``routing_key``."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind("events", routing_key)


async def drain(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message ``queue`` holds now, taken from it."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue, ensure=True)
        taken = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken


def test_a_broker_outage_mid_stream_loses_no_accepted_job_and_every_consumer_comes_back(
    pipeline_factory: PipelineFactory,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
    broker_url: str,
    proxy: TcpProxy,
) -> None:
    through_proxy = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    pipeline = pipeline_factory(**mailtrap_settings, RABBITMQ_URL=through_proxy.geturl())
    pipeline.start()
    # Straight to the broker, not through the proxy: a copy of every JobRequested
    # the broker routed, whatever the api answered. It tells when the pipeline
    # has carried everything the broker holds, and which jobs it holds.
    asyncio.run(bind_probe(broker_url, ROUTED_PROBE, "job.requested"))
    stream = JobStream(pipeline.api.url, JOBS).start()
    stream.wait_answered(JOBS // 4)

    refused_before = len(stream.refused)
    proxy.cut()
    # The outage lasts until every service has lost the broker and the api has
    # refused a job for it (unless the stream ended first).
    wait_for(
        lambda: (
            all(LOSS in service.output() for service in pipeline.services)
            and (len(stream.refused) > refused_before or stream.answered == JOBS)
        ),
        timeout=30,
        what="every service to lose the broker and the api to refuse a job",
    )
    proxy.open()
    stream.wait_done()

    assert len(stream.accepted) >= JOBS // 4
    assert set(stream.refused) <= {503}

    accepted = set(stream.accepted)
    routed: set[str] = set()

    def everything_routed_delivered() -> bool:
        routed.update(
            job
            for message in asyncio.run(drain(broker_url, ROUTED_PROBE))
            for job in job_ids_of(message)
        )
        return (accepted | routed) <= set(mailtrap.deliveries_by_job())

    try:
        wait_for(
            everything_routed_delivered,
            timeout=90,
            interval=0.5,  # each look at the probe is a connection to the broker
            what="an email for every job the api accepted or the broker routed",
        )
    except AssertionError as timeout:
        delivered = set(mailtrap.deliveries_by_job())
        raise AssertionError(
            f"{timeout}: no email for {len(accepted - delivered)} jobs answered 202 "
            f"{sorted(accepted - delivered)}, nor for {len((routed - accepted) - delivered)} "
            f"jobs answered 503 that the broker routed {sorted((routed - accepted) - delivered)}"
        ) from None

    print(
        f"outage: {len(accepted)} jobs answered 202, {len(stream.refused)} answered 503, "
        f"{len(routed - accepted)} of those 503s routed by the broker all the same"
    )
    # Every job answered 202 is emailed exactly once.
    assert accepted <= routed, f"jobs answered 202 the broker never routed: {accepted - routed}"
    assert accepted <= set(mailtrap.deliveries_by_job())
    assert duplicates(mailtrap) == {}
    # Every service is back.
    for service in pipeline.services:
        assert service.running, service.output()
    wait_for(
        lambda: all(
            pipeline.management.consumers(pipeline.vhost, stage.queue) == 1
            for stage in (PROCESSOR, MAILER, STATUS)
        ),
        timeout=30,
        what="one consumer on each work queue again",
    )
    for worker in (pipeline.status, pipeline.processor, pipeline.mailer):
        assert "reconnected" in worker.output()
    # And no job answered a plain 503 is emailed: that 503 says the job was not
    # taken, and the caller retries it. Only a 503 that names its job with
    # "outcome": "unknown" (the api could not tell) may arrive, once. Checked
    # last, so that a failure here says that all the rest held. Each job is
    # named with its request's recipient (user<n>) and whether the broker
    # routed it, beside the api's 503 answers by reason.
    marker = "answering 503 to POST /jobs: "
    reasons = Counter(
        line.split(marker, 1)[1] for line in pipeline.api.output().splitlines() if marker in line
    )
    unknown = {
        match[1] for reason in reasons if (match := re.match(r"job (\S+): outcome unknown", reason))
    }
    refused_but_sent = {
        request.job_id: (request.to, request.job_id in routed)
        for request in mailtrap.delivered
        if request.job_id not in accepted | unknown
    }
    print(
        f"outage: {len(unknown)} answered 503 with an unknown outcome, of them "
        f"{len(unknown & set(mailtrap.deliveries_by_job()))} emailed"
    )
    assert refused_but_sent == {}, (
        f"{len(refused_but_sent)} of the {len(stream.refused)} jobs answered 503 were emailed "
        f"(job: (recipients, routed by the broker)): {refused_but_sent}; "
        f"the api's 503 answers by reason: {dict(reasons)}"
    )
    assert set(mailtrap.deliveries_by_job()) <= accepted | unknown


@pytest.mark.parametrize("stage", ["processor", "mailer"])
def test_a_worker_stopped_with_sigterm_mid_stream_exits_0_in_time_and_loses_nothing(
    pipeline: Pipeline, mailtrap: MailtrapStub, stage: str
) -> None:
    worker = pipeline.processor if stage == "processor" else pipeline.mailer
    stream = JobStream(pipeline.api.url, JOBS).start()
    stream.wait_answered(JOBS // 4)

    started = time.monotonic()
    code = worker.terminate(timeout=30)
    took = time.monotonic() - started
    stream.wait_answered(JOBS // 2)
    worker.start()
    pipeline.wait_consuming()
    stream.wait_done()

    assert code == 0, worker.output()
    assert took < 10 + 5  # SHUTDOWN_TIMEOUT_SECONDS in these tests, plus process exit
    assert "stopping: no new messages" in worker.output()
    wait_all_delivered(mailtrap, stream.accepted)
    assert set(mailtrap.deliveries_by_job()) == set(stream.accepted)
    assert duplicates(mailtrap) == {}


async def publish_raw(url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


POISON = {
    "not-json": b"\x00\xffnot json at all",
    "wrong-schema": json.dumps({"event_type": "DataProcessed", "job_id": 42}).encode(),
    "unknown-version": json.dumps(
        {
            "event_type": "JobRequested",
            "schema_version": 7,
            "job_id": "5b7d2f8e-3c41-4d0c-9a7e-4f1b2c3d4e5f",
            "email": "a@example.com",
            "data": {},
        }
    ).encode(),
    "huge": b'{"pad": "' + b"x" * (1024 * 1024 + 10) + b'"}',
}


@pytest.mark.parametrize("kind", sorted(POISON))
@pytest.mark.parametrize("stage", [PROCESSOR, MAILER], ids=["processor", "mailer"])
async def test_poison_published_straight_to_a_queue_is_dead_lettered_and_work_goes_on(
    pipeline: Pipeline,
    mailtrap: MailtrapStub,
    broker_url: str,
    kind: str,
    stage: Stage,
) -> None:
    await publish_raw(broker_url, stage.queue, POISON[kind])

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{pipeline.api.url}/jobs", json={"email": "bob@example.com", "data": {}}
        )
    job_id = response.json()["job_id"]

    wait_for(lambda: mailtrap.deliveries_by_job()[job_id] == 1, what="the good job's email")
    dead = wait_for(
        lambda: pipeline.management.peek(pipeline.vhost, stage.dead_letter_queue),
        what="the dead letter",
    )
    headers = dead[0]["properties"]["headers"]
    assert headers["x-error-type"] == "PoisonMessage"
    assert headers["x-error-reason"]
    assert headers["x-failed-service"] in {"processor-service", "mailer-service"}
    assert pipeline.processor.running
    assert pipeline.mailer.running


def test_a_400_from_mailtrap_dead_letters_at_once_and_publishes_job_failed(
    pipeline: Pipeline, mailtrap: MailtrapStub, broker_url: str
) -> None:
    failures_queue = "test.job.failed"

    async def bind_probe() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(failures_queue, durable=True)
            await queue.bind("events", "job.failed")

    asyncio.run(bind_probe())
    mailtrap.fail_next(1, 400)

    response = httpx.post(
        f"{pipeline.api.url}/jobs", json={"email": "ada@example.com", "data": {}}, timeout=10
    )
    job_id = response.json()["job_id"]

    failed = wait_for(
        lambda: pipeline.management.peek(pipeline.vhost, failures_queue), what="JobFailed"
    )
    event = json.loads(failed[0]["payload"])
    assert event["event_type"] == "JobFailed"
    assert event["job_id"] == job_id
    assert "400" in event["reason"]
    assert event["stage"] == "mailer-service"
    assert [r.status for r in mailtrap.received] == [400]
    dead = pipeline.management.peek(pipeline.vhost, MAILER.dead_letter_queue)
    assert dead[0]["properties"]["headers"]["x-attempts"] == 1
