"""What one SQLite transaction costs in CPU, the way the api and the mailer use SQLite.

    python bench/sqlite_commit_cost.py [--events 2000] [--threads 1 4]

The api folds each job event into its job's row through ``JobStore`` (a read
transaction, then a ``BEGIN IMMEDIATE`` read-modify-write transaction, in a
worker thread); the mailer's ledger writes two transactions per email. Both
run on the same SQLAlchemy engine (``pipeline_shared.database.build_engine``:
WAL, ``synchronous=FULL``, busy timeout). This script drives those code paths
directly, with no broker and no HTTP, and prints per event the process CPU
time (user and system, ``getrusage``), the wall time and the thread CPU
spent inside SQLite itself (SQLAlchemy's calls into the ``sqlite3`` driver:
statements, and COMMIT with its fsync), for

* ``JobStore.record`` as the api calls it (one event per call), from 1 and
  from several threads at once (the api's default executor has 6);
* the same with ``synchronous=NORMAL`` (WAL: no fsync at commit, durable
  against a process crash, not a power cut);
* the same events folded by a plain ``INSERT`` per event into an
  append-only table, one transaction per batch of 64 events (what the
  redesign in ``bench/profiles.md`` proposes), FULL and NORMAL;

and the number of Python function calls one ``JobStore._record`` makes.

It uses the code of the checkout it runs from (``api_service.store``), and a
temporary database under ``--dir`` (default: the system's temporary folder,
the same disk as the services' default files).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from sqlalchemy.engine.default import DefaultDialect

from api_service.store import JobStore
from pipeline_shared.events import DataProcessed, EmailSent, JobRequested

_driver_lock = threading.Lock()
_driver_cpu = [0.0]  # thread CPU seconds inside SQLAlchemy's calls into the sqlite3 driver


def time_driver_calls() -> None:
    """Sum the thread CPU spent in SQLite itself (statements, COMMIT with its fsync)."""

    def timed(original: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                with _driver_lock:
                    _driver_cpu[0] += time.thread_time() - started

        return wrapper

    for name in ("do_execute", "do_execute_no_params", "do_commit", "do_rollback"):
        setattr(DefaultDialect, name, timed(getattr(DefaultDialect, name)))


@dataclass(frozen=True)
class Cost:
    name: str
    events: int
    user_ms: float
    system_ms: float
    wall_ms: float
    driver_ms: float

    def line(self) -> str:
        per = self.events
        return (
            f"{self.name:<62} {1000 * self.user_ms / per:8.1f} {1000 * self.system_ms / per:8.1f} "
            f"{1000 * (self.user_ms + self.system_ms) / per:8.1f} {1000 * self.wall_ms / per:8.1f} "
            # The append-only rows use the sqlite3 module directly: all of it is SQLite.
            + (f"{1000 * self.driver_ms / per:9.1f}" if self.driver_ms else f"{'all':>9}")
        )


def measure(name: str, events: int, work: Callable[[], None]) -> Cost:
    driver = _driver_cpu[0]
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return Cost(
        name,
        events,
        (after.ru_utime - before.ru_utime) * 1000,
        (after.ru_stime - before.ru_stime) * 1000,
        (ended - started) * 1000,
        (_driver_cpu[0] - driver) * 1000,
    )


def python_calls_per_record(directory: Path, events: list) -> float:
    """Python function calls (cProfile) per ``JobStore._record`` call, FULL, one thread."""
    work = store_run(directory, events, 1, "FULL")
    profile = cProfile.Profile()
    profile.enable()
    work()
    profile.disable()
    stats = pstats.Stats(profile)
    records = sum(
        calls
        for (_, _, function), (calls, *_rest) in stats.stats.items()  # type: ignore[attr-defined]
        if function == "_record"
    )
    return stats.total_calls / max(1, records)  # type: ignore[attr-defined]


def job_events(count: int) -> list[JobRequested | DataProcessed | EmailSent]:
    """``count`` events of count/3 jobs, in pipeline order, as the api sees them."""
    events: list[JobRequested | DataProcessed | EmailSent] = []
    for n in range(count // 3):
        job_id = uuid4()
        data = {"visits": [n, n + 1, n + 2], "score": n * 1.5, "name": f"user{n}"}
        email = f"user{n}@example.com"
        events.append(JobRequested(job_id=job_id, email=email, data=data, submitted_by="anonymous"))
        events.append(
            DataProcessed(
                job_id=job_id, email=email, step="summarise", data=data, result={"field_count": 3}
            )
        )
        events.append(
            EmailSent(job_id=job_id, email=email, transport="mailtrap", provider_message_id="x")
        )
    return events


def store_run(directory: Path, events: list, threads: int, synchronous: str) -> Callable[[], None]:
    store = JobStore.open(f"sqlite:///{directory / f'api-{uuid4().hex[:8]}.sqlite3'}")
    if synchronous != "FULL":
        from sqlalchemy import event

        @event.listens_for(store._engine, "connect")
        def _sync(connection: object, record: object) -> None:
            connection.execute(f"PRAGMA synchronous={synchronous}")  # type: ignore[attr-defined]

        store._engine.dispose()

    def work() -> None:
        # The api's JobRequested is recorded once by the intake and once more when
        # it comes back through the queue (a read only); the others once each.
        calls = []
        for event in events:
            calls.append(event)
            if isinstance(event, JobRequested):
                calls.append(event)
        if threads == 1:
            for event in calls:
                store._record(event)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(store._record, calls))

    return work


def append_only_run(
    directory: Path, events: list, batch: int, synchronous: str
) -> Callable[[], None]:
    path = directory / f"append-{uuid4().hex[:8]}.sqlite3"
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute(
        "CREATE TABLE job_events (event_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, "
        "event TEXT NOT NULL, at REAL NOT NULL, caller TEXT, attempts INTEGER, "
        "reason TEXT, provider_message_id TEXT)"
    )
    connection.execute("CREATE INDEX job_events_job ON job_events (job_id)")
    rows = [
        (
            str(e.event_id),
            str(e.job_id),
            e.event_type,
            e.occurred_at.timestamp(),
            getattr(e, "submitted_by", None),
            getattr(e, "attempts", None),
            getattr(e, "reason", None),
            getattr(e, "provider_message_id", None),
        )
        for e in events
    ]

    def work() -> None:
        for start in range(0, len(rows), batch):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT INTO job_events VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO NOTHING",
                rows[start : start + batch],
            )
            connection.execute("COMMIT")

    return work


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=1500, help="job events (a third of them jobs)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    events = job_events(args.events)
    print(f"SQLite {sqlite3.sqlite_version}, {len(events)} job events, database under {args.dir}")
    print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}")
    time_driver_calls()
    print(
        f"{'per job event':<62} {'user µs':>8} {'sys µs':>8} {'CPU µs':>8} {'wall µs':>8} "
        f"{'in SQLite':>9}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-sqlite-") as tmp:
        directory = Path(tmp)
        results = []
        for synchronous in ("FULL", "NORMAL"):
            for threads in args.threads:
                results.append(
                    measure(
                        f"JobStore._record per event, {threads} thread(s), "
                        f"synchronous={synchronous}",
                        len(events),
                        store_run(directory, events, threads, synchronous),
                    )
                )
                print(results[-1].line(), flush=True)
        for synchronous in ("FULL", "NORMAL"):
            for batch in (1, args.batch):
                results.append(
                    measure(
                        f"append-only INSERT, {batch} event(s) per transaction, {synchronous}",
                        len(events),
                        append_only_run(directory, events, batch, synchronous),
                    )
                )
                print(results[-1].line(), flush=True)
        calls = python_calls_per_record(directory, events[:300])
        print(f"Python function calls per JobStore._record (cProfile): {calls:.0f}")
    print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
