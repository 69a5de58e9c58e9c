"""Refuse request bodies over a size limit with 413, whether or not they declare a length,
and bodies that take longer than a time limit to arrive with 408."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware: read the body up to ``max_bytes`` (or its path's own limit in
    ``max_bytes_by_path``) before the app sees it.

    A declared ``Content-Length`` over the limit is refused before reading; a
    chunked body is counted as it arrives and refused as soon as it passes
    the limit, so neither can make the service buffer more than ``max_bytes``.
    A body not complete ``timeout_seconds`` after the request began is refused
    with 408 and its connection closed, so slow senders cannot pile up.
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
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            declared = declared.strip(b" \t")  # optional whitespace, as HTTP allows
            if not declared.isdigit():
                await self._refuse(send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await self._refuse(send, 413, _too_large(limit))
                return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                first = await _read_body(receive, limit)
        except TimeoutError:
            await self._refuse(
                send, 408, f"the request body did not arrive within {self.timeout_seconds:g} s"
            )
            return
        if first is None:
            await self._refuse(send, 413, _too_large(limit))
            return
        await self.app(scope, _replay(first, receive), send)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        payload = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive, limit: int) -> Message | None:
    """The whole body as one message, a disconnect, or None when it is over ``limit``."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away: let the app see the disconnect.
            return message
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return {"type": "http.request", "body": bytes(body), "more_body": False}


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


def _replay(first: Message, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replayed
