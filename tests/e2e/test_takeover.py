"""Two mailers share one ledger: when one dies, the other takes its claims over within
the lease, and never takes a live one's."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from e2e.conftest import Pipeline
from support.mailtrap_stub import MailtrapStub
from support.services import Service
from support.streams import JobStream
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

JOBS = 200
LEASE = 15.0  # the default
MARGIN = 5.0
"""Seconds past the lease within which a dead mailer's claimed emails must arrive."""
MAILER_CONCURRENCY = 8
MAILER_PREFETCH = 16
"""The emails a mailer holds at once: with batching, the most it can have at the
provider when it dies, so the bound on duplicates without an account id."""
# A second mailer on this host: the first holds the metrics port.
NO_METRICS = {"METRICS_PORT": "0"}


def claimed_jobs(database_url: str) -> set[str]:
    """The jobs whose email a mailer is sending right now, by the ledger."""
    path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=10) as connection:
        rows = connection.execute(
            "SELECT job_id FROM mailer_sent_emails WHERE state = 'sending'"
        ).fetchall()
    return {row[0] for row in rows}


def test_a_survivor_sends_a_killed_mailers_claimed_emails_within_the_lease(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    # Retry delays far longer than the lease: only the lapse of the dead
    # mailer's claims (not a retry schedule) can get its emails out in time.
    pipeline = pipeline_factory(
        **mailtrap_settings,
        SEND_LEASE_SECONDS=str(LEASE),
        RETRY_DELAYS="1,60,60",
        MAILER_CONCURRENCY=str(MAILER_CONCURRENCY),
        MAILER_PREFETCH=str(MAILER_PREFETCH),
    )
    survivor = Service("mailer-service", {**pipeline.mailer.env, **NO_METRICS}, pipeline.mailer.cwd)
    pipeline.start()
    survivor.start()
    try:
        # As a real provider: emails are at the provider when the mailer dies
        # (batched, a request holds several; it must be in flight at the kill).
        mailtrap.latency = 0.3
        stream = JobStream(pipeline.api.url, JOBS).start()
        wait_for(lambda: len(mailtrap.delivered) >= JOBS // 4, timeout=60, what="some emails")
        database_url = pipeline.mailer.env["DATABASE_URL"]
        wait_for(lambda: bool(claimed_jobs(database_url)), timeout=30, what="emails in flight")

        pipeline.mailer.kill()
        killed_at = time.monotonic()
        orphaned = claimed_jobs(pipeline.mailer.env["DATABASE_URL"])
        assert orphaned, "no email was being sent at the kill: nothing to take over"
        stream.wait_done()
        assert stream.refused == []
        wanted = set(stream.accepted)
        wait_for(
            lambda: wanted <= set(mailtrap.deliveries_by_job()),
            timeout=90,
            what="every accepted job's email",
        )

        # The emails the dead mailer had claimed (and the survivor's in flight)
        # arrive within the lease, not after a retry delay or a 90 s lease.
        arrived = {
            r.job_id: r.received_at - killed_at for r in mailtrap.delivered if r.job_id in orphaned
        }
        assert set(arrived) == orphaned
        late = {job: round(t, 1) for job, t in arrived.items() if t > LEASE + MARGIN}
        assert late == {}, f"claimed emails arrived late after the kill: {late}"
        repeated = {job: n for job, n in mailtrap.deliveries_by_job().items() if n > 1}
        if repeated:
            print(f"emails sent twice after the kill (in flight at the provider): {repeated}")
        assert sum(n - 1 for n in repeated.values()) <= MAILER_PREFETCH
    finally:
        survivor.stop_quietly()


def test_a_slow_but_live_mailers_claims_are_never_taken_over(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    # Each send takes three leases: without renewal, the second mailer would
    # take every claim over and send every email again.
    pipeline = pipeline_factory(
        **mailtrap_settings,
        SEND_LEASE_SECONDS="1",
        MAILTRAP_TIMEOUT_SECONDS="10",
        RETRY_DELAYS="0.2,0.2,0.2",
    )
    second = Service("mailer-service", {**pipeline.mailer.env, **NO_METRICS}, pipeline.mailer.cwd)
    pipeline.start()
    second.start()
    try:
        mailtrap.latency = 3.0
        stream = JobStream(pipeline.api.url, 6).start()
        stream.wait_done()
        wanted = set(stream.accepted)
        wait_for(
            lambda: wanted <= set(mailtrap.deliveries_by_job()),
            timeout=60,
            what="every email",
        )

        assert {job: n for job, n in mailtrap.deliveries_by_job().items() if n > 1} == {}
        assert len(mailtrap.received) == len(wanted)
    finally:
        second.stop_quietly()
