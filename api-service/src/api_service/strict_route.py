"""A route that takes nothing it was not asked for, and no one it does not know.

Before a handler sees a request, ``StrictRoute``:

1. authenticates the caller, when the route needs one, before reading
   anything the client sent (FastAPI reads the body before dependencies);
2. refuses a body that is not ``application/json`` in UTF-8 and without a
   content encoding (415), rather than reading it as JSON anyway;
3. refuses query parameters the route does not declare, and a declared query
   parameter or header given twice (422): ``?email=a&email=b`` names one
   recipient, never the last of several;
4. reads the JSON body with ``parse_json_body`` (duplicate keys, NaN, ...);
5. runs the endpoint through ``direct_handler``, FastAPI's handler without its
   generic machinery, where the route allows it (all of the api's do).

And a ``StrictRoute`` matches a path only where its UUID path parameters are
UUIDs: ``/jobs/batch`` is the batch route's path, never the job ``batch``, so
``GET /jobs/batch`` is a 405 naming the batch route's method, not a 422 about
a job id.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator
from email.message import Message
from typing import Any
from uuid import UUID

from fastapi import HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from api_service.dependencies import authenticate, caller_of
from api_service.direct_handler import NO_BODY, direct_handler, overridden
from api_service.problems import printable, validation_problems
from api_service.strict_json import parse_json_body

log = logging.getLogger("api.requests")

OFF_LOOP_BYTES = 64 * 1024
"""Bodies larger than this are parsed and validated in a worker thread: a batch of
megabytes takes a good part of a second to read (and a hostile one of empty objects,
seconds to validate), which the event loop (every other request) must not wait for.
The work still holds the GIL, but the loop gets its turn every few ms."""


LARGE_AT_ONCE = 2
"""Requests of a route whose body is over ``OFF_LOOP_BYTES`` handled at once, at most;
the others wait their turn. Read into Python values a JSON body takes tens of times
its size (8 MB of empty objects, 400 MB), and each is parsed and validated in a
worker thread: unbounded, a few such requests would take the memory and the threads
the rest of the api needs."""

_LONGEST_ECHO = 100
"""Characters of a refused Content-Type named back in the answer, at most."""


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > OFF_LOOP_BYTES:
                self._json = await asyncio.to_thread(parse_json_body, body)
            else:
                self._json = parse_json_body(body)
        return self._json


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    """The route's dependant and everything it depends on."""
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _not_json(content_type: str) -> str | None:
    """Why a body of ``content_type`` is not JSON in UTF-8, or None if it is."""
    parsed = Message()
    parsed["content-type"] = content_type
    subtype = parsed.get_content_subtype()
    if parsed.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        # Named back, but not at any length: the header is the client's to make huge.
        shown = printable(content_type, _LONGEST_ECHO)
        return f"the body must be JSON (Content-Type: application/json), not {shown!r}"
    charset = parsed.get_param("charset")
    if charset is not None and str(charset).lower() not in {"utf-8", "utf8"}:
        return "JSON bodies must be UTF-8"
    return None


# A client sends the same Content-Type every time, and parsing it was 6 % of a
# ``POST /jobs``: the answers for a few short ones are kept (a long one is the
# client's to make, and not worth keeping).
_not_json_seen = functools.lru_cache(maxsize=64)(_not_json)
_LONGEST_KEPT = 200


def _unsupported_media(request: Request) -> str | None:
    """Why the body cannot be read as JSON, or None if it can."""
    content_type = request.headers.getlist("content-type")
    if len(content_type) != 1:
        return "send exactly one Content-Type: application/json"
    given = content_type[0]
    if why := (_not_json_seen if len(given) <= _LONGEST_KEPT else _not_json)(given):
        return why
    encodings = request.headers.getlist("content-encoding")
    if len(encodings) > 1:
        return "send at most one Content-Encoding (identity)"
    encoding = (encodings[0] if encodings else "identity").strip().lower()
    if encoding != "identity":
        return f"Content-Encoding {encoding!r} is not supported; send the body as it is"
    return None


async def _body(request: Request) -> bytes:
    """The whole body; a client gone before sending it all (or whose chunked framing
    the server could not read) is a 400, not an error of the api's."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise HTTPException(400, "the request body ended before it was complete") from None


async def _json(request: StrictJsonRequest) -> Any:
    """The body's JSON value; a body the parser fails on in a way it did not foresee is
    the client's 400 (as FastAPI answers), logged, not a 500."""
    try:
        return await request.json()
    except HTTPException:
        raise
    except Exception as exc:
        log.warning("could not parse a request body: %s", type(exc).__name__)
        raise HTTPException(400, "There was an error parsing the body") from exc


class StrictRoute(APIRoute):
    """An ``APIRoute`` with the checks in this module's docstring."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        typed = path
        for param in self.dependant.path_params:
            if param.field_info.annotation is UUID:
                typed = typed.replace(f"{{{param.alias}}}", f"{{{param.alias}:uuid}}")
        # Only the matching changes: ``path`` and ``path_format`` stay as declared.
        self.path_regex, _, self.param_convertors = compile_path(typed)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        dependants = list(_dependants(self.dependant))
        needs_caller = any(d.call is authenticate for d in dependants)
        takes_body = self.body_field is not None
        query_names = {p.alias for d in dependants for p in d.query_params}
        header_names = {p.alias.lower() for d in dependants for p in d.header_params}

        direct = direct_handler(self)
        large_bodies = _Gate(LARGE_AT_ONCE)

        async def run(strict: StrictJsonRequest, caller: Any, body: Any, large: bool) -> Response:
            if direct is None or overridden(self):
                return await handler(strict)
            return await direct(strict, caller, body, large)

        async def strict_handler(request: Request) -> Response:
            # One request object throughout: it keeps the body once read.
            strict = StrictJsonRequest(request.scope, request.receive)
            caller = caller_of(strict) if needs_caller else None
            problems = _repeated_or_unknown(strict, query_names, header_names)
            if problems:
                raise HTTPException(422, validation_problems(problems))
            body = NO_BODY
            if takes_body and (raw := await _body(strict)):
                if why := _unsupported_media(strict):
                    raise HTTPException(415, why)
                if len(raw) > OFF_LOOP_BYTES:
                    async with large_bodies.held():
                        return await run(strict, caller, await _json(strict), True)
                body = await _json(strict)
            return await run(strict, caller, body, False)

        return strict_handler


class _Gate:
    """At most ``size`` holders at once, on whichever event loop serves the route
    (an asyncio semaphore belongs to the loop it first waited on)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore = asyncio.Semaphore(size)

    def held(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self._size)
        return self._semaphore


def _repeated_or_unknown(
    request: Request, query_names: set[str], header_names: set[str]
) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in query_names:
            problems.append(
                {"type": "unknown_parameter", "loc": ("query", name), "msg": "unknown parameter"}
            )
        elif name in seen:
            problems.append(
                {
                    "type": "repeated_parameter",
                    "loc": ("query", name),
                    "msg": "given more than once",
                }
            )
        seen.add(name)
    for name in header_names:
        if len(request.headers.getlist(name)) > 1:
            problems.append(
                {"type": "repeated_header", "loc": ("header", name), "msg": "given more than once"}
            )
    return problems
