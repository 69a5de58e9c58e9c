"""Where each service's CPU goes per job: the pipeline under load, measured three ways.

It runs what ``pipeline_throughput.py`` runs (the four console commands,
RabbitMQ in a throw-away vhost, the Mailtrap stand-in over HTTPS), by default
on a snapshot of a commit (``git archive``) so that edits being made in the
checkout meanwhile do not change the code measured, and measures one window
of ``--jobs`` jobs after a warm-up:

* ``--mode plain``: the unmodified processes. CPU per job of each service
  (user and system time, from ``/proc``), of RabbitMQ, of the benchmark
  process and of everything else on the machine (named, so a busy machine
  shows), ``POST /jobs`` latency and end-to-end throughput, and with
  ``--fsyncs`` the fsync/fdatasync calls per job of each process
  (``perf record`` of the syscall tracepoints, system-wide, split by pid);
* ``--mode pyspy``: the same, with ``py-spy record --nonblocking`` attached to
  each service for the window; the raw (collapsed) profiles are written to
  ``--out`` and summarised by ``pyspy_summary.py``;
* ``--mode count``: each service runs under ``instrumented_service.py``,
  which counts JSON encodes and decodes, pydantic validations, contract walks,
  SQL transactions, thread hops, confirmed publishes and log records; the
  counts for the window, divided by the jobs, and the CPU time of each
  thread (by its Python name) are printed and written to ``--out``.

All traffic stays on loopback. Every figure is printed and also written as
JSON to ``--out`` (default ``bench/out/``, which git ignores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from io import BytesIO
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

import pipeline_throughput as pt  # noqa: E402
from benchkit import machine, stop_cleanly_on_signals  # noqa: E402
from support.rabbit import Management, url_for_vhost  # noqa: E402
from support.services import Api, Service  # noqa: E402

PACKAGE_SOURCES = ("shared/src", "api-service/src", "processor-service/src", "mailer-service/src")
HERTZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Options:
    mode: str
    jobs: int
    concurrency: int
    mailer_concurrency: int
    warmup: int
    timeout: float
    commit: str | None
    out: Path
    rate: int
    fsyncs: bool
    label: str


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("plain", "pyspy", "count"), default="plain")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="POST /jobs in flight")
    parser.add_argument("--mailer-concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument(
        "--commit",
        default="HEAD",
        help="run the services from a snapshot of this commit (default HEAD); "
        "'working-tree' runs the checkout as it is",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--fsyncs", action="store_true", help="count fsyncs per process (perf)")
    parser.add_argument("--label", default="", help="a name for this run's files")
    args = parser.parse_args(argv)
    return Options(
        mode=args.mode,
        jobs=args.jobs,
        concurrency=args.concurrency,
        mailer_concurrency=args.mailer_concurrency,
        warmup=args.warmup,
        timeout=args.timeout,
        commit=None if args.commit == "working-tree" else args.commit,
        out=args.out,
        rate=args.rate,
        fsyncs=args.fsyncs,
        label=args.label or f"{args.mode}-{time.strftime('%H%M%S')}",
    )


# --- the code measured -------------------------------------------------------------


@contextlib.contextmanager
def code_snapshot(commit: str | None) -> Iterator[tuple[str, dict[str, str]]]:
    """(description, environment) for services running ``commit`` from a temporary copy."""
    if commit is None:
        yield "working tree of " + _git("rev-parse", "--short", "HEAD") + " (as it was)", {}
        return
    resolved = _git("rev-parse", "--short", commit)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", resolved, *PACKAGE_SOURCES],
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix=f"bench-code-{resolved}-") as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        # The editable installs are .pth entries, after PYTHONPATH on sys.path.
        path = os.pathsep.join(str(Path(tmp) / source) for source in PACKAGE_SOURCES)
        yield f"{resolved} (snapshot)", {"PYTHONPATH": path}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


# --- services, optionally wrapped -----------------------------------------------


@dataclass
class WrappedService(Service):
    prefix: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return _wrapped(super().argv(), self.prefix)


@dataclass
class WrappedApi(Api):
    prefix: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return _wrapped(super().argv(), self.prefix)


def _wrapped(argv: list[str], prefix: Sequence[str]) -> list[str]:
    """``argv`` with ``prefix`` in front of the service's own command (after any ``nice``)."""
    return [*argv[:-1], *prefix, argv[-1]]


def wrap(pipeline: pt.Pipeline, prefix: tuple[str, ...]) -> pt.Pipeline:
    def copy(service: Service, cls: type[Service]) -> Service:
        values = {f.name: getattr(service, f.name) for f in fields(service)}
        return cls(**values, prefix=prefix)  # type: ignore[call-arg]

    return pt.Pipeline(
        api=copy(pipeline.api, WrappedApi),  # type: ignore[arg-type]
        status=copy(pipeline.status, WrappedService),
        processor=copy(pipeline.processor, WrappedService),
        mailer=copy(pipeline.mailer, WrappedService),
    )


# --- CPU accounting -----------------------------------------------------------------


@dataclass(frozen=True)
class ProcessCpu:
    user: float
    system: float
    children: float
    comm: str
    command: str


def read_process(pid: int) -> ProcessCpu | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    values = stat.rsplit(")", 1)[1].split()
    return ProcessCpu(
        user=int(values[11]) / HERTZ,
        system=int(values[12]) / HERTZ,
        children=(int(values[13]) + int(values[14])) / HERTZ,
        comm=comm,
        command=command.strip()[:200],
    )


def all_processes() -> dict[int, ProcessCpu]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (cpu := read_process(int(entry.name))) is not None:
            found[int(entry.name)] = cpu
    return found


def threads_of(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, summed by thread name (digits dropped)."""
    by_name: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")].rstrip("0123456789_-")
        values = stat.rsplit(")", 1)[1].split()
        by_name[name or "?"] += (int(values[11]) + int(values[12])) / HERTZ
    return dict(by_name)


def context_switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


@dataclass
class Sample:
    at: float
    processes: dict[int, ProcessCpu]
    machine_busy: float
    machine_total: float
    threads: dict[str, dict[str, float]] = field(default_factory=dict)
    switches: dict[str, tuple[int, int]] = field(default_factory=dict)
    load: str = ""


def sample(pipeline: pt.Pipeline) -> Sample:
    busy, total = pt.machine_cpu()
    result = Sample(time.monotonic(), all_processes(), busy, total)
    for service in pipeline.services:
        assert service.process is not None
        result.threads[service.command] = threads_of(service.process.pid)
        result.switches[service.command] = context_switches(service.process.pid)
    result.load = Path("/proc/loadavg").read_text().strip()
    return result


def cpu_report(
    pipeline: pt.Pipeline, before: Sample, after: Sample, jobs: int
) -> dict[str, object]:
    """CPU of each service, RabbitMQ, this process and the rest, in total and per job."""
    seconds = after.at - before.at
    ours = {service.process.pid: service.command for service in pipeline.services}  # type: ignore[union-attr]
    ours[os.getpid()] = "benchmark (client, stand-in)"
    named: dict[str, dict[str, float]] = {}
    others: Counter[str] = Counter()
    for pid, end in after.processes.items():
        start = before.processes.get(pid)
        base_user = start.user if start else 0.0
        base_system = start.system if start else 0.0
        user, system = end.user - base_user, end.system - base_system
        if pid in ours:
            named[ours[pid]] = {"user": user, "system": system}
        elif end.comm == "beam.smp":
            named["rabbitmq (beam.smp)"] = {"user": user, "system": system}
        elif user + system > 0:
            # Not the children's time: a parent's (pid 1's) grows by whole lifetimes
            # of processes reaped in the window. Short-lived processes end up in
            # "unaccounted" instead.
            others[_describe(end)] += user + system
    busy = after.machine_busy - before.machine_busy
    accounted = sum(v["user"] + v["system"] for v in named.values()) + sum(others.values())
    threads = {
        command: {
            name: after.threads[command].get(name, 0.0) - before.threads[command].get(name, 0.0)
            for name in after.threads[command]
        }
        for command in after.threads
    }
    switches = {
        command: [
            a - b for a, b in zip(after.switches[command], before.switches[command], strict=True)
        ]
        for command in after.switches
    }
    return {
        "seconds": seconds,
        "jobs": jobs,
        "processes": named,
        "others": dict(others.most_common(12)),
        "unaccounted": busy - accounted,
        "machine_busy": busy,
        "machine_total": after.machine_total - before.machine_total,
        "threads": threads,
        "context_switches": switches,
        "load_before": before.load,
        "load_after": after.load,
    }


def _describe(process: ProcessCpu) -> str:
    words = process.command.split()
    interesting = [w for w in words[:6] if not w.startswith("-")]
    short = " ".join(Path(w).name if "/" in w else w for w in interesting[:3])
    return f"{process.comm}: {short}"[:60] if short else process.comm


def print_cpu(report: dict[str, object]) -> None:
    seconds = float(report["seconds"])  # type: ignore[arg-type]
    jobs = int(report["jobs"])  # type: ignore[call-overload]
    print()
    print(f"CPU during the window ({seconds:.1f} s wall, {jobs} jobs; 100 % = one core)")
    print(f"  {'process':<30} {'user s':>7} {'sys s':>7} {'ms/job':>7} {'%':>5}")
    processes: dict[str, dict[str, float]] = report["processes"]  # type: ignore[assignment]
    for name, used in processes.items():
        total = used["user"] + used["system"]
        print(
            f"  {name:<30} {used['user']:7.2f} {used['system']:7.2f} "
            f"{1000 * total / jobs:7.2f} {100 * total / seconds:5.0f}"
        )
    others: dict[str, float] = report["others"]  # type: ignore[assignment]
    for name, used in others.items():
        if used >= 0.05:
            print(f"  other  {name:<40} {used:6.2f} s {100 * used / seconds:5.0f} %")
    unaccounted = float(report["unaccounted"])  # type: ignore[arg-type]
    print(f"  unaccounted (short-lived processes, kernel threads) {unaccounted:6.2f} s")
    busy, total = float(report["machine_busy"]), float(report["machine_total"])  # type: ignore[arg-type]
    print(
        f"  whole machine {busy:6.1f} s busy of {total:.1f} s "
        f"({100 * busy / seconds:.0f} % of {100 * total / seconds:.0f} %)"
    )
    print(f"  load average before: {report['load_before']}; after: {report['load_after']}")
    threads: dict[str, dict[str, float]] = report["threads"]  # type: ignore[assignment]
    switches: dict[str, list[int]] = report["context_switches"]  # type: ignore[assignment]
    for command, by_name in threads.items():
        shown = ", ".join(
            f"{name} {1000 * cpu / jobs:.2f}"
            for name, cpu in sorted(by_name.items(), key=lambda kv: -kv[1])
            if cpu > 0
        )
        voluntary, involuntary = switches[command]
        print(
            f"  {command} threads (ms/job): {shown}; context switches/job: "
            f"{voluntary / jobs:.1f} voluntary, {involuntary / jobs:.1f} involuntary"
        )


# --- fsyncs (perf) ----------------------------------------------------------------------


@contextlib.contextmanager
def counting_fsyncs(enabled: bool, directory: Path) -> Iterator[dict[str, Counter[int]]]:
    counts: dict[str, Counter[int]] = {}
    if not enabled or shutil.which("perf") is None:
        yield counts
        return
    data = directory / "fsyncs.perf.data"
    recorder = subprocess.Popen(
        [
            "perf",
            "record",
            "-a",
            "-q",
            "-o",
            str(data),
            "-e",
            "syscalls:sys_enter_fsync",
            "-e",
            "syscalls:sys_enter_fdatasync",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # perf needs a moment before it records
    try:
        yield counts
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=30)
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "pid,event"],
            capture_output=True,
            text=True,
        ).stdout
        for line in script.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                counts.setdefault(parts[1].rstrip(":").split(":")[-1], Counter())[
                    int(parts[0])
                ] += 1
        data.unlink(missing_ok=True)


# --- py-spy ------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling(
    enabled: bool, pipeline: pt.Pipeline, out: Path, label: str, rate: int
) -> Iterator[list[Path]]:
    files: list[Path] = []
    if not enabled:
        yield files
        return
    spy = Path(sys.executable).parent / "py-spy"
    recorders = []
    for service in pipeline.services:
        assert service.process is not None
        path = out / f"{label}-{service.command}.pyspy.txt"
        files.append(path)
        recorders.append(
            subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(service.process.pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--threads",
                    "--full-filenames",
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(1.0)
    try:
        yield files
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            recorder.wait(timeout=60)


# --- counters (instrumented_service.py) ----------------------------------------------------


def snapshot_counts(pipeline: pt.Pipeline, directory: Path) -> dict[str, dict[str, list[float]]]:
    result = {}
    for service in pipeline.services:
        assert service.process is not None
        before = set(directory.glob(f"{service.command}-*.json"))
        service.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while True:
            new = set(directory.glob(f"{service.command}-*.json")) - before
            if new:
                result[service.command] = json.loads(max(new).read_text())["counts"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.command} wrote no counter snapshot")
            time.sleep(0.05)
    return result


def counts_report(
    before: dict[str, dict[str, list[float]]], after: dict[str, dict[str, list[float]]], jobs: int
) -> dict[str, list[dict[str, object]]]:
    report: dict[str, list[dict[str, object]]] = {}
    for command, counts in after.items():
        rows = []
        for name, (calls, cpu, wall) in counts.items():
            base = before.get(command, {}).get(name, [0, 0.0, 0.0])
            calls, cpu, wall = calls - base[0], cpu - base[1], wall - base[2]
            if calls:
                rows.append(
                    {
                        "name": name,
                        "per_job": calls / jobs,
                        "cpu_ms_per_job": 1000 * cpu / jobs,
                        "wall_ms_per_call": 1000 * wall / calls,
                    }
                )
        report[command] = sorted(rows, key=lambda row: row["name"])  # type: ignore[arg-type,return-value]
    return report


def print_counts(report: dict[str, list[dict[str, object]]]) -> None:
    for command, rows in report.items():
        print()
        print(f"{command}: calls per job (thread CPU ms per job inside them; wall ms per call)")
        for row in rows:
            print(
                f"  {float(row['per_job']):7.2f}  {float(row['cpu_ms_per_job']):7.3f} ms  "  # type: ignore[arg-type]
                f"{float(row['wall_ms_per_call']):8.3f} ms/call  {row['name']}"  # type: ignore[arg-type]
            )


# --- the run ---------------------------------------------------------------------------------


def run(options: Options) -> dict[str, object]:
    options.out.mkdir(parents=True, exist_ok=True)
    management = Management.connect()
    result: dict[str, object] = {"options": {k: str(v) for k, v in asdict(options).items()}}
    try:
        with (
            code_snapshot(options.commit) as (code, code_env),
            tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp,
            pt.throwaway_vhost(management) as vhost,
            pt.running_stub(Path(tmp), 0.0) as stub,
        ):
            overview = management.client.get("/api/overview").json()
            print("profile of the pipeline's services")
            print(f"  machine  : {machine()}")
            print(f"  code     : {code}")
            print(f"  rabbitmq : {overview.get('rabbitmq_version', '?')}")
            print(
                f"  mode     : {options.mode}; jobs={options.jobs} "
                f"concurrency={options.concurrency} "
                f"warmup={options.warmup} MAILER_CONCURRENCY={options.mailer_concurrency}"
            )
            result.update(code=code, machine=machine())
            pt_options = pt.Options(
                jobs=options.jobs,
                concurrency=options.concurrency,
                mailer_concurrency=options.mailer_concurrency,
                stub_latency_ms=0.0,
                warmup=options.warmup,
                timeout=options.timeout,
                log_level="INFO",
            )
            pipeline = pt.build_pipeline(Path(tmp), url_for_vhost(vhost), stub, pt_options)
            for service in pipeline.services:
                service.env.update(code_env)
            counts_dir = Path(tmp) / "counts"
            if options.mode == "count":
                counts_dir.mkdir()
                pipeline = wrap(
                    pipeline,
                    (
                        sys.executable,
                        str(BENCH / "instrumented_service.py"),
                        "--counts-dir",
                        str(counts_dir),
                    ),
                )
            with pt.running_pipeline(pipeline, management, vhost):
                measure(pipeline, stub, options, counts_dir, result)
    finally:
        management.close()
    return result


def wait_for_read_model(pipeline: pt.Pipeline, sent: int, timeout: float) -> float | None:
    """When the api's read model shows ``sent`` jobs as sent (None if not within ``timeout``).

    Reads the api's SQLite file (its default ``DATABASE_URL``) read-only."""
    path = pipeline.api.cwd / "api-state.sqlite3"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                (count,) = db.execute(
                    "SELECT count(*) FROM api_jobs WHERE status = 'sent'"
                ).fetchone()
        except sqlite3.Error:
            count = 0
        if count >= sent:
            return time.monotonic()
        time.sleep(0.1)
    return None


def measure(
    pipeline: pt.Pipeline,
    stub: pt.MailtrapStub,
    options: Options,
    counts_dir: Path,
    result: dict[str, object],
) -> None:
    api_url = pipeline.api.url
    if options.warmup:
        warm = asyncio.run(pt.submit_all(api_url, options.warmup, options.concurrency))
        pt.wait_for_emails(stub, {s.job_id for s in warm if s.job_id}, options.timeout)
    with (
        counting_fsyncs(options.fsyncs, options.out) as fsyncs,
        profiling(
            options.mode == "pyspy", pipeline, options.out, options.label, options.rate
        ) as files,
    ):
        counts_before = snapshot_counts(pipeline, counts_dir) if options.mode == "count" else {}
        before = sample(pipeline)
        submissions = asyncio.run(pt.submit_all(api_url, options.jobs, options.concurrency))
        job_ids = {s.job_id for s in submissions if s.job_id is not None}
        emails = pt.wait_for_emails(stub, job_ids, options.timeout)
        last_email = time.monotonic()
        # status-service folds EmailSent into the read model after the email went
        # out, and may lag further behind: its CPU per job counts only once it has
        # caught up with every job of the window.
        caught_up = wait_for_read_model(pipeline, options.warmup + len(job_ids), options.timeout)
        result["read_model_lag_s"] = caught_up - last_email if caught_up else None
        after = sample(pipeline)
        counts_after = snapshot_counts(pipeline, counts_dir) if options.mode == "count" else {}
    pt.print_report(submissions, emails)
    accepted = [s for s in submissions if s.status == 202]
    latencies = sorted(s.finished - s.started for s in accepted)
    p50, p99 = pt.percentiles(latencies, (50, 99))
    first_email = {r.job_id: r.received_at for r in sorted(emails, key=lambda r: r.received_at)}
    start = min(s.started for s in submissions)
    result["figures"] = {
        "accepted": len(accepted),
        "accepted_per_s": len(accepted) / (max(s.finished for s in submissions) - start),
        "post_p50_ms": 1000 * p50,
        "post_p99_ms": 1000 * p99,
        "end_to_end_per_s": len(first_email) / (max(first_email.values()) - start)
        if first_email
        else 0,
        "emails": len(emails),
        "missing": sum(1 for s in accepted if s.job_id not in first_email),
        "duplicates": len(emails) - len(first_email),
    }
    lag = result["read_model_lag_s"]
    print(
        "read model caught up "
        + (f"{lag:.2f} s after the last email" if lag is not None else "NOT within the timeout")
    )
    cpu = cpu_report(pipeline, before, after, len(accepted))
    result["cpu"] = cpu
    print_cpu(cpu)
    if fsyncs:
        pids = {s.process.pid: s.command for s in pipeline.services}  # type: ignore[union-attr]
        beam = [pid for pid, p in after.processes.items() if p.comm == "beam.smp"]
        per_process: dict[str, dict[str, float]] = {}
        for syscall, by_pid in fsyncs.items():
            for pid, calls in by_pid.items():
                name = pids.get(pid) or ("rabbitmq (beam.smp)" if pid in beam else "other")
                per_process.setdefault(name, {})
                per_process[name][syscall] = per_process[name].get(syscall, 0) + calls / len(
                    accepted
                )
        result["fsyncs_per_job"] = per_process
        print()
        print("fsync-family syscalls per job (perf, whole window, all threads):")
        for name, calls in per_process.items():
            print(f"  {name:<30} " + ", ".join(f"{k} {v:.2f}" for k, v in calls.items()))
    if options.mode == "count":
        report = counts_report(counts_before, counts_after, len(accepted))
        result["counts"] = report
        print_counts(report)
    if files:
        result["profiles"] = [str(f) for f in files]
        print()
        print("py-spy profiles: " + ", ".join(str(f) for f in files))


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    stop_cleanly_on_signals()
    try:
        result = run(options)
    except KeyboardInterrupt:
        print("\ninterrupted; services stopped and vhost deleted", file=sys.stderr)
        sys.exit(130)
    path = options.out / f"{options.label}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
