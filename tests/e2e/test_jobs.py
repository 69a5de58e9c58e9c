"""Following jobs, resubmitting safely, and keeping strangers out, on the running pipeline."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aio_pika
import httpx
import pytest

from e2e.conftest import Pipeline
from pipeline_shared.events import DataProcessed
from pipeline_shared.topology import MAILER
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
AS_A = {"Authorization": f"Bearer {KEY_A}"}
AS_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def pipeline(pipeline_factory: PipelineFactory, mailtrap_settings: dict[str, str]) -> Pipeline:
    pipeline = pipeline_factory(**mailtrap_settings, API_KEYS=f"{KEY_A},{KEY_B}")
    pipeline.start()
    return pipeline


def submit(pipeline: Pipeline, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{pipeline.api.url}/jobs", json=body, headers={**AS_A, **headers}, timeout=10
    )


def job_of(pipeline: Pipeline, job_id: str, auth: dict[str, str] = AS_A) -> httpx.Response:
    return httpx.get(f"{pipeline.api.url}/jobs/{job_id}", headers=auth, timeout=10)


def test_a_job_is_known_at_once_and_can_be_followed_to_sent(
    pipeline: Pipeline, mailtrap: MailtrapStub
) -> None:
    response = submit(pipeline, {"email": "ada@example.com", "data": {"x": 1}})
    assert response.status_code == 202
    job_id = response.json()["job_id"]

    first = job_of(pipeline, job_id)
    assert first.status_code == 200
    assert first.json()["status"] in {"queued", "processed", "sent"}

    sent = wait_for(
        lambda: (r := job_of(pipeline, job_id).json())["status"] == "sent" and r,
        what="the job to be sent",
    )
    (delivery,) = [d for d in mailtrap.delivered if d.job_id == job_id]
    assert sent["provider_message_id"] == delivery.message_id
    assert sent["error"] is None
    assert sent["attempts"] == 1
    assert [e["event"] for e in sent["timeline"]] == ["JobRequested", "DataProcessed", "EmailSent"]
    assert sent["created_at"] <= sent["updated_at"]


def test_a_job_never_accepted_is_404_and_the_tutorials_task_id_is_a_job_id(
    pipeline: Pipeline,
) -> None:
    assert job_of(pipeline, str(uuid.uuid4())).status_code == 404
    task = httpx.post(
        f"{pipeline.api.url}/process-and-email/",
        params={"email": "grace@example.com"},
        json={"n": 1},
        headers=AS_A,
        timeout=10,
    ).json()["task_id"]
    assert job_of(pipeline, task).status_code == 200


def test_failed_jobs_are_listed_with_their_reason_newest_first(pipeline: Pipeline) -> None:
    failed = [
        submit(pipeline, {"email": "ada@example.com", "data": {}, "step": "nope"}).json()["job_id"]
        for _ in range(3)
    ]
    submit(pipeline, {"email": "ada@example.com", "data": {}})

    def listed() -> list[dict[str, object]] | None:
        page = httpx.get(
            f"{pipeline.api.url}/jobs", params={"status": "failed"}, headers=AS_A, timeout=10
        ).json()
        items: list[dict[str, object]] = page["items"]
        return items if len(items) == 3 else None

    items = wait_for(listed, what="three failed jobs")
    assert [item["job_id"] for item in items] == list(reversed(failed))
    for item in items:
        assert "unknown processing step 'nope'" in str(item["error"])

    first = httpx.get(
        f"{pipeline.api.url}/jobs", params={"status": "failed", "limit": 2}, headers=AS_A
    ).json()
    rest = httpx.get(
        f"{pipeline.api.url}/jobs",
        params={"status": "failed", "limit": 2, "cursor": first["next_cursor"]},
        headers=AS_A,
    ).json()
    assert [i["job_id"] for i in first["items"] + rest["items"]] == list(reversed(failed))
    assert rest["next_cursor"] is None


def test_resubmitting_with_an_idempotency_key_returns_the_first_job_and_sends_once(
    pipeline: Pipeline, mailtrap: MailtrapStub
) -> None:
    body = {"email": "ada@example.com", "data": {"order": 17}}
    first = submit(pipeline, body, **{"Idempotency-Key": "order-17"})
    again = submit(pipeline, body, **{"Idempotency-Key": "order-17"})
    other_body = submit(
        pipeline, {**body, "data": {"order": 18}}, **{"Idempotency-Key": "order-17"}
    )

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    assert other_body.status_code == 409
    job_id = first.json()["job_id"]
    wait_for(lambda: mailtrap.deliveries_by_job()[job_id] == 1, what="the one email")
    assert len(mailtrap.delivered) == 1


def test_concurrent_requests_with_one_key_make_one_job(
    pipeline: Pipeline, mailtrap: MailtrapStub
) -> None:
    body = {"email": "ada@example.com", "data": {"order": 99}}

    def post(_: int) -> httpx.Response:
        return submit(pipeline, body, **{"Idempotency-Key": "race-99"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))

    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["job_id"] for r in responses}) == 1
    wait_for(lambda: len(mailtrap.delivered) == 1, what="the one email")


def test_idempotency_keys_are_scoped_to_the_caller(pipeline: Pipeline) -> None:
    body = {"email": "ada@example.com", "data": {}}
    mine = submit(pipeline, body, **{"Idempotency-Key": "shared-name"}).json()["job_id"]
    theirs = httpx.post(
        f"{pipeline.api.url}/jobs",
        json=body,
        headers={**AS_B, "Idempotency-Key": "shared-name"},
        timeout=10,
    )
    assert theirs.status_code == 202
    assert theirs.json()["job_id"] != mine


def test_without_a_valid_key_the_api_answers_401_except_for_health(pipeline: Pipeline) -> None:
    url = pipeline.api.url
    body = {"email": "ada@example.com", "data": {}}
    assert httpx.post(f"{url}/jobs", json=body).status_code == 401
    wrong = httpx.post(f"{url}/jobs", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/jobs").status_code == 401
    assert httpx.post(f"{url}/process-and-email/?email=a@example.com", json={}).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_one_caller_cannot_see_another_callers_jobs(pipeline: Pipeline) -> None:
    job_id = submit(pipeline, {"email": "ada@example.com", "data": {}}).json()["job_id"]
    assert job_of(pipeline, job_id, AS_B).status_code == 404
    listed = httpx.get(f"{pipeline.api.url}/jobs", headers=AS_B).json()
    assert job_id not in [item["job_id"] for item in listed["items"]]


def test_an_api_listening_beyond_loopback_without_keys_refuses_to_start(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(API_HOST="0.0.0.0")
    pipeline.api.start()
    assert pipeline.api.process is not None
    code = pipeline.api.process.wait(timeout=20)

    lines = [line for line in pipeline.api.output().splitlines() if not line.startswith("---")]
    assert code != 0
    assert len(lines) == 1, lines
    assert "API_KEYS" in lines[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("subject", "Hi\r\nBcc: victim@example.com"), ("email", "ada@example.com\r\nBcc: x@y.z")],
)
async def test_the_mailer_rejects_header_injection_from_any_producer(
    pipeline: Pipeline, mailtrap: MailtrapStub, broker_url: str, field: str, value: str
) -> None:
    event = json.loads(
        DataProcessed(
            job_id=uuid.uuid4(), email="ada@example.com", step="echo", data={}, result={}
        ).model_dump_json()
    )
    event[field] = value
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(event).encode()), routing_key=MAILER.queue
        )

    dead = wait_for(
        lambda: pipeline.management.peek(pipeline.vhost, MAILER.dead_letter_queue),
        what="the dead letter",
    )
    assert field in dead[0]["properties"]["headers"]["x-error-reason"]
    assert mailtrap.received == []
