"""What reusing the HTTPS connection to Mailtrap is worth, printed (nothing is asserted).

The official SDK's ``MailtrapClient.send()`` builds a new ``SendingApi`` and so
a new ``requests.Session`` per call: every email pays a TCP connect and a TLS
handshake. ``MailtrapTransport`` (mailer-service) keeps one ``SendingApi`` per
worker thread instead, so each thread's connection stays alive across emails.

This sends ``--emails`` emails to the Mailtrap stand-in of ``tests/support``
(real HTTPS with its own CA, on loopback) both ways, with one and with eight
threads, and prints emails/s and the mean time per email. The stand-in runs in
a child process, so its own TLS work does not share this process's GIL, as a
remote provider would not. Loopback has no network round trip, so the figures
show the CPU and protocol cost of a handshake, a lower bound of what it costs
over the internet (where it also takes extra round trips); ``--stub-latency-ms``
adds a provider-like pause per request.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path

import mailtrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchkit import (
    code_version,
    machine,
    stop_cleanly_on_signals,
)
from mailer_service.compose import OutgoingEmail, Sender
from mailer_service.mailtrap_transport import MailtrapTransport, to_mail
from support.mailtrap_stub import MailtrapStub

SENDER = Sender("reports@pipeline.example.com", "Pipeline Reports", "background-job")
CONCURRENCIES = (1, 8)


@dataclass(frozen=True)
class Options:
    emails: int
    warmup: int
    stub_latency_ms: float


@dataclass(frozen=True)
class StandIn:
    """Where the stand-in (in its child process) listens, and how to trust and pass it."""

    host: str
    ca_bundle: str
    token: str


@dataclass(frozen=True)
class Result:
    way: str
    concurrency: int
    emails: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.emails / self.seconds

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies) * 1000


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="emails per run (default 300)")
    parser.add_argument(
        "--warmup", type=int, default=16, help="emails sent, not measured, before each run"
    )
    parser.add_argument(
        "--stub-latency-ms",
        type=float,
        default=0.0,
        help="artificial latency of the Mailtrap stand-in per request (default 0)",
    )
    args = parser.parse_args(argv)
    if args.emails < 1 or args.warmup < 0:
        parser.error("--emails must be positive and --warmup not negative")
    return Options(args.emails, args.warmup, args.stub_latency_ms)


# --- the stand-in, in a child process ------------------------------------------


def serve_stand_in(conn: Connection, latency: float) -> None:
    """Child process: run a stand-in until told to stop, then report what it answered."""
    with tempfile.TemporaryDirectory(prefix="bench-mailtrap-") as tmp:
        stub = MailtrapStub(Path(tmp), latency=latency)
        stub.start()
        try:
            conn.send(StandIn(stub.host, str(stub.ca_bundle), stub.token))
            conn.recv()
            received = stub.received
            conn.send((len(received), sum(1 for r in received if r.status != 200)))
        except (EOFError, KeyboardInterrupt):
            pass  # the benchmark stopped early
        finally:
            stub.stop()


@contextmanager
def stand_in_process(options: Options) -> Iterator[tuple[StandIn, Connection]]:
    """A stand-in in a child process; on exit it is stopped (killed if need be)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    latency = options.stub_latency_ms / 1000
    child = context.Process(target=serve_stand_in, args=(theirs, latency), daemon=True)
    child.start()
    theirs.close()
    try:
        if not ours.poll(30):
            raise RuntimeError("the Mailtrap stand-in did not start")
        yield ours.recv(), ours
    finally:
        ours.close()  # the child sees EOF and stops, if it has not yet
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join()


def answered(conn: Connection) -> tuple[int, int]:
    """Stop the stand-in; (requests it answered, how many of them not 200)."""
    conn.send("stop")
    counts: tuple[int, int] = conn.recv()
    return counts


def email(n: int) -> OutgoingEmail:
    job_id = f"bench-{n}"
    return OutgoingEmail(
        job_id=job_id,
        sender=SENDER,
        to=f"user{n}@example.com",
        subject=f"Report {n}",
        text=f"Hello,\n\nyour job {job_id} has been processed.\n",
        custom_variables={"job_id": job_id},
    )


# --- the two ways ------------------------------------------------------------


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def send_per_call(stub: StandIn, count: int, concurrency: int) -> list[float]:
    """``MailtrapClient.send()`` for each email: a new session (and handshake) each time."""
    client = mailtrap.MailtrapClient(token=stub.token, api_host=stub.host)

    def one(n: int) -> float:
        return timed(lambda: client.send(to_mail(email(n))))

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


async def send_with_transport(
    transport: MailtrapTransport, count: int, concurrency: int
) -> list[float]:
    """``MailtrapTransport.send`` with at most ``concurrency`` emails in flight."""
    slots = asyncio.Semaphore(concurrency)

    async def one(n: int) -> float:
        async with slots:
            started = time.perf_counter()
            await transport.send(email(n))
            return time.perf_counter() - started

    return list(await asyncio.gather(*(one(n) for n in range(count))))


def run_per_call(stub: StandIn, options: Options, concurrency: int) -> Result:
    send_per_call(stub, options.warmup, concurrency)
    started = time.perf_counter()
    latencies = send_per_call(stub, options.emails, concurrency)
    return Result(
        "client.send() per email",
        concurrency,
        options.emails,
        time.perf_counter() - started,
        latencies,
    )


async def run_transport(stub: StandIn, options: Options, concurrency: int) -> Result:
    transport = MailtrapTransport(
        token=stub.token, api_host=stub.host, inbox_id=None, concurrency=concurrency
    )
    try:
        await send_with_transport(transport, options.warmup, concurrency)
        started = time.perf_counter()
        latencies = await send_with_transport(transport, options.emails, concurrency)
        seconds = time.perf_counter() - started
    finally:
        await transport.close()
    return Result("MailtrapTransport (reuse)", concurrency, options.emails, seconds, latencies)


# --- reporting ---------------------------------------------------------------


def print_setup(options: Options) -> None:
    print("Mailtrap session reuse benchmark")
    print(f"  machine   : {machine()}; mailtrap SDK {version('mailtrap')}")
    print(f"  code      : {code_version()}")
    print(
        f"  settings  : emails={options.emails} per run, warmup={options.warmup}, "
        f"stub latency={options.stub_latency_ms:g} ms, HTTPS on 127.0.0.1"
    )
    print("  stand-in  : child process; client: this process, SDK per call vs MailtrapTransport")


def print_results(results: list[Result]) -> None:
    print()
    print(f"{'way':<28} {'threads':>7} {'emails/s':>10} {'mean ms':>9}")
    print("-" * 57)
    for result in results:
        print(
            f"{result.way:<28} {result.concurrency:>7} {result.rate:>10.1f} {result.mean_ms:>9.2f}"
        )


def print_answers(counts: tuple[int, int], expected: int) -> None:
    total, failed = counts
    print(f"\nstand-in answered {total} requests (expected {expected}), {failed} not 200")


# --- main --------------------------------------------------------------------


def run(options: Options) -> None:
    print_setup(options)
    with stand_in_process(options) as (stub, conn):
        # requests reads it when a session sends; set before any session exists.
        os.environ["REQUESTS_CA_BUNDLE"] = stub.ca_bundle
        results = [run_per_call(stub, options, c) for c in CONCURRENCIES]
        results += [asyncio.run(run_transport(stub, options, c)) for c in CONCURRENCIES]
        counts = answered(conn)
    print_results(results)
    print_answers(counts, len(results) * (options.emails + options.warmup))


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    stop_cleanly_on_signals()
    try:
        run(options)
    except KeyboardInterrupt:
        print("\ninterrupted; the stand-in is stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
