"""How long one large ``POST /jobs/batch`` holds the api's event loop.

    .venv/bin/python bench/large_body_stall.py [--jobs 30] [--objects 80000]

Sends the real app (``create_app``, every middleware, a SQLite job store in a
temporary folder, a broker and recorder that answer at once) one batch of
``--jobs`` jobs whose data is a list of ``--objects`` empty objects: within
every limit, and as costly to read as a body of its size can be. Meanwhile a
task sleeps 5 ms at a time; the longest it waited past that is how long any
other request would have waited. Prints the answer, the time it took and
that longest stall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from api_request_cost import KEY, InstantBroker, InstantRecorder, post  # noqa: E402
from api_service.app import create_app  # noqa: E402
from api_service.settings import ApiSettings  # noqa: E402
from api_service.store import JobStore  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--objects", type=int, default=80_000)
    args = parser.parse_args()
    item = {"email": "ada@example.com", "data": {"k": [{}] * args.objects}}
    body = json.dumps({"jobs": [item] * args.jobs}, separators=(",", ":")).encode()

    with tempfile.TemporaryDirectory() as folder:
        app = create_app(ApiSettings(api_keys=KEY, database_url="sqlite:///:memory:"))
        store = JobStore.open(f"sqlite:///{Path(folder) / 'jobs.sqlite3'}")
        app.state.broker, app.state.recorder, app.state.store = (
            InstantBroker(),
            InstantRecorder(),
            store,
        )
        longest, done = 0.0, False

        async def sleeper() -> None:
            nonlocal longest
            while not done:
                started = time.perf_counter()
                await asyncio.sleep(0.005)
                longest = max(longest, time.perf_counter() - started - 0.005)

        watching = asyncio.create_task(sleeper())
        started = time.perf_counter()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {KEY}".encode()),
        ]
        status = await post(app, headers, body, "/jobs/batch")
        took = time.perf_counter() - started
        done = True
        await watching
        await store.close()
    print(f"POST /jobs/batch of {len(body) / 1e6:.1f} MB ({args.jobs} jobs): {status}")
    print(f"  took {took:.2f} s; the event loop's longest stall {longest:.3f} s")


if __name__ == "__main__":
    asyncio.run(main())
