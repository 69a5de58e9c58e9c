"""uvicorn's HTTP protocol, with a deadline for a request's line and headers.

uvicorn closes a keep-alive connection that stays idle between requests, but
nothing bounds a connection that sends nothing at all, or sends its headers a
byte at a time: enough of them exhaust the process's file descriptors. Each
request's line and headers must arrive within ``REQUEST_TIMEOUT_SECONDS`` of
its first byte (of the connection, for the first request), or the connection
is closed. The body then has the same time again (``BodySizeLimit``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_seconds: float = 15.0
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def protocol_with_header_deadline(timeout_seconds: float) -> type[HttpToolsProtocol]:
    """An HTTP protocol class for ``uvicorn.run(http=...)`` that enforces the deadline."""
    return type(
        "HeaderDeadlineProtocol",
        (_HeaderDeadlineProtocol,),
        {"header_timeout_seconds": timeout_seconds},
    )
