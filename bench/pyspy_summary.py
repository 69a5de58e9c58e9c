"""Summarise py-spy raw profiles of the services: where each one's CPU goes, per job.

    python bench/pyspy_summary.py bench/out/pyspy-1.json

reads the run's JSON (written by ``profile_services.py --mode pyspy``) and
its ``*.pyspy.txt`` files (one a service) (py-spy's ``--format raw``: one collapsed
stack per line with its sample count), and prints for each service two
tables, in milliseconds of CPU per job and in percent:

* **by kind of work**: each sample goes to the innermost frame that belongs
  to a known kind (JSON, pydantic, the contract's checks, email_validator,
  SQLAlchemy, the SQLite driver, aio-pika/aiormq/pamqp, uvicorn, ...); frames
  of generic helpers (``re``, ``typing``, ``copy``, ...) belong to their caller;
* **by step of a job**: each sample goes to the innermost frame that names a
  step of the service's own code (parse the request, validate it, build the
  event, publish it, record it, decode a delivery, ack, log, ...).

py-spy counts a thread as active when the kernel says it is runnable, which
on a busy machine includes time spent waiting for a core. Samples whose
innermost frame is a wait (``select``/``epoll``, an idle executor thread
waiting for work) are shown as "waiting (runnable)" and left out of the
shares; the others are scaled to the CPU time ``/proc`` measured for the
service over the same window, so the milliseconds add up to the measured
CPU per job.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    path: str

    @property
    def where(self) -> str:
        """The path from the package on (``sqlalchemy/engine/base.py``)."""
        path = re.sub(r".*/site-packages/", "", self.path)
        path = re.sub(r".*/lib/python3\.\d+/", "stdlib/", path)
        return re.sub(r".*/src/", "", path)


@dataclass(frozen=True, slots=True)
class Stack:
    thread: str
    frames: tuple[Frame, ...]  # outermost first
    samples: int


def read_raw(path: Path) -> list[Stack]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        thread = (
            parts[0].split(": ", 1)[-1].rstrip("0123456789_-")
            if parts[0].startswith("thread")
            else ""
        )
        frames = []
        for part in parts[1:] if thread or parts[0].startswith("thread") else parts:
            match = _FRAME.match(part)
            if match:
                frames.append(Frame(match["function"], match["path"]))
            else:
                frames.append(Frame(part, ""))
        stacks.append(Stack(thread, tuple(frames), int(count)))
    return stacks


# --- kinds of work (innermost match wins) ---------------------------------------------

# Innermost frames that mean "waiting", not working: the thread was runnable
# (or just woken) with its stack at a wait.
_WAITS = (
    ("stdlib/selectors.py", "select"),
    ("stdlib/concurrent/futures/thread.py", "_worker"),
    ("mailer_service/blocking_pool.py", "_serve"),
    ("stdlib/threading.py", "wait"),
    ("stdlib/queue.py", "get"),
)

# Generic helpers: their time belongs to the caller's kind.
_NEUTRAL = re.compile(
    r"^stdlib/(re|sre_\w+|typing|enum|functools|abc|copy|copyreg|dataclasses|contextlib|"
    r"weakref|_weakrefset|types|operator|collections/__init__|uuid|datetime|<frozen)"
    r"|^<frozen|^<string>"
)

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("logging", re.compile(r"^stdlib/logging/|pipeline_shared/logs\.py")),
    ("JSON (stdlib json)", re.compile(r"^stdlib/json/")),
    ("contract checks (pipeline_shared.contract)", re.compile(r"pipeline_shared/contract\.py")),
    ("email_validator / idna (address checks)", re.compile(r"^email_validator/|^idna/")),
    (
        "pydantic (validate, dump)",
        re.compile(r"^pydantic/|^pydantic_core/|pipeline_shared/events\.py"),
    ),
    (
        "SQLite driver (C: statements, COMMIT, fsync)",
        re.compile(r"^sqlalchemy/engine/default\.py:(DefaultDialect\.)?do_"),
    ),
    ("SQLAlchemy (Python: compile, execute, pool)", re.compile(r"^sqlalchemy/")),
    (
        "read model / ledger code (Python)",
        re.compile(
            r"api_service/(store|read_model|recorder|following|status_service)\.py"
            r"|mailer_service/ledger\.py"
        ),
    ),
    (
        "AMQP client (aio-pika, aiormq, pamqp)",
        re.compile(r"^(aio_pika|aiormq|pamqp)/|pipeline_shared/messaging\.py"),
    ),
    (
        "HTTP server (uvicorn protocol, httptools)",
        re.compile(r"^uvicorn/protocols/|^httptools/|api_service/http_protocol\.py"),
    ),
    ("ASGI framework (starlette, fastapi)", re.compile(r"^(starlette|fastapi|anyio)/")),
    ("api request code (routes, auth, limits)", re.compile(r"^api_service/")),
    (
        "HTTPS client (requests, urllib3, ssl, http.client, mailtrap SDK)",
        re.compile(
            r"^(requests|urllib3|mailtrap|certifi|charset_normalizer)/|^stdlib/(ssl|http/|email/|socket)"
        ),
    ),
    ("email composition (compose, mime)", re.compile(r"^mailer_service/(compose|mime)\.py")),
    ("processing step", re.compile(r"^processor_service/steps\.py|^stdlib/statistics\.py")),
    (
        "thread handoff (executors, to_thread, daemon pool)",
        re.compile(
            r"^stdlib/(concurrent/|threading\.py|queue\.py)|mailer_service/blocking_pool\.py|^stdlib/asyncio/threads\.py"
        ),
    ),
    (
        "event loop (asyncio, uvloop; C code under Runner.run)",
        re.compile(r"^stdlib/asyncio/|^uvloop/"),
    ),
    (
        "service code (handlers, worker)",
        re.compile(r"^(mailer_service|processor_service|pipeline_shared)/"),
    ),
)

WAITING = "waiting (runnable; left out)"


def is_wait(frame: Frame) -> bool:
    return any(frame.where == path and frame.function.endswith(name) for path, name in _WAITS)


def kind_of(stack: Stack) -> str:
    if stack.frames and is_wait(stack.frames[-1]):
        return WAITING
    for frame in reversed(stack.frames):
        where = f"{frame.where}:{frame.function}"
        if _NEUTRAL.match(frame.where):
            continue
        for name, pattern in KINDS:
            if pattern.search(where):
                return name
    return "other"


# --- steps of a job (first rule that matches any frame wins) ------------------------------

# (step, path contains, function starts with, the next frame inward starts with)
STEPS: tuple[tuple[str, str, str, str], ...] = (
    ("logging (format, mask, write)", "stdlib/logging/", "", ""),
    ("logging (format, mask, write)", "pipeline_shared/logs.py", "", ""),
    (
        "publish: encode event, basic_publish, await confirm",
        "pipeline_shared/messaging/broker.py",
        "Broker.publish",
        "",
    ),
    (
        "publish: encode event, basic_publish, await confirm",
        "pipeline_shared/messaging/broker.py",
        "Broker._publish",
        "",
    ),
    (
        "delivery: decode event (pydantic validate_json)",
        "pipeline_shared/messaging/wire.py",
        "decode_event",
        "",
    ),
    (
        "read model: JobStore._record in a thread (SQL + fold)",
        "api_service/store.py",
        "JobStore._record",
        "",
    ),
    ("mailer: ledger claim in a thread (SQL)", "mailer_service/ledger.py", "SqlLedger._claim", ""),
    (
        "mailer: ledger mark_sent in a thread (SQL)",
        "mailer_service/ledger.py",
        "SqlLedger._mark_sent",
        "",
    ),
    (
        "mailer: SDK send over HTTPS in a thread",
        "mailer_service/mailtrap_transport.py",
        "MailtrapTransport._send_blocking",
        "",
    ),
    ("mailer: compose the email (json.dumps x4)", "mailer_service/compose.py", "", ""),
    ("mailer: SDK Mail model, pool hop", "mailer_service/mailtrap_transport.py", "", ""),
    (
        "mailer: build EmailSent (validation)",
        "mailer_service/handlers.py",
        "SendEmail._publish_sent",
        "",
    ),
    ("mailer: ledger calls, async side (to_thread)", "mailer_service/ledger.py", "", ""),
    (
        "processor: the step itself (steps.py; inline for small jobs)",
        "processor_service/steps.py",
        "",
        "",
    ),
    (
        "processor: deepcopy of the data",
        "processor_service/handlers.py",
        "ProcessJob.__call__",
        "deepcopy",
    ),
    (
        "processor: build DataProcessed (validation)",
        "processor_service/handlers.py",
        "ProcessJob.__call__",
        "BaseModel.__init__",
    ),
    (
        "processor: build DataProcessed (validation)",
        "processor_service/handlers.py",
        "ProcessJob.__call__",
        "BaseModel.model_validate",
    ),
    (
        "processor: dump DataProcessed for the size check",
        "processor_service/handlers.py",
        "ProcessJob.__call__",
        "BaseModel.model_dump_json",
    ),
    (
        # The step runs inline for small jobs (steps.py, INLINE_MAX_BYTES); for larger
        # ones this is handing it to a thread and back.
        "processor: the step and its handling, other",
        "processor_service/handlers.py",
        "ProcessJob.__call__",
        "",
    ),
    ("api: parse the JSON body (strict_json)", "api_service/strict_json.py", "parse_json_body", ""),
    (
        "api: validate the request (JobRequest: contract, address)",
        "fastapi/dependencies/utils.py",
        "request_body_to_args",
        "",
    ),
    (
        "api: validate the request (JobRequest: contract, address)",
        "fastapi/_compat/v2.py",
        "ModelField.validate",
        "",
    ),
    ("api: serialise the answer (JobAccepted)", "fastapi/routing.py", "serialize_response", ""),
    (
        "api: build JobRequested (validation)",
        "api_service/intake.py",
        "JobIntake.accept",
        "BaseModel.__init__",
    ),
    ("api: intake, other (uuid, store.record hop)", "api_service/intake.py", "", ""),
    ("api: read model, async side (to_thread)", "api_service/store.py", "", ""),
    ("api: strict route checks (auth, media type, params)", "api_service/strict_route.py", "", ""),
    ("api: body size/time limit middleware", "api_service/body_limit.py", "", ""),
    (
        "delivery: handler, other",
        "pipeline_shared/messaging/handling.py",
        "EventHandling._run_handler",
        "",
    ),
    (
        # The span, the policy, retry and dead-letter copies, the report after the ack.
        "delivery: an event's outcome (span, copies, report)",
        "pipeline_shared/messaging/handling.py",
        "",
        "",
    ),
    (
        "delivery: settle (ack), timing",
        "pipeline_shared/messaging/consumer.py",
        "Consumer._handle",
        "",
    ),
    (
        "delivery: task per message (_on_message)",
        "pipeline_shared/messaging/consumer.py",
        "Consumer._on_message",
        "",
    ),
    ("AMQP: aiormq frames in and out", "aiormq/", "", ""),
    ("AMQP: aio-pika", "aio_pika/", "", ""),
    ("AMQP: pamqp", "pamqp/", "", ""),
    ("api: FastAPI/Starlette routing, dependencies, response", "fastapi/", "", ""),
    ("api: FastAPI/Starlette routing, dependencies, response", "starlette/", "", ""),
    # Only the protocol: uvicorn's server frames sit under every stack of the loop.
    ("api: uvicorn HTTP protocol (httptools)", "uvicorn/protocols/", "", ""),
    ("thread pool plumbing", "stdlib/concurrent/futures/", "", ""),
    ("thread pool plumbing", "mailer_service/blocking_pool.py", "", ""),
)


def step_of(stack: Stack) -> str:
    if stack.frames and is_wait(stack.frames[-1]):
        return WAITING
    for name, path, function, callee in STEPS:
        for index, frame in enumerate(stack.frames):
            if path in frame.where and frame.function.startswith(function):
                if callee:
                    inner = stack.frames[index + 1 :]
                    if not inner or (
                        not inner[0].function.split(".")[-1].startswith(callee.split(".")[-1])
                        and not inner[0].function.startswith(callee)
                    ):
                        continue
                return name
    return "event loop (asyncio/uvloop) and other"


# --- reporting ------------------------------------------------------------------------------


def shares(stacks: Iterable[Stack], classify: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for stack in stacks:
        counts[classify(stack)] += stack.samples  # type: ignore[operator]
    return counts


def table(title: str, counts: Counter[str], cpu_ms_per_job: float, top: int) -> list[str]:
    working = sum(v for k, v in counts.items() if k != WAITING)
    lines = [f"  {title}", f"  {'':4}{'ms/job':>8} {'%':>6}  what"]
    for name, samples in counts.most_common():
        if name == WAITING:
            continue
        share = samples / working
        lines.append(f"  {'':4}{cpu_ms_per_job * share:8.2f} {100 * share:6.1f}  {name}")
        if len(lines) - 2 >= top:
            break
    waiting = counts.get(WAITING, 0)
    lines.append(
        f"  {'':4}({working} working samples; {waiting} more at a wait, "
        f"{100 * waiting / max(1, working + waiting):.0f} % of all)"
    )
    return lines


def summarise(run: dict[str, object], top: int) -> str:
    cpu = run["cpu"]  # type: ignore[index]
    jobs = cpu["jobs"]  # type: ignore[index]
    out = [f"code {run.get('code')}, {jobs} jobs, window {cpu['seconds']:.1f} s"]  # type: ignore[index]
    for path in run.get("profiles", []):  # type: ignore[union-attr]
        path = Path(path)
        service = next(
            name for name in cpu["processes"] if path.name.endswith(f"-{name}.pyspy.txt")
        )  # type: ignore[index]
        used = cpu["processes"][service]  # type: ignore[index]
        ms = 1000 * (used["user"] + used["system"]) / jobs
        stacks = read_raw(path)
        out.append("")
        out.append(
            f"{service}: {ms:.2f} ms CPU per job (/proc), {sum(s.samples for s in stacks)} samples"
        )
        out += table("by kind of work", shares(stacks, kind_of), ms, top)
        out += table("by step of a job", shares(stacks, step_of), ms, top)
        threads: Counter[str] = Counter()
        for stack in stacks:
            if not (stack.frames and is_wait(stack.frames[-1])):
                threads[stack.thread] += stack.samples
        total = sum(threads.values())
        out.append(
            "  by thread: "
            + ", ".join(f"{t} {100 * n / total:.0f} %" for t, n in threads.most_common())
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the JSON a --mode pyspy run wrote")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args(argv)
    print(summarise(json.loads(args.run.read_text()), args.top))


if __name__ == "__main__":
    main()
