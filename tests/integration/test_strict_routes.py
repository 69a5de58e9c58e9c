"""What every route refuses before a handler runs: strangers, foreign bodies, extra or
repeated parameters. In-process, with a recording broker and a real SQLite job store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api_service import direct_handler, strict_route
from api_service.app import create_app
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore
from api_service.strict_json import parse_json_body
from support.asgi import http_scope
from unit.fakes import FakePublisher

KEY = "a-test-key-of-enough-length"
JOB = b'{"email": "ada@example.com", "data": {"visits": [3, 5]}}'
JSON = {"content-type": "application/json"}


class FakeBroker(FakePublisher):
    is_ready = True


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


def build_app(broker: FakeBroker, tmp_path: Path, **settings: Any) -> Iterator[FastAPI]:
    application = create_app(ApiSettings(_env_file=None, **settings))  # type: ignore[call-arg]
    application.state.broker = broker
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    application.state.store = store
    application.state.recorder = JobRecorder(store.record_batch)
    yield application
    asyncio.run(store.close())


@pytest.fixture
def app(broker: FakeBroker, tmp_path: Path) -> Iterator[FastAPI]:
    yield from build_app(broker, tmp_path)


@pytest.fixture
def keyed_app(broker: FakeBroker, tmp_path: Path) -> Iterator[FastAPI]:
    yield from build_app(broker, tmp_path, api_keys=KEY)


async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(app):
        yield c


@pytest.fixture
async def keyed_client(keyed_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(keyed_app):
        yield c


def locations(response: httpx.Response) -> list[list[Any]]:
    return [problem["loc"] for problem in response.json()["detail"]]


# --- query parameters and headers -------------------------------------------


async def test_a_recipient_given_twice_in_the_query_is_refused_not_guessed(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/process-and-email/?email=ada@example.com&email=eve@example.com",
        content=b'{"a": 1}',
        headers=JSON,
    )

    assert response.status_code == 422
    assert locations(response) == [["query", "email"]]
    assert broker.published == []


async def test_a_query_parameter_the_route_does_not_take_is_refused(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/process-and-email/?email=ada@example.com&subject=Hi&step=echo",
        content=b'{"a": 1}',
        headers=JSON,
    )

    assert response.status_code == 422
    assert locations(response) == [["query", "subject"], ["query", "step"]]
    assert broker.published == []


async def test_a_list_filter_given_twice_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs?status=sent&status=failed")

    assert response.status_code == 422
    assert locations(response) == [["query", "status"]]


async def post_job_with_twice(
    client: httpx.AsyncClient, header: str, first: str, second: str
) -> httpx.Response:
    """``POST /jobs`` with ``header`` given twice, ``first`` then ``second``."""
    return await client.post(
        "/jobs",
        content=JOB,
        headers=[("content-type", "application/json"), (header, first), (header, second)],
    )


async def test_two_idempotency_keys_are_refused_rather_than_one_picked(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await post_job_with_twice(client, "idempotency-key", "first", "second")

    assert response.status_code == 422
    assert locations(response) == [["header", "idempotency-key"]]
    assert broker.published == []


async def test_two_authorization_headers_name_no_caller_whichever_comes_first(
    keyed_client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    for first, second in ((KEY, "someone-elses-key"), ("someone-elses-key", KEY), (KEY, KEY)):
        response = await post_job_with_twice(
            keyed_client, "authorization", f"Bearer {first}", f"Bearer {second}"
        )

        assert response.status_code == 401, response.text
        assert "one Authorization header" in response.json()["detail"]
    assert broker.published == []


async def test_two_content_encodings_are_refused_rather_than_the_first_believed(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await post_job_with_twice(client, "content-encoding", "identity", "gzip")

    assert response.status_code == 415
    assert "one Content-Encoding" in response.json()["detail"]
    assert broker.published == []


async def test_declared_query_parameters_given_once_are_accepted(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    response = await client.post(
        "/process-and-email/?email=ada@example.com", content=b'{"a": 1}', headers=JSON
    )

    assert response.status_code == 202
    assert len(broker.published) == 1


# --- the body's media type --------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "multipart/form-data; boundary=x"},
        {"content-type": "application/json; charset=utf-16"},
        {"content-type": "application/json", "content-encoding": "gzip"},
    ],
    ids=["none", "text", "form", "multipart", "utf-16", "gzip"],
)
async def test_a_body_that_is_not_plain_utf8_json_is_refused_with_415(
    client: httpx.AsyncClient, broker: FakeBroker, headers: dict[str, str]
) -> None:
    response = await client.post("/jobs", content=JOB, headers=headers)

    assert response.status_code == 415
    assert isinstance(response.json()["detail"], str)
    assert broker.published == []


async def test_two_content_types_are_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        content=JOB,
        headers=[("content-type", "text/plain"), ("content-type", "application/json")],
    )

    assert response.status_code == 415


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=UTF-8", "application/vnd.jobs+json"],
)
async def test_json_media_types_are_accepted(
    client: httpx.AsyncClient, broker: FakeBroker, content_type: str
) -> None:
    response = await client.post("/jobs", content=JOB, headers={"content-type": content_type})

    assert response.status_code == 202
    assert len(broker.published) == 1


# --- strangers first --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"email": "x", "data": {"a": NaN}}',
        b'{"email": "x", "email": "y", "data": {}}',
        b"[" * 5000,
        b"\xff\xfe",
    ],
    ids=["nan", "duplicate", "deep", "not-utf8"],
)
async def test_a_caller_without_a_key_learns_nothing_about_its_body(
    keyed_client: httpx.AsyncClient, body: bytes
) -> None:
    response = await keyed_client.post("/jobs", content=body, headers=JSON)

    assert response.status_code == 401
    assert response.json() == {"detail": "missing or invalid API key"}


async def test_a_caller_with_a_key_gets_the_bodys_problems(
    keyed_client: httpx.AsyncClient,
) -> None:
    response = await keyed_client.post(
        "/jobs",
        content=b'{"email": "ada@example.com", "data": {"a": NaN}}',
        headers={**JSON, "authorization": f"Bearer {KEY}"},
    )

    assert response.status_code == 422
    assert locations(response) == [["body", "data", "a"]]


async def test_a_path_without_its_slash_is_not_redirected_to_the_clients_host(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/process-and-email?email=ada@example.com",
        content=b"{}",
        headers={**JSON, "host": "evil.example:666"},
    )

    assert response.status_code == 404
    assert "location" not in response.headers


# --- lone surrogates, named precisely ---------------------------------------


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"email": "ada@example.com", "subject": "a\\ud800", "data": {}}', ["body", "subject"]),
        (b'{"email": "ada@example.com", "data": {"\\udc00": 1}}', ["body", "data", "\\udc00"]),
        (b'{"email": "ada@example.com", "data": {"x": ["\\ud83d"]}}', ["body", "data", "x", 0]),
    ],
)
async def test_a_lone_surrogate_is_named_where_it_stands(
    client: httpx.AsyncClient, body: bytes, loc: list[Any]
) -> None:
    response = await client.post("/jobs", content=body, headers=JSON)

    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == loc
    assert "lone surrogate" in problem["msg"]


async def test_a_surrogate_pair_is_one_character_and_accepted(
    client: httpx.AsyncClient, broker: FakeBroker
) -> None:
    body = b'{"email": "ada@example.com", "subject": "\\ud83d\\ude00", "data": {}}'

    response = await client.post("/jobs", content=body, headers=JSON)

    assert response.status_code == 202
    assert broker.published[0].subject == "\U0001f600"  # type: ignore[attr-defined]


async def test_a_client_gone_mid_body_is_a_400_not_an_error_of_the_api(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    # As uvicorn reports a client that hangs up, or chunked framing it cannot read.
    arrivals: list[dict[str, Any]] = [
        {"type": "http.request", "body": JOB[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return arrivals.pop(0) if arrivals else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope([(b"content-type", b"application/json"), (b"content-length", b"60")])
    await app(scope, receive, send)

    assert sent[0]["status"] == 400
    assert b"ended before it was complete" in sent[1]["body"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_large_body_is_parsed_off_the_event_loop_and_a_small_one_on_it(
    client: httpx.AsyncClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Megabytes of batch take a good part of a second to parse: not on the loop.
    parsed_in: list[str] = []

    def recording(body: bytes) -> Any:
        parsed_in.append(threading.current_thread().name)
        return parse_json_body(body)

    monkeypatch.setattr(strict_route, "parse_json_body", recording)
    item = {"email": "ada@example.com", "data": {"visits": [3, 5]}}
    large = json.dumps({"jobs": [item] * 2000}).encode()
    assert len(large) > strict_route.OFF_LOOP_BYTES

    small_answer = await client.post("/jobs", content=JOB, headers=JSON)
    large_answer = await client.post("/jobs/batch", content=large, headers=JSON)
    duplicate = large[:-1] + b', "jobs": []}'
    refused = await client.post("/jobs/batch", content=duplicate, headers=JSON)

    assert small_answer.status_code == 202, small_answer.text
    assert large_answer.status_code == 422  # over MAX_BATCH_JOBS, found after parsing
    assert refused.status_code == 422
    assert locations(refused)[0] == ["body", "jobs"]  # the duplicate key, from the thread
    loop_thread = threading.current_thread().name
    assert parsed_in[0] == loop_thread
    assert parsed_in[1] != loop_thread
    assert parsed_in[2] != loop_thread


async def test_a_body_the_parser_fails_on_unforeseen_is_a_400_not_a_500(
    client: httpx.AsyncClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What FastAPI's own handler answered, before the routes parsed bodies themselves.
    def failing(body: bytes) -> Any:
        raise ArithmeticError("a case the parser did not foresee")

    monkeypatch.setattr(strict_route, "parse_json_body", failing)

    answer = await client.post("/jobs", content=JOB, headers=JSON)

    assert answer.status_code == 400
    assert answer.json() == {"detail": "There was an error parsing the body"}
    assert broker.published == []


async def test_a_large_body_is_validated_off_the_event_loop_two_requests_at_a_time(
    client: httpx.AsyncClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validating megabytes of small objects took seconds, all of them on the event
    # loop; and each such request holds tens of times its body in memory.
    threads: list[str] = []
    lock = threading.Lock()
    inside = most = 0
    real = direct_handler._validated

    def watched(*args: Any) -> Any:
        nonlocal inside, most
        if args[2] != ("body",):
            return real(*args)  # a header's value
        with lock:
            inside += 1
            most = max(most, inside)
            threads.append(threading.current_thread().name)
        try:
            if len(json.dumps(args[1])) > strict_route.OFF_LOOP_BYTES:
                time.sleep(0.2)  # long enough for the others to arrive
            return real(*args)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(direct_handler, "_validated", watched)
    item = {"email": "ada@example.com", "data": {"visits": [3, 5]}}
    large = json.dumps({"jobs": [item] * 2000}).encode()
    small = json.dumps({"jobs": [item]}).encode()

    answers = await asyncio.gather(
        *(client.post("/jobs/batch", content=large, headers=JSON) for _ in range(4)),
        client.post("/jobs/batch", content=small, headers=JSON),
    )

    assert [a.status_code for a in answers] == [422] * 4 + [202]  # 2000 > MAX_BATCH_JOBS
    loop_thread = threading.current_thread().name
    assert threads.count(loop_thread) == 1  # the small one only
    assert most == 2
