"""``pipeline-admin status`` as operators run it: the console command, reading the real
broker's management API about a vhost whose queues hold a known number of messages."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from pipeline_shared.messaging import Broker
from pipeline_shared.topology import MAILER, PROCESSOR, QUEUE_EXCHANGE
from support.rabbit import MANAGEMENT_URL, new_vhost_name, url_for_vhost
from support.services import clean_environment
from support.waiting import async_wait_for, wait_for

ADMIN = str(Path(sys.executable).parent / "pipeline-admin")
# Long enough that nothing leaves the retry queue while the test looks at it.
RETRY_DELAY = 600.0
RETRY_QUEUE = PROCESSOR.retry_queue(RETRY_DELAY)


def environment(broker_url: str, management_url: str = MANAGEMENT_URL) -> dict[str, str]:
    return clean_environment(RABBITMQ_URL=broker_url, RABBITMQ_MANAGEMENT_URL=management_url)


def status(
    broker_url: str, tmp_path: Path, *args: str, management_url: str = MANAGEMENT_URL
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ADMIN, "status", *args],
        env=environment(broker_url, management_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def known_queues(broker_url: str) -> AsyncIterator[None]:
    """The topology, with 3 messages in the processor's work queue (one of them held
    unacknowledged by its one consumer), 2 in its retry queue and 1 in its DLQ."""
    broker = Broker(broker_url, app_id="processor-service", retry_delays=(RETRY_DELAY,))
    await broker.connect()
    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    queues = await channel.get_exchange(QUEUE_EXCHANGE, ensure=False)
    for queue, count in (
        (PROCESSOR.queue, 3),
        (RETRY_QUEUE, 2),
        (PROCESSOR.dead_letter_queue, 1),
    ):
        for n in range(count):
            message = aio_pika.Message(f"{queue} {n}".encode())
            await queues.publish(message, routing_key=queue, mandatory=True)
    await channel.set_qos(prefetch_count=1)
    held: list[AbstractIncomingMessage] = []

    async def hold(message: AbstractIncomingMessage) -> None:
        held.append(message)

    work = await channel.get_queue(PROCESSOR.queue, ensure=False)
    await work.consume(hold)

    async def one_held() -> bool:
        return len(held) == 1

    await async_wait_for(one_held, what="the consumer to hold one message")
    yield
    await connection.close()
    await broker.close()


def stage_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    (stage,) = [stage for stage in report["stages"] if stage["stage"] == name]
    found: dict[str, Any] = stage
    return found


async def test_json_reports_the_real_depth_consumers_retries_and_dead_letters(
    broker_url: str, vhost: str, tmp_path: Path, known_queues: None
) -> None:
    expected = {
        "exists": True,
        "ready": 2,
        "unacked": 1,
        "consumers": 1,
        "retrying": 2,
        "retry_queues": {RETRY_QUEUE: 2},
        "dead_letters": 1,
    }

    async def settled() -> dict[str, Any] | None:
        # The management API's figures trail the broker by its statistics interval.
        result = await asyncio.to_thread(status, broker_url, tmp_path, "--json")
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        processor = stage_of(report, "processor")
        shown = {key: processor[key] for key in expected}
        return report if shown == expected else None

    report = await async_wait_for(
        settled, timeout=30, interval=0.25, what=f"the management API to show {expected}"
    )

    assert report["vhost"] == vhost
    processor = stage_of(report, "processor")
    assert processor["queue"] == PROCESSOR.queue
    assert processor["dead_letter_queue"] == PROCESSOR.dead_letter_queue
    for rate in ("publish_rate", "deliver_rate", "ack_rate"):
        assert isinstance(processor[rate], float)
        assert processor[rate] >= 0
    mailer = stage_of(report, "mailer")
    assert (mailer["queue"], mailer["exists"], mailer["retrying"]) == (MAILER.queue, True, 0)
    assert mailer["retry_queues"] == {MAILER.retry_queue(RETRY_DELAY): 0}
    assert [stage["stage"] for stage in report["stages"]] == ["processor", "mailer", "status"]


async def test_the_table_shows_the_same_figures(
    broker_url: str, tmp_path: Path, known_queues: None
) -> None:
    async def settled() -> str | None:
        result = await asyncio.to_thread(status, broker_url, tmp_path)
        assert result.returncode == 0, result.stderr
        (row,) = [line for line in result.stdout.splitlines() if line.startswith("processor ")]
        cells = row.split()
        # ready, unacked, consumers ... retrying, dead
        return row if cells[2:5] == ["2", "1", "1"] and cells[-2:] == ["2", "1"] else None

    await async_wait_for(settled, timeout=30, interval=0.25, what="the table's figures")


def test_watch_redraws_until_ctrl_c_and_then_exits_0(broker_url: str, tmp_path: Path) -> None:
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [ADMIN, "status", "--watch", "--interval", "0.2"],
            env=environment(broker_url),
            cwd=tmp_path,
            stdout=out,
            stderr=err,
        )
    try:
        wait_for(
            lambda: stdout.read_text().count("(Ctrl-C stops)") >= 2,
            what="two drawings of the status",
        )
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert code == 0
    assert stderr.read_text() == ""
    assert "processor.job.requested" in stdout.read_text()


def test_an_unreachable_management_api_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    result = status(
        "amqp://guest:distinctive-secret-7@127.0.0.1:5672/",
        tmp_path,
        management_url="http://127.0.0.1:1",
    )

    assert result.returncode != 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "pipeline-admin: cannot reach the RabbitMQ management API at http://127.0.0.1:1:"
    )
    assert "distinctive-secret-7" not in result.stderr


def test_a_wrong_password_is_one_line_that_does_not_show_it(
    broker_url: str, tmp_path: Path
) -> None:
    parts = urlsplit(broker_url)
    host_port = parts.netloc.rpartition("@")[2]
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:wrong-secret-9@{host_port}"))

    result = status(wrong, tmp_path)

    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert f"refused user '{parts.username}' (401" in line
    assert "wrong-secret-9" not in result.stderr


def test_a_vhost_that_does_not_exist_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = new_vhost_name("missing")

    result = status(url_for_vhost(missing), tmp_path)

    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert line == (
        f"pipeline-admin: vhost '{missing}' (from RABBITMQ_URL) does not exist on the broker "
        f"at {MANAGEMENT_URL.rstrip('/')}"
    )
