"""The services, each logged in as its least-privilege broker user.

As under docker compose: the broker holds the topology of rabbitmq/definitions.json
(loaded into the test's vhost), and each service's user has the file's
permissions, so no service may declare anything; it only checks the topology.
status-service, the api's read model, logs in as the api's user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.conftest import Pipeline, metrics_url
from pipeline_shared.messaging import DEFAULT_RETRY_DELAYS
from support.broker_users import ServiceUsers, committed_definitions, topology_of
from support.mailtrap_stub import MailtrapStub
from support.rabbit import Management
from support.services import Service
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]
USER_OF = {
    "api-service": "api-service",
    "status-service": "status-service",
    "processor-service": "processor-service",
    "mailer-service": "mailer-service",
}
"""The file's user each service logs in as, by the service's command."""
# The file's retry queues are those of the default delays.
FILE_RETRY_DELAYS = ",".join(f"{delay:g}" for delay in DEFAULT_RETRY_DELAYS)


@pytest.fixture
def definitions() -> dict[str, Any]:
    return committed_definitions()


@pytest.fixture
def users(
    management: Management, definitions: dict[str, Any], vhost: str
) -> Iterator[ServiceUsers]:
    """The file's service users, granted the file's permissions on the test's vhost.

    Tests ask for it before ``pipeline_factory``, so the users are deleted only
    after the services have stopped.
    """
    created = ServiceUsers.create(management, definitions)
    created.grant(vhost)
    yield created
    created.delete()


def restricted(users: ServiceUsers, vhost: str) -> dict[str, dict[str, str]]:
    return {service: {"RABBITMQ_URL": users.url(user, vhost)} for service, user in USER_OF.items()}


def output_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("--- ")]


def test_a_job_reaches_mailtrap_with_every_service_as_its_own_restricted_user(
    users: ServiceUsers,
    pipeline_factory: PipelineFactory,
    definitions: dict[str, Any],
    vhost: str,
    management: Management,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
) -> None:
    management.load_definitions(vhost, topology_of(definitions))
    pipeline = pipeline_factory(
        per_service=restricted(users, vhost), RETRY_DELAYS=FILE_RETRY_DELAYS, **mailtrap_settings
    )
    pipeline.start()

    response = httpx.post(
        f"{pipeline.api.url}/jobs",
        json={"email": "ada@example.com", "subject": "Least privilege", "data": {"n": [1, 2]}},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = str(response.json()["job_id"])

    wait_for(lambda: mailtrap.deliveries_by_job()[job_id] == 1, what="the job's email")
    (delivered,) = [r for r in mailtrap.delivered if r.job_id == job_id]
    assert delivered.to == ["ada@example.com"]
    assert delivered.payload["subject"] == "Least privilege"

    assert {process.command for process in pipeline.services} == set(USER_OF)
    for process in pipeline.services:
        output, service = process.output(), process.command
        assert f"{users.names[USER_OF[service]]}:***@" in output, (
            f"{service} did not log in as its user"
        )
        assert "topology checked" in output, f"{service} declared the topology"

    def connected_users() -> set[str]:
        connections = management.client.get(f"/api/vhosts/{vhost}/connections").json()
        return {connection["user"] for connection in connections}

    # Nobody else (no administrator, no guest) is connected to the vhost.
    wait_for(
        lambda: connected_users() == set(users.names.values()),
        what="the three users' connections in the management API",
    )

    # The api's read model (status-service) consumed every event of the job under the
    # api's user.
    def status() -> object:
        return httpx.get(f"{pipeline.api.url}/jobs/{job_id}", timeout=10).json().get("status")

    wait_for(lambda: status() == "sent", what="the api to see EmailSent")


@pytest.mark.parametrize("worker", ["processor", "mailer"])
def test_a_worker_whose_broker_lacks_the_topology_exits_with_one_clear_line(
    worker: str, users: ServiceUsers, pipeline_factory: PipelineFactory, vhost: str
) -> None:
    pipeline = pipeline_factory(per_service=restricted(users, vhost))  # no topology loaded
    process = pipeline.processor if worker == "processor" else pipeline.mailer
    process.start()
    assert process.process is not None
    code = process.process.wait(timeout=30)

    assert code != 0
    lines = output_lines(process.output())
    assert lines[-1].startswith(f"{worker}-service: the broker lacks exchange 'events'"), lines
    assert "rabbitmq/definitions.json" in lines[-1]
    assert "Traceback" not in process.output()
    # Before it, only start-up lines: the mailer's (its ledger, its transport) and
    # the probe endpoint's.
    assert all(" mailer: " in line or " pipeline.probes: " in line for line in lines[:-1]), lines


def test_the_api_whose_broker_lacks_the_topology_stays_up_unready_and_says_why(
    users: ServiceUsers, pipeline_factory: PipelineFactory, vhost: str
) -> None:
    pipeline = pipeline_factory(per_service=restricted(users, vhost))  # no topology loaded
    api = pipeline.api
    api.start()
    api.wait_listening()

    def reported() -> bool:
        return any(
            " ERROR " in line and "the broker lacks" in line for line in api.output().splitlines()
        )

    wait_for(reported, what="the api to log the missing topology")
    ready = httpx.get(f"{api.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "the broker lacks" in ready.json()["detail"]
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    # Proving a negative needs a pause: the api tries again with back-off (an
    # operator may load the definitions without restarting it), but says so
    # once, not once per try.
    time.sleep(2.5)
    assert api.running
    assert api.output().count("the broker lacks") == 1, "the configuration error was logged again"


def readyz(service: Service) -> tuple[int, str]:
    """status-service's /readyz: its status code and ``detail`` ("" when ready)."""
    answer = httpx.get(f"{metrics_url(service)}/readyz", timeout=5)
    return answer.status_code, str(answer.json().get("detail", ""))


def test_status_service_refused_its_queue_is_unready_naming_it_until_granted_then_catches_up(
    users: ServiceUsers,
    pipeline_factory: PipelineFactory,
    definitions: dict[str, Any],
    vhost: str,
    management: Management,
) -> None:
    management.load_definitions(vhost, topology_of(definitions))
    status_rule = next(r for r in definitions["permissions"] if r["user"] == "status-service")
    status_user = users.names["status-service"]
    # status-service's user may not read its own queue.
    management.set_permissions(
        vhost, status_user, status_rule["configure"], status_rule["write"], "^$"
    )
    pipeline = pipeline_factory(
        per_service=restricted(users, vhost), RETRY_DELAYS=FILE_RETRY_DELAYS
    )
    for service in pipeline.services:
        service.start()
    pipeline.wait_workers_consuming()
    pipeline.api.wait_ready()
    status = pipeline.status

    def unready_naming_the_queue() -> bool:
        assert status.running, f"status-service exited:\n{status.output()}"
        try:
            code, detail = readyz(status)
        except httpx.HTTPError:
            return False
        return code == 503 and "api.job.status" in detail

    wait_for(unready_naming_the_queue, what="status-service's /readyz to name the refused queue")
    assert "ACCESS_REFUSED" in readyz(status)[1]
    # The api needs only to publish: it stays ready, and takes jobs (the broker
    # holds their events), but their status cannot move yet.
    assert httpx.get(f"{pipeline.api.url}/readyz", timeout=5).status_code == 200
    response = httpx.post(
        f"{pipeline.api.url}/jobs", json={"email": "ada@example.com", "data": {}}, timeout=10
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    def status_of_job() -> str:
        answer = httpx.get(f"{pipeline.api.url}/jobs/{job_id}", timeout=5)
        return str(answer.json()["status"]) if answer.status_code == 200 else ""

    wait_for(
        lambda: (Path(pipeline.mailer.env["OUTBOX_DIR"]) / f"{job_id}.eml").exists(),
        what="the job's email in the outbox",
    )
    assert status_of_job() == "queued"

    management.set_permissions(
        vhost, status_user, status_rule["configure"], status_rule["write"], status_rule["read"]
    )

    pipeline.wait_following(timeout=60)
    wait_for(
        lambda: status_of_job() == "sent", timeout=30, what="the waiting events to move the job on"
    )
    assert status.output().count("cannot follow the job events") == 1
    assert "following the job events on api.job.status again" in status.output()
    assert httpx.get(f"{pipeline.api.url}/readyz", timeout=5).status_code == 200
    assert "cannot follow" not in pipeline.api.output()
