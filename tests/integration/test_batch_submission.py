"""``POST /jobs/batch`` in-process against the real broker and real job stores: one job per
item in the items' order, all or nothing validated, its own size limits, one Idempotency-Key
for the whole batch. What reached the broker is read from the queue itself."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from fastapi import FastAPI

from api_service.app import create_app
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker, bundle
from pipeline_shared.topology import PROCESSOR
from support.rabbit import messages_ready_now

MAX_JOBS = 10
MAX_JOB_BYTES = 2048
MAX_BATCH_BYTES = 8 * MAX_JOB_BYTES
KEY = "batch-key-0123456789abcdef"
AS_CALLER = {"Authorization": f"Bearer {KEY}"}


def item(n: int, **fields: Any) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "subject": f"Digest {n}", "data": {"n": n}, **fields}


class Ready:
    problem: str | None = None


@pytest.fixture
def settings(broker_url: str) -> ApiSettings:
    return ApiSettings(  # type: ignore[call-arg]
        _env_file=None,
        rabbitmq_url=broker_url,
        api_keys=KEY,
        max_batch_jobs=MAX_JOBS,
        max_request_bytes=MAX_JOB_BYTES,
        max_batch_request_bytes=MAX_BATCH_BYTES,
    )


@pytest.fixture
async def broker(settings: ApiSettings) -> AsyncIterator[Broker]:
    broker = Broker.from_settings(settings, app_id="api-service")
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    opened = JobStore.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def app(settings: ApiSettings, broker: Broker, store: JobStore) -> AsyncIterator[FastAPI]:
    # httpx's ASGI transport runs no lifespan: give the app what the lifespan would.
    application = create_app(settings)
    recorder = JobRecorder(store.record_batch)
    application.state.broker = broker
    application.state.store = store
    application.state.recorder = recorder
    application.state.connector = Ready()
    yield application
    await recorder.close()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api.test", headers=AS_CALLER
    ) as client:
        yield client


@pytest.fixture
async def channel(broker_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        yield await connection.channel()


async def queued(channel: AbstractChannel) -> int:
    """Jobs waiting for a processor, as the broker counts them now."""
    return await messages_ready_now(channel, PROCESSOR.queue)


async def published(channel: AbstractChannel) -> list[JobRequested]:
    """Every JobRequested in the processor's queue, taken off it."""
    queue = await channel.get_queue(PROCESSOR.queue, ensure=False)
    events = []
    while (message := await queue.get(fail=False)) is not None:
        events.extend(bundle.decode_all(message.body, message.headers, JobRequested, 1 << 20))
        await message.ack()
    return events


async def test_a_batch_is_one_job_per_item_answered_in_the_items_order_and_each_queued(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    items = [item(n) for n in range(7)]

    response = await client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 202, response.text
    answered = response.json()["jobs"]
    assert [job["status"] for job in answered] == ["queued"] * 7
    job_ids = [job["job_id"] for job in answered]
    events = {str(event.job_id): event for event in await published(channel)}
    assert sorted(events) == sorted(job_ids)  # one message per job, no more
    for n, job_id in enumerate(job_ids):
        event = events[job_id]
        assert (event.email, event.subject, event.data) == (
            f"user{n}@example.com",
            f"Digest {n}",
            {"n": n},
        )
    for job_id in job_ids:
        record = await client.get(f"/jobs/{job_id}")
        assert (record.status_code, record.json()["status"]) == (200, "queued")


async def test_one_bad_item_is_a_422_naming_its_index_and_nothing_is_published(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    items = [item(0), item(1), item(2), item(3, email="not-an-address"), item(4)]

    response = await client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 422
    assert [problem["loc"] for problem in response.json()["detail"]] == [
        ["body", "jobs", 3, "email"]
    ]
    assert await queued(channel) == 0


async def test_each_bad_item_is_named_at_most_the_usual_number_of_problems_never_echoing_input(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    secret = "do-not-echo-me"
    items = [
        item(n, email=f"{secret}-{n}", subject=f"{secret}\r\n", data=[secret])
        for n in range(MAX_JOBS)
    ]

    response = await client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 422
    problems = response.json()["detail"]
    # Three problems per item: the first 20, then a count of the other 10.
    assert [p["loc"] for p in problems[:3]] == [
        ["body", "jobs", 0, field] for field in ("email", "data", "subject")
    ]
    assert problems[19]["loc"][:3] == ["body", "jobs", 6]
    assert problems[20] == {"type": "too_many_errors", "loc": [], "msg": "and 10 more problems"}
    assert len(problems) == 21
    assert secret not in response.text
    assert await queued(channel) == 0


async def test_more_items_than_max_batch_jobs_is_a_422_and_nothing_is_published(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    items = [item(n) for n in range(MAX_JOBS + 1)]

    response = await client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("too_long", ["body", "jobs"])
    assert await queued(channel) == 0


async def test_an_empty_batch_is_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs/batch", json={"jobs": []})

    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "too_short"


async def test_a_body_over_the_batch_limit_is_a_413_while_one_over_a_single_jobs_limit_is_not(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    # Each item under MAX_REQUEST_BYTES, the batch over it but within its own limit.
    fits = [item(n, data={"text": "x" * (MAX_JOB_BYTES // 2)}) for n in range(3)]
    too_large = [item(n, data={"text": "x" * (MAX_JOB_BYTES - 200)}) for n in range(MAX_JOBS)]
    assert len(json.dumps({"jobs": fits})) > MAX_JOB_BYTES

    accepted = await client.post("/jobs/batch", json={"jobs": fits})
    refused = await client.post("/jobs/batch", json={"jobs": too_large})

    assert accepted.status_code == 202, accepted.text
    assert refused.status_code == 413
    assert refused.json() == {"detail": f"request body larger than {MAX_BATCH_BYTES} bytes"}
    assert len(await published(channel)) == 3


async def test_an_item_larger_than_post_jobs_takes_is_a_422_naming_it(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    items = [item(0), item(1, data={"text": "x" * MAX_JOB_BYTES})]

    response = await client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("too_large", ["body", "jobs", 1])
    assert "MAX_REQUEST_BYTES" in problem["msg"]
    assert await queued(channel) == 0


async def test_the_same_idempotency_key_twice_gives_the_same_jobs_and_publishes_them_once(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    items = [item(n) for n in range(5)]
    reordered = [dict(reversed(list(job.items()))) for job in items]  # same jobs, keys reordered
    headers = {"Idempotency-Key": "newsletter-2026-11"}

    first = await client.post("/jobs/batch", json={"jobs": items}, headers=headers)
    again = await client.post("/jobs/batch", json={"jobs": reordered}, headers=headers)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(await published(channel)) == 5


async def test_the_same_key_with_another_batch_is_a_409_and_publishes_nothing_more(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    headers = {"Idempotency-Key": "newsletter-2026-12"}
    await client.post("/jobs/batch", json={"jobs": [item(0), item(1)]}, headers=headers)

    other = await client.post("/jobs/batch", json={"jobs": [item(0), item(2)]}, headers=headers)
    single = await client.post("/jobs", json=item(0), headers=headers)

    assert other.status_code == 409
    assert single.status_code == 409
    assert len(await published(channel)) == 2


async def test_a_caller_without_a_key_gets_401_before_anything_it_sent_is_read(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    response = await client.post(
        "/jobs/batch",
        content=b'{"jobs": [{"email": "not-an-address", "data": NaN}]}',
        headers={"Authorization": "", "content-type": "application/json"},
    )

    assert response.status_code == 401
    assert await queued(channel) == 0


async def test_a_body_that_is_not_json_is_a_415_and_duplicate_keys_a_422(
    client: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    not_json = await client.post(
        "/jobs/batch",
        content=json.dumps({"jobs": [item(0)]}),
        headers={"content-type": "text/plain"},
    )
    duplicate = await client.post(
        "/jobs/batch",
        content=b'{"jobs": [{"email": "a@example.com", "data": {}, "data": {"x": 1}}]}',
        headers={"content-type": "application/json"},
    )

    assert not_json.status_code == 415
    assert duplicate.status_code == 422
    assert duplicate.json()["detail"][0]["loc"] == ["body", "jobs", 0, "data"]
    assert await queued(channel) == 0


async def test_another_method_on_the_batch_path_is_a_405_allowing_post_only(
    client: httpx.AsyncClient,
) -> None:
    options = await client.request("OPTIONS", "/jobs/batch")
    get = await client.get("/jobs/batch")
    jobs = await client.request("OPTIONS", "/jobs")

    # "batch" is not a job id: GET /jobs/{job_id} does not match the batch's path.
    assert (options.status_code, options.headers["allow"]) == (405, "POST")
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    assert (jobs.status_code, jobs.headers["allow"]) == (405, "GET, POST")


def test_the_openapi_document_describes_the_batch_route_and_its_limits(app: FastAPI) -> None:
    document = app.openapi()
    operation = document["paths"]["/jobs/batch"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    request = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]

    assert {"202", "200", "409", "413", "422", "503"} <= set(operation["responses"])
    assert request["properties"]["jobs"]["maxItems"] == MAX_JOBS
    assert request["properties"]["jobs"]["minItems"] == 1
    assert request["properties"]["jobs"]["items"] == {"$ref": "#/components/schemas/JobRequest"}
    assert operation["security"] == [{"HTTPBearer": []}]
