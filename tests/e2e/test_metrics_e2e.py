"""Each service's metrics count what really happened, and a worker's /readyz tells the truth
about its broker connection."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from e2e.conftest import Pipeline, metrics_url
from pipeline_shared.probe_server import NOT_CONNECTED
from support.mailtrap_stub import MailtrapStub
from support.scraping import Figure, figure, scrape
from support.services import Service
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

GOOD_JOBS = 5
FAILING_JOBS = 2


def wait_for_figures(service: str, url: str, expected: dict[Figure, float]) -> dict[Figure, float]:
    """Poll ``url/metrics`` until it shows ``expected`` (a figure it lacks is 0); all of
    its figures, or fail naming those that differ."""
    seen: dict[Figure, float] = {}

    def matches() -> bool:
        seen.clear()
        seen.update(scrape(url))
        return all(seen.get(key, 0.0) == value for key, value in expected.items())

    try:
        wait_for(matches, timeout=30, interval=0.2, what=f"{service}'s metrics")
    except AssertionError as exc:
        wrong = {
            f"{name}{dict(labels)}": (seen.get((name, labels), 0.0), value)
            for (name, labels), value in expected.items()
            if seen.get((name, labels), 0.0) != value
        }
        raise AssertionError(f"{exc}: (shown, expected) {wrong}") from None
    return dict(seen)


def consumed(stage: str, event_type: str, outcome: str) -> Figure:
    return figure(
        "pipeline_events_consumed_total", stage=stage, event_type=event_type, outcome=outcome
    )


def published(event_type: str) -> Figure:
    return figure("pipeline_events_published_total", event_type=event_type, outcome="confirmed")


def submit(api_url: str, **body: object) -> str:
    response = httpx.post(f"{api_url}/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def test_each_services_metrics_count_what_was_sent_retried_and_failed(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()
    # The first email is not taken (503): the mailer retries it once. Alone in the
    # pipeline, so that no other email shares its request.
    mailtrap.fail_next(1, 503)
    first = submit(pipeline.api.url, email="user0@example.com", data={"n": 0})
    wait_for(lambda: mailtrap.deliveries_by_job()[first] == 1, what="the first email, retried")
    good = [first]
    for n in range(1, GOOD_JOBS):
        good.append(submit(pipeline.api.url, email=f"user{n}@example.com", data={"n": n}))
    for n in range(FAILING_JOBS):  # an unknown step: a permanent failure in the processor
        submit(pipeline.api.url, email=f"bad{n}@example.com", data={}, step="no_such_step")
    jobs = GOOD_JOBS + FAILING_JOBS

    api = wait_for_figures(
        "api-service",
        pipeline.api.url,
        {
            figure("http_requests_total", method="POST", route="/jobs", status="202"): jobs,
            published("JobRequested"): jobs,
        },
    )
    status = wait_for_figures(
        "status-service",
        metrics_url(pipeline.status),
        {
            # The read model saw every job event after the request, which the api
            # records itself: no JobRequested comes through its queue.
            consumed("status", "JobRequested", "acked"): 0,
            consumed("status", "DataProcessed", "acked"): GOOD_JOBS,
            consumed("status", "EmailSent", "acked"): GOOD_JOBS,
            consumed("status", "JobFailed", "acked"): FAILING_JOBS,
            consumed("status", "DataProcessed", "dead_lettered"): 0,
            figure("pipeline_messages_in_flight", stage="status"): 0,
        },
    )
    processor = wait_for_figures(
        "processor-service",
        metrics_url(pipeline.processor),
        {
            consumed("processor", "JobRequested", "acked"): GOOD_JOBS,
            consumed("processor", "JobRequested", "dead_lettered"): FAILING_JOBS,
            consumed("processor", "JobRequested", "retried"): 0,
            figure(
                "pipeline_handling_failures_total",
                stage="processor",
                event_type="JobRequested",
                failure="permanent",
            ): FAILING_JOBS,
            published("DataProcessed"): GOOD_JOBS,
            published("JobFailed"): FAILING_JOBS,
            figure(
                "pipeline_handling_duration_seconds_count", stage="processor", outcome="acked"
            ): (GOOD_JOBS),
            figure("pipeline_messages_in_flight", stage="processor"): 0,
        },
    )
    mailer = wait_for_figures(
        "mailer-service",
        metrics_url(pipeline.mailer),
        {
            consumed("mailer", "DataProcessed", "acked"): GOOD_JOBS,
            consumed("mailer", "DataProcessed", "retried"): 1,
            consumed("mailer", "DataProcessed", "dead_lettered"): 0,
            figure(
                "pipeline_handling_failures_total",
                stage="mailer",
                event_type="DataProcessed",
                failure="transient",
            ): 1,
            figure(
                "mailer_provider_send_duration_seconds_count",
                transport="mailtrap",
                outcome="accepted",
            ): GOOD_JOBS,
            figure(
                "mailer_provider_send_duration_seconds_count",
                transport="mailtrap",
                outcome="not_sent",
            ): 1,
            published("EmailSent"): GOOD_JOBS,
            figure("mailer_job_duration_seconds_count"): GOOD_JOBS,
            figure("pipeline_messages_in_flight", stage="mailer"): 0,
        },
    )

    # What the stand-in saw agrees: every good job's email once.
    assert mailtrap.deliveries_by_job() == dict.fromkeys(good, 1)
    # Each job took some time from its request to its email, and not minutes.
    assert 0 < mailer[figure("mailer_job_duration_seconds_sum")] < 60 * GOOD_JOBS
    # No worker counted anything under another's stage; the api, which consumes
    # nothing, under none.
    for figures, own in (
        (api, set()),
        (status, {"status"}),
        (processor, {"processor"}),
        (mailer, {"mailer"}),
    ):
        stages = {dict(labels).get("stage") for _, labels in figures} - {None}
        assert stages == own, stages


def readyz(worker: Service) -> tuple[int, str | None]:
    """The worker's /readyz status and ``detail`` (0 while it does not answer)."""
    try:
        response = httpx.get(f"{metrics_url(worker)}/readyz", timeout=2)
    except httpx.HTTPError:
        return 0, None
    return response.status_code, response.json().get("detail")


def test_a_workers_readyz_is_503_while_its_broker_is_cut_off_and_200_once_it_is_back(
    pipeline_factory: PipelineFactory, broker_url: str, proxy: TcpProxy
) -> None:
    through_proxy = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    pipeline = pipeline_factory(RABBITMQ_URL=through_proxy.geturl())
    workers = (pipeline.processor, pipeline.mailer)

    def all_answer(status: int, detail: str | None = None) -> bool:
        for worker in workers:
            assert worker.running, f"{worker.command} exited:\n{worker.output()}"
        return all(readyz(worker) == (status, detail) for worker in workers)

    proxy.cut()  # no broker yet: alive, not ready
    for worker in workers:
        worker.start()
    wait_for(lambda: all_answer(503, NOT_CONNECTED), what="503 before the broker is reached")
    for worker in workers:
        assert httpx.get(f"{metrics_url(worker)}/healthz", timeout=2).status_code == 200

    proxy.open()
    wait_for(lambda: all_answer(200), timeout=30, what="200 once connected and consuming")

    proxy.cut()
    wait_for(lambda: all_answer(503, NOT_CONNECTED), what="503 while the broker is cut off")
    for worker in workers:
        assert httpx.get(f"{metrics_url(worker)}/healthz", timeout=2).status_code == 200

    proxy.open()
    wait_for(lambda: all_answer(200), timeout=30, what="200 once the consumers are back")
