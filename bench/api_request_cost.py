"""What one ``POST /jobs`` costs the api in-process: its HTTP path alone.

The real app (``create_app``) is called as uvicorn calls it, through every
middleware, with a broker that confirms at once and a recorder whose write is
done at once, so only the request's own path is measured: tracing, metrics,
the body limit, routing, authentication, the strict checks, validation, the
intake and the answer. Each round sends ``--requests`` requests one after the
other; the CPU time per request of the best round is printed, and with
``--profile`` the cProfile of one more round, by own time.

    .venv/bin/python bench/api_request_cost.py [--requests 5000] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from api_service.app import create_app  # noqa: E402
from api_service.settings import ApiSettings  # noqa: E402
from pipeline_shared.events import JobRequested  # noqa: E402
from support.asgi import http_scope  # noqa: E402

BODY = json.dumps(
    {
        "email": "someone@example.com",
        "subject": "Your weekly digest",
        "data": {"numbers": [1, 2, 3, 4], "name": "digest", "nested": {"a": 1, "b": [True, None]}},
    }
).encode()
KEY = "bench-key-0123456789abcdef"


class InstantBroker:
    """Confirms every publish at once."""

    is_ready = True

    async def publish(self, event: JobRequested) -> None:
        return None


class LocalStore:
    """A store only this process reads (SQLite's rule): the answer does not wait for
    the record; only Idempotency-Key requests would touch it."""

    shared = False


class InstantRecorder:
    """Every record is written at once."""

    def note(self, event: Any, trace_id: str | None = None) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done


async def post(
    app: Any, headers: list[tuple[bytes, bytes]], body: bytes = BODY, path: str = "/jobs"
) -> int:
    """POST ``body`` to ``path`` as uvicorn would hand it to the app; the answer's status."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = http_scope(headers)
    scope["path"], scope["raw_path"] = path, path.encode()
    await app(scope, receive, send)
    return status


async def round_of(app: Any, headers: list[tuple[bytes, bytes]], requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        status = await post(app, headers)
        if status != 202:
            raise SystemExit(f"POST /jobs answered {status}")
    return (time.process_time() - started) / requests


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    settings = ApiSettings(api_keys=KEY, database_url="sqlite:///:memory:")
    app = create_app(settings)
    app.state.broker = InstantBroker()
    app.state.recorder = InstantRecorder()
    app.state.store = LocalStore()
    headers = [
        (b"host", b"api.test"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]
    await round_of(app, headers, 200)  # warm up
    best = min([await round_of(app, headers, args.requests) for _ in range(args.rounds)])
    print(f"POST /jobs in-process: {best * 1e6:.1f} µs CPU a request (best of {args.rounds})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await round_of(app, headers, args.requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    asyncio.run(main())
