"""Shared fixtures, and test tiers by folder: tests under unit/, integration/ and e2e/
get that marker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import settings
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline_shared import tracing
from support.mailtrap_stub import MailtrapStub
from support.postgres import shown_url, temporary_database
from support.rabbit import Management, new_vhost_name, url_for_vhost
from support.services import free_port
from support.tcp_proxy import TcpProxy

TIERS = ("unit", "integration", "e2e")

# HYPOTHESIS_PROFILE=deep runs every property test with many more examples
# (minutes, not seconds): for hunting, not for every run.
settings.register_profile("deep", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.path)).relative_to(Path(__file__).parent).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


# --- the real broker, one vhost per test -------------------------------------


@pytest.fixture(scope="session")
def management() -> Iterator[Management]:
    client = Management.connect()
    if not client.available():
        pytest.fail(
            "the RabbitMQ management API does not answer at RABBITMQ_MANAGEMENT_URL "
            "(default http://127.0.0.1:15672); run `rabbitmq-plugins enable rabbitmq_management`"
        )
    yield client
    client.close()


@pytest.fixture
def vhost(management: Management) -> Iterator[str]:
    """A fresh vhost for this test alone, deleted afterwards with all it holds."""
    name = new_vhost_name()
    management.create_vhost(name)
    yield name
    management.delete_vhost(name)


@pytest.fixture
def broker_url(vhost: str) -> str:
    return url_for_vhost(vhost)


@pytest.fixture(scope="module")
def postgres_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A PostgreSQL database of the test module's own, dropped afterwards. When no
    server answers at TEST_POSTGRES_URL the test is skipped, saying why; under
    CI=true it fails instead."""
    prefix = request.module.__name__.rsplit(".", 1)[-1]
    with temporary_database(prefix) as url:
        if url is None:
            pytest.skip(f"no PostgreSQL answers at TEST_POSTGRES_URL ({shown_url()})")
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on both databases a service may keep its state in: a SQLite
    file of its own, then the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    base: str = request.getfixturevalue("postgres_database")
    return base


@pytest.fixture
def mailtrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailtrapStub]:
    """The HTTPS stand-in for Mailtrap's sending API."""
    stub = MailtrapStub(tmp_path_factory.mktemp("mailtrap"))
    stub.start()
    yield stub
    stub.stop()


# --- spans, recorded in memory -------------------------------------------------


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Every span recorded while the test runs (tracing on, exporting to memory)."""
    exporter = InMemorySpanExporter()
    tracing.start_exporting(exporter, Resource.create({"service.name": "test"}), batched=False)
    yield exporter
    tracing.shutdown()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy to the broker, open: cut it (``cut``) to make the broker unreachable."""
    target = urlsplit(broker_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672, free_port())
    proxy.open()
    yield proxy
    proxy.close()
