"""A broker refusal no retry can fix stops a worker with one line, and keeps the api unready.

The console commands run as processes against the real broker, pointed at a
vhost that does not exist, at a vhost where the processor's work queue was
declared before as a classic queue, and with a wrong password.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
import pytest

from e2e.conftest import Pipeline
from pipeline_shared.topology import PROCESSOR
from support.rabbit import new_vhost_name, url_for_vhost
from support.services import BIN, clean_environment, free_port
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]
WORKERS = ("processor-service", "mailer-service")
EXIT_WITHIN = 10.0


def missing_vhost(broker_url: str) -> tuple[str, list[str]]:
    """A URL naming a vhost that does not exist, and what the line must say."""
    name = new_vhost_name("missing")
    return url_for_vhost(name, broker_url), [
        f"the broker refused to open vhost '{name}'",
        f"(NOT_ALLOWED - vhost {name} not found)",
        "create the vhost",
    ]


async def classic_work_queue(broker_url: str, vhost: str) -> tuple[str, list[str]]:
    """The test's vhost with the processor's work queue declared as a classic queue."""
    connection = await aio_pika.connect_robust(broker_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(PROCESSOR.queue, durable=True)
    finally:
        await connection.close()
    return broker_url, [
        f"the broker refused to declare queue '{PROCESSOR.queue}'",
        # The broker names the first argument that differs.
        "(PRECONDITION_FAILED - inequivalent arg '",
        f"for queue '{PROCESSOR.queue}' in vhost '{vhost}'",
        f"delete the queue '{PROCESSOR.queue}'",
    ]


def wrong_password(broker_url: str) -> tuple[str, list[str]]:
    parts = urlsplit(broker_url)
    netloc = f"{parts.username or 'guest'}:{quote('wrong-pass-4711')}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl(), [
        f"the broker refused the login of user '{parts.username or 'guest'}'",
        "(ACCESS_REFUSED - Login was refused",
        "password in RABBITMQ_URL",
    ]


@pytest.fixture(params=["missing-vhost", "classic-queue", "wrong-password"])
async def refused(
    request: pytest.FixtureRequest, broker_url: str, vhost: str
) -> tuple[str, list[str]]:
    """A RABBITMQ_URL the broker refuses, and the words the worker's line must hold."""
    if request.param == "missing-vhost":
        return missing_vhost(broker_url)
    if request.param == "classic-queue":
        return await classic_work_queue(broker_url, vhost)
    return wrong_password(broker_url)


def run_until_exit(command: str, env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    """Start ``command``, wait for it to exit (at most EXIT_WITHIN s): (code, stderr, seconds)."""
    started = time.monotonic()
    process = subprocess.Popen(
        [str(BIN / command)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, stderr = process.communicate(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(
            f"{command} still running after {EXIT_WITHIN:g} s:\n{stderr.decode(errors='replace')}"
        )
    return process.returncode, stderr.decode(errors="replace"), time.monotonic() - started


@pytest.mark.parametrize("worker", WORKERS)
def test_a_worker_refused_by_the_broker_exits_non_zero_with_one_line_quoting_it(
    worker: str, refused: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, words = refused
    env = clean_environment(
        RABBITMQ_URL=url,
        OUTBOX_DIR=str(tmp_path / "outbox"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'state.sqlite3'}",
        # Not the default port: another run of this test beside it (or a
        # `make run` on this host) would hold it, and the worker fail on that.
        METRICS_PORT=str(free_port()),
    )
    code, stderr, seconds = run_until_exit(worker, env, tmp_path)

    assert code != 0, stderr
    assert seconds < EXIT_WITHIN
    assert "Traceback" not in stderr
    assert "retrying" not in stderr
    assert "not reachable" not in stderr
    # Exactly one line names the problem, and it is the last one: the
    # mailer's own start-up lines (its ledger, its outbox) and the line saying
    # where the worker's metrics endpoint listens may come before.
    lines = [line for line in stderr.splitlines() if line.strip()]
    naming = [line for line in lines if "the broker refused" in line]
    assert naming == [lines[-1]], stderr
    assert all(" mailer: " in line or " pipeline.probes: " in line for line in lines[:-1]), stderr
    line = lines[-1]
    assert line.startswith(f"{worker}: the broker refused"), line
    for expected in words:
        assert expected in line, line
    assert "wrong-pass-4711" not in stderr


def test_the_api_refused_by_the_broker_stays_up_unready_and_says_why(
    pipeline_factory: PipelineFactory, broker_url: str
) -> None:
    url, words = missing_vhost(broker_url)
    pipeline = pipeline_factory(RABBITMQ_URL=url)
    api = pipeline.api
    api.start()
    api.wait_listening()

    def reported() -> list[str]:
        return [
            line for line in api.output().splitlines() if " ERROR " in line and words[0] in line
        ]

    lines = wait_for(reported, timeout=EXIT_WITHIN, what="the api to log the refusal")
    assert len(lines) == 1, api.output()
    for expected in words:
        assert expected in lines[0]

    ready = httpx.get(f"{api.url}/readyz", timeout=5)
    assert ready.status_code == 503
    detail = ready.json()["detail"]
    for expected in words:
        assert expected in detail, detail
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    # The api tries again with a slow back-off (a fix needs no restart), but
    # says it once, and never as a broker that is not reachable.
    assert api.running
    assert "not reachable" not in api.output()
    assert "retrying" not in api.output()
    assert api.output().count("the broker refused") == 1, api.output()
