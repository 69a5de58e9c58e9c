"""A worker's own small HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` and
``/readyz`` for container probes.

The workers have no web framework, and need none for three read-only paths:
the server runs on the worker's event loop with asyncio streams, answers one
request per connection (``Connection: close``) and drops a client that has
not sent its request head within a few seconds or sends more than a few
kilobytes of it, so a stuck or hostile client costs one socket for a moment.

=============  ==============================================================
path           answer
=============  ==============================================================
``/metrics``   the process's Prometheus metrics (``pipeline_shared.metrics``)
``/healthz``   ``200 {"status": "ok"}`` while the process runs
``/readyz``    ``200 {"status": "ready"}`` while connected to the broker with
               the stage's consumer consuming (``Readiness``; status-service
               has its own check); else ``503`` with ``detail``
=============  ==============================================================

The endpoint listens on ``METRICS_HOST:METRICS_PORT``; ``METRICS_PORT=0`` turns
it off. It starts before the broker is reached, so ``/healthz`` answers (and
``/readyz`` says why not) while a worker waits for its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Protocol

from pipeline_shared import metrics
from pipeline_shared.settings import WorkerSettings

log = logging.getLogger("pipeline.probes")

NOT_CONNECTED = "not connected to the message broker"
NOT_CONSUMING = "not consuming its queue"
# A request head larger than this is no probe or scrape: the connection is dropped.
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_SECONDS = 5.0
# How long asking the consumer may take: a robust channel waits for its
# connection to come back before it answers.
CONSUMING_CHECK_SECONDS = 1.0


class BrokerState(Protocol):
    @property
    def is_ready(self) -> bool: ...


class ConsumerState(Protocol):
    async def is_consuming(self) -> bool: ...


class ReadinessCheck(Protocol):
    async def problem(self) -> str | None:
        """Why the service is not ready, or None when it is."""
        ...


class Readiness:
    """Whether a worker can do its work: its broker connection is open and the
    consumer of its stage is consuming (``Broker.is_ready``, ``Consumer.is_consuming``)."""

    def __init__(self, broker: BrokerState) -> None:
        self._broker = broker
        self._consumer: ConsumerState | None = None

    def watch(self, consumer: ConsumerState) -> None:
        """The consumer to ask from now on (``serve_stage`` hands it over once consuming)."""
        self._consumer = consumer

    async def problem(self) -> str | None:
        """Why the worker is not ready, or None when it is."""
        if not self._broker.is_ready:
            return NOT_CONNECTED
        if self._consumer is None:
            return NOT_CONSUMING
        try:
            async with asyncio.timeout(CONSUMING_CHECK_SECONDS):
                consuming = await self._consumer.is_consuming()
        except TimeoutError:
            consuming = False
        return None if consuming else NOT_CONSUMING


class ProbeServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (``start``, ``close``)."""

    def __init__(self, readiness: ReadinessCheck, host: str, port: int) -> None:
        self._readiness = readiness
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen; raises ``OSError`` if the address cannot be bound. With port 0 the
        system picks a free port, which ``port`` then holds."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        answered = False
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, extra = await self._answer(head)
            head_only = head.startswith(b"HEAD ")
            writer.write(_response(status, content_type, body, extra, head_only=head_only))
            async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
                await writer.drain()
            answered = True
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that is too slow, too big or gone gets nothing more
        except Exception:  # never let one request end the endpoint
            log.exception("answering a probe or scrape failed")
        finally:
            self._clients.discard(writer)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    async def _answer(self, head: bytes) -> tuple[HTTPStatus, str, bytes, dict[str, str]]:
        request_line, _, header_block = head.decode("latin-1").partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _json(HTTPStatus.BAD_REQUEST, {"detail": "not an HTTP/1.x request"})
        method, target, _ = parts
        path = target.partition("?")[0]
        if path not in _PATHS:
            return _json(HTTPStatus.NOT_FOUND, {"detail": f"no such path; try {', '.join(_PATHS)}"})
        if method not in ("GET", "HEAD"):
            status, content_type, body, _ = _json(
                HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "only GET and HEAD"}
            )
            return status, content_type, body, {"Allow": "GET, HEAD"}
        if path == "/metrics":
            text, content_type = metrics.exposition(_header(header_block, "accept"))
            return HTTPStatus.OK, content_type, text, {}
        if path == "/healthz":
            return _json(HTTPStatus.OK, {"status": "ok"})
        problem = await self._readiness.problem()
        if problem is None:
            return _json(HTTPStatus.OK, {"status": "ready"})
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable", "detail": problem})


_PATHS = ("/metrics", "/healthz", "/readyz")


def _json(
    status: HTTPStatus, answer: dict[str, str]
) -> tuple[HTTPStatus, str, bytes, dict[str, str]]:
    return status, "application/json", json.dumps(answer).encode(), {}


def _header(block: str, name: str) -> str | None:
    """The first value of the header ``name`` (lower case) in a request's header lines."""
    for line in block.split("\r\n"):
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name:
            return value.strip()
    return None


def _response(
    status: HTTPStatus,
    content_type: str,
    body: bytes,
    extra: dict[str, str],
    *,
    head_only: bool,
) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **extra,
    }
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


@asynccontextmanager
async def serving_probes(
    settings: WorkerSettings, broker: BrokerState, service: str
) -> AsyncIterator[Readiness]:
    """Serve the worker's endpoint for the duration of the block, as its settings ask
    (not at all with ``METRICS_PORT=0``); yields the ``Readiness`` to hand the consumer to."""
    readiness = Readiness(broker)
    async with serving(settings, readiness, service):
        yield readiness


@asynccontextmanager
async def serving(
    settings: WorkerSettings, readiness: ReadinessCheck, service: str
) -> AsyncIterator[None]:
    """Serve the endpoint, ``/readyz`` answering from ``readiness``, for the duration of
    the block (not at all with ``METRICS_PORT=0``).

    An address that cannot be bound (a port in use, a host that is not local) stops
    the service with one line naming the settings.
    """
    if settings.metrics_port == 0:
        yield
        return
    server = ProbeServer(readiness, settings.metrics_host, settings.metrics_port)
    try:
        await server.start()
    except OSError as exc:
        raise SystemExit(
            f"{service}: cannot serve /metrics, /healthz and /readyz on "
            f"{settings.metrics_host}:{settings.metrics_port} ({exc.strerror or exc}): set "
            "METRICS_PORT to a free port (0 turns the endpoint off) or METRICS_HOST to an "
            "address of this host"
        ) from None
    log.info("serving /metrics, /healthz and /readyz on %s:%d", settings.metrics_host, server.port)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await server.close()
