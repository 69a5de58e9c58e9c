"""A batch whose publishes the broker does not all confirm: the answer says which jobs are
queued, which may be and which are not, and a retry with the same Idempotency-Key finishes
the batch under the same job ids without publishing a confirmed job twice. In-process, with
a broker scripted per job and a real SQLite job store."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import OperationalError

from api_service.app import create_app
from api_service.batch import BatchIncomplete, BatchIntake, BatchNotAccepted
from api_service.intake import IntakePolicy
from api_service.recorder import JobRecorder
from api_service.schemas import JobRequest
from api_service.settings import ApiSettings
from api_service.store import JobStore
from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.events import Event, JobRequested

Answer = Literal["confirm", "refuse", "unknown"]


class ScriptedBroker:
    """Answers the publishes of each recipient's job with that recipient's script, one
    answer per attempt, then confirms; records every attempt and every confirmed event."""

    def __init__(self) -> None:
        self.is_ready = True
        self.scripts: dict[str, list[Answer]] = {}
        self.attempts: list[JobRequested] = []
        self.confirmed: list[JobRequested] = []

    def script(self, email: str, *answers: Answer) -> None:
        self.scripts[email] = list(answers)

    async def publish(self, event: Event) -> None:
        assert isinstance(event, JobRequested)
        event.model_dump_json()  # what the real broker does before anything goes out
        self.attempts.append(event)
        script = self.scripts.get(event.email, [])
        answer = script.pop(0) if script else "confirm"
        if answer == "refuse":
            raise BrokerUnavailable("the broker refused the message (nack)")
        if answer == "unknown":
            raise PublishOutcomeUnknown("the broker did not confirm the message within 0.3 s")
        self.confirmed.append(event)

    def confirmed_ids(self) -> list[str]:
        return [str(event.job_id) for event in self.confirmed]


class Ready:
    problem: str | None = None


def item(n: int) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "data": {"n": n}}


def always(answer: Answer) -> list[Answer]:
    """More of one answer than any publish budget in these tests lasts."""
    return [answer] * 50


@pytest.fixture
def broker() -> ScriptedBroker:
    return ScriptedBroker()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    opened = JobStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield opened
    await opened.close()


@pytest.fixture
async def app(broker: ScriptedBroker, store: JobStore) -> AsyncIterator[FastAPI]:
    # A short publish timeout: the budget for publishing again is one timeout.
    settings = ApiSettings(_env_file=None, publish_timeout_seconds=0.3)  # type: ignore[call-arg]
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
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


async def test_a_partly_taken_batch_is_a_503_giving_each_jobs_state_in_order(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.script("user1@example.com", *always("refuse"))
    broker.script("user3@example.com", *always("unknown"))

    response = await client.post("/jobs/batch", json={"jobs": [item(n) for n in range(4)]})

    assert response.status_code == 503
    assert response.headers["retry-after"]
    body = response.json()
    assert body["outcome"] == "partial"
    assert [job["status"] for job in body["jobs"]] == [
        "queued",
        "not_accepted",
        "queued",
        "unknown",
    ]
    assert "2 of 4 jobs queued, 1 with an unknown outcome, 1 not accepted" in body["detail"]
    job_ids = [job["job_id"] for job in body["jobs"]]
    assert sorted(broker.confirmed_ids()) == sorted([job_ids[0], job_ids[2]])
    for job_id, status in zip(job_ids, (200, 404, 200, 404), strict=True):
        assert (await client.get(f"/jobs/{job_id}")).status_code == status


async def test_a_batch_the_broker_took_none_of_is_a_plain_503_naming_no_jobs(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    for n in range(3):
        broker.script(f"user{n}@example.com", "refuse")

    response = await client.post("/jobs/batch", json={"jobs": [item(n) for n in range(3)]})

    assert response.status_code == 503
    assert set(response.json()) == {"detail"}
    assert response.json()["detail"].startswith("none of the jobs was accepted")
    assert len(broker.attempts) == 3  # not published again: nothing went out


async def test_an_unconfirmed_job_is_published_again_as_the_same_event_and_accepted(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.script("user1@example.com", "unknown", "unknown")

    response = await client.post("/jobs/batch", json={"jobs": [item(n) for n in range(3)]})

    assert response.status_code == 202, response.text
    again = [e for e in broker.attempts if e.email == "user1@example.com"]
    assert len(again) == 3
    assert len({(e.job_id, e.event_id) for e in again}) == 1
    assert len(broker.confirmed) == 3


async def test_a_retry_with_the_same_key_publishes_only_the_jobs_not_queued_under_their_ids(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    broker.script("user1@example.com", *always("refuse"))
    broker.script("user2@example.com", *always("unknown"))
    batch = {"jobs": [item(n) for n in range(4)]}
    headers = {"Idempotency-Key": "digest-42"}

    first = await client.post("/jobs/batch", json=batch, headers=headers)
    broker.scripts.clear()  # the broker is well again
    retry = await client.post("/jobs/batch", json=batch, headers=headers)
    replay = await client.post("/jobs/batch", json=batch, headers=headers)

    assert first.status_code == 503
    job_ids = [job["job_id"] for job in first.json()["jobs"]]
    assert retry.status_code == 202, retry.text
    assert [job["job_id"] for job in retry.json()["jobs"]] == job_ids
    assert (replay.status_code, replay.json()) == (200, retry.json())
    # Every job confirmed exactly once: the retry did not publish jobs 0 and 3 again.
    assert sorted(broker.confirmed_ids()) == sorted(job_ids)


async def test_a_batch_the_broker_took_none_of_frees_its_key_for_a_fresh_attempt(
    client: httpx.AsyncClient, broker: ScriptedBroker
) -> None:
    for n in range(2):
        broker.script(f"user{n}@example.com", "refuse")
    batch = {"jobs": [item(n) for n in range(2)]}
    headers = {"Idempotency-Key": "digest-43"}

    first = await client.post("/jobs/batch", json=batch, headers=headers)
    retry = await client.post("/jobs/batch", json=batch, headers=headers)

    assert first.status_code == 503
    assert retry.status_code == 202
    assert sorted(broker.confirmed_ids()) == sorted(j["job_id"] for j in retry.json()["jobs"])


# --- the answer never lies, whatever the broker does -------------------------------------


class Recorded:
    """The batch's one-transaction write (failing with ``fail``), and the jobs handed on
    to be written later when it fails."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.traces: dict[str, str] = {}
        self.later: list[str] = []
        self.later_traces: dict[str, str | None] = {}
        self.fail = fail

    async def __call__(self, events: Sequence[JobRequested], traces: Mapping[str, str]) -> None:
        self.batches.append([str(event.job_id) for event in events])
        self.traces.update(traces)
        if self.fail is not None:
            raise self.fail

    def record_later(self, event: JobRequested, trace_id: str | None) -> None:
        self.later.append(str(event.job_id))
        self.later_traces[str(event.job_id)] = trace_id


async def first_answer(
    submitting: Awaitable[tuple[list[UUID], bool]],
) -> tuple[list[str], list[str] | None]:
    """The job ids and states a submission answered; (no ids, None) for a plain refusal."""
    try:
        job_ids, _ = await submitting
    except BatchNotAccepted:
        return [], None
    except BatchIncomplete as incomplete:
        return [str(job.job_id) for job in incomplete.jobs], [job.state for job in incomplete.jobs]
    return [str(job_id) for job_id in job_ids], ["queued"] * len(job_ids)


async def submit_twice(answers: list[Answer]) -> None:
    """One batch whose jobs the broker answers with ``answers``, then its retry with the
    same key once the broker is well: check both answers against what the broker did."""
    jobs = [JobRequest.model_validate(item(n)) for n in range(len(answers))]
    broker = ScriptedBroker()
    for n, answer in enumerate(answers):
        broker.script(f"user{n}@example.com", answer)
    # No budget: an unknown outcome is final at once (the republishing has its own tests).
    policy = IntakePolicy(publish_budget=0.0, key_stale_after=60.0, key_wait=1.0)
    with tempfile.TemporaryDirectory() as folder:
        store = JobStore.open(f"sqlite:///{folder}/jobs.sqlite3")
        try:
            recorded = Recorded()
            intake = BatchIntake(broker, store, policy, recorded, recorded.record_later)

            first_ids, states = await first_answer(intake.accept_once(jobs, "caller", "k"))

            expected = {"confirm": "queued", "refuse": "not_accepted", "unknown": "unknown"}
            if states is None:
                assert set(answers) == {"refuse"}
            else:
                assert states == [expected[answer] for answer in answers]
            # What was said to be queued was confirmed, and only that, recorded at once.
            queued = [i for i, a in zip(first_ids, answers, strict=False) if a == "confirm"]
            assert sorted(broker.confirmed_ids()) == sorted(queued)
            assert sorted(job for batch in recorded.batches for job in batch) == sorted(queued)
            assert len(recorded.batches) <= 1  # one transaction for the batch
            # Each job its own trace.
            assert sorted(recorded.traces) == sorted(queued)
            assert len(set(recorded.traces.values())) == len(queued)

            retry_ids, replayed = await intake.accept_once(jobs, "caller", "k")

            retried = [str(job_id) for job_id in retry_ids]
            assert replayed == (set(answers) == {"confirm"})
            if first_ids:
                assert retried == first_ids
            assert sorted(broker.confirmed_ids()) == sorted(retried)  # each exactly once
        finally:
            await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["confirm", "refuse", "unknown"]), min_size=1, max_size=6))
def test_each_jobs_state_is_what_the_broker_did_and_a_retry_completes_the_batch_once(
    answers: list[Answer],
) -> None:
    asyncio.run(submit_twice(answers))


async def test_jobs_whose_batch_could_not_be_recorded_are_handed_on_to_be_written_later(
    tmp_path: Path,
) -> None:
    # Nothing else records an accepted job (its JobRequested does not come back
    # through the broker): the batch's failed write must not be the last word.
    jobs = [JobRequest.model_validate(item(n)) for n in range(3)]
    broker = ScriptedBroker()
    policy = IntakePolicy(publish_budget=0.0, key_stale_after=60.0, key_wait=1.0)
    store = JobStore.open(f"sqlite:///{tmp_path}/jobs.sqlite3")
    try:
        recorded = Recorded(fail=OperationalError("INSERT", {}, Exception("database is locked")))
        intake = BatchIntake(broker, store, policy, recorded, recorded.record_later)

        job_ids = await intake.accept(jobs, "caller")
    finally:
        await store.close()

    assert sorted(broker.confirmed_ids()) == sorted(map(str, job_ids))
    assert recorded.later == [str(job_id) for job_id in job_ids]
    # Each job keeps its own trace, as its write in the batch's transaction would have.
    assert recorded.later_traces == recorded.traces
    assert len(set(recorded.later_traces.values())) == len(job_ids)


async def post_batch(items: list[dict[str, Any]]) -> tuple[httpx.Response, ScriptedBroker]:
    broker = ScriptedBroker()
    with tempfile.TemporaryDirectory() as folder:
        store = JobStore.open(f"sqlite:///{folder}/jobs.sqlite3")
        application = create_app(ApiSettings(_env_file=None))  # type: ignore[call-arg]
        application.state.broker = broker
        application.state.store = store
        recorder = application.state.recorder = JobRecorder(store.record_batch)
        application.state.connector = Ready()
        try:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
                return await client.post("/jobs/batch", json={"jobs": items}), broker
        finally:
            # With SQLite the answer does not wait for the jobs' write: let it
            # finish, as the api's lifespan does, before the folder goes.
            await recorder.close()
            await store.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.booleans(), min_size=1, max_size=25))
def test_a_422_names_exactly_the_bad_items_in_order_and_nothing_is_published(
    bad: list[bool],
) -> None:
    items = [
        {**item(n), "email": "no-at-sign"} if wrong else item(n) for n, wrong in enumerate(bad)
    ]

    response, broker = asyncio.run(post_batch(items))

    named = [n for n, wrong in enumerate(bad) if wrong]
    if not named:
        assert response.status_code == 202
        assert len(broker.confirmed) == len(items)
        return
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert [p["loc"] for p in problems[:20]] == [["body", "jobs", n, "email"] for n in named[:20]]
    assert len(problems) == min(len(named), 20) + (len(named) > 20)
    assert broker.attempts == []
