"""One trace per job across the services: W3C trace context in the AMQP headers, spans
exported over OTLP to a collector stand-in, and the trace id in the job's status."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator

import httpx
import pytest

from e2e.conftest import Pipeline
from support.otlp_collector import ExportedSpan, OtlpCollector
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]
SERVICES = {"api-service", "status-service", "processor-service", "mailer-service"}


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture
def exporting(pipeline_factory: PipelineFactory, collector: OtlpCollector) -> Pipeline:
    """The four services exporting their spans to ``collector``, flushed every 0.1 s."""
    pipeline = pipeline_factory(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_BSP_SCHEDULE_DELAY="100"
    )
    pipeline.start()
    return pipeline


def traceparent() -> tuple[str, str, str]:
    """A client's own trace context: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def job_view(pipeline: Pipeline, job_id: str) -> dict[str, object]:
    response = httpx.get(f"{pipeline.api.url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    view: dict[str, object] = response.json()
    return view


def wait_sent(pipeline: Pipeline, job_id: str) -> dict[str, object]:
    wait_for(
        lambda: job_view(pipeline, job_id)["status"] == "sent",
        timeout=30,
        what=f"job {job_id} to be sent",
    )
    return job_view(pipeline, job_id)


def one(spans: list[ExportedSpan], service: str, name: str) -> ExportedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def wait_trace(collector: OtlpCollector, trace_id: str) -> list[ExportedSpan]:
    """The trace once the mailer's email.sent publish and status-service's record of it
    are in."""

    def complete() -> bool:
        names = {(s.service, s.name) for s in collector.trace(trace_id)}
        return {
            ("mailer-service", "publish email.sent"),
            ("status-service", "process api.job.status"),
        } <= names and len(names) >= 8

    wait_for(complete, timeout=20, what=f"the spans of trace {trace_id}")
    return collector.trace(trace_id)


def test_a_job_is_one_trace_through_every_service_continuing_the_clients(
    exporting: Pipeline, collector: OtlpCollector
) -> None:
    pipeline = exporting
    header, client_trace, client_span = traceparent()

    response = httpx.post(
        f"{pipeline.api.url}/jobs",
        json={"email": "ada@example.com", "data": {"n": 1}},
        headers={"traceparent": header, "tracestate": "vendor=opaque"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    assert wait_sent(pipeline, job_id)["trace_id"] == client_trace
    spans = wait_trace(collector, client_trace)
    assert {s.service for s in spans} == SERVICES
    request = one(spans, "api-service", "POST /jobs")
    assert (request.kind, request.parent_span_id) == ("server", client_span)
    assert request.attributes["http.response.status_code"] == 202
    # Each hop is the child of the publish that sent its message.
    chain = [
        ("api-service", "publish job.requested", "producer"),
        ("processor-service", "process processor.job.requested", "consumer"),
        ("processor-service", "publish data.processed", "producer"),
        ("mailer-service", "process mailer.data.processed", "consumer"),
    ]
    parent = request
    for service, name, kind in chain:
        span = one(spans, service, name)
        assert (span.kind, span.parent_span_id) == (kind, parent.span_id), name
        assert span.attributes["messaging.message.conversation_id"] == job_id
        parent = span
    sending = one(spans, "mailer-service", "send email")
    assert (sending.kind, sending.parent_span_id) == ("client", parent.span_id)
    assert sending.attributes["email.transport"] == "outbox"
    assert not any(s.error for s in spans)


def test_each_job_of_a_batch_is_a_trace_of_its_own_linked_to_the_request(
    exporting: Pipeline, collector: OtlpCollector
) -> None:
    pipeline = exporting
    header, client_trace, _ = traceparent()

    response = httpx.post(
        f"{pipeline.api.url}/jobs/batch",
        json={"jobs": [{"email": f"user{n}@example.com", "data": {"n": n}} for n in range(2)]},
        headers={"traceparent": header},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_ids = [job["job_id"] for job in response.json()["jobs"]]

    traces = [str(wait_sent(pipeline, job_id)["trace_id"]) for job_id in job_ids]
    assert len(set(traces)) == 2
    assert client_trace not in traces
    wait_for(
        lambda: any(s.name == "POST /jobs/batch" for s in collector.trace(client_trace)),
        timeout=10,
        what="the batch request's span",
    )
    request = one(collector.trace(client_trace), "api-service", "POST /jobs/batch")
    for job_id, trace_id in zip(job_ids, traces, strict=True):
        spans = wait_trace(collector, trace_id)
        assert {s.service for s in spans} == SERVICES
        accepted = one(spans, "api-service", "accept job")
        assert accepted.parent_span_id == ""  # the root of the job's trace
        assert accepted.links == ((client_trace, request.span_id),)
        assert accepted.attributes["messaging.message.conversation_id"] == job_id
        publish = one(spans, "api-service", "publish job.requested")
        assert publish.parent_span_id == accepted.span_id


def test_without_opentelemetry_configured_the_trace_id_still_travels_and_is_logged(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(LOG_FORMAT="json", LOG_LEVEL="INFO")
    pipeline.start()
    header, client_trace, _ = traceparent()

    response = httpx.post(
        f"{pipeline.api.url}/jobs",
        json={"email": "ada@example.com", "data": {"n": 1}},
        headers={"traceparent": header},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    untraced = httpx.post(
        f"{pipeline.api.url}/jobs",
        json={"email": "grace@example.org", "data": {"n": 2}},
        headers={"traceparent": "00-not-a-trace-01"},  # malformed: a new trace
        timeout=10,
    )
    assert untraced.status_code == 202, untraced.text
    other_job = untraced.json()["job_id"]

    assert wait_sent(pipeline, job_id)["trace_id"] == client_trace
    other_trace = wait_sent(pipeline, other_job)["trace_id"]
    assert isinstance(other_trace, str)
    assert len(other_trace) == 32
    assert other_trace != client_trace
    for worker in (pipeline.processor, pipeline.mailer):
        handled = [
            record
            for line in worker.output().splitlines()
            if line.startswith("{")
            and (record := json.loads(line)).get("outcome")
            and record.get("job_id") in (job_id, other_job)
        ]
        assert {(r["job_id"], r["trace_id"]) for r in handled} == {
            (job_id, client_trace),
            (other_job, other_trace),
        }, worker.command
