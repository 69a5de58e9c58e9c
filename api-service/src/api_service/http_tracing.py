"""Each HTTP request in its trace: the client's ``traceparent`` continued, or a new trace.

The span is the outermost thing a request meets, so a job accepted by the
route is published in the request's trace, and answers given before a route
runs (the body limit's 413 and 408) are in it too. A ``traceparent`` that is
malformed or sent twice is ignored (W3C Trace Context: a new trace starts); a
``tracestate`` sent in several headers is one list.
"""

from __future__ import annotations

from fastapi import FastAPI
from opentelemetry.trace import SpanKind, StatusCode
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from api_service.http_metrics import AnsweredStatus, route_template
from pipeline_shared import tracing


def trace_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace context of a request's headers, as the propagator reads it."""
    parents = [value for name, value in raw if name == b"traceparent"]
    states = [value for name, value in raw if name == b"tracestate"]
    if len(parents) != 1:
        return {}
    found = {"traceparent": parents[0].decode("latin-1")}
    if states:
        found["tracestate"] = b",".join(states).decode("latin-1")
    return found


class HttpTracing:
    """ASGI middleware running each HTTP request in a server span of its trace."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        answered = AnsweredStatus(send)
        with tracing.span(
            method,
            SpanKind.SERVER,
            parent=tracing.extract(trace_headers(scope["headers"])),
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, answered)
            except Exception:
                answered.failed()
                raise
            finally:
                if span.is_recording():
                    route = route_template(self._routes, scope)
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", answered.status)
                    if answered.status >= 500:
                        span.set_status(StatusCode.ERROR)


def install_http_tracing(app: FastAPI) -> None:
    """Run every request in its trace. Call it last, so that this middleware is outermost."""
    app.add_middleware(HttpTracing, routes=app.router.routes)
