"""The whole pipeline: jobs over HTTP in, emails out through the real SDK over HTTPS."""

from __future__ import annotations

import signal
from collections.abc import Callable
from email import message_from_bytes
from email import policy as email_policy

import httpx
import pytest

from e2e.conftest import Pipeline
from pipeline_shared.topology import MAILER, PROCESSOR, STATUS
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]


def submit(api_url: str, **body: object) -> str:
    response = httpx.post(f"{api_url}/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["status"] == "queued"
    return str(answer["job_id"])


def test_every_job_posted_over_http_reaches_mailtrap_exactly_once_with_its_data(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()

    jobs = {
        submit(
            pipeline.api.url,
            email=f"user{n}@example.com",
            subject=f"Report {n}",
            data={"visits": [n, n + 1], "score": n * 1.5, "name": f"user{n}"},
        ): n
        for n in range(12)
    }
    wait_for(lambda: len(mailtrap.delivered) >= len(jobs), what="every email", timeout=30)

    assert mailtrap.deliveries_by_job() == dict.fromkeys(jobs, 1)
    for request in mailtrap.delivered:
        n = jobs[str(request.job_id)]
        payload = request.payload
        assert request.to == [f"user{n}@example.com"]
        assert payload["subject"] == f"Report {n}"
        assert payload["from"] == {
            "email": "reports@pipeline.example.com",
            "name": "Pipeline Reports",
        }
        assert payload["category"] == "background-job"
        assert payload["custom_variables"] == {"job_id": request.job_id}
        assert f'"name": "user{n}"' in payload["text"]  # the input data
        assert '"field_count": 3' in payload["text"]  # the processing result
        assert request.authorization == f"Bearer {mailtrap.token}"
    assert "job " in pipeline.processor.output()
    assert "handled" in pipeline.mailer.output()


def test_the_tutorials_endpoint_still_queues_a_job_and_answers_a_task_id(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()

    response = httpx.post(
        f"{pipeline.api.url}/process-and-email/",
        params={"email": "grace@example.com"},
        json={"rows": [1, 2, 3]},
        timeout=10,
    )

    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    wait_for(lambda: mailtrap.deliveries_by_job()[task_id] == 1, what="the tutorial job's email")
    (delivered,) = mailtrap.delivered
    assert delivered.to == ["grace@example.com"]
    assert '"rows"' in delivered.payload["text"]


def test_without_a_mailtrap_token_each_email_is_written_to_the_outbox(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory()
    pipeline.start()

    job_id = submit(pipeline.api.url, email="ada@example.com", data={"answer": 42})

    outbox = pipeline.api.cwd / "outbox"
    eml = wait_for(lambda: next(outbox.glob(f"{job_id}.eml"), None), what="the .eml file")
    message = message_from_bytes(eml.read_bytes(), policy=email_policy.default)
    assert message["To"] == "ada@example.com"
    assert message["X-Job-Id"] == job_id
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    assert '"answer": 42' in body.get_content()
    assert "MAILTRAP_TOKEN is not set" in pipeline.mailer.output()


def test_an_unknown_step_fails_the_job_with_a_reason_and_keeps_the_processor_running(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()

    failed = submit(pipeline.api.url, email="ada@example.com", data={}, step="no_such_step")
    fine = submit(pipeline.api.url, email="bob@example.com", data={"x": 1})

    wait_for(lambda: mailtrap.deliveries_by_job()[fine] == 1, what="the good job's email")
    dead = wait_for(
        lambda: pipeline.management.peek(pipeline.vhost, PROCESSOR.dead_letter_queue),
        what="the dead letter",
    )
    headers = dead[0]["properties"]["headers"]
    assert dead[0]["properties"]["correlation_id"] == failed
    assert "unknown processing step 'no_such_step'" in headers["x-error-reason"]
    assert mailtrap.deliveries_by_job()[failed] == 0
    assert pipeline.processor.running


def test_a_token_mailtrap_rejects_dead_letters_the_email_without_retrying(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**{**mailtrap_settings, "MAILTRAP_TOKEN": "revoked-token"})
    pipeline.start()

    job_id = submit(pipeline.api.url, email="ada@example.com", data={})

    dead = wait_for(
        lambda: pipeline.management.peek(pipeline.vhost, MAILER.dead_letter_queue),
        what="the dead letter",
    )
    headers = dead[0]["properties"]["headers"]
    assert headers["x-error-type"] == "PermanentFailure"
    assert "401" in headers["x-error-reason"]
    assert headers["x-attempts"] == 1
    assert [r.status for r in mailtrap.received if r.job_id == job_id] == [401]


def test_mailtrap_outages_are_retried_until_the_email_goes_out(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()
    mailtrap.fail_next(1, 503)
    mailtrap.fail_next(1, 429)

    job_id = submit(pipeline.api.url, email="ada@example.com", data={})

    wait_for(lambda: mailtrap.deliveries_by_job()[job_id] == 1, what="the email after retries")
    assert [r.status for r in mailtrap.received] == [503, 429, 200]
    assert "retrying in" in pipeline.mailer.output()


@pytest.mark.parametrize(
    ("failures", "delivered"), [(3, True), (4, False)], ids=["recovers", "gives-up"]
)
def test_short_retry_delays_alone_give_a_mailer_that_keeps_its_promises(
    pipeline_factory: PipelineFactory,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
    failures: int,
    delivered: bool,
) -> None:
    # Only RETRY_DELAYS is set: the lease and the provider timeout keep their
    # defaults (90 s and 30 s, far longer than all the delays together).
    pipeline = pipeline_factory(
        **mailtrap_settings,
        RETRY_DELAYS="1,1,2",
        SEND_LEASE_SECONDS="",
        MAILTRAP_TIMEOUT_SECONDS="",
    )
    pipeline.start()
    mailtrap.fail_next(failures, 503)

    job_id = submit(pipeline.api.url, email="ada@example.com", data={})

    if delivered:
        wait_for(lambda: mailtrap.deliveries_by_job()[job_id] == 1, what="the email")
        assert [r.status for r in mailtrap.received] == [503, 503, 503, 200]
    else:
        dead = wait_for(
            lambda: pipeline.management.peek(pipeline.vhost, MAILER.dead_letter_queue),
            what="the dead letter",
        )
        assert dead[0]["properties"]["headers"]["x-attempts"] == 4
        assert [r.status for r in mailtrap.received] == [503] * 4
    assert mailtrap.deliveries_by_job()[job_id] == (1 if delivered else 0)


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)],
    ids=["sigterm", "ctrl-c-then-sigterm"],
)
def test_every_service_exits_0_when_asked_to_stop(
    pipeline_factory: PipelineFactory,
    mailtrap_settings: dict[str, str],
    signals: tuple[signal.Signals, ...],
) -> None:
    pipeline = pipeline_factory(**mailtrap_settings)
    pipeline.start()

    # The second case is what a process manager does on Ctrl-C: the terminal
    # sends SIGINT to everyone, then the manager sends SIGTERM as well.
    for service in pipeline.services:
        assert service.process is not None
        for signum in signals:
            service.process.send_signal(signum)
    codes = {service.command: service.terminate(timeout=20) for service in pipeline.services}

    assert codes == {
        "api-service": 0,
        "status-service": 0,
        "processor-service": 0,
        "mailer-service": 0,
    }, pipeline.output()


def test_a_missing_required_setting_stops_the_service_with_one_line_naming_it(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(MAILER_TRANSPORT="mailtrap", MAILER_CONCURRENCY="many")
    pipeline.mailer.start()
    assert pipeline.mailer.process is not None
    code = pipeline.mailer.process.wait(timeout=20)

    lines = [line for line in pipeline.mailer.output().splitlines() if not line.startswith("---")]
    assert code != 0
    assert len(lines) == 1, lines
    assert "MAILER_CONCURRENCY" in lines[0]
    assert "MAILTRAP_TOKEN" in lines[0]


def test_while_the_services_run_the_management_ui_shows_a_consumer_on_each_work_queue(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory()
    pipeline.start()

    wait_for(
        lambda: all(
            pipeline.management.consumers(pipeline.vhost, stage.queue) == 1
            for stage in (PROCESSOR, MAILER, STATUS)
        ),
        what="one consumer per work queue (status-service's too) in the management API",
    )
