"""HTTP/1.1 load generators that cost the benchmark little CPU: open loop and closed.

``run``, open loop: requests are due at fixed times (``start + i / rate``) whatever the answers:
a slow answer does not delay the next arrival, as it would in a closed loop
(the "coordinated omission" that hides queueing). Each request's latency is
taken from its *due* time, so time spent waiting for the client itself (its
event loop behind schedule, no connection free) counts against the server
too, never in its favour; ``send_lag`` says how far behind schedule the client
actually wrote each request, so a client that could not keep up shows.

``closed_loop``: a fixed number of requests in flight, the next written as soon
as one is answered: how fast the server goes, and its latency at that load.

It writes pre-encoded requests on raw asyncio streams with keep-alive
connections (a new one whenever none is idle, up to ``max_connections``),
because at hundreds of requests per second ``httpx`` costs a core-share that
the services under test would otherwise get on a small machine.

``run_apart`` runs ``run`` in a process of its own: the benchmark's process
also serves the Mailtrap stand-in from threads and copies its list of emails
to count them, and every millisecond those hold the GIL is a millisecond a
timed answer waits to be read (bench/README.md, "Session 10").
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Shot:
    """One request: when it was due, written and answered (``time.monotonic()``)."""

    due: float
    sent: float
    finished: float
    status: int
    """HTTP status, or 0 if the request failed (connection error, timeout)."""
    job_id: str | None
    """The answer's ``job_id``: a 202's, or a 503's whose outcome is unknown (the job may
    yet be emailed)."""
    detail: str | None = None
    """The answer's ``detail``, if it has one (an error's reason)."""

    @property
    def latency(self) -> float:
        return self.finished - self.due

    @property
    def send_lag(self) -> float:
        return self.sent - self.due


IDLE_SECONDS = 4.0
"""How long a connection may wait idle and still be reused: under uvicorn's
keep-alive timeout (5 s), after which the server closes it."""


class _Connections:
    def __init__(self, host: str, port: int, limit: int) -> None:
        self._host, self._port = host, port
        # Each with the time it became idle; the most recent last.
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def take(
        self, *, fresh: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection (a new one if ``fresh``), and whether it was reused (a reused
        one may have been closed by the server while idle)."""
        await self._slots.acquire()
        stale_before = time.monotonic() - IDLE_SECONDS
        while self._idle and not fresh:
            reader, writer, since = self._idle.pop()
            if since >= stale_before:
                return reader, writer, True
            writer.close()  # the server is about to close it, or has
        try:
            reader, writer = await asyncio.open_connection(self._host, self._port)
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        return reader, writer, False

    def give_back(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> None:
        if connection is not None:
            self._idle.append((*connection, time.monotonic()))
        self._slots.release()

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """Write ``request``, read one answer: (status, body, connection reusable)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """A pre-encoded ``POST`` of a JSON body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _send(pool: _Connections, due: float, payload: bytes, answer_within: float) -> Shot:
    """One request on a pooled connection; a ``Shot`` whatever happens."""
    sent = due
    try:
        async with asyncio.timeout(max(due + answer_within - time.monotonic(), 0.001)):
            for attempt in (1, 2):
                # A retry on a new connection: the next idle one may be as stale.
                reader, writer, reused = await pool.take(fresh=attempt == 2)
                sent = time.monotonic()
                try:
                    status, body, keep = await _exchange(reader, writer, payload)
                except (asyncio.IncompleteReadError, ConnectionError) as error:
                    writer.close()
                    pool.give_back(None)
                    # A keep-alive connection the server closed while it was idle
                    # fails before any answer: try once more on a new one.
                    if reused and attempt == 1 and not getattr(error, "partial", b""):
                        continue
                    raise
                except BaseException:
                    writer.close()
                    pool.give_back(None)
                    raise
                if keep:
                    pool.give_back((reader, writer))
                else:
                    writer.close()
                    pool.give_back(None)
                break
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as error:
        return Shot(due, sent, time.monotonic(), 0, None, repr(error)[:200])
    finished = time.monotonic()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return Shot(due, sent, finished, status, None)
    job_id, detail = answer.get("job_id"), answer.get("detail")
    return Shot(
        due,
        sent,
        finished,
        status,
        None if job_id is None else str(job_id),
        None if detail is None else str(detail),
    )


async def run(
    host: str,
    port: int,
    requests: Callable[[int], bytes],
    rate: float,
    count: int,
    *,
    max_connections: int = 4000,
    answer_within: float = 120.0,
) -> list[Shot]:
    """Send ``requests(i)`` for ``i`` in ``range(count)``, the ``i``-th due at
    ``start + i / rate``; one ``Shot`` per request, in order. An answer is read as
    JSON for its ``job_id``; one not in by ``answer_within``
    seconds after its due time counts as failed (status 0)."""
    payloads = [requests(i) for i in range(count)]  # encoded before the clock starts
    return await _run(
        host, port, payloads, rate, time.monotonic() + 0.05, max_connections, answer_within
    )


async def run_apart(
    host: str,
    port: int,
    requests: Callable[[int], bytes],
    rate: float,
    count: int,
    *,
    start_in: float = 2.0,
    max_connections: int = 4000,
    answer_within: float = 120.0,
) -> list[Shot]:
    """``run``, in a new process that sends the first request ``start_in`` seconds from
    now (its start-up comes before that). Times are ``time.monotonic()``, which is
    the same clock in every process."""
    payloads = [requests(i) for i in range(count)]
    start = time.monotonic() + start_in
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return await asyncio.get_running_loop().run_in_executor(
            pool, _run_here, host, port, payloads, rate, start, max_connections, answer_within
        )


def _run_here(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    rate: float,
    start: float,
    max_connections: int,
    answer_within: float,
) -> list[Shot]:
    return asyncio.run(_run(host, port, payloads, rate, start, max_connections, answer_within))


async def _run(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    rate: float,
    start: float,
    max_connections: int,
    answer_within: float,
) -> list[Shot]:
    pool = _Connections(host, port, max_connections)
    tasks: list[asyncio.Task[Shot]] = []
    try:
        for i, payload in enumerate(payloads):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(pool, due, payload, answer_within)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        pool.close()


async def closed_loop(
    host: str,
    port: int,
    requests: Callable[[int], bytes],
    count: int,
    concurrency: int,
    *,
    answer_within: float = 30.0,
) -> list[Shot]:
    """Send ``requests(i)`` for ``i`` in ``range(count)`` as fast as the server answers,
    ``concurrency`` at a time on as many keep-alive connections (each request is
    due when it is written); one ``Shot`` per request, in order."""
    pool = _Connections(host, port, concurrency)
    payloads = [requests(i) for i in range(count)]
    shots: list[Shot | None] = [None] * count
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            shots[i] = await _send(pool, time.monotonic(), payloads[i], answer_within)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        pool.close()
    return [shot for shot in shots if shot is not None]
