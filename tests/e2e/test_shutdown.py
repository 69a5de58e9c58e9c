"""Stopping is bounded in time, whatever the provider does."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable

import httpx

from e2e.conftest import Pipeline
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

SHUTDOWN_TIMEOUT = 3.0
MARGIN = 7.0
"""Seconds past SHUTDOWN_TIMEOUT_SECONDS a stop may take: the interpreter's own exit,
which on a busy machine (the suite runs two tests at a time) has taken over 3 s. Still
far below the provider's timeout (60 s), which must not be what ends the stop."""


def test_a_mailer_stopped_while_the_provider_hangs_exits_0_in_time_and_sends_each_email_once(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    # The provider's timeout is far longer than the shutdown's: only the
    # shutdown bounds the stop.
    pipeline = pipeline_factory(
        **mailtrap_settings,
        SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT),
        MAILTRAP_TIMEOUT_SECONDS="60",
        SEND_LEASE_SECONDS="61",
        HANDLER_TIMEOUT_SECONDS="120",
        MAILER_CONCURRENCY="4",
        # One request per email, so that each job's send hangs on its own: jobs
        # a few milliseconds apart would otherwise share a batch request.
        MAILTRAP_BATCH_SIZE="1",
    )
    pipeline.start()
    mailtrap.hold()
    jobs = []
    for n in range(3):
        response = httpx.post(
            f"{pipeline.api.url}/jobs", json={"email": "ada@example.com", "data": {"n": n}}
        )
        assert response.status_code == 202, response.text
        jobs.append(response.json()["job_id"])
    wait_for(lambda: mailtrap.held == len(jobs), what="every send hanging at the provider")

    assert pipeline.mailer.process is not None
    pipeline.mailer.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = pipeline.mailer.process.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    took = time.monotonic() - started

    assert code == 0, pipeline.mailer.output()
    assert took <= SHUTDOWN_TIMEOUT + MARGIN, f"the mailer took {took:.1f} s to stop"
    assert "Traceback" not in pipeline.mailer.output()

    # The sends in flight were left uncertain, not lapsing claims.
    assert ledger_states(pipeline.mailer.env["DATABASE_URL"], jobs) == ["uncertain"] * len(jobs)

    # The held requests are refused (none was taken). A new mailer, with the
    # provider healthy, asks the Email Logs about each (the lease, 61 s, is
    # not what gets them out), finds nothing, and sends each email once.
    mailtrap.release()
    pipeline.mailer.env.update(
        MAILTRAP_TIMEOUT_SECONDS="0.9",
        MAILTRAP_ACCOUNT_ID=mailtrap.account_id,
        MAILTRAP_GENERAL_API_HOST=mailtrap.host,
        RECONCILE_AFTER_SECONDS="0.5",
    )
    pipeline.mailer.start()
    wait_for(
        lambda: all(mailtrap.deliveries_by_job()[job] == 1 for job in jobs),
        timeout=30,
        what="each email after the restart",
    )
    assert all(mailtrap.deliveries_by_job()[job] == 1 for job in jobs)
    assert len(mailtrap.log_searches) >= len(jobs)


def ledger_states(database_url: str, jobs: list[str]) -> list[str]:
    path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=10) as connection:
        return [
            row[0]
            for job in jobs
            for row in connection.execute(
                "SELECT state FROM mailer_sent_emails WHERE job_id = ?", (job,)
            )
        ]
