"""W3C trace context in and out, choosing an exporter from OTEL_*, and recording spans."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api_service.http_tracing import trace_headers
from pipeline_shared import tracing

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def trace_id_in(context: object) -> str | None:
    return tracing.trace_id_of(trace.get_current_span(context))  # type: ignore[arg-type]


# --- reading and writing the context -------------------------------------------


def test_a_valid_traceparent_is_continued() -> None:
    assert trace_id_in(tracing.extract({"traceparent": PARENT})) == TRACE_ID


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"traceparent": "00-not-a-trace-01"},
        {"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"},  # the invalid all-zero id
        {"traceparent": PARENT.encode()},  # not a string (as a hostile AMQP header may be)
        {"traceparent": PARENT.replace("4b", "\uff14b")},  # non-ASCII digits
    ],
)
def test_without_a_valid_context_a_new_trace_starts(headers: dict[str, object] | None) -> None:
    first, second = trace_id_in(tracing.extract(headers)), trace_id_in(tracing.extract(headers))

    assert first is not None
    assert re.fullmatch("[0-9a-f]{32}", first)
    assert first not in (second, TRACE_ID)


@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), st.text()))
def test_any_header_values_give_a_trace_id_and_never_raise(headers: dict[str, str]) -> None:
    found = trace_id_in(tracing.extract(headers))
    assert found is not None
    assert re.fullmatch("[0-9a-f]{32}", found)


def test_the_context_is_written_into_message_headers_with_its_tracestate() -> None:
    context = tracing.extract({"traceparent": PARENT, "tracestate": "vendor=opaque"})
    headers: dict[str, object] = {}
    with tracing.span("publish", SpanKind.PRODUCER, parent=context):
        tracing.inject(headers)

    assert headers == {"traceparent": PARENT, "tracestate": "vendor=opaque"}


def test_http_trace_headers_are_read_as_w3c_says() -> None:
    parent, state = (b"traceparent", PARENT.encode()), (b"tracestate", b"a=1")

    assert trace_headers([parent, (b"accept", b"*/*")]) == {"traceparent": PARENT}
    assert trace_headers([parent, state, (b"tracestate", b"b=2")]) == {
        "traceparent": PARENT,
        "tracestate": "a=1,b=2",
    }
    # Two traceparent headers are no context at all; a tracestate alone neither.
    assert trace_headers([parent, parent]) == {}
    assert trace_headers([state]) == {}


# --- choosing an exporter --------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, OTLPSpanExporter),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, OTLPSpanExporter),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, OTLPSpanExporter),
        ({"OTEL_TRACES_EXPORTER": "console"}, ConsoleSpanExporter),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ],
)
def test_the_exporter_is_what_the_otel_variables_ask_for(
    environ: dict[str, str], expected: type | None
) -> None:
    exporter = tracing.exporter_from_environment(environ)
    if expected is None:
        assert exporter is None
    else:
        assert isinstance(exporter, expected)
        exporter.shutdown()


def test_an_exporter_this_pipeline_lacks_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert tracing.exporter_from_environment({"OTEL_TRACES_EXPORTER": "zipkin"}) is None
    assert "OTEL_TRACES_EXPORTER=zipkin is not supported" in caplog.text


def test_nothing_is_recorded_unless_exporting() -> None:
    assert not tracing.exporting()
    with tracing.span("work", SpanKind.INTERNAL, parent=tracing.new_root()) as span:
        assert not span.is_recording()
        assert tracing.current_trace_id() == tracing.trace_id_of(span)


# --- recording spans ------------------------------------------------------------


def test_spans_are_recorded_in_the_trace_of_their_parent(
    exported: InMemorySpanExporter,
) -> None:
    with (
        tracing.span(
            "POST /jobs", SpanKind.SERVER, parent=tracing.extract({"traceparent": PARENT})
        ),
        tracing.span("publish job.requested", SpanKind.PRODUCER) as publish,
    ):
        assert publish.is_recording()

    server, producer = sorted(exported.get_finished_spans(), key=lambda s: s.name)
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert producer.parent is not None
    assert producer.parent.span_id == server.context.span_id
    assert server.resource.attributes["service.name"] == "test"


def test_a_job_trace_is_a_new_root_linked_to_its_request(
    exported: InMemorySpanExporter,
) -> None:
    with tracing.span("POST /jobs/batch", SpanKind.SERVER, parent=tracing.new_root()) as request:
        with tracing.job_trace("accept job", "job-1", link_to=request) as job:
            job_trace = tracing.trace_id_of(job)
        assert job_trace != tracing.trace_id_of(request)

    accepted = next(s for s in exported.get_finished_spans() if s.name == "accept job")
    assert accepted.parent is None
    assert [link.context.span_id for link in accepted.links] == [request.get_span_context().span_id]


def test_a_trace_started_where_nothing_records_asks_exporting_services_to_record_it() -> None:
    headers: dict[str, object] = {}
    with tracing.span("POST /jobs", SpanKind.SERVER, parent=tracing.extract({})):
        tracing.inject(headers)

    assert str(headers["traceparent"]).endswith("-01")
    # A client's own decision is passed on unchanged.
    unsampled = PARENT[:-2] + "00"
    with tracing.span(
        "POST /jobs", SpanKind.SERVER, parent=tracing.extract({"traceparent": unsampled})
    ):
        tracing.inject(headers)
    assert headers["traceparent"] == unsampled


@pytest.mark.parametrize(
    ("environ", "flag"),
    [
        ({}, "01"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, "00"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, "00"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, "01"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"}, "01"),
    ],
)
def test_where_nothing_exports_a_new_trace_is_flagged_as_the_sampler_variables_say(
    environ: dict[str, str], flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So sampling still works when only the workers export.
    monkeypatch.setattr(tracing, "_root_sampler", tracing.root_sampler_from_environment(environ))
    headers: dict[str, object] = {}
    with tracing.span("POST /jobs", SpanKind.SERVER, parent=tracing.extract({})):
        tracing.inject(headers)

    assert str(headers["traceparent"]).endswith(f"-{flag}")


def test_an_over_long_tracestate_is_dropped_and_the_trace_kept() -> None:
    headers: dict[str, object] = {}
    context = tracing.extract({"traceparent": PARENT, "tracestate": "k=" + "v" * 600})
    with tracing.span("publish", SpanKind.PRODUCER, parent=context):
        tracing.inject(headers)

    assert headers == {"traceparent": PARENT}


def test_spans_go_to_the_collector_named_by_the_base_or_the_signal_endpoint() -> None:
    base = tracing.exporter_from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    signal = tracing.exporter_from_environment(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom/path"}
    )
    assert isinstance(base, OTLPSpanExporter)
    assert isinstance(signal, OTLPSpanExporter)
    assert base._endpoint == "http://c:4318/v1/traces"
    assert signal._endpoint == "http://c:4318/custom/path"


def test_a_stop_waits_for_a_collector_that_does_not_answer_only_a_bounded_time() -> None:
    class Unanswered(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            time.sleep(30)
            return SpanExportResult.FAILURE

    tracing.start_exporting(Unanswered(), Resource.create({"service.name": "test"}))
    for _ in range(10):
        with tracing.span("work", SpanKind.INTERNAL):
            pass
    started = time.monotonic()
    tracing.shutdown()

    assert time.monotonic() - started < tracing.SHUTDOWN_SECONDS + 1
    assert not tracing.exporting()
