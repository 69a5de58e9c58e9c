"""One trace per job: W3C trace context from the HTTP request through every hop.

A job's trace starts at the api (continuing a ``traceparent`` the client sent,
or a new one) and travels in each message's AMQP headers, ``traceparent`` and
``tracestate``, the way W3C Trace Context says it travels in HTTP headers.
Retry and dead-letter copies keep the headers, so a retried job stays in its
trace.

Spans are exported only where OpenTelemetry is configured through its usual
variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(OTLP over HTTP, protobuf), or ``OTEL_TRACES_EXPORTER`` set to ``otlp`` or
``console``; ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and the exporter's own variables apply as documented by
OpenTelemetry. Without them no span is recorded, which costs nearly nothing,
and the trace id still travels: every log line of a handled event and
``GET /jobs/{id}`` show it, and a collector configured later sees whole traces.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("pipeline.tracing")

TRACER_NAME = "pipeline"
HEADERS = ("traceparent", "tracestate")
MAX_HEADER_CHARS = 512
"""A longer ``tracestate`` (or ``traceparent``, which has 55) is dropped, not passed
on (W3C: propagate at least 512 characters of tracestate)."""
SHUTDOWN_SECONDS = 2.0
"""How long a stop waits for buffered spans to reach the collector."""

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_root_sampler: Sampler = ALWAYS_ON

# The SDK logs a warning per malformed header a client sends, and per span it
# drops while the collector is away: errors only, so no one can flood the logs.
for _noisy in ("opentelemetry.trace", "opentelemetry.sdk._shared_internal"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def exporter_from_environment(environ: Mapping[str, str]) -> SpanExporter | None:
    """The span exporter the ``OTEL_*`` variables ask for, or None to export nothing."""
    choice = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if choice not in ("", "otlp"):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", choice)
        return None
    if choice == "" and not endpoint:
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol.strip().lower() != "http/protobuf":
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported: spans are exported as "
            "http/protobuf (the collector's port 4318)",
            protocol,
        )
    # Imported only when used: it brings requests and protobuf along.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    signal = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    url = signal or (base.rstrip("/") + "/v1/traces" if base else None)
    return OTLPSpanExporter(endpoint=url)


def root_sampler_from_environment(environ: Mapping[str, str]) -> Sampler:
    """Whether a trace started where nothing exports is to be recorded further on, by
    ``OTEL_TRACES_SAMPLER`` (and its ``_ARG``), as an exporting service would decide:
    by the trace id, so every service that samples by ratio keeps the same traces."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in ("always_off", "parentbased_always_off"):
        return ALWAYS_OFF
    if name in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0
        return TraceIdRatioBased(min(max(ratio, 0.0), 1.0))
    return ALWAYS_ON


def configure(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Export this process's spans if the environment asks for it; True if it does.

    Call once at startup, before the first span; ``shutdown`` at exit sends what is
    still buffered."""
    global _root_sampler
    exporter = exporter_from_environment(environ)
    if exporter is None:
        _root_sampler = root_sampler_from_environment(environ)
        return False
    named = environ.get("OTEL_SERVICE_NAME")
    start_exporting(exporter, Resource.create({} if named else {SERVICE_NAME: service_name}))
    log.info("exporting trace spans (%s)", type(exporter).__name__)
    return True


def start_exporting(exporter: SpanExporter, resource: Resource, *, batched: bool = True) -> None:
    """Record spans and hand them to ``exporter`` (in batches, from a thread of the SDK's;
    tests pass ``batched=False`` to see each span as it ends)."""
    global _provider
    shutdown()
    provider = TracerProvider(resource=resource)
    processor = BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    # The module's own provider, not OpenTelemetry's global one (which can be set
    # only once per process): the pipeline makes all of its spans here.
    _provider = provider


@contextmanager
def configured(service_name: str) -> Iterator[bool]:
    """``configure`` for the block (a process's whole run), ``shutdown`` after it."""
    try:
        yield configure(service_name)
    finally:
        shutdown()


def shutdown() -> None:
    """Send the spans still buffered, for at most ``SHUTDOWN_SECONDS``, and stop exporting.

    The SDK's own shutdown waits up to 30 s for a collector that does not answer,
    longer than a stop may take: it runs in a thread of its own, given up on after
    the bound (a daemon thread, so the process still exits)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    flushing = threading.Thread(target=provider.shutdown, name="trace-shutdown", daemon=True)
    flushing.start()
    flushing.join(SHUTDOWN_SECONDS)
    if flushing.is_alive():
        log.warning(
            "buffered trace spans not sent: the collector did not take them within %g s",
            SHUTDOWN_SECONDS,
        )


def exporting() -> bool:
    return _provider is not None


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context into ``headers`` (an AMQP message's)."""
    _propagator.inject(headers)


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The trace context ``headers`` carry (HTTP or AMQP); a malformed one is ignored.

    Where nothing records spans, a message or request without a valid context
    gets a new trace id here, so that it still has one to pass on and log."""
    carrier = {
        name: value
        for name in HEADERS
        if isinstance(value := (headers or {}).get(name), str)
        and value.isascii()
        and len(value) <= MAX_HEADER_CHARS
    }
    found = _propagator.extract(carrier)
    if exporting() or trace.get_current_span(found).get_span_context().is_valid:
        return found
    return new_root()


def new_root() -> Context:
    """A context starting a new trace: empty where spans are recorded (the SDK gives
    the first span new ids and its sampler decides), else one holding fresh ids that
    nothing here records, flagged sampled as ``OTEL_TRACES_SAMPLER`` decides
    (``root_sampler_from_environment``): the services further on that export follow
    the flag."""
    if exporting():
        return Context()
    # Unique, not secret: the SDK's own ids come from ``random`` too, and
    # ``secrets`` was a system call per id.
    trace_id = random.getrandbits(128) or 1
    decision = _root_sampler.should_sample(None, trace_id, "root").decision
    ids = SpanContext(
        trace_id=trace_id,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(
            TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        ),
    )
    return trace.set_span_in_context(NonRecordingSpan(ids), Context())


def trace_id_of(span: Span) -> str | None:
    """The span's trace id as 32 hex digits (how W3C and trace viewers write it)."""
    ids = span.get_span_context()
    return format(ids.trace_id, "032x") if ids.is_valid else None


def current_trace_id() -> str | None:
    return trace_id_of(trace.get_current_span())


@contextmanager
def span(
    name: str,
    kind: SpanKind,
    *,
    parent: Context | None = None,
    attributes: Mapping[str, str | int] | None = None,
    links: Sequence[Link] = (),
) -> Iterator[Span]:
    """A span for the block, current within it, a child of ``parent`` (default: the
    current context). Where nothing records spans the block runs in ``parent``'s
    context unchanged, without the cost of making a span no one sees."""
    if _provider is not None:
        with _provider.get_tracer(TRACER_NAME).start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes, links=links
        ) as made:
            yield made
        return
    if parent is None:
        yield trace.get_current_span()
        return
    token = otel_context.attach(parent)
    try:
        yield trace.get_current_span(parent)
    finally:
        otel_context.detach(token)


def job_trace(name: str, job_id: str, link_to: Span | None = None) -> ContextManager[Span]:
    """A new trace for one job of a batch, linked to the request that submitted it:
    one trace per job, however it was submitted."""
    linked = link_to.get_span_context() if link_to is not None else None
    return span(
        name,
        SpanKind.INTERNAL,
        parent=new_root(),
        attributes={"messaging.message.conversation_id": job_id},
        links=[Link(linked)] if linked is not None and linked.is_valid else [],
    )
