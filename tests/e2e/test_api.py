"""The api-service as a real process: bad input, big bodies, and a broker that comes and goes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest

from e2e.conftest import Pipeline
from pipeline_shared.topology import EXCHANGE, PROCESSOR, STATUS
from support.rabbit import Management, new_vhost_name, url_for_vhost
from support.services import Api, clean_environment, free_port
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

PipelineFactory = Callable[..., Pipeline]

GOOD = {"email": "ada@example.com", "data": {"a": 1}}


@pytest.fixture(scope="module")
def api(management: Management, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One api, in a vhost of its own, for the tests of its answers: none of them
    changes what it answers the next, and its start is most of such a test's time."""
    vhost = new_vhost_name("api")
    management.create_vhost(vhost)
    workdir = tmp_path_factory.mktemp("api")
    port = free_port()
    env = clean_environment(
        RABBITMQ_URL=url_for_vhost(vhost),
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        DATABASE_URL=f"sqlite:///{workdir / 'state.sqlite3'}",
    )
    api = Api("api-service", env, workdir, port=port)
    try:
        api.start()
        api.wait_ready()
        yield api
    finally:
        api.stop_quietly()
        management.delete_vhost(vhost)


@pytest.fixture
def own_api(pipeline_factory: PipelineFactory) -> Api:
    """An api of the test's own, in the test's vhost, for a test that changes its broker."""
    pipeline = pipeline_factory()
    pipeline.api.start()
    pipeline.api.wait_ready()
    return pipeline.api


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "email": "not-an-address"}, "email"),
        ({**GOOD, "data": [1, 2]}, "data"),
        ({**GOOD, "data": "text"}, "data"),
        ({"email": "ada@example.com"}, "data"),
        ({"data": {}}, "email"),
        ({**GOOD, "subject": "Hello\r\nBcc: victim@example.com"}, "subject"),
        ({**GOOD, "subject": "x" * 201}, "subject"),
        ({**GOOD, "step": "Robert'); DROP"}, "step"),
        ({**GOOD, "unexpected": True}, "unexpected"),
    ],
    ids=[
        "bad-address",
        "data-list",
        "data-string",
        "no-data",
        "no-email",
        "crlf-subject",
        "long-subject",
        "bad-step",
        "unknown-field",
    ],
)
def test_bad_input_gets_a_422_naming_the_field(api: Api, body: object, field: str) -> None:
    response = httpx.post(f"{api.url}/jobs", json=body, timeout=10)

    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(field in problem["loc"] for problem in problems), problems


def test_a_body_that_is_not_json_gets_a_422(api: Api) -> None:
    response = httpx.post(
        f"{api.url}/jobs",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422


def test_the_tutorial_endpoint_refuses_a_bad_address_and_non_object_data(api: Api) -> None:
    bad_address = httpx.post(
        f"{api.url}/process-and-email/", params={"email": "nope"}, json={}, timeout=10
    )
    not_object = httpx.post(
        f"{api.url}/process-and-email/", params={"email": "a@example.com"}, json=[1], timeout=10
    )
    assert bad_address.status_code == 422
    assert not_object.status_code == 422


def test_empty_data_is_a_valid_job(api: Api) -> None:
    response = httpx.post(f"{api.url}/jobs", json={**GOOD, "data": {}}, timeout=10)
    assert response.status_code == 202


def test_a_body_over_256_kib_gets_a_413(api: Api) -> None:
    big = {**GOOD, "data": {"blob": "x" * (256 * 1024)}}
    response = httpx.post(f"{api.url}/jobs", json=big, timeout=10)
    assert response.status_code == 413
    assert "larger than 262144 bytes" in response.json()["detail"]


def test_a_chunked_body_over_the_limit_without_a_length_gets_a_413(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"email": "ada@example.com", "data": {"blob": "'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}}'

    response = httpx.post(
        f"{api.url}/jobs",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413


def test_the_openapi_docs_are_served(api: Api) -> None:
    docs = httpx.get(f"{api.url}/docs", timeout=10)
    schema = httpx.get(f"{api.url}/openapi.json", timeout=10).json()
    assert docs.status_code == 200
    assert {"/jobs", "/jobs/batch", "/process-and-email/", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    target = urlsplit(broker_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672, free_port())
    yield proxy
    proxy.close()


def test_the_api_starts_without_a_broker_answers_503_and_recovers_when_it_returns(
    pipeline_factory: PipelineFactory, broker_url: str, proxy: TcpProxy
) -> None:
    through_proxy = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    pipeline = pipeline_factory(RABBITMQ_URL=through_proxy.geturl())
    api = pipeline.api
    api.start()
    api.wait_listening()

    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    not_ready = httpx.get(f"{api.url}/readyz", timeout=5)
    refused = httpx.post(f"{api.url}/jobs", json=GOOD, timeout=5)
    assert not_ready.status_code == 503
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert "broker" in refused.json()["detail"]

    proxy.open()
    api.wait_ready()
    assert httpx.post(f"{api.url}/jobs", json=GOOD, timeout=5).status_code == 202

    proxy.cut()
    wait_for(
        lambda: httpx.post(f"{api.url}/jobs", json=GOOD, timeout=15).status_code == 503,
        what="503 while the broker is away",
    )

    proxy.open()
    wait_for(
        lambda: httpx.post(f"{api.url}/jobs", json=GOOD, timeout=15).status_code == 202,
        timeout=30,
        what="202 once the broker is back, without a restart",
    )
    assert api.running
    assert "Traceback" not in api.output()


def test_a_job_the_broker_cannot_route_gets_a_503_not_a_silent_202(
    own_api: Api, broker_url: str
) -> None:
    async def unbind() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            for stage in (PROCESSOR, STATUS):
                queue = await channel.get_queue(stage.queue, ensure=True)
                await queue.unbind(EXCHANGE, "job.requested")

    asyncio.run(unbind())

    response = httpx.post(f"{own_api.url}/jobs", json=GOOD, timeout=10)

    assert response.status_code == 503
    assert "no queue is bound" in response.json()["detail"]
    assert response.headers["retry-after"].isdigit()
