"""Taking a job in when the broker answers "maybe": 503 means "not accepted", and nothing
else; an unknown outcome keeps its job id. In-process, with a scripted broker and a real
SQLite job store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import OperationalError

from api_service import recorder as recorder_module
from api_service.app import create_app
from api_service.read_model import JobRecord
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore, KeyState
from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.events import Event, JobRequested

JSON = {"content-type": "application/json"}
JOB = {"email": "ada@example.com", "data": {"visits": [3, 5], "region": "EU"}}


class ScriptedBroker:
    """Answers each publish with the next scripted failure, then confirms; records every
    publish attempt and the events it confirmed."""

    def __init__(self) -> None:
        self.is_ready = True
        self.script: list[Exception] = []
        self.attempts: list[Event] = []
        self.confirmed: list[Event] = []
        self.always: Exception | None = None

    async def publish(self, event: Event) -> None:
        self.attempts.append(event)
        if self.always is not None:
            raise self.always
        if self.script:
            raise self.script.pop(0)
        self.confirmed.append(event)


class FlakySettleStore(JobStore):
    """A job store whose next ``settle_failures`` writes of a key's state fail."""

    settle_failures = 0

    async def settle_key(self, caller: str, key: str, outcome: KeyState) -> None:
        if self.settle_failures:
            self.settle_failures -= 1
            raise OperationalError("UPDATE", {}, Exception("database is locked"))
        await super().settle_key(caller, key, outcome)


class FlakyRecordStore(FlakySettleStore):
    """A job store whose job records cannot be written while ``records_fail``."""

    records_fail = False
    gate: threading.Event | None = None
    """While set to an event not yet set, writes of job records wait for it."""

    def record_batch(self, *args: Any, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.records_fail:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        super().record_batch(*args, **kwargs)


class Ready:
    problem: str | None = None


@pytest.fixture
def broker() -> ScriptedBroker:
    return ScriptedBroker()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlakySettleStore]:
    store = FlakyRecordStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield store  # type: ignore[misc]
    asyncio.run(store.close())


@pytest.fixture
def app(broker: ScriptedBroker, store: JobStore) -> FastAPI:
    return make_app(broker, store)


def make_app(broker: ScriptedBroker, store: JobStore) -> FastAPI:
    # A short publish timeout: the budget for republishing is one timeout.
    settings = ApiSettings(_env_file=None, publish_timeout_seconds=0.5)  # type: ignore[call-arg]
    application = create_app(settings)
    application.state.broker = broker
    application.state.store = store
    application.state.recorder = JobRecorder(store.record_batch)
    application.state.connector = Ready()
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


def unknown() -> PublishOutcomeUnknown:
    return PublishOutcomeUnknown("the broker did not confirm the message within 0.5 s")


def refused() -> BrokerUnavailable:
    return BrokerUnavailable("not connected to the message broker")


def job_ids(events: list[Event]) -> set[str]:
    return {str(event.job_id) for event in events}


# --- the job's record -----------------------------------------------------------


async def test_a_job_answered_202_is_in_a_shared_store_already(
    broker: ScriptedBroker, postgres_database: str
) -> None:
    # Its JobRequested does not come back through the broker, and another replica
    # may be asked for it next: with PostgreSQL the answer waits for the record.
    store = FlakyRecordStore.open(postgres_database)
    assert store.shared
    try:
        app = make_app(broker, store)
        # The wait is what is tested, not its bound (1 s): a busy machine's first
        # PostgreSQL write can take longer.
        app.state.intake_policy = replace(app.state.intake_policy, record_wait=30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            response = await client.post("/jobs", json=JOB)

        assert response.status_code == 202, response.text
        [event] = broker.confirmed
        assert event.submitted_by is not None
        record = await store.get(response.json()["job_id"], event.submitted_by)
        assert record is not None
        assert record.status == "queued"
    finally:
        await store.close()


async def test_with_sqlite_a_job_answered_202_is_shown_at_once_and_written_a_moment_later(
    client: httpx.AsyncClient, broker: ScriptedBroker, store: FlakyRecordStore
) -> None:
    # One api reads a SQLite file: it shows the job from memory until its group
    # commit writes it, and the answer does not wait for that write.
    assert not store.shared
    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    [event] = broker.confirmed
    assert event.submitted_by is not None
    shown = await client.get(f"/jobs/{job_id}")
    assert (shown.status_code, shown.json()["status"]) == (200, "queued")
    deadline = asyncio.get_running_loop().time() + 10
    while (record := await store.get(job_id, event.submitted_by)) is None:
        assert asyncio.get_running_loop().time() < deadline, "the record was never written"
        await asyncio.sleep(0.02)
    assert record.status == "queued"


async def test_with_sqlite_no_answer_waits_for_its_jobs_write(
    app: FastAPI, client: httpx.AsyncClient, broker: ScriptedBroker, store: FlakyRecordStore
) -> None:
    # Waiting would queue behind status-service's writes for the file's one lock.
    app.state.intake_policy = replace(app.state.intake_policy, record_wait=30)
    store.gate = threading.Event()  # every write of a job record held
    try:
        single = await asyncio.wait_for(client.post("/jobs", json=JOB), 5)
        batch = await asyncio.wait_for(client.post("/jobs/batch", json={"jobs": [JOB, JOB]}), 5)

        assert single.status_code == 202, single.text
        assert batch.status_code == 202, batch.text
        job_ids = [single.json()["job_id"], *(j["job_id"] for j in batch.json()["jobs"])]
        caller = broker.confirmed[0].submitted_by
        assert caller is not None
        for job_id in job_ids:
            assert await store.get(job_id, caller) is None  # not written yet
            shown = await client.get(f"/jobs/{job_id}")
            assert (shown.status_code, shown.json().get("status")) == (200, "queued")
    finally:
        store.gate.set()


async def test_with_postgresql_each_answer_waits_for_its_jobs_write(
    broker: ScriptedBroker, postgres_database: str
) -> None:
    # Replicas share the store: any of them may be asked for the job next.
    store = FlakyRecordStore.open(postgres_database)
    store.gate = threading.Event()
    app = make_app(broker, store)
    app.state.intake_policy = replace(app.state.intake_policy, record_wait=30)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            for path, body in (("/jobs", JOB), ("/jobs/batch", {"jobs": [JOB, JOB]})):
                store.gate.clear()
                answer = asyncio.create_task(client.post(path, json=body))
                await asyncio.sleep(0.5)
                assert not answer.done(), f"{path} answered before its jobs were written"
                store.gate.set()
                response = await asyncio.wait_for(answer, 10)
                assert response.status_code == 202, response.text
    finally:
        store.gate.set()
        await store.close()


async def test_a_job_written_while_it_is_being_read_is_never_a_404(
    client: httpx.AsyncClient, store: FlakyRecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With SQLite the 202 comes before the job's write: a GET whose read of the
    # store starts before that write and ends after it must still find the job.
    held = store.gate = threading.Event()
    original_get = store.get

    async def read_across_the_write(job_id: str, caller: str) -> JobRecord | None:
        before = await original_get(job_id, caller)  # the write is held: not there yet
        held.set()
        deadline = asyncio.get_running_loop().time() + 10
        while await original_get(job_id, caller) is None:  # written (and forgotten) now
            assert asyncio.get_running_loop().time() < deadline, "the record was never written"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the recorder's bookkeeping after the write
        return before

    response = await client.post("/jobs", json=JOB)
    assert response.status_code == 202, response.text
    monkeypatch.setattr(store, "get", read_across_the_write)

    shown = await client.get(f"/jobs/{response.json()['job_id']}")

    assert (shown.status_code, shown.json().get("status")) == (200, "queued")


async def test_a_record_that_cannot_be_written_does_not_hold_the_answer_and_is_written_later(
    client: httpx.AsyncClient,
    broker: ScriptedBroker,
    store: FlakyRecordStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder_module, "NOTE_FIRST_PAUSE", 0.05)
    store.records_fail = True

    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    [event] = broker.confirmed
    assert event.submitted_by is not None
    assert await store.get(job_id, event.submitted_by) is None
    shown = await client.get(f"/jobs/{job_id}")  # this replica still knows it
    assert shown.status_code == 200
    assert shown.json()["status"] == "queued"

    store.records_fail = False
    deadline = asyncio.get_running_loop().time() + 10
    while await store.get(job_id, event.submitted_by) is None:
        assert asyncio.get_running_loop().time() < deadline, "the record was never written"
        await asyncio.sleep(0.02)


# --- without an Idempotency-Key -----------------------------------------------


async def test_an_unconfirmed_publish_is_republished_as_the_same_event_and_accepted(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.script = [unknown(), unknown()]

    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 202, response.text
    assert len(broker.attempts) == 3
    # The very same event each time: same job, same event id.
    assert len({(e.job_id, e.event_id) for e in broker.attempts}) == 1
    assert job_ids(broker.confirmed) == {response.json()["job_id"]}


async def test_an_outcome_that_stays_unknown_is_a_503_naming_the_job(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.always = unknown()

    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 503
    body = response.json()
    assert body["outcome"] == "unknown"
    assert body["job_id"] == next(iter(job_ids(broker.attempts)))
    assert "GET /jobs/{job_id}" in body["detail"]
    assert response.headers["retry-after"]


async def test_unknown_then_refused_is_still_unknown_not_a_plain_refusal(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    async def refuse_after_first(event: Event) -> None:
        broker.attempts.append(event)
        if len(broker.attempts) == 1:
            raise unknown()
        raise refused()

    broker.publish = refuse_after_first  # type: ignore[method-assign]

    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 503
    assert response.json()["outcome"] == "unknown"


async def test_a_publish_the_broker_provably_did_not_take_is_a_plain_503(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.always = refused()

    response = await client.post("/jobs", json=JOB)

    assert response.status_code == 503
    assert "job_id" not in response.json()
    assert response.json()["detail"].startswith("the job was not accepted")
    assert len(broker.attempts) == 1  # not retried: nothing went out


# --- with an Idempotency-Key --------------------------------------------------


async def test_a_retry_after_an_unknown_outcome_publishes_the_same_job_not_a_new_one(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.always = unknown()
    first = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 503
    job_id = first.json()["job_id"]

    broker.always = None
    retry = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-1"})
    replay = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-1"})

    assert (retry.status_code, retry.json()["job_id"]) == (202, job_id)
    assert (replay.status_code, replay.json()["job_id"]) == (200, job_id)
    assert job_ids(broker.attempts) == {job_id}


async def test_a_key_whose_final_state_could_not_be_written_is_never_reused_for_a_new_job(
    client: httpx.AsyncClient, broker: ScriptedBroker, store: FlakySettleStore
) -> None:
    store.settle_failures = 10  # every attempt to mark the key done fails
    first = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-2"})
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    await asyncio.sleep(1.6)  # the reservation, still pending, goes stale (3 timeouts)

    store.settle_failures = 0
    retry = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-2"})

    assert retry.json()["job_id"] == job_id
    assert job_ids(broker.confirmed) == {job_id}


async def test_a_refused_job_frees_its_key_for_a_fresh_attempt(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.always = refused()
    first = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-3"})
    broker.always = None
    retry = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-3"})

    assert first.status_code == 503
    assert retry.status_code == 202
    assert job_ids(broker.confirmed) == {retry.json()["job_id"]}


async def test_the_same_job_with_its_keys_in_another_order_is_the_same_request(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    reordered: dict[str, Any] = {
        "data": {"region": "EU", "visits": [3, 5]},
        "step": "summarise",
        "email": "ada@example.com",
    }
    first = await client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k-4"})
    again = await client.post("/jobs", json=reordered, headers={"Idempotency-Key": "k-4"})

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert len(broker.confirmed) == 1


async def test_the_tutorials_endpoint_honours_an_idempotency_key(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    url = "/process-and-email/?email=ada@example.com"
    headers = {**JSON, "Idempotency-Key": "k-5"}
    first = await client.post(url, content=b'{"a": 1}', headers=headers)
    again = await client.post(url, content=b'{"a": 1}', headers=headers)
    other = await client.post(url, content=b'{"a": 2}', headers=headers)

    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409)
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(broker.confirmed) == 1
    assert isinstance(broker.confirmed[0], JobRequested)
