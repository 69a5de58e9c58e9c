"""A real Consumer against the real broker, logging with LOG_FORMAT=json: each handled
message is one JSON line naming its job, its event and what became of it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.trace import SpanKind

from pipeline_shared import tracing
from pipeline_shared.errors import PermanentFailure
from pipeline_shared.events import JobRequested
from pipeline_shared.logs import configure_service_logging
from pipeline_shared.messaging import Broker
from pipeline_shared.settings import PipelineSettings
from pipeline_shared.topology import PROCESSOR
from support.waiting import async_wait_for

SERVICE = "processor-service"


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What the service writes to stderr, as the test can read it while it runs."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture
def json_logging(broker_url: str, stderr: io.StringIO) -> Iterator[PipelineSettings]:
    """The service's logging set up from settings that ask for JSON, undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aio_pika", "aiormq")}
    settings = PipelineSettings(rabbitmq_url=broker_url, log_format="json", retry_delays=(0.1,))
    configure_service_logging(settings, SERVICE)
    yield settings
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.fixture
async def broker(json_logging: PipelineSettings) -> AsyncIterator[Broker]:
    broker = Broker.from_settings(json_logging, app_id=SERVICE)
    await broker.connect()
    yield broker
    await broker.close()


def handled_lines(err: str) -> dict[str, dict[str, object]]:
    """The consumer's JSON lines that carry an outcome, by job id."""
    records = [json.loads(line) for line in err.splitlines()]
    return {str(r["job_id"]): r for r in records if "outcome" in r}


async def test_each_handled_message_is_one_json_line_with_its_job_event_and_outcome(
    broker: Broker, stderr: io.StringIO
) -> None:
    good = JobRequested(job_id=uuid.uuid4(), email="ada@example.com", data={"n": 1})
    bad = JobRequested(job_id=uuid.uuid4(), email="grace@example.org", data={"n": 2})

    async def handler(received: JobRequested) -> None:
        if received.job_id == bad.job_id:
            raise PermanentFailure(f"refused by {received.email}")

    consumer = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=4)
    # The good job in a trace (as the api publishes every job), the bad one in none.
    with tracing.span("submit", SpanKind.SERVER, parent=tracing.new_root()) as span:
        trace_id = tracing.trace_id_of(span)
        await broker.publish(good)
    await broker.publish(bad)
    seen: dict[str, dict[str, object]] = {}

    async def both_logged() -> bool:
        seen.update(handled_lines(stderr.getvalue()))
        return {str(good.job_id), str(bad.job_id)} <= seen.keys()

    try:
        await async_wait_for(both_logged, timeout=10, what="both handled lines")
    finally:
        await asyncio.wait_for(consumer.stop(5), 10)

    acked = seen[str(good.job_id)]
    assert acked["outcome"] == "acked"
    assert acked["event_id"] == str(good.event_id)
    assert acked["event_type"] == "JobRequested"
    assert acked["attempt"] == 1
    assert isinstance(acked["duration_ms"], float)
    assert acked["duration_ms"] >= 0
    assert acked["trace_id"] == trace_id
    assert acked["service"] == SERVICE
    assert acked["level"] == "INFO"
    assert acked["logger"] == "pipeline.messaging"
    assert str(acked["message"]).startswith(f"job {good.job_id}: JobRequested handled in ")

    failed = seen[str(bad.job_id)]
    assert failed["outcome"] == "dead_lettered"
    assert failed["event_id"] == str(bad.event_id)
    assert failed["level"] == "ERROR"
    # A message that came without a trace starts one: its lines still share an id.
    assert re.fullmatch("[0-9a-f]{32}", str(failed["trace_id"]))
    assert failed["trace_id"] != trace_id
    assert "refused by g***@example.org" in str(failed["message"])
    assert "grace@example.org" not in json.dumps(failed)
