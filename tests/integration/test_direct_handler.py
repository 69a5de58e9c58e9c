"""The api's routes answer through ``direct_handler`` exactly as through FastAPI's handler.

Two apps side by side, each with a recording broker and a real SQLite job
store of its own: one serves requests directly, the other is made to use
FastAPI's handler (any entry in ``dependency_overrides`` does that). Every
request, drawn by hypothesis from valid ones and every way of getting one
wrong, must get the same status, headers and body from both (job ids aside:
each app makes its own).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Query, Request
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection

from api_service.app import create_app
from api_service.dependencies import get_connector
from api_service.direct_handler import direct_handler
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore
from api_service.strict_route import StrictRoute
from unit.fakes import FakePublisher

KEY = "a-test-key-of-enough-length"
# What each app makes its own: job ids, trace ids and the times in a job's record.
_OWN = re.compile(
    rb"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    rb"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"
)


class FakeBroker(FakePublisher):
    is_ready = True


class Connected:
    problem: str | None = None


def unused_override() -> None:
    """A dependency override no route uses: its presence alone selects FastAPI's handler."""


@asynccontextmanager
async def client(folder: Path, *, direct: bool) -> AsyncIterator[httpx.AsyncClient]:
    folder.mkdir(parents=True, exist_ok=True)
    app = create_app(ApiSettings(_env_file=None, api_keys=KEY, max_request_bytes=4096))  # type: ignore[call-arg]
    app.state.broker = FakeBroker()
    app.state.connector = Connected()
    store = await asyncio.to_thread(JobStore.open, f"sqlite:///{folder / 'jobs.sqlite3'}")
    app.state.store = store
    app.state.recorder = JobRecorder(store.record_batch)
    if not direct:
        app.dependency_overrides[unused_override] = unused_override
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as c:
            yield c
    finally:
        await app.state.recorder.close()
        await store.close()


def api_routes() -> list[APIRoute]:
    app = create_app(ApiSettings(_env_file=None))  # type: ignore[call-arg]
    return [route for route in app.routes if isinstance(route, APIRoute)]


def test_every_route_of_the_api_is_served_directly() -> None:
    # A route that stops qualifying (a new kind of parameter) falls back to
    # FastAPI's handler silently, and costs every request of it again.
    routes = api_routes()
    assert routes
    assert [r.path for r in routes if direct_handler(r) is None] == []


async def test_routes_needing_more_than_it_does_keep_fastapis_handler() -> None:
    app = FastAPI()
    app.router.route_class = StrictRoute

    async def with_argument(request: Request, flavour: str = "plain") -> str:
        return flavour

    @app.get("/cookie")
    async def cookie(request: Request, session: str | None = None) -> dict[str, str | None]:
        return {"session": request.cookies.get("session")}

    @app.get("/sync")
    def sync() -> dict[str, str]:
        return {"ran": "in a thread"}

    @app.get("/dependency")
    async def dependency(
        flavour: str = Depends(with_argument),
    ) -> dict[str, str]:
        return {"flavour": flavour}

    @app.get("/list")
    async def listed(tag: list[str] = Query(default=[])) -> dict[str, list[str]]:  # noqa: B008
        return {"tag": tag}

    @app.get("/sequence")
    async def sequence(tag: Sequence[str] = Query(default=())) -> dict[str, list[str]]:
        return {"tag": list(tag)}

    @app.get("/connection")
    async def connection(c: HTTPConnection) -> dict[str, str]:
        return {"path": c.url.path}

    async def counted(request: Request) -> int:
        request.state.calls = getattr(request.state, "calls", 0) + 1
        return int(request.state.calls)

    @app.get("/twice")
    async def twice(
        first: int = Depends(counted),
        second: int = Depends(counted),
    ) -> dict[str, int]:
        return {"first": first, "second": second}

    routes = {r.path: r for r in app.routes if isinstance(r, APIRoute)}
    assert direct_handler(routes["/cookie"]) is not None  # a query parameter: served
    for path in ("/sync", "/dependency", "/list", "/sequence", "/connection", "/twice"):
        assert direct_handler(routes[path]) is None, path

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/sync")).json() == {"ran": "in a thread"}
        assert (await c.get("/dependency", params={"flavour": "salt"})).json() == {
            "flavour": "salt"
        }
        assert (await c.get("/list", params={"tag": "a"})).json() == {"tag": ["a"]}
        assert (await c.get("/sequence", params={"tag": "a"})).json() == {"tag": ["a"]}
        assert (await c.get("/connection")).json() == {"path": "/connection"}
        # A dependency is called once a request, however often it is listed.
        assert (await c.get("/twice")).json() == {"first": 1, "second": 1}


async def test_dependency_overrides_still_apply(tmp_path: Path) -> None:
    class Troubled:
        problem = "overridden in a test"

    async with client(tmp_path, direct=True) as c:
        assert (await c.get("/readyz")).status_code == 200
        app = c._transport.app  # type: ignore[attr-defined]
        app.dependency_overrides[get_connector] = Troubled
        answer = await c.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["detail"] == "overridden in a test"


# --- the same answers, whichever handler ------------------------------------------------

JOB = {"email": "ada@example.com", "data": {"visits": [3, 5]}}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def mostly(valid: Any, *wrong: Any) -> st.SearchStrategy[Any]:
    """``valid`` half the time, else one of the ``wrong`` values: requests that get far
    (accepted, replayed, listed) are as common as those refused early."""
    return st.one_of(st.just(valid), st.sampled_from(wrong))


jobs = st.one_of(
    st.just(JOB),
    st.fixed_dictionaries(
        {"email": st.sampled_from(["ada@example.com", "no-at-sign", "", 7]), "data": json_values},
        optional={
            "subject": st.sampled_from(["Hi", "a\r\nBcc: x@y.z", None, 3]),
            "step": st.sampled_from(["summarise", "echo", "nope"]),
            "extra": st.just(1),
        },
    ),
    json_values,
)
bodies = st.one_of(
    jobs.map(lambda job: json.dumps(job).encode()),
    st.lists(jobs, max_size=3).map(lambda items: json.dumps({"jobs": items}).encode()),
    st.sampled_from([b"", b"null", b"[]", b"{", b'{"email": 1, "email": 2}', b"\xff", b"NaN"]),
)
requests = st.tuples(
    st.sampled_from(
        [
            ("POST", "/jobs"),
            ("POST", "/jobs/batch"),
            ("POST", "/process-and-email/"),
            ("GET", "/jobs"),
            ("GET", "/jobs/8c6f3a4e-4f59-4f6e-9a53-6a1c2f2d7b10"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
        ]
    ),
    mostly(
        "",
        "status=queued",
        "status=bogus",
        "limit=0",
        "limit=5",
        "limit=abc",
        "cursor=",
        "cursor=bm90LWEtY3Vyc29y",
        "email=ada@example.com",
        "email=no-at-sign",
        "other=1",
    ),
    bodies,
    mostly(b"key-1", None, b"key-2", b"", b"x" * 256, b"has space", b"caf\xe9"),
    mostly(f"Bearer {KEY}", "Bearer wrong", None),
    mostly("application/json", "text/plain", None),
)


def answer_of(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = sorted((name, _OWN.sub(b"<own>", value)) for name, value in response.headers.raw)
    return response.status_code, headers, _OWN.sub(b"<own>", response.content)


async def both_answer(folder: Path, sequence: list[Any]) -> None:
    async with (
        client(folder / "direct", direct=True) as direct,
        client(folder / "fastapi", direct=False) as fastapi,
    ):
        for (method, path), query, body, key, authorization, content_type in sequence:
            headers: list[tuple[bytes, bytes]] = []
            if key is not None:
                headers.append((b"idempotency-key", key))
            if authorization is not None:
                headers.append((b"authorization", authorization.encode()))
            if content_type is not None:
                headers.append((b"content-type", content_type.encode()))
            url = f"{path}?{query}" if query else path
            content = body if method == "POST" else None
            got = [
                answer_of(await c.request(method, url, content=content, headers=headers))
                for c in (direct, fastapi)
            ]
            assert got[0] == got[1], (method, url, body, headers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=st.lists(requests, min_size=1, max_size=6))
def test_direct_and_fastapi_answers_are_the_same(
    tmp_path_factory: pytest.TempPathFactory, sequence: list[Any]
) -> None:
    # Twice over: the second time, keys are replayed and jobs are listed.
    asyncio.run(both_answer(tmp_path_factory.mktemp("apps"), sequence * 2))
