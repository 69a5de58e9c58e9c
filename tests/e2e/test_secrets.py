"""Secrets never leave the process, and addresses are masked in logs.

A full run with distinctive secrets everywhere (the broker user's password,
the Mailtrap token, an API key, the database password), through success,
failures, bad requests and a stop; then every service's output and every
answer the api gave is searched for them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from e2e.conftest import Pipeline
from support.mailtrap_stub import MailtrapStub
from support.postgres import temporary_database
from support.rabbit import Management
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]


@pytest.fixture
def broker_user(management: Management, vhost: str) -> Iterator[tuple[str, str]]:
    name, password = f"svc-{uuid.uuid4().hex[:8]}", f"amqp-pw-{uuid.uuid4().hex}"
    management.client.put(f"/api/users/{name}", json={"password": password, "tags": ""})
    management.client.put(
        f"/api/permissions/{quote(vhost, safe='')}/{name}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
    ).raise_for_status()
    yield name, password
    management.client.delete(f"/api/users/{name}")


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """A PostgreSQL database of the test's own, reached with a password in its URL
    (trust authentication ignores it); SQLite, without one, if no server answers."""
    password = f"db-pw-{uuid.uuid4().hex}"
    with temporary_database("secrets", password) as url:
        if url is None:
            yield f"sqlite:///{tmp_path / 'state.sqlite3'}", None
        else:
            yield url, password


def test_no_secret_appears_in_any_output_or_answer_and_addresses_are_masked(
    pipeline_factory: PipelineFactory,
    tmp_path: Path,
    broker_url: str,
    broker_user: tuple[str, str],
    database_url: tuple[str, str | None],
) -> None:
    token, api_key = f"mt-token-{uuid.uuid4().hex}", f"api-key-{uuid.uuid4().hex}"
    user, amqp_password = broker_user
    url, db_password = database_url
    stub = MailtrapStub(tmp_path, token=token)
    stub.start()
    try:
        pipeline = pipeline_factory(
            RABBITMQ_URL=broker_url.replace("guest:guest@", f"{user}:{amqp_password}@"),
            DATABASE_URL=url,
            API_KEYS=api_key,
            MAILTRAP_TOKEN=token,
            MAILTRAP_API_HOST=stub.host,
            REQUESTS_CA_BUNDLE=str(stub.ca_bundle),
            MAIL_FROM="reports@pipeline.example.com",
            # One request per email: the scripted 401 then refuses one email, not
            # whichever jobs happened to share its batch.
            MAILTRAP_BATCH_SIZE="1",
        )
        pipeline.start()
        auth = {"Authorization": f"Bearer {api_key}"}
        api = pipeline.api.url
        answers = []

        stub.fail_next(1, 401)  # a rejected send: its reason travels through the logs
        for n in range(3):
            response = httpx.post(
                f"{api}/jobs", json={"email": f"secret{n}@example.com", "data": {}}, headers=auth
            )
            answers.append(response.text)
        answers.append(
            httpx.post(
                f"{api}/process-and-email/",
                params={"email": "tutorial@example.com"},
                json={},
                headers=auth,
            ).text
        )
        wait_for(lambda: len(stub.received) == 4, what="four sends")
        for request in (
            httpx.post(f"{api}/jobs", json={"email": "x@example.com"}, headers=auth),
            httpx.post(f"{api}/jobs", json={}, headers={"Authorization": f"Bearer {token}"}),
            httpx.get(f"{api}/jobs/{uuid.uuid4()}", headers=auth),
            httpx.get(f"{api}/jobs", headers=auth),
            httpx.get(f"{api}/docs"),
            httpx.get(f"{api}/openapi.json"),
            httpx.get(f"{api}/readyz"),
        ):
            answers.append(request.text)
        for service in pipeline.services:
            assert service.terminate() == 0
    finally:
        stub.stop()

    output = pipeline.output()
    secrets = [token, api_key, amqp_password] + ([db_password] if db_password else [])
    for secret in secrets:
        assert secret not in output
        for answer in answers:
            assert secret not in answer
    assert "Mailtrap answered 401" in output  # the failure itself is logged
    for address in ("secret0@example.com", "tutorial@example.com", "tutorial%40example.com"):
        assert address not in output
    assert "t***%40example.com" in output or "t***@example.com" in output
