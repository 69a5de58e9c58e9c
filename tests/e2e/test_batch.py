"""POST /jobs/batch on the running pipeline: every job of a batch emailed exactly once."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from e2e.conftest import Pipeline
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

KEY = "batch-e2e-key-0123456789abcdef"
AS_CALLER = {"Authorization": f"Bearer {KEY}"}


def test_a_batch_of_fifty_jobs_is_emailed_exactly_once_each_to_its_own_recipient(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings, API_KEYS=KEY)
    pipeline.start()
    items = [
        {"email": f"reader{n}@example.com", "subject": f"Digest {n}", "data": {"n": n}}
        for n in range(50)
    ]

    response = httpx.post(
        f"{pipeline.api.url}/jobs/batch",
        json={"jobs": items},
        headers={**AS_CALLER, "Idempotency-Key": "digest-e2e"},
        timeout=30,
    )
    replay = httpx.post(
        f"{pipeline.api.url}/jobs/batch",
        json={"jobs": items},
        headers={**AS_CALLER, "Idempotency-Key": "digest-e2e"},
        timeout=30,
    )

    assert response.status_code == 202, response.text
    assert replay.status_code == 200
    job_ids = [job["job_id"] for job in response.json()["jobs"]]
    assert [job["job_id"] for job in replay.json()["jobs"]] == job_ids
    wait_for(lambda: len(mailtrap.delivered) >= 50, what="fifty emails", timeout=60)
    assert mailtrap.deliveries_by_job() == dict.fromkeys(job_ids, 1)
    recipients = {str(d.job_id): d.to for d in mailtrap.delivered}
    assert [recipients[job_id] for job_id in job_ids] == [[item["email"]] for item in items]

    def all_sent() -> bool:
        listed = httpx.get(
            f"{pipeline.api.url}/jobs", params={"limit": 200}, headers=AS_CALLER, timeout=10
        ).json()["items"]
        return sorted(job["job_id"] for job in listed if job["status"] == "sent") == sorted(job_ids)

    wait_for(all_sent, what="every job of the batch shown as sent", timeout=30)
