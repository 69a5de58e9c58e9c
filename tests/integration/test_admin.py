"""``pipeline-admin`` as operators run it: the console command against the real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from pipeline_shared.errors import PermanentFailure
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker
from pipeline_shared.topology import PROCESSOR
from support.services import clean_environment
from support.waiting import async_wait_for

ADMIN = str(Path(sys.executable).parent / "pipeline-admin")


@pytest.fixture
async def dead_jobs(broker_url: str) -> AsyncIterator[list[str]]:
    """Three jobs the processor dead-lettered, and no consumer left on the work queue."""
    broker = Broker(broker_url, app_id="processor-service", retry_delays=(0.1,))
    await broker.connect()
    jobs = [
        JobRequested(job_id=uuid.uuid4(), email="a@example.com", data={"n": n}) for n in range(3)
    ]
    failed: list[str] = []

    async def reject(event: JobRequested) -> None:
        failed.append(str(event.job_id))
        raise PermanentFailure(f"bad data in job {event.data['n']}")

    consumer = await broker.consume(PROCESSOR, JobRequested, reject, prefetch=10)
    for job in jobs:
        await broker.publish(job)

    async def all_failed() -> bool:
        return len(failed) == len(jobs)

    await async_wait_for(all_failed, what="three dead letters")
    await consumer.stop(5)
    yield [str(job.job_id) for job in jobs]
    await broker.close()


def admin(
    broker_url: str, tmp_path: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ADMIN, *args],
        env=clean_environment(RABBITMQ_URL=broker_url),
        cwd=tmp_path,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def work_queue_messages(broker_url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(PROCESSOR.queue, ensure=True)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def test_list_prints_one_line_per_dead_message_with_job_reason_and_attempts(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    result = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[-1] == "3 message(s) in processor.job.requested.dlq"
    for job in dead_jobs:
        (line,) = [line for line in lines if line.startswith(job)]
        assert "JobRequested" in line
        assert "attempts=1" in line
        assert "PermanentFailure: bad data in job" in line


async def test_listing_leaves_the_messages_in_the_queue(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")
    again = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")
    assert again.stdout.splitlines()[-1] == "3 message(s) in processor.job.requested.dlq"


async def test_show_prints_the_failure_and_the_body_of_one_job(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    job = dead_jobs[1]
    result = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "show", "processor", job)

    assert result.returncode == 0, result.stderr
    assert f"job:          {job}" in result.stdout
    assert "failed in:    processor-service" in result.stdout
    assert "bad data in job 1" in result.stdout
    assert '"n": 1' in result.stdout


async def test_show_of_an_unknown_job_says_so_and_fails(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    result = await asyncio.to_thread(
        admin, broker_url, tmp_path, "dlq", "show", "processor", str(uuid.uuid4())
    )
    assert result.returncode == 1
    assert "no message of job" in result.stderr


async def test_replay_of_one_job_sends_only_it_back_with_a_fresh_attempt_count(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    job = dead_jobs[0]
    result = await asyncio.to_thread(
        admin, broker_url, tmp_path, "dlq", "replay", "processor", "--job", job
    )

    assert result.returncode == 0, result.stderr
    assert "1 message(s) replayed to processor.job.requested" in result.stdout
    (replayed,) = await work_queue_messages(broker_url)
    assert replayed.correlation_id == job
    assert replayed.type == "JobRequested"
    headers = replayed.headers or {}
    assert "x-attempts" not in headers
    assert "x-error-reason" not in headers
    listed = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")
    assert listed.stdout.splitlines()[-1] == "2 message(s) in processor.job.requested.dlq"


async def test_replay_without_a_job_sends_every_dead_message_back(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    result = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "replay", "processor")

    assert result.returncode == 0, result.stderr
    replayed = await work_queue_messages(broker_url)
    assert sorted(m.correlation_id or "" for m in replayed) == sorted(dead_jobs)


async def test_purge_asks_first_and_does_nothing_without_a_yes(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    refused = await asyncio.to_thread(
        admin, broker_url, tmp_path, "dlq", "purge", "processor", stdin="n\n"
    )
    assert refused.returncode == 1
    assert "Delete 3 message(s)" in refused.stdout
    listed = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")
    assert listed.stdout.splitlines()[-1] == "3 message(s) in processor.job.requested.dlq"


async def test_purge_with_yes_empties_the_dead_letter_queue(
    broker_url: str, tmp_path: Path, dead_jobs: list[str]
) -> None:
    result = await asyncio.to_thread(
        admin, broker_url, tmp_path, "dlq", "purge", "processor", "--yes"
    )

    assert result.returncode == 0, result.stderr
    assert "purged 3 message(s)" in result.stdout
    listed = await asyncio.to_thread(admin, broker_url, tmp_path, "dlq", "list", "processor")
    assert listed.stdout.splitlines()[-1] == "0 message(s) in processor.job.requested.dlq"


def test_an_unreachable_broker_is_one_clear_line(tmp_path: Path) -> None:
    result = admin("amqp://guest:secret@127.0.0.1:1/", tmp_path, "dlq", "list", "mailer")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("pipeline-admin: cannot reach the broker")
    assert "secret" not in result.stderr
