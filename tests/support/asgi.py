"""A request's ASGI scope, as uvicorn hands one to the app, for tests that call it directly."""

from __future__ import annotations

from starlette.types import Scope


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    """A ``POST /jobs`` over HTTP/1.1 from 127.0.0.1 with ``headers``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/jobs",
        "raw_path": b"/jobs",
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "server": ("api.test", 80),
        "client": ("127.0.0.1", 50000),
        "state": {},
    }
