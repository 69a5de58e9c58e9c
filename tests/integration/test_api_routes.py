"""The api's routes, driven in-process with a fake broker in place of RabbitMQ.

``httpx.ASGITransport`` does not run the app's lifespan, so no real broker is
made; each test puts a recording fake on ``app.state.broker`` instead, and a
real job store on a SQLite file of its own on ``app.state.store``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI

from api_service.answers import RETRY_AFTER_SECONDS
from api_service.app import create_app
from api_service.connecting import BrokerConnector
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore
from pipeline_shared.errors import BrokerUnavailable, TopologyMissing
from pipeline_shared.events import Event, JobRequested
from unit.fakes import FakePublisher


class FakeBroker(FakePublisher):
    """Records published events; can be told it is not ready, or to refuse publishing."""

    def __init__(self) -> None:
        super().__init__()
        self.is_ready = True
        self.refusal: BrokerUnavailable | None = None

    async def publish(self, event: Event) -> None:
        if self.refusal is not None:
            raise self.refusal
        await super().publish(event)


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def connector(broker: FakeBroker) -> BrokerConnector:
    return BrokerConnector(broker)  # type: ignore[arg-type]


@pytest.fixture
def app(broker: FakeBroker, connector: BrokerConnector, tmp_path: Path) -> Iterator[FastAPI]:
    settings = ApiSettings(_env_file=None, max_request_bytes=2048)  # type: ignore[call-arg]
    application = create_app(settings)
    application.state.broker = broker
    application.state.connector = connector
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    application.state.store = store
    application.state.recorder = JobRecorder(store.record_batch)
    yield application
    asyncio.run(store.close())


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


async def test_a_job_is_accepted_with_202_once_it_is_published(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/jobs",
        json={"email": "ada@example.com", "subject": "Visits", "data": {"visits": [3, 5]}},
    )

    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "queued"
    [event] = broker.published
    assert isinstance(event, JobRequested)
    assert event.job_id == UUID(answer["job_id"])
    assert (event.email, event.subject, event.step) == ("ada@example.com", "Visits", "summarise")
    assert event.data == {"visits": [3, 5]}


async def test_each_accepted_job_gets_its_own_job_id(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    for _ in range(2):
        await client.post("/jobs", json={"email": "ada@example.com", "data": {}})

    assert len({event.job_id for event in broker.published}) == 2


async def test_an_invalid_job_is_answered_422_and_not_published(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/jobs", json={"email": "ada@example.com", "data": [1, 2], "subject": "a\r\nb"}
    )

    assert response.status_code == 422
    fields = {tuple(error["loc"]) for error in response.json()["detail"]}
    assert fields == {("body", "data"), ("body", "subject")}
    assert broker.published == []


async def test_a_job_over_the_size_limit_is_answered_413_and_not_published(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/jobs", json={"email": "ada@example.com", "data": {"blob": "x" * 4096}}
    )

    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 2048 bytes"}
    assert broker.published == []


async def test_a_broker_that_cannot_take_the_job_gives_503_with_retry_after(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    broker.refusal = BrokerUnavailable("not connected to the message broker")

    response = await client.post("/jobs", json={"email": "ada@example.com", "data": {}})

    assert response.status_code == 503
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert "not connected to the message broker" in response.json()["detail"]


async def test_the_tutorial_endpoint_takes_the_email_in_the_query_and_data_as_body(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/process-and-email/", params={"email": "ada@example.com"}, json={"n": 1}
    )

    assert response.status_code == 202
    [event] = broker.published
    assert response.json() == {"task_id": str(event.job_id), "status": "queued"}
    assert event.data == {"n": 1}  # type: ignore[attr-defined]


async def test_healthz_answers_ok_even_without_a_broker(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    broker.is_ready = False

    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_readyz_follows_the_broker_connection(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    ready = await client.get("/readyz")
    broker.is_ready = False
    not_ready = await client.get("/readyz")

    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert (not_ready.status_code, not_ready.json()["status"]) == (503, "unavailable")
    assert not_ready.json()["detail"] == "not connected to the message broker"
    assert not_ready.headers["retry-after"] == str(RETRY_AFTER_SECONDS)


async def test_readyz_is_503_naming_what_the_broker_refused_until_it_connects(
    client: httpx.AsyncClient, broker: FakeBroker, connector: BrokerConnector
) -> None:
    missing = TopologyMissing(["exchange 'events'"], "/")

    async def refuse() -> None:
        raise missing

    broker.is_ready = False
    broker.connect_until_ready = refuse  # type: ignore[method-assign]
    connecting = asyncio.create_task(connector.run())
    try:
        for _ in range(100):
            if connector.problem != "not connected to the message broker":
                break
            await asyncio.sleep(0.01)
        refused = await client.get("/readyz")
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)

    assert refused.status_code == 503
    assert refused.json() == {"status": "unavailable", "detail": f"cannot accept jobs: {missing}"}
    broker.is_ready = True
    assert (await client.get("/readyz")).status_code == 200
