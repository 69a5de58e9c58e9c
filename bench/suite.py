"""``make bench``: the pipeline as production runs it, in several shapes, one table.

Each scenario runs what production runs, from scratch: the three console
commands (with N processor and M mailer replicas) against the machine's
RabbitMQ in a throw-away vhost, the mailer sending through the real
``mailtrap`` SDK over HTTPS to the stand-in of ``tests/support``, which
enforces Mailtrap's limit of 150 requests per 10 s per token (429 with
``Retry-After`` beyond it) and answers after ``latency`` ms. After a warm-up it
submits ``--jobs`` jobs as fast as the client can (``POST /jobs`` with 32 in
flight, or ``POST /jobs/batch`` with ``--batch-size`` jobs per request) and
waits for every email and for the api's read model to catch up. Per scenario:

* jobs per second end to end (first submit to last email) and as a ratio of
  the broker's ceiling, a bare aio-pika program doing the same three hops
  (``amqp_cost.three_hops``), measured in the same run;
* ``POST /jobs`` latency p50/p99 of single POSTs, in the window above, or
  with ``--rate R`` in a second window at R requests per second;
* in the ``backlog`` scenario, ``POST /jobs`` latency (p50/p99/max, from each
  request's due time) of single POSTs sent open loop at ``--rate`` per second
  (default 300) for ``--rate-seconds`` while the pipeline drains a backlog of
  ``--backlog`` jobs submitted just before through ``POST /jobs/batch``, with
  the backlog still waiting at the start and end of that window;
* CPU milliseconds per job of each service (replicas summed) and of RabbitMQ,
  from ``/proc``, over the window until the read model caught up;
* provider requests and 429 answers, lost and duplicated emails;
* peak RSS (``VmHWM``) of each service, the largest replica's.

All traffic stays on loopback; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

import amqp_cost  # noqa: E402
import open_loop  # noqa: E402
import pipeline_throughput as pt  # noqa: E402
import profile_services as ps  # noqa: E402
from benchkit import code_version, machine, stop_cleanly_on_signals  # noqa: E402
from pipeline_shared.topology import MAILER, PROCESSOR, STATUS  # noqa: E402
from support.mailtrap_stub import MailtrapStub  # noqa: E402
from support.rabbit import Management, messages_ready_now, url_for_vhost  # noqa: E402
from support.services import Api, Service, free_port  # noqa: E402
from support.waiting import wait_for  # noqa: E402

PROVIDER_LIMIT = (150, 10.0)
"""Mailtrap's sending limit per API token: requests per seconds."""
SERVICES = ("api-service", "status-service", "processor-service", "mailer-service")
BACKLOG_BATCH = 1000
"""Jobs per ``POST /jobs/batch`` of the backlog (``MAX_BATCH_JOBS``): the fewest requests."""
BACKLOG_IN_FLIGHT = 2
"""Backlog requests in flight: one being read while the api publishes the other's jobs."""
BACKLOG_RATE = 300
"""Single POSTs per second during the backlog window unless ``--rate`` says otherwise."""


@dataclass(frozen=True)
class Scenario:
    processors: int
    mailers: int
    latency_ms: float
    batch: bool
    backlog: bool = False
    """Single POSTs at a fixed rate while a backlog of batch-submitted jobs drains."""

    @property
    def name(self) -> str:
        how = "backlog" if self.backlog else "batch" if self.batch else "single"
        return f"{how} p{self.processors} m{self.mailers} {self.latency_ms:g}ms"


DEFAULT_SCENARIOS = (
    Scenario(1, 1, 0, batch=False),
    Scenario(2, 3, 0, batch=False),
    Scenario(1, 1, 150, batch=False),
    Scenario(1, 1, 0, batch=True),
    Scenario(1, 1, 0, batch=False, backlog=True),
)
ALL_SCENARIOS = (
    *(
        Scenario(p, m, latency, batch)
        for batch, latency, p, m in itertools.product((False, True), (0, 150), (1, 2), (1, 3))
    ),
    Scenario(1, 1, 0, batch=False, backlog=True),
)


@dataclass(frozen=True)
class Options:
    jobs: int
    batch_jobs: int
    batch_size: int
    concurrency: int
    rate: int
    rate_seconds: float
    backlog: int
    ceiling_messages: int
    warmup: int
    timeout: float
    scenarios: tuple[Scenario, ...]


@dataclass
class Row:
    scenario: Scenario
    per_second: float = 0.0
    post_p50_ms: float | None = None
    post_p99_ms: float | None = None
    cpu_ms: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    limited: int = 0
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    note: str = ""
    window: Window | None = None


@dataclass(frozen=True)
class Waiting:
    """The backlog at one moment: the backlog's jobs the stand-in has no email for yet
    (exact), each work queue's ready messages as the broker counts them now (a passive
    declare), and its ready + unacked messages as the management API last sampled
    them (up to its statistics interval, 5 s, old: it can show 0 while thousands
    wait)."""

    not_emailed: int
    processor_ready: int
    mailer_ready: int
    processor_management: int | None
    mailer_management: int | None
    status_ready: int
    """Job events waiting for status-service: how far the read model lags."""

    def __str__(self) -> str:
        def depth(n: int | None) -> str:
            return "?" if n is None else str(n)

        return (
            f"{self.not_emailed} backlog jobs not yet emailed; messages (single events or "
            f"bundles) ready now: processor queue {self.processor_ready}, mailer queue "
            f"{self.mailer_ready} (management API: "
            f"{depth(self.processor_management)}, {depth(self.mailer_management)}), "
            f"status queue {self.status_ready}"
        )


@dataclass(frozen=True)
class Window:
    """The backlog scenario's fixed-rate window of single POSTs."""

    backlog: int
    backlog_refused: Counter[int]
    backlog_seconds: float
    rate: int
    seconds: float
    shots: list[open_loop.Shot]
    at_start: Waiting
    at_end: Waiting
    client_cpu_s: float
    unknown_emailed: int
    """Window POSTs answered 503 with an unknown outcome whose job was emailed anyway."""


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per single-POST scenario")
    parser.add_argument("--batch-jobs", type=int, default=3000, help="jobs per batch scenario")
    parser.add_argument("--batch-size", type=int, default=100, help="jobs per POST /jobs/batch")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument(
        "--rate",
        type=int,
        default=0,
        help="measure POST /jobs latency in a second window at this many requests per "
        "second (default: in the as-fast-as-it-can window); in the backlog scenario, "
        f"the rate while the backlog drains (default {BACKLOG_RATE})",
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=10.0, help="length of a fixed-rate window"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=5000,
        help=f"jobs the backlog scenario submits by POST /jobs/batch ({BACKLOG_BATCH} per "
        "request) before its fixed-rate window (issue 9's figure: 20000)",
    )
    parser.add_argument("--ceiling-messages", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per wait")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every scenario: single and batch x 0 and 150 ms x 1 and 2 processors "
        "x 1 and 3 mailers (16; about 10 minutes)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="run the scenarios whose name contains this, e.g. 'batch' or 'p2 m3'",
    )
    args = parser.parse_args(argv)
    scenarios = ALL_SCENARIOS if args.all else DEFAULT_SCENARIOS
    scenarios = tuple(s for s in scenarios if args.only in s.name)
    if not scenarios:
        parser.error(f"no scenario's name contains {args.only!r}")
    if args.backlog < 1 or args.rate < 0 or args.rate_seconds <= 0:
        parser.error("--backlog must be positive, --rate not negative, --rate-seconds positive")
    return Options(
        jobs=args.jobs,
        batch_jobs=args.batch_jobs,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        rate=args.rate,
        rate_seconds=args.rate_seconds,
        backlog=args.backlog,
        ceiling_messages=args.ceiling_messages,
        warmup=args.warmup,
        timeout=args.timeout,
        scenarios=scenarios,
    )


# --- the pipeline, with replicas ---------------------------------------------------


@dataclass
class Replicated(pt.Pipeline):
    """``pt.Pipeline`` with more processor and mailer processes beside the first ones."""

    more: tuple[Service, ...] = ()

    @property
    def services(self) -> tuple[Service, ...]:
        return (self.api, self.status, self.processor, self.mailer, *self.more)


def build(workdir: Path, broker_url: str, stub: MailtrapStub, scenario: Scenario) -> Replicated:
    """The services as ``pt.build_pipeline`` makes them; replicas share the working
    directory, so the mailers share their ledger (and with it the send budget)."""
    base = pt.build_pipeline(
        workdir,
        broker_url,
        stub,
        pt.Options(
            jobs=0,
            concurrency=1,
            mailer_concurrency=8,
            stub_latency_ms=scenario.latency_ms,
            warmup=0,
            timeout=0,
            log_level="INFO",
        ),
    )

    def replica(template: Service) -> Service:
        # Each worker serves its metrics on a port of its own.
        return replace(template, env={**template.env, "METRICS_PORT": str(free_port())})

    processors = [replica(base.processor) for _ in range(scenario.processors)]
    mailers = [replica(base.mailer) for _ in range(scenario.mailers)]
    return Replicated(
        api=base.api,
        status=base.status,
        processor=processors[0],
        mailer=mailers[0],
        more=(*processors[1:], *mailers[1:]),
    )


def wait_all_consuming(management: Management, scenario: Scenario, vhost: str) -> None:
    """Every replica consumes (``pt.running_pipeline`` waits for one per queue)."""
    for queue, count in (
        (PROCESSOR.queue, scenario.processors),
        (MAILER.queue, scenario.mailers),
    ):

        def all_of_them(queue: str = queue, count: int = count) -> bool:
            return management.consumers(vhost, queue) >= count

        wait_for(all_of_them, timeout=30, what=f"{count} consumers of {queue}")


@contextlib.contextmanager
def running_scenario(
    management: Management, scenario: Scenario
) -> Iterator[tuple[Replicated, MailtrapStub]]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp,
        pt.throwaway_vhost(management) as vhost,
        pt.running_stub(Path(tmp), scenario.latency_ms) as stub,
    ):
        stub.rate_limit = PROVIDER_LIMIT
        pipeline = build(Path(tmp), url_for_vhost(vhost), stub, scenario)
        with pt.running_pipeline(pipeline, management, vhost):
            wait_all_consuming(management, scenario, vhost)
            yield pipeline, stub


# --- submitting --------------------------------------------------------------------------


async def submit_batches(
    api_url: str, count: int, size: int, concurrency: int, answer_within: float = 60
) -> list[pt.Submission]:
    """``count`` jobs through ``POST /jobs/batch``, ``size`` per request, ``concurrency``
    requests in flight; one ``pt.Submission`` per job (its request's times)."""
    chunks = iter([range(start, min(start + size, count)) for start in range(0, count, size)])
    results: list[pt.Submission] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for chunk in chunks:
            started = time.monotonic()
            try:
                response = await client.post(
                    "/jobs/batch", json={"jobs": [pt.job_body(n) for n in chunk]}
                )
            except httpx.HTTPError:
                results.extend(pt.Submission(started, time.monotonic(), 0, None) for _ in chunk)
                continue
            finished = time.monotonic()
            if response.status_code == 202:
                results.extend(
                    pt.Submission(started, finished, 202, str(item["job_id"]))
                    for item in response.json()["jobs"]
                )
            else:
                results.extend(
                    pt.Submission(started, finished, response.status_code, None) for _ in chunk
                )

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_url, limits=limits, timeout=answer_within) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


async def submit_at_rate(api_url: str, count: int, rate: int) -> list[pt.Submission]:
    """``count`` single POSTs due at ``rate`` per second whatever the answers (an open
    loop: a slow answer does not slow the arrivals); latency counts from each due time."""
    host, port = pt.host_and_port(api_url)
    shots = await open_loop.run_apart(
        host, port, lambda i: pt.post_job(host, port, 1_000_000 + i), rate, count
    )
    return [pt.Submission(shot.due, shot.finished, shot.status, shot.job_id) for shot in shots]


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """CPU seconds so far of each service (replicas summed) and of RabbitMQ."""

    cpu: dict[str, float]
    load: str


def usage(pipeline: Replicated) -> Usage:
    cpu: dict[str, float] = {}
    for service in pipeline.services:
        assert service.process is not None
        cpu[service.command] = cpu.get(service.command, 0.0) + pt.process_cpu(service.process.pid)
    cpu["rabbitmq"] = amqp_cost.cpu_of(amqp_cost.beam_pid())
    return Usage(cpu, Path("/proc/loadavg").read_text().split(" ", 3)[0])


def peak_rss_mb(pipeline: Replicated) -> dict[str, float]:
    """``VmHWM`` of each service, the largest replica's, in MB."""
    peaks: dict[str, float] = {}
    for service in pipeline.services:
        assert service.process is not None
        for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                mb = int(line.split()[1]) / 1024
                peaks[service.command] = max(peaks.get(service.command, 0.0), mb)
    return peaks


def delivered(stub: MailtrapStub, job_ids: set[str]) -> tuple[dict[str, float], int, int]:
    """(first email's arrival per job, jobs without one, emails beyond a job's first)."""
    emails = [r for r in stub.delivered if r.job_id in job_ids]
    per_job = Counter(r.job_id for r in emails)
    first: dict[str, float] = {}
    for email in sorted(emails, key=lambda r: r.received_at):
        if email.job_id is not None:
            first.setdefault(email.job_id, email.received_at)
    return first, len(job_ids - set(first)), sum(n - 1 for n in per_job.values())


def run_scenario(management: Management, scenario: Scenario, options: Options) -> Row:
    row = Row(scenario)
    with running_scenario(management, scenario) as (pipeline, stub):
        api = pipeline.api.url
        warm = asyncio.run(pt.submit_all(api, options.warmup, 8))
        pt.wait_for_emails(stub, {s.job_id for s in warm if s.job_id}, options.timeout)
        requests_before = len(stub.sending_times) + stub.rate_limited
        limited_before = stub.rate_limited
        before = usage(pipeline)
        if scenario.batch:
            submissions = asyncio.run(
                submit_batches(api, options.batch_jobs, options.batch_size, 4)
            )
        else:
            submissions = asyncio.run(pt.submit_all(api, options.jobs, options.concurrency))
        accepted = [s for s in submissions if s.status == 202]
        job_ids = {s.job_id for s in accepted if s.job_id is not None}
        pt.wait_for_emails(stub, job_ids, options.timeout)
        ps.wait_for_read_model(pipeline, len(warm) + len(job_ids), options.timeout)
        after = usage(pipeline)
        first, row.lost, row.duplicated = delivered(stub, job_ids)
        row.jobs = len(accepted)
        start = min(s.started for s in submissions)
        if first:
            row.per_second = len(first) / (max(first.values()) - start)
        refused = len(submissions) - len(accepted)
        if refused:
            row.note = f"{refused} POSTs refused or failed; "
        row.cpu_ms = {
            name: 1000 * (after.cpu[name] - before.cpu[name]) / max(row.jobs, 1)
            for name in after.cpu
        }
        row.note += f"load {before.load}->{after.load}"
        latencies = [s.finished - s.started for s in accepted]
        if options.rate and not scenario.batch:
            at_rate = asyncio.run(
                submit_at_rate(api, int(options.rate * options.rate_seconds), options.rate)
            )
            ok = [s for s in at_rate if s.status == 202]
            latencies = [s.finished - s.started for s in ok]
            rate_ids = {s.job_id for s in ok if s.job_id is not None}
            pt.wait_for_emails(stub, rate_ids, options.timeout)
            _, lost, duplicated = delivered(stub, rate_ids)
            row.lost += lost + len(at_rate) - len(ok)
            row.duplicated += duplicated
        if latencies and not scenario.batch:
            p50, p99 = pt.percentiles(latencies, (50, 99))
            row.post_p50_ms, row.post_p99_ms = 1000 * p50, 1000 * p99
        row.requests = len(stub.sending_times) + stub.rate_limited - requests_before
        row.limited = stub.rate_limited - limited_before
        row.peak_rss_mb = peak_rss_mb(pipeline)
    return row


# --- the backlog scenario ---------------------------------------------------------------


def vhost_of(pipeline: Replicated) -> str:
    return unquote(urlsplit(pipeline.api.env["RABBITMQ_URL"]).path[1:])


async def waiting(
    channel: AbstractChannel,
    management: Management,
    vhost: str,
    stub: MailtrapStub,
    job_ids: set[str],
) -> Waiting:
    def depth(queue: str) -> int | None:
        info = management.queue(vhost, queue)
        return None if info is None or "messages" not in info else int(info["messages"])

    def not_emailed() -> int:
        return len(job_ids - {r.job_id for r in stub.delivered})

    return Waiting(
        await asyncio.to_thread(not_emailed),
        await messages_ready_now(channel, PROCESSOR.queue),
        await messages_ready_now(channel, MAILER.queue),
        await asyncio.to_thread(depth, PROCESSOR.queue),
        await asyncio.to_thread(depth, MAILER.queue),
        await messages_ready_now(channel, STATUS.queue),
    )


def wait_for_all_emails(stub: MailtrapStub, job_ids: set[str], stall: float) -> None:
    """Until every job has an email, or ``stall`` seconds pass with no new one (a
    backlog of 20,000 takes minutes; what matters is that it still moves). Polls
    twice a second: each look copies the stand-in's list of every email."""
    seen, last_progress = -1, time.monotonic()
    while True:
        emailed = len(job_ids & {r.job_id for r in stub.delivered})
        if emailed == len(job_ids):
            break
        if emailed > seen:
            seen, last_progress = emailed, time.monotonic()
        elif time.monotonic() - last_progress > stall:
            break
        time.sleep(0.5)
    time.sleep(0.5)  # a late duplicate would show up here


def benchmark_cpu() -> float:
    """CPU seconds of this process (the stand-in) and of its children that have
    exited (the client's process once it is done; the services still run)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


START_IN = 2.0
"""Seconds until the window's first request: the client's own process starts meanwhile."""


async def backlog_window(
    management: Management,
    vhost: str,
    stub: MailtrapStub,
    api: Api,
    backlog_ids: set[str],
    rate: int,
    seconds: float,
) -> tuple[list[open_loop.Shot], Waiting, Waiting]:
    """Single POSTs at ``rate`` per second for ``seconds``, open loop; the backlog
    waiting just before the first is due and when the last is due."""
    count = round(rate * seconds)

    def request(i: int) -> bytes:
        body = json.dumps(pt.job_body(1_000_000 + i)).encode()
        return open_loop.post_request("127.0.0.1", api.port, "/jobs", body)

    async with await aio_pika.connect(url_for_vhost(vhost)) as connection:
        channel = await connection.channel()

        async def after(delay: float) -> Waiting:
            await asyncio.sleep(delay)
            return await waiting(channel, management, vhost, stub, backlog_ids)

        at_start = asyncio.create_task(after(START_IN))
        end = asyncio.create_task(after(START_IN + seconds))
        shots = await open_loop.run_apart(
            "127.0.0.1", api.port, request, rate, count, start_in=START_IN
        )
        return shots, await at_start, await end


def run_backlog(management: Management, scenario: Scenario, options: Options) -> Row:
    """Submit ``--backlog`` jobs by ``POST /jobs/batch``; while they drain, single POSTs
    at a fixed rate; then wait for every email (backlog and window) and the read model."""
    row = Row(scenario)
    rate = options.rate or BACKLOG_RATE
    with running_scenario(management, scenario) as (pipeline, stub):
        api, vhost = pipeline.api, vhost_of(pipeline)
        warm = asyncio.run(pt.submit_all(api.url, options.warmup, 8))
        pt.wait_for_emails(stub, {s.job_id for s in warm if s.job_id}, options.timeout)
        requests_before = len(stub.sending_times) + stub.rate_limited
        limited_before = stub.rate_limited
        before = usage(pipeline)
        backlog = asyncio.run(
            submit_batches(
                api.url, options.backlog, BACKLOG_BATCH, BACKLOG_IN_FLIGHT, options.timeout
            )
        )
        backlog_ids = {s.job_id for s in backlog if s.status == 202 and s.job_id is not None}
        backlog_seconds = max(s.finished for s in backlog) - min(s.started for s in backlog)
        client_before = benchmark_cpu()
        shots, at_start, at_end = asyncio.run(
            backlog_window(management, vhost, stub, api, backlog_ids, rate, options.rate_seconds)
        )
        client_after = benchmark_cpu()
        window_ids = {s.job_id for s in shots if s.status == 202 and s.job_id is not None}
        unknown_ids = {s.job_id for s in shots if s.status != 202 and s.job_id is not None}
        job_ids = backlog_ids | window_ids
        wait_for_all_emails(stub, job_ids, options.timeout)
        ps.wait_for_read_model(pipeline, len(warm) + len(job_ids), options.timeout)
        after = usage(pipeline)
        first, row.lost, row.duplicated = delivered(stub, job_ids)
        row.jobs = len(job_ids)
        if first:
            row.per_second = len(first) / (max(first.values()) - min(s.started for s in backlog))
        unknown_emailed = len(unknown_ids & {r.job_id for r in stub.delivered})
        refused = len(backlog) - len(backlog_ids) + len(shots) - len(window_ids)
        if refused:
            row.note = f"{refused} POSTs refused or failed (jobs counted, not lost); "
        row.note += f"load {before.load}->{after.load}"
        row.cpu_ms = {
            name: 1000 * (after.cpu[name] - before.cpu[name]) / max(row.jobs, 1)
            for name in after.cpu
        }
        latencies = [s.latency for s in shots if s.status == 202]
        if latencies:
            p50, p99 = pt.percentiles(latencies, (50, 99))
            row.post_p50_ms, row.post_p99_ms = 1000 * p50, 1000 * p99
        row.requests = len(stub.sending_times) + stub.rate_limited - requests_before
        row.limited = stub.rate_limited - limited_before
        row.peak_rss_mb = peak_rss_mb(pipeline)
        row.window = Window(
            backlog=len(backlog_ids),
            backlog_refused=Counter(s.status for s in backlog if s.status != 202),
            backlog_seconds=backlog_seconds,
            rate=rate,
            seconds=options.rate_seconds,
            shots=shots,
            at_start=at_start,
            at_end=at_end,
            client_cpu_s=client_after - client_before,
            unknown_emailed=unknown_emailed,
        )
    return row


def print_window(row: Row) -> None:
    """The backlog window's own figures, under the table."""
    window = row.window
    if window is None:
        return
    shots = window.shots
    ok = [s for s in shots if s.status == 202]
    others = Counter(s.status for s in shots if s.status != 202)
    first_due = min(s.due for s in shots)
    last_sent = max(s.sent for s in shots)
    refused = (
        f" (jobs refused or failed, by status, 0 = no answer: {dict(window.backlog_refused)})"
        if window.backlog_refused
        else ""
    )
    print(
        f"  {row.scenario.name}: {window.backlog} jobs accepted by POST /jobs/batch in "
        f"{window.backlog_seconds:.1f} s ({window.backlog / window.backlog_seconds:.0f}/s)"
        f"{refused}; then {len(shots)} single POST /jobs due at {window.rate}/s for "
        f"{window.seconds:g} s, open loop"
    )
    print(f"    backlog at window start : {window.at_start}")
    print(f"    backlog at window end   : {window.at_end}")
    if ok:
        p50, p99 = pt.percentiles([s.latency for s in ok], (50, 99))
        print(
            f"    POST /jobs from due time: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, "
            f"max {1000 * max(s.latency for s in ok):.1f} ms ({len(ok)} answered 202"
            + (f"; others by status: {dict(others)}" if others else "")
            + ")"
        )
        print(
            f"    achieved                : sent {len(shots) / (last_sent - first_due):.1f}/s, "
            f"202 answers {len(ok) / (max(s.finished for s in ok) - first_due):.1f}/s "
            f"(last answer {max(s.finished for s in ok) - first_due:.1f} s after the first due)"
        )
    else:
        print(f"    no POST answered 202: {dict(others)}")
    for (status, detail), n in Counter(
        (s.status, s.detail) for s in shots if s.status != 202
    ).most_common(3):
        print(f"    answered {status} x{n:<13}: {detail}")
    unknown = sum(1 for s in shots if s.status != 202 and s.job_id is not None)
    if unknown:
        print(
            f"    unknown outcomes        : {unknown} answered 503 with a job id (outcome "
            f"unknown), {window.unknown_emailed} of them emailed anyway"
        )
    lag50, lag99 = pt.percentiles([s.send_lag for s in shots], (50, 99))
    print(
        f"    client                  : wrote p50 {1000 * lag50:.1f} ms, p99 "
        f"{1000 * lag99:.1f} ms after due (connecting included); {window.client_cpu_s:.1f} s "
        "CPU in the window "
        "(client and stand-in)"
    )


# --- reporting ---------------------------------------------------------------------------


def print_table(rows: Sequence[Row], ceiling: amqp_cost.Ceiling, options: Options) -> None:
    latency = f"at {options.rate}/s" if options.rate else "at 32 in flight"
    print()
    print(
        f"{'scenario':<20} {'jobs':>5} {'jobs/s':>7} {'xceil':>6} "
        f"{'POST p50/p99 ms':>16} {'CPU ms/job api/stat/proc/mail (rabbit)':>39} "
        f"{'req/429':>9} {'lost/dup':>9} {'peak RSS MB api/stat/proc/mail':>31}"
    )
    print("-" * 151)
    for row in rows:
        post = (
            f"{row.post_p50_ms:.0f}/{row.post_p99_ms:.0f}"
            if row.post_p50_ms is not None and row.post_p99_ms is not None
            else "-"
        )
        cpu = "/".join(f"{row.cpu_ms.get(name, 0):.2f}" for name in SERVICES)
        total = sum(row.cpu_ms.get(name, 0) for name in SERVICES)
        cpu += f" ={total:.2f} ({row.cpu_ms.get('rabbitmq', 0):.2f})"
        rss = "/".join(f"{row.peak_rss_mb.get(name, 0):.0f}" for name in SERVICES)
        print(
            f"{row.scenario.name:<20} {row.jobs:>5} {row.per_second:>7.1f} "
            f"{row.per_second / ceiling.per_second:>6.2f} {post:>16} {cpu:>39} "
            f"{f'{row.requests}/{row.limited}':>9} {f'{row.lost}/{row.duplicated}':>9} {rss:>31}"
        )
    print()
    print(
        f"broker ceiling (bare aio-pika, three confirmed persistent hops, a process each): "
        f"{ceiling.per_second:.0f} msg/s, RabbitMQ {1000 * ceiling.broker_s / ceiling.messages:.2f}"
        " ms CPU per message"
    )
    print(
        f"POST /jobs latency {latency}; batch rows: {options.batch_size} jobs per "
        "POST /jobs/batch, 4 in flight; pN mM = N processors, M mailers; "
        "0/150ms = provider latency"
    )
    for row in rows:
        print(f"  {row.scenario.name}: {row.note}")
    for row in rows:
        print_window(row)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    stop_cleanly_on_signals()
    management = Management.connect()
    try:
        print("make bench: the pipeline as production runs it")
        print(f"  machine  : {machine()}")
        print(f"  code     : {code_version()}")
        if os.environ.get("PYTHONPATH"):
            # profile_services.code_snapshot's way of running a commit, not the tree
            print(f"  services : PYTHONPATH={os.environ['PYTHONPATH']}")
        print(f"  load     : {Path('/proc/loadavg').read_text().strip()} at start")
        print(
            f"  provider : stand-in over HTTPS, {PROVIDER_LIMIT[0]} requests per "
            f"{PROVIDER_LIMIT[1]:g} s per token (429 + Retry-After beyond)"
        )
        print(
            "  settings : services' defaults (processor prefetch 32; MAILER_CONCURRENCY 8, "
            "prefetch 250 when batching; Mailtrap batches <= 500, BATCH_WAIT_MS 20)"
        )
        with pt.throwaway_vhost(management) as vhost:
            ceiling = amqp_cost.three_hops(management, vhost, options.ceiling_messages)
        print(f"  ceiling  : {ceiling.per_second:.0f} msg/s through three hops", flush=True)
        rows = []
        for scenario in options.scenarios:
            print(f"  running  : {scenario.name}", flush=True)
            run = run_backlog if scenario.backlog else run_scenario
            rows.append(run(management, scenario, options))
        print(f"  load     : {Path('/proc/loadavg').read_text().strip()} at end")
        print_table(rows, ceiling, options)
    except KeyboardInterrupt:
        print("\ninterrupted; services stopped and vhosts deleted", file=sys.stderr)
        sys.exit(130)
    finally:
        management.close()


if __name__ == "__main__":
    main()
