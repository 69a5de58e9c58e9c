"""A worker's /metrics, /healthz and /readyz, and the consumer's counts, against the real broker.

Metrics live on the process-wide registry, so each test reads a figure before
and after what it does and asserts on the difference.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import aio_pika
import httpx
import pytest
from prometheus_client import REGISTRY

from pipeline_shared import probe_server
from pipeline_shared.errors import PermanentFailure, TransientFailure
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker
from pipeline_shared.probe_server import (
    MAX_HEAD_BYTES,
    NOT_CONNECTED,
    NOT_CONSUMING,
    Readiness,
    serving_probes,
)
from pipeline_shared.settings import WorkerSettings
from pipeline_shared.topology import PROCESSOR
from support.services import free_port
from support.waiting import async_wait_for

FAST_RETRIES = (0.1, 0.2)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def change_of(name: str, **labels: str) -> Callable[[], float]:
    before = sample(name, **labels)
    return lambda: sample(name, **labels) - before


def job(fate: str) -> JobRequested:
    return JobRequested.model_validate(
        {"job_id": uuid.uuid4(), "email": "ada@example.com", "data": {"fate": fate}}
    )


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    broker = Broker(broker_url, app_id="test-service", retry_delays=FAST_RETRIES, publish_timeout=5)
    yield broker
    await broker.close()


def probes(broker: Broker, port: int) -> AbstractAsyncContextManager[Readiness]:
    settings = WorkerSettings(_env_file=None, metrics_port=port)  # type: ignore[call-arg]
    return serving_probes(settings, broker, "test-service")


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        return await client.get(path)


async def nothing(event: JobRequested) -> None:
    pass


async def test_readyz_says_ready_only_while_connected_and_consuming(broker: Broker) -> None:
    port = free_port()
    async with probes(broker, port) as readiness:
        waiting = await get(port, "/readyz")
        alive = await get(port, "/healthz")
        await broker.connect()
        connected = await get(port, "/readyz")
        consumer = await broker.consume(PROCESSOR, JobRequested, nothing, prefetch=1)
        readiness.watch(consumer)
        consuming = await get(port, "/readyz")
        await consumer.stop(1)
        stopped = await get(port, "/readyz")

    assert (waiting.status_code, waiting.json()["detail"]) == (503, NOT_CONNECTED)
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert (connected.status_code, connected.json()["detail"]) == (503, NOT_CONSUMING)
    assert (consuming.status_code, consuming.json()) == (200, {"status": "ready"})
    assert (stopped.status_code, stopped.json()["detail"]) == (503, NOT_CONSUMING)


async def test_the_consumers_counts_follow_each_message_to_its_end(
    broker: Broker, broker_url: str
) -> None:
    def consumed(outcome: str, event_type: str = "JobRequested") -> Callable[[], float]:
        return change_of(
            "pipeline_events_consumed_total",
            stage="processor",
            event_type=event_type,
            outcome=outcome,
        )

    acked, retried, dead = consumed("acked"), consumed("retried"), consumed("dead_lettered")
    poison = consumed("dead_lettered", event_type="unknown")
    permanent = change_of(
        "pipeline_handling_failures_total",
        stage="processor",
        event_type="JobRequested",
        failure="permanent",
    )
    job_failed = change_of(
        "pipeline_events_published_total", event_type="JobFailed", outcome="confirmed"
    )
    timed = change_of(
        "pipeline_handling_duration_seconds_count", stage="processor", outcome="acked"
    )
    tried: set[str] = set()

    async def handler(event: JobRequested) -> None:
        fate = str(event.data["fate"])
        if fate == "fails" or (fate == "fails once" and str(event.job_id) not in tried):
            tried.add(str(event.job_id))
            raise (PermanentFailure if fate == "fails" else TransientFailure)(fate)

    await broker.connect()
    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    for fate in ("works", "works", "fails once", "fails"):
        await broker.publish(job(fate))
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(b"not json", type="SomethingElse")
        await channel.default_exchange.publish(message, routing_key=PROCESSOR.queue)

    async def all_settled() -> bool:
        return acked() == 3 and poison() == 1 and dead() == 1

    await async_wait_for(all_settled, what="every message settled")
    await consumer.stop(1)

    assert (acked(), retried(), dead(), poison()) == (3, 1, 1, 1)
    assert permanent() == 1
    assert job_failed() == 1
    assert timed() == 3
    assert sample("pipeline_messages_in_flight", stage="processor") == 0


async def test_the_endpoint_serves_the_metrics_and_refuses_what_it_does_not_serve(
    broker: Broker,
) -> None:
    port = free_port()
    async with (
        probes(broker, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client,
    ):
        scrape = await client.get("/metrics")
        open_metrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        head = await client.head("/healthz")
        unknown = await client.get("/jobs")
        posted = await client.post("/metrics")

    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE pipeline_events_consumed_total counter" in scrape.text
    assert "process_cpu_seconds_total" in scrape.text
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    assert (head.status_code, head.content) == (200, b"")
    assert unknown.status_code == 404
    assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")


async def answer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends before it closes the connection."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=5)
    except ConnectionResetError:
        return b""


async def test_a_client_too_slow_or_too_big_is_dropped_and_the_endpoint_goes_on(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_server, "HEAD_TIMEOUT_SECONDS", 0.2)
    port = free_port()
    async with probes(broker, port):
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        slow.write(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        big_reader, big = await asyncio.open_connection("127.0.0.1", port)
        big.write(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        slow_answer, big_answer = await answer(slow_reader), await answer(big_reader)
        healthy = await get(port, "/healthz")
        slow.close()
        big.close()

    assert (slow_answer, big_answer) == (b"", b"")
    assert healthy.status_code == 200


async def test_a_port_in_use_stops_the_worker_with_a_line_naming_the_setting(
    broker: Broker,
) -> None:
    port = free_port()
    async with probes(broker, port):
        with pytest.raises(SystemExit, match="METRICS_PORT") as stopped:
            async with probes(broker, port):
                pass

    assert f"127.0.0.1:{port}" in str(stopped.value)
