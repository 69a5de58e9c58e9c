"""A provider that takes an email and never answers, on the running pipeline.

The stand-in accepts the email (it counts as delivered) and withholds its
answer past ``MAILTRAP_TIMEOUT_SECONDS``: the mailer cannot know the email
went out. With ``MAILTRAP_ACCOUNT_ID`` it finds it in the Email Logs and
sends nothing more; without, it sends again only after the lease.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import httpx

from e2e.conftest import Pipeline
from e2e.test_pipeline import submit
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

LEASE = 3.0


def job_view(pipeline: Pipeline, job_id: str) -> dict[str, object]:
    response = httpx.get(f"{pipeline.api.url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_an_email_taken_without_an_answer_is_found_in_the_logs_and_sent_once(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    mailtrap.log_delay = 1.0  # the logs show an email only a while after it was taken
    pipeline = pipeline_factory(
        **mailtrap_settings,
        MAILTRAP_ACCOUNT_ID=mailtrap.account_id,
        MAILTRAP_GENERAL_API_HOST=mailtrap.host,
        RECONCILE_AFTER_SECONDS="1.5",
        SEND_LEASE_SECONDS=str(LEASE),
    )
    pipeline.start()
    mailtrap.accept_then_hang(1)

    job_id = submit(pipeline.api.url, email="ada@example.com", subject="Your report", data={})
    wait_for(
        lambda: job_view(pipeline, job_id)["status"] == "sent", timeout=30, what="the job sent"
    )
    mailtrap.release()

    [delivered] = mailtrap.delivered
    assert delivered.job_id == job_id
    assert job_view(pipeline, job_id)["provider_message_id"] == delivered.message_id
    assert mailtrap.log_searches, "the mailer never asked the Email Logs"
    assert "an earlier send went out after all" in pipeline.mailer.output()


def test_without_an_account_id_an_unanswered_email_is_sent_again_only_after_the_lease(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings, SEND_LEASE_SECONDS=str(LEASE))
    pipeline.start()
    mailtrap.accept_then_hang(1)

    job_id = submit(pipeline.api.url, email="ada@example.com", subject="Your report", data={})
    wait_for(
        lambda: job_view(pipeline, job_id)["status"] == "sent", timeout=30, what="the job sent"
    )
    mailtrap.release()

    # The one duplicate the README allows, and not before the lease.
    assert mailtrap.deliveries_by_job() == Counter({job_id: 2})
    first, second = mailtrap.delivered
    assert second.received_at - first.received_at >= LEASE
    assert mailtrap.log_searches == []
    assert "MAILTRAP_ACCOUNT_ID is not set" in pipeline.mailer.output()
