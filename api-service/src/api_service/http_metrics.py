"""The api's HTTP metrics and its ``GET /metrics``.

Requests are counted by method, route *template* (``/jobs/{job_id}``, never the
path a client sent, which would make a series per job) and status, and timed by
method and route. The middleware sits outside every other, so answers given
before a route runs (``413`` and ``408`` from the body limit) are counted too. A
path no route matches is counted as route ``unmatched``, a method outside
HTTP's usual ones as ``other``: clients cannot create series at will.

``GET /metrics`` serves the process's metrics (``pipeline_shared.metrics``) to
Prometheus. Like ``/healthz`` it needs no API key and is not in the OpenAPI
document: scrapers hold no caller's key, the document describes the JSON API
for callers, and the metrics carry no personal data (labels are route
templates, statuses, stages, event types and outcomes). Where the api is
reachable from outside, the TLS-terminating proxy in front of it can keep
``/metrics`` for the inside.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline_shared import metrics

PATH = "/metrics"
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A request the client gave up on before any answer (nginx's "client closed request").
CLIENT_CLOSED = 499
# Up to PUBLISH_TIMEOUT_SECONDS (10 s) for a job, REQUEST_TIMEOUT_SECONDS (15 s) for a body.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template.",
    ["method", "route"],
    buckets=BUCKETS,
)


def route_template(routes: list[BaseRoute], scope: Scope) -> str:
    """The path template of the route that serves ``scope`` (or that would, with another
    method), else ``unmatched``."""
    # The router names the route it chose (FULL match, else the first PARTIAL one)
    # in the scope; only an answer given before routing needs the search below.
    chosen = scope.get("route")
    if chosen is not None:
        return str(getattr(chosen, "path", UNMATCHED))
    other_method: str | None = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and other_method is None:
            other_method = str(getattr(route, "path", UNMATCHED))
    return other_method or UNMATCHED


class AnsweredStatus:
    """An ASGI ``send`` that passes everything on and keeps the answer's status:
    ``CLIENT_CLOSED`` until one starts, 500 if the app raised before (``failed``)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = CLIENT_CLOSED

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    def failed(self) -> None:
        if self.status == CLIENT_CLOSED:
            self.status = 500  # what the server's error middleware answers


class HttpMetrics:
    """ASGI middleware counting and timing every HTTP request by route template."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        # The router's own list: routes added after the middleware count too.
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = AnsweredStatus(send)
        try:
            await self.app(scope, receive, answered)
        except Exception:
            answered.failed()
            raise
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = route_template(self._routes, scope)
            REQUESTS.labels(method, route, str(answered.status)).inc()
            DURATION.labels(method, route).observe(time.perf_counter() - started)


async def serve_metrics(request: Request) -> Response:
    """``GET /metrics``: the process's metrics in the format the scraper accepts."""
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


def install_http_metrics(app: FastAPI) -> None:
    """Count and time the app's requests, and serve ``GET /metrics``.

    Call it after adding the other middleware, so that this one is outside them
    (only the request's trace is outside it)."""
    app.add_middleware(HttpMetrics, routes=app.router.routes)
    app.add_route(PATH, serve_metrics, methods=["GET"], include_in_schema=False)
