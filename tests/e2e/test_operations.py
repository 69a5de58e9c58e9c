"""What an operator does when emails fail: fix the cause, replay the dead letters."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from e2e.conftest import Pipeline
from pipeline_shared.topology import MAILER
from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]
ADMIN = str(Path(sys.executable).parent / "pipeline-admin")


def test_emails_dead_lettered_by_a_revoked_token_go_out_once_replayed_after_the_fix(
    pipeline_factory: PipelineFactory, mailtrap: MailtrapStub, mailtrap_settings: dict[str, str]
) -> None:
    pipeline = pipeline_factory(**{**mailtrap_settings, "MAILTRAP_TOKEN": "revoked-token"})
    pipeline.start()
    jobs = [
        httpx.post(
            f"{pipeline.api.url}/jobs", json={"email": f"u{n}@example.com", "data": {}}, timeout=10
        ).json()["job_id"]
        for n in range(3)
    ]
    wait_for(
        lambda: len(pipeline.management.peek(pipeline.vhost, MAILER.dead_letter_queue)) == 3,
        what="three dead letters",
    )

    # The operator fixes the token and restarts the mailer, then replays.
    assert pipeline.mailer.terminate() == 0
    pipeline.mailer.env["MAILTRAP_TOKEN"] = mailtrap.token
    pipeline.mailer.start()
    pipeline.wait_consuming()
    replay = subprocess.run(
        [ADMIN, "dlq", "replay", "mailer"],
        env=pipeline.mailer.env,
        cwd=pipeline.mailer.cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert replay.returncode == 0, replay.stderr
    wait_for(lambda: set(jobs) <= set(mailtrap.deliveries_by_job()), what="the replayed emails")
    assert {job: mailtrap.deliveries_by_job()[job] for job in jobs} == dict.fromkeys(jobs, 1)
