"""End-to-end throughput and latency of the whole pipeline, printed (nothing is asserted).

What runs is what production runs: the console commands (api-service,
status-service, processor-service, mailer-service) as subprocesses against the machine's
RabbitMQ, in a throw-away vhost, and the real ``mailtrap`` SDK sending over
HTTPS to the Mailtrap stand-in of ``tests/support`` on loopback.

It submits ``--jobs`` jobs with ``POST /jobs`` (at most ``--concurrency`` at a
time) and measures

* acceptance: jobs/s the API answered 202 (each 202 means the broker confirmed
  the ``JobRequested``), and the latency of ``POST /jobs``;
* end to end: jobs/s from the first submit to the last email reaching the
  stand-in, and per job the time from its submit to its email's arrival;
* correctness: every job got exactly one email (duplicates and missing ones
  are counted and printed);
* where the CPU went meanwhile (Linux ``/proc``): seconds used by each service
  and by this process (client and stand-in), and by the whole machine, whose
  rest is RabbitMQ and anything else running.

Why: the pipeline's cost per job (two confirmed publishes to quorum queues,
two consumers, one HTTPS call) sets how fast it drains a burst; these figures
show where it stands on a given machine and what ``MAILER_CONCURRENCY`` buys
when the provider is slow (``--stub-latency-ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import open_loop
from benchkit import (
    code_version,
    machine,
    stop_cleanly_on_signals,
)
from pipeline_shared.topology import MAILER, PROCESSOR, STATUS
from support.mailtrap_stub import MailtrapStub, Received
from support.rabbit import Management, new_vhost_name, url_for_vhost
from support.services import Api, Service, clean_environment, free_port
from support.waiting import wait_for

WORKER_NICENESS = 10
"""The Procfile's ``nice -n`` for the processor and the mailer."""


@dataclass(frozen=True)
class Options:
    jobs: int
    concurrency: int
    mailer_concurrency: int
    stub_latency_ms: float
    warmup: int
    timeout: float
    log_level: str


@dataclass(frozen=True)
class Submission:
    """One ``POST /jobs``: when it started and ended (``time.monotonic()``) and its answer."""

    started: float
    finished: float
    status: int
    job_id: str | None


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by each process, and by the machine (busy, total)."""

    processes: dict[str, float]
    machine_busy: float
    machine_total: float


@dataclass
class Pipeline:
    api: Api
    status: Service
    processor: Service
    mailer: Service

    @property
    def services(self) -> tuple[Service, ...]:
        return (self.api, self.status, self.processor, self.mailer)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs measured (default 500)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="POST /jobs in flight at once (default 32)"
    )
    parser.add_argument(
        "--mailer-concurrency", type=int, default=8, help="MAILER_CONCURRENCY (default 8)"
    )
    parser.add_argument(
        "--stub-latency-ms",
        type=float,
        default=0.0,
        help="artificial latency of the Mailtrap stand-in per request (default 0)",
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="jobs sent and delivered before measuring"
    )
    parser.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for the emails (default 90)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="LOG_LEVEL of the services (default INFO)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.concurrency < 1 or args.mailer_concurrency < 1 or args.warmup < 0:
        parser.error("--jobs and the concurrencies must be positive, --warmup not negative")
    return Options(
        jobs=args.jobs,
        concurrency=args.concurrency,
        mailer_concurrency=args.mailer_concurrency,
        stub_latency_ms=args.stub_latency_ms,
        warmup=args.warmup,
        timeout=args.timeout,
        log_level=args.log_level,
    )


# --- setting up and tearing down -------------------------------------------


@contextlib.contextmanager
def throwaway_vhost(management: Management) -> Iterator[str]:
    name = new_vhost_name("bench")
    management.create_vhost(name)
    try:
        yield name
    finally:
        management.delete_vhost(name)


@contextlib.contextmanager
def running_stub(directory: Path, latency_ms: float) -> Iterator[MailtrapStub]:
    stub = MailtrapStub(directory, latency=latency_ms / 1000)
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


def build_pipeline(
    workdir: Path, broker_url: str, stub: MailtrapStub, options: Options
) -> Pipeline:
    port = free_port()
    env = clean_environment(
        RABBITMQ_URL=broker_url,
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        MAILTRAP_TOKEN=stub.token,
        MAILTRAP_API_HOST=stub.host,
        REQUESTS_CA_BUNDLE=str(stub.ca_bundle),
        MAIL_FROM="reports@pipeline.example.com",
        MAILER_CONCURRENCY=str(options.mailer_concurrency),
        OUTBOX_DIR=str(workdir / "outbox"),
        LOG_LEVEL=options.log_level,
    )
    # The workers at a lower CPU priority than the api, as `make run` (the
    # Procfile) and compose (cpu_shares) run them.
    return Pipeline(
        api=Api("api-service", env, workdir, port=port),
        status=Service(
            "status-service",
            {**env, "METRICS_PORT": str(free_port())},
            workdir,
            niceness=WORKER_NICENESS,
        ),
        processor=Service("processor-service", env, workdir, niceness=WORKER_NICENESS),
        mailer=Service("mailer-service", env, workdir, niceness=WORKER_NICENESS),
    )


@contextlib.contextmanager
def running_pipeline(pipeline: Pipeline, management: Management, vhost: str) -> Iterator[Pipeline]:
    try:
        for service in pipeline.services:
            service.start()
        pipeline.api.wait_ready()
        for worker, queue in (
            (pipeline.status, STATUS.queue),
            (pipeline.processor, PROCESSOR.queue),
            (pipeline.mailer, MAILER.queue),
        ):
            wait_for(
                consuming(worker, management, vhost, queue), timeout=30, what=f"{queue} consumed"
            )
        yield pipeline
    except Exception:
        print_log_tails(pipeline)
        raise
    finally:
        for service in pipeline.services:
            stop(service)


def consuming(
    worker: Service, management: Management, vhost: str, queue: str
) -> Callable[[], bool]:
    """A probe: ``worker`` consumes ``queue`` (it fails at once if the worker exited)."""

    def probe() -> bool:
        if not worker.running:
            raise RuntimeError(f"{worker.command} exited while starting")
        return management.consumers(vhost, queue) > 0

    return probe


def stop(service: Service) -> None:
    """SIGTERM and wait; SIGKILL if it does not exit in time."""
    if service.process is None:
        return
    try:
        service.terminate(timeout=15)
    except Exception:
        service.stop_quietly()


def print_log_tails(pipeline: Pipeline, lines: int = 15) -> None:
    for service in pipeline.services:
        tail = service.output().splitlines()[-lines:]
        print(f"--- last lines of {service.command}:", *tail, sep="\n", file=sys.stderr)


# --- submitting ------------------------------------------------------------


def job_body(n: int) -> dict[str, object]:
    return {
        "email": f"user{n}@example.com",
        "subject": f"Report {n}",
        "data": {"visits": [n, n + 1, n + 2], "score": n * 1.5, "name": f"user{n}"},
    }


def post_job(host: str, port: int, n: int) -> bytes:
    """Job ``n``'s ``POST /jobs``, encoded."""
    return open_loop.post_request(host, port, "/jobs", json.dumps(job_body(n)).encode())


def host_and_port(api_url: str) -> tuple[str, int]:
    url = urlsplit(api_url)
    return url.hostname or "127.0.0.1", url.port or 80


async def submit_all(api_url: str, count: int, concurrency: int) -> list[Submission]:
    """POST ``count`` jobs with at most ``concurrency`` in flight, on as many connections,
    with the lean client of ``open_loop`` (``httpx`` would take a third of this machine
    from the services under test)."""
    host, port = host_and_port(api_url)
    shots = await open_loop.closed_loop(
        host, port, lambda n: post_job(host, port, n), count, concurrency
    )
    return [
        Submission(
            shot.sent, shot.finished, shot.status, shot.job_id if shot.status == 202 else None
        )
        for shot in shots
    ]


def wait_for_emails(stub: MailtrapStub, job_ids: set[str], timeout: float) -> list[Received]:
    """Wait until every job in ``job_ids`` has an email (or ``timeout``); return the emails."""
    deadline = time.monotonic() + timeout
    while True:
        emails = [r for r in stub.delivered if r.job_id in job_ids]
        if {r.job_id for r in emails} >= job_ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # a late duplicate would show up here
    return [r for r in stub.delivered if r.job_id in job_ids]


# --- reporting -------------------------------------------------------------


def percentiles(values: Sequence[float], points: Sequence[int]) -> list[float]:
    if len(values) == 1:
        return [values[0]] * len(points)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[p - 1] for p in points]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def print_setup(options: Options, management: Management) -> None:
    overview = management.client.get("/api/overview").json()
    print("pipeline throughput benchmark")
    print(f"  machine   : {machine()}")
    print(f"  code      : {code_version()}")
    print(f"  rabbitmq  : {overview.get('rabbitmq_version', '?')} (quorum queues)")
    print("  stand-in  : in this process")
    print(
        f"  settings  : jobs={options.jobs} concurrency={options.concurrency} "
        f"warmup={options.warmup} MAILER_CONCURRENCY={options.mailer_concurrency} "
        f"(prefetch {2 * options.mailer_concurrency}) stub latency={options.stub_latency_ms:g} ms "
        f"LOG_LEVEL={options.log_level}"
    )


def print_report(submissions: list[Submission], emails: list[Received]) -> None:
    accepted = [s for s in submissions if s.status == 202]
    refused = Counter(s.status for s in submissions if s.status != 202)
    if not accepted:
        print(f"no job was accepted: {dict(refused)}")
        return
    first_submit = min(s.started for s in submissions)
    last_accept = max(s.finished for s in submissions)
    post_latency = [s.finished - s.started for s in accepted]

    per_job = Counter(r.job_id for r in emails)
    first_email = {r.job_id: r.received_at for r in sorted(emails, key=lambda r: r.received_at)}
    e2e = [first_email[s.job_id] - s.started for s in accepted if s.job_id in first_email]
    missing = sum(1 for s in accepted if s.job_id not in per_job)
    duplicates = sum(count - 1 for count in per_job.values() if count > 1)

    print()
    print(f"{'measure':<34} {'value':>14}")
    print("-" * 49)
    rate = len(accepted) / (last_accept - first_submit)
    print(f"{'accepted (202)':<34} {len(accepted):>14}")
    if refused:
        print(f"{'refused or failed POSTs':<34} {dict(refused)!s:>14}")
    print(f"{'API acceptance throughput':<34} {rate:>9.1f} job/s")
    for point, value in zip((50, 95, 99), percentiles(post_latency, (50, 95, 99)), strict=True):
        print(f"{f'POST /jobs latency p{point}':<34} {ms(value):>14}")
    if e2e:
        last_email = max(first_email.values())
        print(f"{'emails received':<34} {len(emails):>14}")
        print(f"{'end-to-end throughput':<34} {len(e2e) / (last_email - first_submit):>9.1f} job/s")
        for point, value in zip((50, 95), percentiles(e2e, (50, 95)), strict=True):
            print(f"{f'end-to-end latency p{point}':<34} {ms(value):>14}")
        print(f"{'first submit -> last email':<34} {last_email - first_submit:>12.2f} s")
    print(f"{'jobs without an email (missing)':<34} {missing:>14}")
    print(f"{'duplicate emails':<34} {duplicates:>14}")


# --- main --------------------------------------------------------------------


# --- CPU accounting (Linux /proc) ----------------------------------------------


def process_cpu(pid: int) -> float:
    """utime + stime of ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(ticks[:8])  # guest time is already counted in user
    idle = ticks[3] + ticks[4]  # idle + iowait
    hertz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hertz, total / hertz


def sample_cpu(pipeline: Pipeline) -> CpuSample | None:
    try:
        processes = {
            service.command: process_cpu(service.process.pid)
            for service in pipeline.services
            if service.process is not None
        }
        processes["benchmark (client, stand-in)"] = process_cpu(os.getpid())
        return CpuSample(processes, *machine_cpu())
    except (OSError, ValueError, IndexError):
        return None  # not Linux


def print_cpu(before: CpuSample | None, after: CpuSample | None, seconds: float) -> None:
    if before is None or after is None:
        return
    print()
    print(f"CPU during the measured run ({seconds:.1f} s wall; 100 % = one core busy)")
    for name, used in after.processes.items():
        spent = used - before.processes[name]
        print(f"  {name:<32} {spent:6.1f} s  {100 * spent / seconds:5.0f} %")
    ours = sum(after.processes.values()) - sum(before.processes.values())
    busy = after.machine_busy - before.machine_busy
    total = after.machine_total - before.machine_total
    rest = busy - ours
    print(f"  {'rest (RabbitMQ, anything else)':<32} {rest:6.1f} s  {100 * rest / seconds:5.0f} %")
    print(
        f"  {'whole machine':<32} {busy:6.1f} s  {100 * busy / seconds:5.0f} %"
        f"  of {100 * total / seconds:.0f} %"
    )


def run(options: Options) -> None:
    management = Management.connect()
    try:
        print_setup(options, management)
        with (
            tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
            throwaway_vhost(management) as vhost,
            running_stub(Path(tmp), options.stub_latency_ms) as stub,
        ):
            pipeline = build_pipeline(Path(tmp), url_for_vhost(vhost), stub, options)
            with running_pipeline(pipeline, management, vhost):
                print(f"  vhost     : {vhost}; services ready, warming up")
                measure(pipeline, stub, options)
    finally:
        management.close()


def measure(pipeline: Pipeline, stub: MailtrapStub, options: Options) -> None:
    api_url = pipeline.api.url
    if options.warmup:
        warmup = asyncio.run(submit_all(api_url, options.warmup, options.concurrency))
        warm_ids = {s.job_id for s in warmup if s.job_id is not None}
        wait_for_emails(stub, warm_ids, options.timeout)
    before, started = sample_cpu(pipeline), time.monotonic()
    submissions = asyncio.run(submit_all(api_url, options.jobs, options.concurrency))
    job_ids = {s.job_id for s in submissions if s.job_id is not None}
    emails = wait_for_emails(stub, job_ids, options.timeout)
    after, seconds = sample_cpu(pipeline), time.monotonic() - started
    print_report(submissions, emails)
    print_cpu(before, after, seconds)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    stop_cleanly_on_signals()
    try:
        run(options)
    except KeyboardInterrupt:
        print("\ninterrupted; services stopped and vhost deleted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
