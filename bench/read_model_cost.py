"""What the api's read model costs per job, as the api drives it, without broker or HTTP.

    python bench/read_model_cost.py [--jobs 3000] [--batch 32] [--database-url URL] [--profile]

Per job the api writes three events through ``JobStore.record_batch``, each in
a batch of ``--batch`` jobs as its recorder groups them under load: the
accepted job (``note``), then ``DataProcessed`` and ``EmailSent`` from the
status queue (until 2026-11-29 the same ``JobRequested`` came back through
that queue too, a fourth write per job). This prints the process CPU
(user and system) and wall time per job and per event, for the code of the
checkout it runs from, on SQLite in a temporary folder or on ``--database-url``
(a PostgreSQL database, whose tables it empties first). ``--profile`` adds the
functions that took the most time (cProfile, which slows everything down).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from uuid import uuid4

from sqlalchemy import delete

from api_service.store import JobStore, idempotency_keys, jobs
from pipeline_shared.events import DataProcessed, EmailSent, JobRequested

JobEvent = JobRequested | DataProcessed | EmailSent


def rounds(count: int, batch: int) -> list[list[JobEvent]]:
    """The batches the api writes for ``count`` jobs: for each group of ``batch`` jobs,
    their notes, their ``DataProcessed`` and their ``EmailSent``."""
    batches: list[list[JobEvent]] = []
    for first in range(0, count, batch):
        requested = [
            JobRequested(
                job_id=uuid4(),
                email=f"user{n}@example.com",
                subject=f"Report {n}",
                data={"visits": [n, n + 1, n + 2], "score": n * 1.5, "name": f"user{n}"},
                submitted_by="anonymous",
            )
            for n in range(first, min(first + batch, count))
        ]
        processed: list[JobEvent] = [
            DataProcessed(
                job_id=r.job_id, email=r.email, step="summarise", data=r.data, result={"n": 3}
            )
            for r in requested
        ]
        sent: list[JobEvent] = [
            EmailSent(job_id=r.job_id, email=r.email, transport="mailtrap", provider_message_id="m")
            for r in requested
        ]
        batches += [list(requested), processed, sent]
    return batches


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--database-url")
    parser.add_argument("--profile", action="store_true")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as directory:
        url = options.database_url or f"sqlite:///{Path(directory) / 'api.sqlite3'}"
        store = JobStore.open(url)
        with store._engine.begin() as connection:
            connection.execute(delete(jobs))
            connection.execute(delete(idempotency_keys))
        batches = rounds(options.jobs, options.batch)
        profiler = cProfile.Profile() if options.profile else None
        started, started_cpu = time.perf_counter(), cpu()
        if profiler:
            profiler.enable()
        for events in batches:
            store.record_batch(events, {})
        if profiler:
            profiler.disable()
        wall, used = time.perf_counter() - started, cpu() - started_cpu
        store._engine.dispose()
        store._relaxed.dispose()

    events = sum(len(b) for b in batches)
    print(f"read model on {url.split(':', 1)[0]}: {options.jobs} jobs, {events} events")
    print(f"  batches of {options.batch} jobs")
    per_event = 1e6 * used / events
    print(f"  CPU  {1000 * used / options.jobs:6.3f} ms per job, {per_event:6.1f} µs per event")
    print(f"  wall {1000 * wall / options.jobs:6.3f} ms per job")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
