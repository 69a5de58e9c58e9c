"""The metrics' pure parts: labels, the publish and send counts, the api's route templates.

Metrics live on prometheus_client's process-wide registry, so each test reads
a figure before and after what it does and asserts on the difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.routing import BaseRoute

from api_service.app import create_app
from api_service.http_metrics import UNMATCHED, route_template
from api_service.settings import ApiSettings
from mailer_service.compose import Sender, compose_email
from mailer_service.handlers import SendEmail
from mailer_service.metrics import MeasuredTransport, send_outcome
from mailer_service.transport import SendOutcomeUnknown
from pipeline_shared import metrics
from pipeline_shared.errors import (
    BrokerUnavailable,
    Deferred,
    PermanentFailure,
    PublishOutcomeUnknown,
    TransientFailure,
)
from pipeline_shared.events import Event, utc_now
from pipeline_shared.messaging import PoisonMessage
from unit.fakes import FakeLedger, FakePublisher, FakeTransport, data_processed

KEY = "a-metrics-test-key-0123456789"
SENDER = Sender(email="pipeline@example.com", name="Email Pipeline", category="background-job")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def change_of(name: str, **labels: str) -> Callable[[], float]:
    """How much ``name{labels}`` has changed since this call."""
    before = sample(name, **labels)
    return lambda: sample(name, **labels) - before


# --- labels -------------------------------------------------------------------------------------


def test_a_decoded_event_is_labelled_by_its_own_type() -> None:
    assert metrics.event_type_label(data_processed(), "anything") == "DataProcessed"


@pytest.mark.parametrize(
    ("message_type", "label"),
    [("JobRequested", "JobRequested"), ("Whatever-a-stranger-sent", "unknown"), (None, "unknown")],
)
def test_an_undecodable_message_is_labelled_by_its_type_only_if_the_pipeline_knows_it(
    message_type: str | None, label: str
) -> None:
    assert metrics.event_type_label(None, message_type) == label


@pytest.mark.parametrize(
    ("failure", "label"),
    [
        (PoisonMessage("not JSON"), "poison"),
        (PermanentFailure("unknown step"), "permanent"),
        (TransientFailure("503"), "transient"),
        (BrokerUnavailable("not connected"), "broker_unavailable"),
        (KeyError("a bug"), "unexpected"),
        (Deferred("another mailer has it"), None),
    ],
)
def test_each_failure_has_a_kind_and_a_deferral_is_none(
    failure: BaseException, label: str | None
) -> None:
    assert metrics.failure_label(failure) == label


def test_a_settled_message_is_counted_timed_and_its_failure_counted_by_kind() -> None:
    consumed = change_of(
        "pipeline_events_consumed_total",
        stage="t1",
        event_type="JobRequested",
        outcome="dead_lettered",
    )
    timed = change_of(
        "pipeline_handling_duration_seconds_count", stage="t1", outcome="dead_lettered"
    )
    failed = change_of(
        "pipeline_handling_failures_total",
        stage="t1",
        event_type="JobRequested",
        failure="permanent",
    )

    metrics.message_settled(
        "t1", None, "JobRequested", "dead-letter", PermanentFailure("no such step"), 0.0
    )

    assert (consumed(), timed(), failed()) == (1, 1, 1)


def test_a_deferred_message_is_counted_as_deferred_and_not_as_a_failure() -> None:
    deferred = change_of(
        "pipeline_events_consumed_total", stage="t2", event_type="DataProcessed", outcome="deferred"
    )
    failed = change_of(
        "pipeline_handling_failures_total",
        stage="t2",
        event_type="DataProcessed",
        failure="transient",
    )

    metrics.message_settled("t2", data_processed(), None, "defer", Deferred("busy"), 0.0)

    assert (deferred(), failed()) == (1, 0)


def test_the_in_flight_gauge_counts_a_message_out_when_its_task_is_done() -> None:
    in_flight = change_of("pipeline_messages_in_flight", stage="t3")

    done = metrics.track_in_flight("t3")
    assert in_flight() == 1
    done(None)

    assert in_flight() == 0


# --- publishing ---------------------------------------------------------------------------------


class Publisher:
    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure

    @metrics.count_publishes
    async def publish(self, event: Event) -> None:
        if self.failure is not None:
            raise self.failure


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (None, "confirmed"),
        (BrokerUnavailable("nacked"), "refused"),
        (PublishOutcomeUnknown("no confirm"), "unknown"),
    ],
)
async def test_each_publish_is_counted_by_the_brokers_answer(
    failure: Exception | None, outcome: str
) -> None:
    counted = change_of(
        "pipeline_events_published_total", event_type="DataProcessed", outcome=outcome
    )

    if failure is None:
        await Publisher().publish(data_processed())
    else:
        with pytest.raises(type(failure)):
            await Publisher(failure).publish(data_processed())

    assert counted() == 1


def test_the_scrape_is_openmetrics_when_asked_and_prometheus_text_otherwise() -> None:
    text, plain = metrics.exposition(None)
    _, open_metrics = metrics.exposition("application/openmetrics-text; version=1.0.0")
    _, garbled = metrics.exposition("application/openmetrics-text; version=not.a.version")

    assert plain.startswith("text/plain; version=0.0.4")
    assert b"# TYPE pipeline_events_consumed_total counter" in text
    assert open_metrics.startswith("application/openmetrics-text")
    assert garbled.startswith(("text/plain", "application/openmetrics-text"))


# --- the mailer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (None, "accepted"),
        (PermanentFailure("Mailtrap answered 401"), "rejected"),
        (TransientFailure("Mailtrap answered 503"), "not_sent"),
        (SendOutcomeUnknown("Mailtrap did not answer in time"), "unknown"),
        (asyncio.CancelledError(), "unknown"),
        (OSError("disk full"), "not_sent"),
    ],
)
def test_a_sends_outcome_is_what_the_handler_makes_of_it(
    failure: BaseException | None, outcome: str
) -> None:
    assert send_outcome(failure) == outcome


async def test_the_measured_transport_times_each_send_by_outcome_and_passes_it_on() -> None:
    accepted = change_of(
        "mailer_provider_send_duration_seconds_count", transport="fake", outcome="accepted"
    )
    not_sent = change_of(
        "mailer_provider_send_duration_seconds_count", transport="fake", outcome="not_sent"
    )
    inner = FakeTransport()
    outgoing = compose_email(data_processed(), SENDER)

    receipt = await MeasuredTransport(inner).send(outgoing)
    with pytest.raises(TransientFailure):
        await MeasuredTransport(FakeTransport(failure=TransientFailure("503"))).send(outgoing)

    assert receipt.message_id == "fake-message-1"
    assert inner.sent == [outgoing]
    assert (accepted(), not_sent()) == (1, 1)


async def test_the_time_from_request_to_email_is_observed_once_per_email_sent() -> None:
    observed = change_of("mailer_job_duration_seconds_count")
    total = change_of("mailer_job_duration_seconds_sum")
    handler = SendEmail(FakeTransport(), FakePublisher(), FakeLedger(), SENDER, lease_seconds=15)
    event = data_processed(requested_at=utc_now() - timedelta(seconds=3))

    await handler(event)
    await handler(event)  # a repeat: EmailSent again, no second email

    assert observed() == 1
    assert 3 <= total() < 60


async def test_an_event_without_its_request_time_is_sent_but_not_timed() -> None:
    observed = change_of("mailer_job_duration_seconds_count")
    transport = FakeTransport()

    await SendEmail(transport, FakePublisher(), FakeLedger(), SENDER, lease_seconds=15)(
        data_processed()
    )

    assert len(transport.sent) == 1
    assert observed() == 0


# --- the api ------------------------------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The api in-process without its lifespan: enough for what runs before a handler
    touches the broker or the store."""
    app = create_app(ApiSettings(_env_file=None, api_keys=KEY, max_request_bytes=1024))  # type: ignore[call-arg]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


def app_routes() -> list[BaseRoute]:
    return create_app(ApiSettings(_env_file=None)).router.routes  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", "/jobs/6f1c2a4e-0000-4000-8000-000000000001", "/jobs/{job_id}"),
        ("GET", "/jobs", "/jobs"),
        ("POST", "/jobs", "/jobs"),
        ("DELETE", "/jobs", "/jobs"),  # 405: the route that has the path
        ("GET", "/jobs/6f1c/../../etc/passwd", UNMATCHED),
        ("GET", "/metrics", "/metrics"),
    ],
)
def test_a_request_is_labelled_by_its_route_template_never_its_path(
    method: str, path: str, template: str
) -> None:
    routes = app_routes()
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}

    assert route_template(routes, scope) == template


async def test_requests_are_counted_by_route_template_and_status(
    client: httpx.AsyncClient,
) -> None:
    template = "/jobs/{job_id}"
    unauthorised = change_of("http_requests_total", method="GET", route=template, status="401")
    timed = change_of("http_request_duration_seconds_count", method="GET", route=template)

    for n in range(3):
        response = await client.get(f"/jobs/6f1c2a4e-0000-4000-8000-00000000000{n}")
        assert response.status_code == 401

    assert (unauthorised(), timed()) == (3, 3)


async def test_a_body_refused_before_any_route_runs_is_counted_under_its_route(
    client: httpx.AsyncClient,
) -> None:
    too_large = change_of("http_requests_total", method="POST", route="/jobs", status="413")

    response = await client.post("/jobs", content=b"x" * 2048, headers={"Authorization": KEY})

    assert response.status_code == 413
    assert too_large() == 1


async def test_metrics_need_no_key_and_stay_out_of_the_openapi_document(
    client: httpx.AsyncClient,
) -> None:
    await client.get("/healthz")

    scrape = await client.get("/metrics")
    document = (await client.get("/openapi.json")).json()

    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert 'http_requests_total{method="GET",route="/healthz",status="200"}' in scrape.text
    assert "/metrics" not in document["paths"]
