"""uvicorn's HTTP protocol, with a deadline for a request's line and headers.

uvicorn closes a keep-alive connection that stays idle between requests, but
nothing bounds a connection that sends nothing at all, or sends its headers a
byte at a time: enough of them exhaust the process's file descriptors. Each
request's line and headers must arrive within ``REQUEST_TIMEOUT_SECONDS`` of
its first byte (of the connection, for the first request), or the connection
is closed. The body then has the same time again (``BodySizeLimit``).

Nor does anything bound their size: the parser keeps a header it has not
seen the end of in memory, so a few connections sending endless header lines
would hold gigabytes, without an API key. A request whose line and headers
pass ``MAX_HEAD_BYTES`` is answered ``431`` and its connection closed: while
the head is unfinished, by the bytes read so far; once it is complete, by what
the parser found in it (the target and each header), so a large head that
arrives in one read with its end is refused too.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 32 * 1024
"""Most bytes a request's line and headers may take (nginx allows 32 KiB by default)."""

_TOO_LARGE = b"request line and headers larger than %d bytes" % MAX_HEAD_BYTES


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_seconds: float = 15.0
    max_after_head_bytes: int | None = None
    _deadline: asyncio.TimerHandle | None = None
    _in_head = True  # the bytes arriving belong to a request's line and headers
    _head_bytes = 0
    _parsed_head_bytes = 0  # the target and headers the parser found in this head
    _after_head_bytes = 0  # body, chunk framing and trailers of the current request
    _refusing = False

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return
        # Every byte of a read that leaves the head unfinished is head: a read that
        # finishes it is never refused (its body is the body limit's to count), and
        # what a refused head holds in memory is bounded by one read past the limit.
        if self._in_head:
            self._head_bytes += len(data)
        else:
            self._after_head_bytes += len(data)
            cap = self.max_after_head_bytes
            if cap is not None and self._after_head_bytes > cap:
                # Past any body limit with room for chunk framing: what is left
                # (trailers, say) is not read. The app sees a disconnect.
                self.transport.close()
                return
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer after a chunked body: nothing here reads them, and uvicorn
            # would add them to the request's headers after they were checked.
            self._refusing = True
            self.transport.close()
            return
        self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if self._refusing:
            return  # the rest of a read whose head was refused
        super().on_body(body)

    def _refuse_head(self) -> None:
        self._refusing = True
        self._disarm()
        self.flow.pause_reading()
        if self._answering():
            return  # after the responses before it (on_response_complete)
        self._send_refusal()

    def _answering(self) -> bool:
        """Whether an earlier request on this connection is still being answered."""
        cycle = getattr(self, "cycle", None)
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _send_refusal(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b'content-length: %d\r\nconnection: close\r\n\r\n{"detail": "%s"}'
            % (len(_TOO_LARGE) + 14, _TOO_LARGE)
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusing and not self._answering():
            self._send_refusal()

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
        self._in_head = False
        self._disarm()
        if self._parsed_head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()  # it came with its end in one read
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._refusing:
            return  # the app never sees a request refused mid-way as complete
        super().on_message_complete()
        # What follows on this connection is the next request's head.
        self._in_head, self._head_bytes, self._after_head_bytes = True, 0, 0
        self._parsed_head_bytes = 0


def protocol_with_header_deadline(
    timeout_seconds: float, max_body_bytes: int | None = None
) -> type[HttpToolsProtocol]:
    """An HTTP protocol class for ``uvicorn.run(http=...)`` that enforces the deadline and
    the head's size, and reads no more than twice ``max_body_bytes`` (chunk framing
    included) after a request's head."""
    cap = None if max_body_bytes is None else 2 * max_body_bytes + MAX_HEAD_BYTES
    return type(
        "HeaderDeadlineProtocol",
        (_HeaderDeadlineProtocol,),
        {"header_timeout_seconds": timeout_seconds, "max_after_head_bytes": cap},
    )
