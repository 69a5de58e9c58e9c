"""Unknown publish outcomes and repeated jobs, on the running pipeline.

The api talks to the broker through a proxy that lets a ``basic.publish``
reach the broker whole, then drops the connection before the broker's confirm
comes back: the broker routed the job, the api cannot know it. The README's
promise is checked: the api answers ``202`` (it published the very same job
again on its restored connection) or ``503`` with the job's id and
``"outcome": "unknown"``; a retry with the same ``Idempotency-Key`` names the
same job; and however many copies of that one job reach the broker, exactly
one email goes out.

A probe queue of the test's own, bound straight on the broker (not through the
proxy), gets a copy of every ``JobRequested`` and ``EmailSent`` the broker
routes: it shows which jobs the broker took, how often, and when the pipeline
has handled every copy, so "exactly one email" is checked once nothing is left
to come rather than after a guessed pause.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest

from api_service.auth import ANONYMOUS
from e2e.conftest import Pipeline
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker
from support.mailtrap_stub import MailtrapStub
from support.rabbit import job_ids_of
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

PROBE = "test.unknown-outcomes.probe"
JOB = {"email": "ada@example.com", "subject": "Your report", "data": {"visits": [3, 5, 8]}}
# A short publish budget where the broker stays away past it, so that the api
# gives up republishing (and answers "unknown") within a second or two.
SHORT_BUDGET_SECONDS = 1.5
CUT_DELAY_SECONDS = 0.075


class Probe:
    """A queue on the broker itself that receives a copy of every ``JobRequested``
    and ``EmailSent``; ``collect()`` takes what it holds and counts it by job."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.requested: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def bind(self) -> Probe:
        async def bind() -> None:
            connection = await aio_pika.connect(self._url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(PROBE, durable=True)
                for routing_key in ("job.requested", "email.sent"):
                    await queue.bind("events", routing_key)

        asyncio.run(bind())
        return self

    def collect(self) -> Probe:
        async def drain() -> list[aio_pika.abc.AbstractIncomingMessage]:
            connection = await aio_pika.connect(self._url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(PROBE, ensure=True)
                taken = []
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    taken.append(message)
                return taken

        for message in asyncio.run(drain()):
            counts = self.requested if message.type == "JobRequested" else self.sent
            counts.update(job_ids_of(message))
        return self

    def settled(self) -> bool:
        """Every job the broker took has been through the mailer as often as it was
        routed: the mailer publishes one ``EmailSent`` per ``DataProcessed``, a
        repeat included, so nothing more is on its way to the provider."""
        self.collect()
        return bool(self.requested) and all(
            self.sent[job] >= copies for job, copies in self.requested.items()
        )


def status_of(pipeline: Pipeline, job_id: str) -> str | None:
    response = httpx.get(f"{pipeline.api.url}/jobs/{job_id}", timeout=10)
    return response.json()["status"] if response.status_code == 200 else None


def wait_emailed_once(
    pipeline: Pipeline, mailtrap: MailtrapStub, probe: Probe, job_id: str, timeout: float = 60
) -> None:
    """The job ends ``sent``, every copy of it the broker routed has been handled,
    and the provider got exactly one email, for that job and no other."""
    wait_for(
        lambda: status_of(pipeline, job_id) == "sent",
        timeout=timeout,
        what=f"job {job_id} to be sent",
    )
    wait_for(
        probe.settled,
        timeout=timeout,
        what=f"the mailer to handle every routed copy of the job ({probe.requested})",
    )
    assert set(probe.requested) == {job_id}, f"the broker took other jobs: {probe.requested}"
    assert mailtrap.deliveries_by_job() == Counter({job_id: 1}), (
        f"emails by job: {mailtrap.deliveries_by_job()}; routed JobRequested: {probe.requested}"
    )
    assert status_of(pipeline, job_id) == "sent"


@pytest.mark.parametrize(
    ("broker_comes_back", "round_"),
    [
        *(pytest.param(True, n, id=f"broker-reachable-{n}") for n in range(3)),
        *(pytest.param(False, n, id=f"broker-away-past-budget-{n}") for n in range(2)),
    ],
)
def test_a_publish_whose_confirm_is_lost_stays_one_job_and_one_email(
    pipeline_factory: PipelineFactory,
    broker_url: str,
    proxy: TcpProxy,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
    broker_comes_back: bool,
    round_: int,
) -> None:
    through_proxy = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    api_settings = {"RABBITMQ_URL": through_proxy.geturl()}
    if not broker_comes_back:
        api_settings["PUBLISH_TIMEOUT_SECONDS"] = str(SHORT_BUDGET_SECONDS)
    pipeline = pipeline_factory(**mailtrap_settings, per_service={"api-service": api_settings})
    pipeline.start()
    probe = Probe(broker_url).bind()
    api = pipeline.api
    key = f"unknown-outcome-{uuid.uuid4()}"

    proxy.cut_after_next_publish(CUT_DELAY_SECONDS, stop_listening=not broker_comes_back)
    started = time.monotonic()
    first = httpx.post(f"{api.url}/jobs", json=JOB, headers={"Idempotency-Key": key}, timeout=60)
    first_took = time.monotonic() - started

    assert proxy.publish_cuts == 1, "the proxy never saw the api publish"
    assert "publishing it again" in api.output(), api.output()
    assert first.status_code in (202, 503), first.text
    job_id = first.json()["job_id"]
    if first.status_code == 503:
        assert first.json()["outcome"] == "unknown", first.text
        assert first.headers["retry-after"].isdigit()
    else:
        assert first.json()["status"] == "queued"
    if not broker_comes_back:
        # No connection could be made: no republish can have been confirmed.
        assert first.status_code == 503, first.text

    # The client retries once the broker can be reached again.
    proxy.open()
    api.wait_ready()
    started = time.monotonic()
    retry = httpx.post(f"{api.url}/jobs", json=JOB, headers={"Idempotency-Key": key}, timeout=60)
    retry_took = time.monotonic() - started

    assert retry.status_code in (200, 202), retry.text
    assert retry.json()["job_id"] == job_id
    if first.status_code == 202:
        assert retry.status_code == 200
        assert retry.headers["idempotent-replayed"] == "true"
    else:
        # The key kept its job through the unknown outcome: that job is published again.
        assert retry.status_code == 202, retry.text
    started = time.monotonic()
    wait_emailed_once(pipeline, mailtrap, probe, job_id)
    sent_took = time.monotonic() - started
    # The broker routed the publish whose confirm was lost, and then the copy
    # the api (or the client's retry) published again: the cut came after routing.
    assert probe.requested[job_id] >= 2, probe.requested
    assert "Traceback" not in api.output(), api.output()
    print(
        f"round {round_} ({'broker reachable' if broker_comes_back else 'away past budget'}):"
        f" first answer {first.status_code}"
        f"{' unknown' if first.status_code == 503 else ''} after {first_took:.2f} s;"
        f" retry {retry.status_code} after {retry_took:.2f} s;"
        f" sent {sent_took:.2f} s later; broker routed the job {probe.requested[job_id]} times"
    )


async def publish_directly(url: str, events: list[JobRequested]) -> None:
    broker = Broker(url, app_id="test-publisher")
    await broker.connect()
    try:
        for event in events:
            await broker.publish(event)
    finally:
        await broker.close()


@pytest.mark.parametrize("event_ids", ["same", "different"])
def test_a_job_requested_twice_is_emailed_once(
    pipeline_factory: PipelineFactory,
    broker_url: str,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
    event_ids: str,
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()
    probe = Probe(broker_url).bind()
    first = JobRequested(
        job_id=uuid.uuid4(),
        email="grace@example.com",
        subject="Twice",
        data={"n": [1, 2]},
        submitted_by=ANONYMOUS,  # the caller GET /jobs/{job_id} answers, with no API_KEYS
    )
    second = first if event_ids == "same" else first.model_copy(update={"event_id": uuid.uuid4()})
    assert (second.event_id == first.event_id) is (event_ids == "same")

    asyncio.run(publish_directly(broker_url, [first, second]))

    wait_emailed_once(pipeline, mailtrap, probe, str(first.job_id))
    assert probe.requested[str(first.job_id)] == 2
    assert probe.sent[str(first.job_id)] == 2
