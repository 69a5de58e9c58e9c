"""Refuse request bodies over a size limit with 413, whether or not they declare a length,
and bodies that take longer than a time limit to arrive with 408.

The limits apply as the app reads the body, not before it runs: a route that
answers without the body (a 401 to a caller without a key) never waits for
it, so a stranger cannot make the api read megabytes before hearing no.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLOSE = (b"connection", b"close")


class BodyRefused(HTTPException):
    """A body broke a limit while the app read it: 413 or 408, and the connection closed.

    An ``HTTPException``, so the app's own handler for those answers it in the
    app's format; ``BodySizeLimit`` answers it itself if it escapes the app.
    """

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code, detail, headers={"Connection": "close"})


class BodySizeLimit:
    """ASGI middleware: let the app read the body up to ``max_bytes`` (or its path's own
    limit in ``max_bytes_by_path``), within ``timeout_seconds`` of the request's start.

    A declared ``Content-Length`` over the limit (or not a number) is refused at
    once, before the app runs: that costs nothing. Otherwise the app reads the
    body through the limits, when it reads it: a chunked body is counted as it
    arrives and refused as soon as it passes the limit, and a body not complete
    ``timeout_seconds`` after the request began is refused, by raising
    ``BodyRefused`` from ``receive``. A response that starts before the body
    has all arrived closes the connection, so the rest is never waited for.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_seconds: float = 15.0,
        max_bytes_by_path: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        # Paths with a limit of their own (``/jobs/batch``) instead of ``max_bytes``.
        self.max_bytes_by_path = dict(max_bytes_by_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes_by_path.get(scope["path"], self.max_bytes)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            declared = declared.strip(b" \t")  # optional whitespace, as HTTP allows
            if not declared.isdigit():
                await _refuse(send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await _refuse(send, 413, _too_large(limit))
                return
        body = _LimitedBody(
            receive,
            limit,
            asyncio.get_running_loop().time() + self.timeout_seconds,
            self.timeout_seconds,
        )
        # HTTP/1.1: a request with neither header has no body to leave unread.
        has_body = b"transfer-encoding" in headers or int(declared or 0) > 0
        started = False

        async def send_closing_if_unread(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if has_body and not body.complete:
                    message = _closing(message)
            await send(message)

        try:
            await self.app(scope, body.receive, send_closing_if_unread)
        except BodyRefused as refused:
            if started:
                raise
            # An app without a handler for HTTPException (or one that let it through).
            await _refuse(send, refused.status_code, refused.detail)


class _LimitedBody:
    """The request's ``receive``, counting the body and bounding the time it takes."""

    def __init__(
        self,
        receive: Receive,
        limit: int,
        deadline: float,
        timeout_seconds: float,
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._deadline = deadline
        self._timeout_seconds = timeout_seconds
        self._received = 0
        self._refused: BodyRefused | None = None
        self.complete = False
        """Whether the client has nothing more to send for this request."""

    async def receive(self) -> Message:
        if self._refused is not None:
            raise self._refused
        if self.complete:
            # Once the body is in, the app waits only for a disconnect: no deadline.
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            detail = f"the request body did not arrive within {self._timeout_seconds:g} s"
            self._refused = BodyRefused(408, detail)
            raise self._refused from None
        if message["type"] != "http.request":
            # The client went away: the app sees the disconnect as it is.
            self.complete = True
            return message
        self._received += len(message.get("body", b""))
        if self._received > self._limit:
            self._refused = BodyRefused(413, _too_large(self._limit))
            raise self._refused
        if not message.get("more_body", False):
            self.complete = True
        return message


async def _refuse(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                CLOSE,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _closing(start: Message) -> Message:
    """``start`` asking the server to close the connection after the response."""
    headers = list(start.get("headers", []))
    for name, value in headers:
        if name.lower() == b"connection" and b"close" in value.lower():
            return start
    return {**start, "headers": [*headers, CLOSE]}


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"
