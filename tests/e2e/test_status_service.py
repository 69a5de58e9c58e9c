"""status-service, the api's read model, as a process of its own beside the api.

The api records each job it accepts itself; every later event of a job
(DataProcessed, EmailSent, JobFailed) reaches ``GET /jobs/{id}`` only through
status-service, from the queue ``api.job.status``. Without it the api still
takes jobs and says it is ready, and the events wait in the queue; once it
runs it records them. Its own ``/readyz`` (on its METRICS_PORT) says whether
it follows the job events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import aio_pika
import httpx

from e2e.conftest import Pipeline, metrics_url
from pipeline_shared.probe_server import NOT_CONNECTED
from pipeline_shared.topology import STATUS
from support.rabbit import messages_ready_now
from support.scraping import Figure, figure, scrape
from support.services import Service
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

GOOD_JOBS = 2
FAILING_JOBS = 1


def shows(url: str, expected: dict[Figure, float]) -> bool:
    """``url/metrics`` shows ``expected`` (a figure it lacks is 0)."""
    seen = scrape(url)
    return all(seen.get(key, 0.0) == value for key, value in expected.items())


def published(event_type: str, count: int) -> dict[Figure, float]:
    labels = {"event_type": event_type, "outcome": "confirmed"}
    return {figure("pipeline_events_published_total", **labels): count}


def consumed(event_type: str) -> Figure:
    return figure(
        "pipeline_events_consumed_total", stage="status", event_type=event_type, outcome="acked"
    )


def submit(api_url: str, **body: object) -> str:
    response = httpx.post(f"{api_url}/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def status_of(api_url: str, job_id: str) -> str:
    response = httpx.get(f"{api_url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def readyz(service: Service) -> tuple[int, str | None]:
    """status-service's /readyz: its status and ``detail`` (0 while it does not answer)."""
    try:
        response = httpx.get(f"{metrics_url(service)}/readyz", timeout=2)
    except httpx.HTTPError:
        return 0, None
    return response.status_code, response.json().get("detail")


async def events_ready(url: str) -> int:
    """Messages waiting in ``api.job.status`` now (a message may bundle several events)."""
    connection = await aio_pika.connect(url)
    async with connection:
        return await messages_ready_now(await connection.channel(), STATUS.queue)


def test_without_status_service_jobs_are_taken_and_stay_queued_until_it_records_their_events(
    pipeline_factory: PipelineFactory, broker_url: str
) -> None:
    pipeline = pipeline_factory()
    api = pipeline.api
    for service in (api, pipeline.processor, pipeline.mailer):
        service.start()
    api.wait_ready()
    pipeline.wait_workers_consuming()

    # No status-service: the api is ready all the same (it only needs the broker),
    # and takes jobs, which it shows at once as queued.
    ready = httpx.get(f"{api.url}/readyz", timeout=5)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    good = [submit(api.url, email=f"user{n}@example.com", data={"n": n}) for n in range(GOOD_JOBS)]
    failing = [
        submit(api.url, email=f"bad{n}@example.com", data={}, step="no_such_step")
        for n in range(FAILING_JOBS)
    ]
    assert {status_of(api.url, job) for job in good + failing} == {"queued"}

    # The workers did their part: every event of the jobs is at the broker...
    wait_for(
        lambda: shows(
            metrics_url(pipeline.processor),
            {**published("DataProcessed", GOOD_JOBS), **published("JobFailed", FAILING_JOBS)},
        ),
        what="the processor's events confirmed",
    )
    wait_for(
        lambda: shows(metrics_url(pipeline.mailer), published("EmailSent", GOOD_JOBS)),
        what="the mailer's events confirmed",
    )
    # ... waiting in status-service's queue, while the jobs still show queued.
    assert asyncio.run(events_ready(broker_url)) > 0
    assert {status_of(api.url, job) for job in good + failing} == {"queued"}
    assert httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200

    pipeline.status.start()
    pipeline.wait_following()

    wait_for(
        lambda: (
            all(status_of(api.url, job) == "sent" for job in good)
            and all(status_of(api.url, job) == "failed" for job in failing)
        ),
        timeout=30,
        what="the waiting events recorded",
    )
    assert asyncio.run(events_ready(broker_url)) == 0
    # Its metrics count each event it consumed, under the read model's stage.
    wait_for(
        lambda: shows(
            metrics_url(pipeline.status),
            {
                consumed("DataProcessed"): GOOD_JOBS,
                consumed("EmailSent"): GOOD_JOBS,
                consumed("JobFailed"): FAILING_JOBS,
                consumed("JobRequested"): 0,
            },
        ),
        what="status-service's metrics to count the events",
    )
    # The api consumed none of them.
    assert not any(name.startswith("pipeline_events_consumed") for name, _ in scrape(api.url))


def test_status_services_readyz_is_503_until_it_follows_and_while_its_broker_is_cut_off(
    pipeline_factory: PipelineFactory, broker_url: str, proxy: TcpProxy
) -> None:
    through_proxy = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    pipeline = pipeline_factory(
        per_service={"status-service": {"RABBITMQ_URL": through_proxy.geturl()}}
    )
    status = pipeline.status

    def answers(code: int, detail: str | None = None) -> bool:
        assert status.running, f"status-service exited:\n{status.output()}"
        return readyz(status) == (code, detail)

    proxy.cut()  # no broker yet: alive, not following
    status.start()
    wait_for(lambda: answers(503, NOT_CONNECTED), what="503 before the broker is reached")
    assert httpx.get(f"{metrics_url(status)}/healthz", timeout=2).status_code == 200

    proxy.open()
    wait_for(lambda: answers(200), timeout=30, what="200 once it follows the job events")
    ready = httpx.get(f"{metrics_url(status)}/readyz", timeout=2)
    assert ready.json() == {"status": "ready"}

    proxy.cut()
    wait_for(lambda: answers(503, NOT_CONNECTED), what="503 while the broker is cut off")
    assert httpx.get(f"{metrics_url(status)}/healthz", timeout=2).status_code == 200

    proxy.open()
    wait_for(lambda: answers(200), timeout=30, what="200 once it follows them again")

    # And it really follows them again: a job's status moves on to sent.
    for service in (pipeline.api, pipeline.processor, pipeline.mailer):
        service.start()
    pipeline.api.wait_ready()
    pipeline.wait_consuming()
    job_id = submit(pipeline.api.url, email="ada@example.com", data={"n": 1})
    wait_for(lambda: status_of(pipeline.api.url, job_id) == "sent", timeout=30, what="sent")
    assert "Traceback" not in status.output()
