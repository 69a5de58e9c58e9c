"""The api's request-body limit (an ASGI middleware) and its JobRequest schema."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from api_service.body_limit import BodyRefused, BodySizeLimit
from api_service.schemas import JobRequest
from support.asgi import http_scope

LIMIT = 64


class RecordingApp:
    """An ASGI app that reads the whole body, records it, and answers 200 with it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def app() -> RecordingApp:
    return RecordingApp()


@pytest.fixture
async def client(app: RecordingApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=BodySizeLimit(app, max_bytes=LIMIT))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --- passing through --------------------------------------------------------


async def test_a_body_at_the_limit_passes_through_intact(
    client: httpx.AsyncClient, app: RecordingApp
) -> None:
    body = bytes(range(LIMIT))

    response = await client.post("/jobs", content=body)

    assert response.status_code == 200
    assert response.content == body
    assert app.bodies == [body]
    assert "connection" not in response.headers  # read whole: the connection may be reused


async def test_a_chunked_body_under_the_limit_reaches_the_app_whole(
    client: httpx.AsyncClient, app: RecordingApp
) -> None:
    response = await client.post("/jobs", content=chunks(b"a" * 20, b"b" * 20, b"c" * 24))

    assert response.status_code == 200
    assert app.bodies == [b"a" * 20 + b"b" * 20 + b"c" * 24]
    assert b"content-length" not in dict(app.scopes[0]["headers"])


async def test_a_get_without_a_body_passes_through(
    client: httpx.AsyncClient, app: RecordingApp
) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert app.bodies == [b""]


async def test_an_empty_post_passes_through(client: httpx.AsyncClient, app: RecordingApp) -> None:
    response = await client.post("/jobs", content=b"")

    assert response.status_code == 200
    assert app.bodies == [b""]


# --- refusing ---------------------------------------------------------------


async def test_a_declared_length_over_the_limit_is_refused_with_413_before_the_app(
    client: httpx.AsyncClient, app: RecordingApp
) -> None:
    response = await client.post("/jobs", content=b"x" * (LIMIT + 1))

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": f"request body larger than {LIMIT} bytes"}
    assert app.scopes == []


async def test_a_chunked_body_over_the_limit_is_refused_with_413_and_never_reaches_the_app_whole(
    client: httpx.AsyncClient, app: RecordingApp
) -> None:
    response = await client.post("/jobs", content=chunks(b"a" * 40, b"b" * 40, b"c" * 40))

    assert response.status_code == 413
    assert response.json() == {"detail": f"request body larger than {LIMIT} bytes"}
    assert response.headers["connection"] == "close"
    assert app.bodies == []


async def test_a_body_longer_than_its_small_declared_length_is_still_refused(
    app: RecordingApp,
) -> None:
    sent: list[Message] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"x" * 40, "more_body": True},
        {"type": "http.request", "body": b"x" * 40, "more_body": False},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope(headers=[(b"content-length", b"10")])
    await BodySizeLimit(app, max_bytes=LIMIT)(scope, receive, send)

    assert sent[0]["status"] == 413
    assert app.bodies == []


@pytest.mark.parametrize("declared", ["abc", "-1", "1e3", "1 2", ""])
async def test_a_content_length_that_is_not_a_number_is_refused_with_400(
    declared: str, client: httpx.AsyncClient, app: RecordingApp
) -> None:
    response = await client.post("/jobs", content=b"{}", headers={"Content-Length": declared})

    assert response.status_code == 400
    assert response.json() == {"detail": "invalid Content-Length header"}
    assert app.scopes == []


async def test_a_refusal_asks_the_client_to_close_the_connection(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/jobs", content=b"x" * (LIMIT * 2))

    assert response.headers["connection"] == "close"
    assert int(response.headers["content-length"]) == len(response.content)


async def test_a_path_with_a_limit_of_its_own_takes_larger_bodies_and_only_that_path(
    app: RecordingApp,
) -> None:
    limited = BodySizeLimit(app, max_bytes=LIMIT, max_bytes_by_path={"/jobs/batch": 4 * LIMIT})
    transport = httpx.ASGITransport(app=limited)
    body = b"x" * (2 * LIMIT)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        batch = await client.post("/jobs/batch", content=body)
        single = await client.post("/jobs", content=body)
        too_large = await client.post("/jobs/batch", content=chunks(body, body, body))

    assert batch.status_code == 200
    assert app.bodies == [body]
    assert single.status_code == 413
    assert too_large.status_code == 413
    assert too_large.json() == {"detail": f"request body larger than {4 * LIMIT} bytes"}


# --- other ASGI traffic -----------------------------------------------------


async def test_a_non_http_scope_goes_straight_to_the_app() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        message = await receive()
        seen.append(message["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    await BodySizeLimit(inner, max_bytes=LIMIT)({"type": "lifespan"}, receive, send)

    assert seen == ["lifespan", "lifespan.startup"]


async def test_a_client_that_goes_away_mid_body_lets_the_app_see_the_disconnect() -> None:
    seen: list[dict[str, Any]] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"partial", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(await receive()))
        seen.append(dict(await receive()))

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    await BodySizeLimit(inner, max_bytes=LIMIT)(http_scope(), receive, send)

    assert seen == [
        {"type": "http.request", "body": b"partial", "more_body": True},
        {"type": "http.disconnect"},
    ]


async def test_after_the_body_the_app_receives_from_the_server_again() -> None:
    seen: list[str] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"{}", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["type"])
        seen.append((await receive())["type"])

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    await BodySizeLimit(inner, max_bytes=LIMIT)(http_scope(), receive, send)

    assert seen == ["http.request", "http.disconnect"]


async def test_a_content_length_with_surrounding_whitespace_is_read_as_its_number() -> None:
    seen: list[bytes] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["body"])

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be refused: {message}")

    scope = http_scope([(b"content-length", b" 2\t")])
    await BodySizeLimit(inner, max_bytes=LIMIT)(scope, receive, send)

    assert seen == [b"{}"]


def stalling_after(*messages: Message) -> Receive:
    """A server's ``receive`` that gives ``messages``, then waits for ever."""
    incoming = list(messages)

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    return receive


async def test_a_body_that_does_not_arrive_in_time_is_refused_with_408_and_closed(
    app: RecordingApp,
) -> None:
    sent: list[Message] = []
    receive = stalling_after({"type": "http.request", "body": b"{", "more_body": True})

    async def send(message: Message) -> None:
        sent.append(message)

    started = time.monotonic()
    await BodySizeLimit(app, max_bytes=LIMIT, timeout_seconds=0.2)(http_scope(), receive, send)

    assert 0.2 <= time.monotonic() - started < 2
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"did not arrive within 0.2 s" in sent[1]["body"]
    assert app.bodies == []


async def test_a_body_that_arrives_in_time_is_not_cut_off(app: RecordingApp) -> None:
    sent: list[Message] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.request", "body": b"}", "more_body": False},
    ]

    async def receive() -> Message:
        await asyncio.sleep(0.01)
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await BodySizeLimit(app, max_bytes=LIMIT, timeout_seconds=1)(http_scope(), receive, send)

    assert sent[0]["status"] == 200
    assert app.bodies == [b"{}"]


# --- the body is read only when the app reads it ------------------------------


class AnsweringUnread:
    """An ASGI app that answers 401 without reading the body, as an unauthenticated
    route does."""

    def __init__(self) -> None:
        self.answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.answered += 1
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"detail": "no key"}'})


async def test_an_app_that_answers_without_the_body_is_never_made_to_wait_for_it() -> None:
    sent: list[Message] = []
    app = AnsweringUnread()

    async def receive() -> Message:
        raise AssertionError("nothing of the body may be read for the app")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope([(b"transfer-encoding", b"chunked")])
    await BodySizeLimit(app, max_bytes=LIMIT)(scope, receive, send)

    assert app.answered == 1
    assert sent[0]["status"] == 401
    assert sent[1]["body"] == b'{"detail": "no key"}'


@pytest.mark.parametrize(
    "framing",
    [[(b"content-length", b"2")], [(b"transfer-encoding", b"chunked")]],
    ids=["declared length", "chunked"],
)
async def test_an_answer_given_before_the_body_arrived_closes_the_connection(
    framing: list[tuple[bytes, bytes]],
) -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await BodySizeLimit(AnsweringUnread(), max_bytes=LIMIT)(
        http_scope(framing), stalling_after(), send
    )

    # The server must not wait for, nor read on, the rest of a body no one wants.
    assert [h for h in sent[0]["headers"] if h[0] == b"connection"] == [(b"connection", b"close")]


@pytest.mark.parametrize(
    "headers", [[], [(b"content-length", b"0")]], ids=["no body", "empty body"]
)
async def test_an_answer_to_a_request_without_a_body_keeps_the_connection(
    headers: list[tuple[bytes, bytes]],
) -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await BodySizeLimit(AnsweringUnread(), max_bytes=LIMIT)(
        http_scope(headers), stalling_after(), send
    )

    assert sent[0]["status"] == 401
    assert all(name != b"connection" for name, _ in sent[0]["headers"])


async def test_the_apps_own_handler_answers_a_refusal_met_while_it_reads() -> None:
    async def read(request: Request) -> Response:
        return Response(await request.body())

    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {"detail": exc.detail, "by": "the app"}, exc.status_code, headers=exc.headers
        )

    app = Starlette(
        routes=[Route("/jobs", read, methods=["POST"])],
        exception_handlers={HTTPException: handler},
    )
    transport = httpx.ASGITransport(app=BodySizeLimit(app, max_bytes=LIMIT))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        response = await client.post("/jobs", content=chunks(b"a" * 40, b"b" * 40))

    assert response.status_code == 413
    assert response.json() == {"detail": f"request body larger than {LIMIT} bytes", "by": "the app"}
    assert response.headers["connection"] == "close"


async def test_the_deadline_runs_from_the_start_of_the_request_not_of_the_read() -> None:
    sent: list[Message] = []

    async def late_reader(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.15)
        while (await receive()).get("more_body", False):
            pass

    async def send(message: Message) -> None:
        sent.append(message)

    receive = stalling_after({"type": "http.request", "body": b"{", "more_body": True})
    started = time.monotonic()
    await BodySizeLimit(late_reader, max_bytes=LIMIT, timeout_seconds=0.2)(
        http_scope([(b"content-length", b"10")]), receive, send
    )

    assert 0.2 <= time.monotonic() - started < 0.3
    assert sent[0]["status"] == 408


async def test_once_the_body_is_in_the_app_may_wait_for_a_disconnect_past_the_deadline() -> None:
    seen: list[str] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"{}", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["type"])
        seen.append((await receive())["type"])

    async def receive() -> Message:
        if len(incoming) == 1:
            await asyncio.sleep(0.2)  # the client leaves, well after the deadline
        return incoming.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be refused: {message}")

    await BodySizeLimit(inner, max_bytes=LIMIT, timeout_seconds=0.05)(
        http_scope([(b"content-length", b"2")]), receive, send
    )

    assert seen == ["http.request", "http.disconnect"]


async def test_an_app_that_reads_on_after_a_refusal_is_refused_again() -> None:
    refusals: list[int] = []
    reads = 0

    async def stubborn(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(2):
            try:
                while (await receive()).get("more_body", False):
                    pass
            except BodyRefused as refused:
                refusals.append(refused.status_code)
        raise BodyRefused(413, "gave up")

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 40, "more_body": True}

    async def send(message: Message) -> None:
        pass

    await BodySizeLimit(stubborn, max_bytes=LIMIT)(http_scope(), receive, send)

    assert refusals == [413, 413]
    assert reads == 2  # nothing more was read for it after the limit


async def test_a_refusal_after_the_app_began_its_answer_is_not_answered_twice() -> None:
    sent: list[Message] = []

    async def early_answerer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body", False):
            pass

    async def send(message: Message) -> None:
        sent.append(message)

    receive = stalling_after(
        {"type": "http.request", "body": b"x" * 40, "more_body": True},
        {"type": "http.request", "body": b"x" * 40, "more_body": True},
    )
    with pytest.raises(BodyRefused):
        await BodySizeLimit(early_answerer, max_bytes=LIMIT)(http_scope(), receive, send)

    assert [message["type"] for message in sent] == ["http.response.start"]


# --- the JobRequest schema --------------------------------------------------


def job_request(**overrides: Any) -> dict[str, Any]:
    return {"email": "ada@example.com", "data": {"visits": [3, 5, 8]}, **overrides}


def test_a_minimal_job_request_gets_the_default_step_and_no_subject() -> None:
    job = JobRequest.model_validate(job_request())

    assert job.step == "summarise"
    assert job.subject is None
    assert job.data == {"visits": [3, 5, 8]}


def test_a_job_request_may_have_empty_data() -> None:
    assert JobRequest.model_validate(job_request(data={})).data == {}


@pytest.mark.parametrize("data", [[1, 2, 3], "text", 42, None])
def test_a_job_request_whose_data_is_not_an_object_is_rejected(data: object) -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(job_request(data=data))

    assert caught.value.errors()[0]["loc"] == ("data",)


def test_a_job_request_with_an_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(job_request(priority="high"))

    assert [(error["loc"], error["type"]) for error in caught.value.errors()] == [
        (("priority",), "extra_forbidden")
    ]


@pytest.mark.parametrize("subject", ["Hi\r\nBcc: eve@example.com", "Hi\nthere", "Hi\x00"])
def test_a_job_request_subject_with_a_line_break_is_rejected(subject: str) -> None:
    with pytest.raises(ValidationError, match="must be a single line"):
        JobRequest.model_validate(job_request(subject=subject))


def test_a_job_request_with_an_invalid_email_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(job_request(email="ada-at-example.com"))

    assert caught.value.errors()[0]["loc"] == ("email",)


def test_a_job_request_with_an_unknown_step_name_shape_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(job_request(step="Drop Table"))

    assert caught.value.errors()[0]["loc"] == ("step",)
