"""A caller without a key is answered 401 before its body is read, over a real socket.

The api runs in uvicorn, with the HTTP protocol ``main`` gives it, on a free
port; the client is a bare socket, so the test sees exactly what the server
sends and when, and how much of its body it managed to send meanwhile. The
limits are the defaults: 8 MiB for ``POST /jobs/batch``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from api_service.app import create_app
from api_service.http_protocol import MAX_HEAD_BYTES, protocol_with_header_deadline
from api_service.recorder import JobRecorder
from api_service.settings import ApiSettings
from api_service.store import JobStore
from pipeline_shared.events import Event
from support.services import free_port
from unit.fakes import FakePublisher

KEY = "a-test-key-of-enough-length"
BATCH_LIMIT = 8 * 1024 * 1024
HUGE = 9_000_000
REQUEST_TIMEOUT = 3.0
"""REQUEST_TIMEOUT_SECONDS: long enough that an answer well before it was not a 408."""
QUICK = 1.0
"""Seconds within which an answer that needs no body must come."""

NO_KEY: dict[str, str] = {}
WRONG_KEY = {"Authorization": "Bearer not-the-key-of-anyone"}
VALID_KEY = {"Authorization": f"Bearer {KEY}"}
VALID_KEY_LINE = f"Authorization: Bearer {KEY}\r\n".encode()


class FakeBroker(FakePublisher):
    is_ready = True


class SlowBroker(FakeBroker):
    """Takes a while to confirm: the answer to a request is still to come."""

    DELAY = 0.5

    async def publish(self, event: Event) -> None:
        await asyncio.sleep(self.DELAY)
        await super().publish(event)


@dataclass
class Api:
    port: int
    broker: FakeBroker


@asynccontextmanager
async def serving(app: FastAPI, http: type[asyncio.Protocol] | str) -> AsyncIterator[int]:
    """Run ``app`` in uvicorn on a free loopback port until the test ends."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        http=http,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not serving.done(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield config.port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


def build_app(tmp_path: Path, broker: FakeBroker) -> tuple[FastAPI, JobStore]:
    settings = ApiSettings(_env_file=None, api_keys=KEY, request_timeout_seconds=REQUEST_TIMEOUT)
    app = create_app(settings)
    # The lifespan is off: the app gets a recording broker instead of a connection.
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    app.state.broker, app.state.store = broker, store
    app.state.recorder = JobRecorder(store.record_batch)
    return app, store


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    broker = FakeBroker()
    app, store = build_app(tmp_path, broker)
    try:
        async with serving(app, protocol_with_header_deadline(REQUEST_TIMEOUT)) as port:
            yield Api(port, broker)
    finally:
        await store.close()


# --- a raw HTTP/1.1 client ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Connection:
    """A client socket whose sending and receiving are independent, as a real client's
    are: a send the server refuses (it hung up) does not lose what it already answered."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    sent: int = 0
    send_failed: bool = False

    @classmethod
    async def open(cls, port: int) -> Connection:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False once the server has closed the connection."""
        if self.send_failed:
            return False
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError:  # reset or broken pipe: the server hung up
            self.send_failed = True
            return False
        self.sent += len(data)
        return True

    async def _more(self, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(self.sock, 65536), timeout
            )
        except ConnectionResetError:
            return b""

    async def answer(self, timeout: float) -> Answer:
        """The next response, which must begin and end within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.received:
            data = await self._more(deadline - time.monotonic())
            assert data, f"closed without an answer: {bytes(self.received)!r}"
            self.received += data
        head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            data = await self._more(deadline - time.monotonic())
            assert data, "closed in the middle of the answer"
            rest += data
        self.received = bytearray(rest[length:])
        return Answer(int(status_line.split()[1]), headers, rest[:length])

    async def closed_by_server(self, timeout: float) -> bool:
        """Whether the server closes the connection, sending nothing more, within ``timeout``."""
        try:
            data = await self._more(timeout)
        except TimeoutError:
            return False
        return data == b"" and not self.received

    def close(self) -> None:
        self.sock.close()


def head(path: str, headers: dict[str, str], **more: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: api.test", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in {**headers, **more}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def stream_body(
    connection: Connection, total: int, size: int, pause: float, *, end: bool = True
) -> None:
    """Send ``total`` bytes of chunked body, ``size`` at a time, ``pause`` seconds apart,
    until all is sent or the server hangs up; then its last chunk, if ``end``."""
    # Items of a batch, over and over: what a batch looks like, and never valid early.
    part = b'{"email": "ada@example.com", "data": {}}, '
    piece = (part * (size // len(part) + 1))[:size]
    remaining = total
    while remaining > 0:
        data = piece[: min(size, remaining)]
        if not await connection.send(chunk(data)):
            return
        remaining -= len(data)
        await asyncio.sleep(pause)
    if end:
        await connection.send(b"0\r\n\r\n")


@pytest.fixture
async def connect(api: Api) -> AsyncIterator[Callable[[], Any]]:
    opened: list[Connection] = []

    async def opener() -> Connection:
        connection = await Connection.open(api.port)
        opened.append(connection)
        return connection

    yield opener
    for connection in reversed(opened):
        connection.close()


# --- without a key, the body is never read ---------------------------------------


@pytest.mark.parametrize("key", [NO_KEY, WRONG_KEY], ids=["no key", "wrong key"])
async def test_a_huge_chunked_batch_without_a_valid_key_is_answered_401_before_its_body(
    connect: Callable[[], Any], api: Api, key: dict[str, str]
) -> None:
    connection: Connection = await connect()
    await connection.send(head("/jobs/batch", key, **{"Transfer-Encoding": "chunked"}))
    started = time.monotonic()
    # 9 MB, 1 KiB every 10 ms: sending it all would take 90 s.
    sender = asyncio.create_task(stream_body(connection, HUGE, 1024, 0.01))
    try:
        answer = await connection.answer(QUICK)
        took, sent_by_then = time.monotonic() - started, connection.sent
        closed = await connection.closed_by_server(QUICK)
    finally:
        sender.cancel()

    assert answer.status == 401, answer
    assert answer.json() == {"detail": "missing or invalid API key"}
    assert answer.headers["www-authenticate"] == "Bearer"
    assert took < QUICK
    # A limit that buffered before the app would have waited for 8 MiB (or for
    # REQUEST_TIMEOUT_SECONDS, then answered 408).
    assert sent_by_then < 256 * 1024, f"{sent_by_then} bytes were sent before the 401"
    # The rest of the body is not waited for: the connection is closed after the
    # answer, so a slow sender cannot keep it (nor make the server read on).
    assert answer.headers["connection"] == "close"
    assert closed
    assert api.broker.published == []


async def test_a_client_that_waits_for_100_continue_without_a_key_never_sends_its_body(
    connect: Callable[[], Any],
) -> None:
    connection: Connection = await connect()
    await connection.send(
        head("/jobs/batch", NO_KEY, **{"Content-Length": "1000000", "Expect": "100-continue"})
    )

    answer = await connection.answer(QUICK)

    assert answer.status == 401, answer
    assert answer.headers["connection"] == "close"
    assert connection.sent < 1000  # the headers alone
    assert await connection.closed_by_server(QUICK)


@pytest.mark.parametrize("http", ["httptools-with-deadline", "h11"])
async def test_an_unread_body_is_never_taken_for_a_request_of_its_own(
    tmp_path: Path, http: str
) -> None:
    broker = FakeBroker()
    app, store = build_app(tmp_path, broker)
    # The body is a request of its own; if the server ever parsed the unread
    # body as the next request, it would answer twice.
    smuggled = (
        b"POST /jobs HTTP/1.1\r\nHost: api.test\r\n"
        + b"Content-Type: application/json\r\n"
        + VALID_KEY_LINE
        + b"Content-Length: 2\r\n\r\n{}"
    )
    protocol = protocol_with_header_deadline(REQUEST_TIMEOUT) if http != "h11" else "h11"
    try:
        async with serving(app, protocol) as port:
            for framing in ("length", "chunked"):
                connection = await Connection.open(port)
                try:
                    if framing == "length":
                        framed = {"Content-Length": str(len(smuggled))}
                        body = smuggled
                    else:
                        framed = {"Transfer-Encoding": "chunked"}
                        body = chunk(smuggled) + b"0\r\n\r\n"
                    await connection.send(head("/jobs", NO_KEY, **framed) + body)

                    answer = await connection.answer(QUICK)

                    assert answer.status == 401, (framing, answer)
                    assert await connection.closed_by_server(QUICK), framing
                finally:
                    connection.close()
    finally:
        await store.close()
    assert broker.published == []


async def test_a_connection_whose_body_was_read_is_kept_alive_for_the_next_request(
    connect: Callable[[], Any],
) -> None:
    connection: Connection = await connect()
    body = b'{"jobs": []}'
    await connection.send(head("/jobs/batch", VALID_KEY, **{"Content-Length": str(len(body))}))
    await connection.send(body)
    first = await connection.answer(QUICK)
    await connection.send(b"GET /healthz HTTP/1.1\r\nHost: api.test\r\n\r\n")
    second = await connection.answer(QUICK)

    assert first.status == 422, first
    assert "connection" not in first.headers
    assert second.status == 200, second


async def send_endless_header(connection: Connection, before: bytes = b"") -> None:
    """A request whose one header goes on past four times the head limit, unless the
    server hangs up first."""
    await connection.send(before + b"GET /healthz HTTP/1.1\r\nHost: api.test\r\nX-Big: ")
    sent = 0
    while sent < 4 * MAX_HEAD_BYTES and await connection.send(b"a" * 4096):
        sent += 4096


async def test_endless_header_lines_without_a_key_are_answered_431_and_not_kept(
    connect: Callable[[], Any],
) -> None:
    # The parser keeps an unfinished header in memory: 64 MB of one header line
    # from a few connections would hold hundreds of megabytes.
    connection: Connection = await connect()
    await send_endless_header(connection)

    answer = await connection.answer(QUICK)

    assert answer.status == 431, answer
    assert answer.headers["connection"] == "close"
    assert str(MAX_HEAD_BYTES) in answer.json()["detail"]
    assert await connection.closed_by_server(QUICK)


async def test_a_head_whose_blank_line_is_split_between_reads_is_not_taken_for_a_large_one(
    connect: Callable[[], Any], api: Api
) -> None:
    body = json.dumps({"email": "ada@example.com", "data": {"pad": "p" * 40_000}}).encode()
    request = head("/jobs", VALID_KEY, **{"Content-Length": str(len(body))}) + body
    end = request.index(b"\r\n\r\n")
    for split in (end + 1, end + 2, end + 3):  # inside the blank line, three ways
        connection: Connection = await connect()
        await connection.send(request[:split])
        await asyncio.sleep(0.05)  # two reads, not one
        await connection.send(request[split:])

        answer = await connection.answer(QUICK)

        assert answer.status == 202, (split - end, answer)


@pytest.mark.parametrize("key", [VALID_KEY, NO_KEY])
async def test_a_large_head_arriving_whole_in_one_read_is_answered_431(
    connect: Callable[[], Any], key: dict[str, str]
) -> None:
    # Counting reads alone let a head over the limit through when the read that
    # carried it also carried its end (up to one read past the limit).
    connection: Connection = await connect()
    pad = {"X-Pad": "p" * (MAX_HEAD_BYTES + 8 * 1024)}
    await connection.send(head("/jobs", key, **{"Content-Length": "2"}, **pad) + b"{}")

    answer = await connection.answer(QUICK)

    assert answer.status == 431, answer
    assert await connection.closed_by_server(QUICK)


async def test_a_head_just_under_the_limit_in_one_read_is_served(
    connect: Callable[[], Any],
) -> None:
    connection: Connection = await connect()
    pad = {"X-Pad": "p" * (MAX_HEAD_BYTES - 2048)}
    await connection.send(head("/jobs", VALID_KEY, **{"Content-Length": "2"}, **pad) + b"{}")

    answer = await connection.answer(QUICK)

    assert answer.status == 422, answer  # the body's problems: the head was taken


async def test_blank_lines_before_the_request_line_count_toward_the_head(
    connect: Callable[[], Any],
) -> None:
    connection: Connection = await connect()
    await send_endless_header(connection, before=b"\r\n\r\n")

    answer = await connection.answer(QUICK)

    assert answer.status == 431, answer


async def test_the_head_limit_holds_for_every_request_of_a_kept_alive_connection(
    connect: Callable[[], Any],
) -> None:
    connection: Connection = await connect()
    await connection.send(b"GET /healthz HTTP/1.1\r\nHost: api.test\r\n\r\n")
    first = await connection.answer(QUICK)
    await send_endless_header(connection)

    second = await connection.answer(QUICK)

    assert first.status == 200, first
    assert second.status == 431, second


async def test_trailers_after_a_chunked_body_are_not_read(
    connect: Callable[[], Any], api: Api
) -> None:
    # Trailers come after the head was checked, and uvicorn adds them to the
    # request's headers: a way around the head limit, so none are taken.
    connection: Connection = await connect()
    body = json.dumps({"email": "ada@example.com", "data": {}}).encode()
    await connection.send(head("/jobs", VALID_KEY, **{"Transfer-Encoding": "chunked"}))
    await connection.send(chunk(body) + b"0\r\nX-Trailer: " + b"t" * 1000 + b"\r\n\r\n")

    assert await connection.closed_by_server(QUICK)
    assert api.broker.published == []


async def test_a_head_refused_on_a_busy_connection_waits_for_the_answer_before_it(
    tmp_path: Path,
) -> None:
    # Pipelined: a request still being answered, then a head over the limit. Its
    # 431 must come after the first answer, not instead of it.
    broker = SlowBroker()
    app, store = build_app(tmp_path, broker)
    try:
        async with serving(app, protocol_with_header_deadline(REQUEST_TIMEOUT)) as port:
            connection = await Connection.open(port)
            try:
                body = json.dumps({"email": "ada@example.com", "data": {}}).encode()
                await connection.send(
                    head("/jobs", VALID_KEY, **{"Content-Length": str(len(body))}) + body
                )
                await asyncio.sleep(0.1)  # a read of its own, while the first is answered
                await connection.send(
                    b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (2 * MAX_HEAD_BYTES)
                )

                first = await connection.answer(QUICK + SlowBroker.DELAY)
                second = await connection.answer(QUICK)
            finally:
                connection.close()
    finally:
        await store.close()

    assert first.status == 202, first
    assert second.status == 431, second
    assert len(broker.published) == 1


async def test_a_body_arriving_with_its_head_counts_only_against_the_body_limit(
    connect: Callable[[], Any],
) -> None:
    # A large request body sent in one write with its head, then a second request
    # on the same connection with a head near the limit: each head is counted alone.
    connection: Connection = await connect()
    body = b'{"jobs": [' + b" " * (2 * MAX_HEAD_BYTES) + b"]}"
    request = head("/jobs/batch", VALID_KEY, **{"Content-Length": str(len(body))})
    near_limit = b"X-Pad: " + b"p" * (MAX_HEAD_BYTES - 200) + b"\r\n"

    await connection.send(request + body)
    first = await connection.answer(QUICK)
    await connection.send(b"GET /healthz HTTP/1.1\r\nHost: api.test\r\n" + near_limit + b"\r\n")
    second = await connection.answer(QUICK)

    assert first.status == 422, first  # an empty batch: read, then refused for what it says
    assert second.status == 200, second


# --- with a valid key, the limits still hold ---------------------------------------


async def test_a_chunked_batch_over_the_limit_with_a_valid_key_is_answered_413(
    connect: Callable[[], Any], api: Api
) -> None:
    connection: Connection = await connect()
    await connection.send(head("/jobs/batch", VALID_KEY, **{"Transfer-Encoding": "chunked"}))
    # 64 KiB past the limit, then nothing more: the body never ends.
    past_the_limit = BATCH_LIMIT + 64 * 1024
    sender = asyncio.create_task(stream_body(connection, past_the_limit, 64 * 1024, 0, end=False))
    try:
        answer = await connection.answer(30)
        closed = await connection.closed_by_server(QUICK)
    finally:
        sender.cancel()

    # Counted as it arrived, and refused once past the limit, not at its end.
    assert answer.status == 413, answer
    assert answer.json() == {"detail": f"request body larger than {BATCH_LIMIT} bytes"}
    assert answer.headers["connection"] == "close"
    assert closed
    assert api.broker.published == []


async def test_a_slow_body_with_a_valid_key_is_answered_408_after_the_timeout(
    connect: Callable[[], Any], api: Api
) -> None:
    connection: Connection = await connect()
    started = time.monotonic()
    await connection.send(head("/jobs/batch", VALID_KEY, **{"Transfer-Encoding": "chunked"}))
    sender = asyncio.create_task(stream_body(connection, HUGE, 1024, 0.1))
    try:
        answer = await connection.answer(REQUEST_TIMEOUT + 4)
        took = time.monotonic() - started
        closed = await connection.closed_by_server(QUICK)
    finally:
        sender.cancel()

    assert answer.status == 408, answer
    assert answer.json() == {
        "detail": f"the request body did not arrive within {REQUEST_TIMEOUT:g} s"
    }
    assert answer.headers["connection"] == "close"
    assert closed
    assert REQUEST_TIMEOUT * 0.9 <= took < REQUEST_TIMEOUT + 4
    assert api.broker.published == []


@pytest.mark.parametrize("key", [NO_KEY, VALID_KEY], ids=["no key", "valid key"])
async def test_a_declared_length_over_the_limit_is_answered_413_at_once_with_or_without_a_key(
    connect: Callable[[], Any], key: dict[str, str]
) -> None:
    connection: Connection = await connect()
    await connection.send(head("/jobs/batch", key, **{"Content-Length": str(HUGE)}))

    answer = await connection.answer(QUICK)

    assert answer.status == 413, answer
    assert answer.json() == {"detail": f"request body larger than {BATCH_LIMIT} bytes"}
    assert answer.headers["connection"] == "close"
    assert await connection.closed_by_server(QUICK)
