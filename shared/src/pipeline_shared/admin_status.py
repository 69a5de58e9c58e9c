"""pipeline-admin status: every stage's queues at a glance.

    pipeline-admin status                  # one table
    pipeline-admin status --watch          # redrawn every 2 s until Ctrl-C
    pipeline-admin status --json           # one JSON object, for scripts

For each stage it shows the work queue's depth (ready, unacknowledged), its
consumers and its publish, deliver and ack rates, the messages waiting in the
stage's retry queues and those in its dead-letter queue. The figures come from
the RabbitMQ management HTTP API, which refreshes them every statistics
interval (5 s by default), so they trail the broker by up to that long.

The module has a pure core (``stage_statuses`` turns the API's queue list into
one ``StageStatus`` per stage; ``render_table`` and ``as_json`` present them),
one edge that speaks HTTP (``ManagementApi``, which turns every failure into a
``StatusError`` of one line, with no password in it) and ``run``, which wires
them to the settings and the command line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pipeline_shared.messaging import vhost_of
from pipeline_shared.settings import AdminSettings
from pipeline_shared.topology import STAGES, Stage

DEFAULT_INTERVAL = 2.0
REQUEST_TIMEOUT_SECONDS = 10.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
# Only the fields the status uses: a broker with many queues answers faster.
_COLUMNS = ",".join(
    (
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        "message_stats.publish_details.rate",
        "message_stats.deliver_get_details.rate",
        "message_stats.ack_details.rate",
    )
)


class StatusError(Exception):
    """A problem to report in one line, with exit code 1."""


# --- the management API's answer, checked once where it enters ---------------


class _Rate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    rate: float = 0.0


class _MessageStats(BaseModel):
    # A queue with no traffic yet has no message_stats, or only some of them.
    model_config = ConfigDict(frozen=True, extra="ignore")
    publish_details: _Rate = _Rate()
    deliver_get_details: _Rate = _Rate()
    ack_details: _Rate = _Rate()


class QueueRecord(BaseModel):
    """One queue as ``GET /api/queues/{vhost}`` describes it. Figures the broker
    has not sampled yet (a queue declared a moment ago) count as zero."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    name: str
    messages_ready: int = 0
    messages_unacknowledged: int = 0
    consumers: int = 0
    message_stats: _MessageStats = _MessageStats()

    @property
    def messages(self) -> int:
        return self.messages_ready + self.messages_unacknowledged


_QUEUE_LIST = TypeAdapter(list[QueueRecord])


def parse_queues(body: bytes) -> list[QueueRecord]:
    """The queue list in a management API answer; ``ValueError`` if it is not one."""
    try:
        return _QUEUE_LIST.validate_json(body)
    except ValidationError as exc:
        raise ValueError(f"not a queue list ({exc.error_count()} problem(s))") from None


# --- the pure core ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkQueueFigures:
    """A stage's work queue: depth, consumers and rates (messages per second)."""

    ready: int
    unacked: int
    consumers: int
    publish_rate: float
    deliver_rate: float
    ack_rate: float


@dataclass(frozen=True, slots=True)
class StageStatus:
    """One row of the status: a stage and what waits in its queues."""

    stage: str
    queue: str
    dead_letter_queue: str
    work: WorkQueueFigures | None
    """None when the work queue does not exist (no service has declared it)."""
    retry_queues: tuple[tuple[str, int], ...]
    """Each retry queue of the stage and the messages waiting out its delay."""
    dead_letters: int | None
    """Messages in the dead-letter queue; None when it does not exist."""

    @property
    def retrying(self) -> int:
        return sum(count for _, count in self.retry_queues)

    @property
    def missing(self) -> list[str]:
        """The stage's queues that do not exist."""
        absent = [] if self.work is not None else [self.queue]
        return absent if self.dead_letters is not None else [*absent, self.dead_letter_queue]


def stage_statuses(
    queues: Iterable[QueueRecord], stages: Iterable[Stage] = tuple(STAGES.values())
) -> list[StageStatus]:
    """One ``StageStatus`` per stage, from the vhost's queues.

    A stage's retry queues are found by name (``<queue>.retry.<delay>``), not
    from ``RETRY_DELAYS``: a queue left over from other delays still holds
    messages that will come back.
    """
    by_name = {queue.name: queue for queue in queues}
    statuses = []
    for stage in stages:
        work = by_name.get(stage.queue)
        dead = by_name.get(stage.dead_letter_queue)
        statuses.append(
            StageStatus(
                stage=stage.name,
                queue=stage.queue,
                dead_letter_queue=stage.dead_letter_queue,
                work=None if work is None else _work_figures(work),
                retry_queues=_retry_queues(stage, by_name),
                dead_letters=None if dead is None else dead.messages,
            )
        )
    return statuses


def _retry_queues(stage: Stage, by_name: Mapping[str, QueueRecord]) -> tuple[tuple[str, int], ...]:
    """The stage's retry queues and their messages, the shortest delay first."""
    prefix = f"{stage.queue}.retry."
    names = [name for name in by_name if name.startswith(prefix)]
    names.sort(key=lambda name: _delay_seconds(name.removeprefix(prefix)))
    return tuple((name, by_name[name].messages) for name in names)


def _delay_seconds(suffix: str) -> float:
    """``5s`` -> 5.0, ``250ms`` -> 0.25 (``format_delay`` read back); others sort last."""
    try:
        if suffix.endswith("ms"):
            return float(suffix.removesuffix("ms")) / 1000
        return float(suffix.removesuffix("s"))
    except ValueError:
        return float("inf")


def _work_figures(queue: QueueRecord) -> WorkQueueFigures:
    stats = queue.message_stats
    return WorkQueueFigures(
        ready=queue.messages_ready,
        unacked=queue.messages_unacknowledged,
        consumers=queue.consumers,
        publish_rate=stats.publish_details.rate,
        deliver_rate=stats.deliver_get_details.rate,
        ack_rate=stats.ack_details.rate,
    )


def as_json(vhost: str, statuses: Sequence[StageStatus]) -> dict[str, Any]:
    """The status as a JSON-ready object; figures of a missing queue are null."""
    stages = []
    for status in statuses:
        work = status.work
        stages.append(
            {
                "stage": status.stage,
                "queue": status.queue,
                "exists": work is not None,
                "ready": None if work is None else work.ready,
                "unacked": None if work is None else work.unacked,
                "consumers": None if work is None else work.consumers,
                "publish_rate": None if work is None else work.publish_rate,
                "deliver_rate": None if work is None else work.deliver_rate,
                "ack_rate": None if work is None else work.ack_rate,
                "retrying": status.retrying,
                "retry_queues": dict(status.retry_queues),
                "dead_letter_queue": status.dead_letter_queue,
                "dead_letters": status.dead_letters,
            }
        )
    return {"vhost": vhost, "stages": stages}


_HEADINGS = (
    "stage",
    "queue",
    "ready",
    "unacked",
    "consumers",
    "publish/s",
    "deliver/s",
    "ack/s",
    "retrying",
    "dead",
)


def render_table(vhost: str, statuses: Sequence[StageStatus]) -> str:
    """The status as an aligned text table, with a line naming any missing queue."""
    rows = [_HEADINGS, *(_cells(status) for status in statuses)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADINGS))]
    lines = [f"vhost {vhost}: messages, and rates in messages per second"]
    for row in rows:
        # Names read left-aligned, figures right-aligned.
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    missing = [name for status in statuses for name in status.missing]
    if statuses and all(len(status.missing) == 2 for status in statuses):
        lines.append("no stage's queues exist in this vhost: has any service started here?")
    elif missing:
        lines.append(f"missing: {', '.join(missing)} (has every service started here?)")
    return "\n".join(lines)


def _cells(status: StageStatus) -> tuple[str, ...]:
    work = status.work
    figures = (
        ("-",) * 6
        if work is None
        else (
            str(work.ready),
            str(work.unacked),
            str(work.consumers),
            _rate(work.publish_rate),
            _rate(work.deliver_rate),
            _rate(work.ack_rate),
        )
    )
    dead = "-" if status.dead_letters is None else str(status.dead_letters)
    return (status.stage, status.queue, *figures, str(status.retrying), dead)


def _rate(rate: float) -> str:
    return f"{rate:.2f}" if rate < 100 else f"{rate:.0f}"


# --- the edge: the management HTTP API ----------------------------------------


@dataclass(frozen=True, slots=True)
class ManagementTarget:
    """Where the management API is and who asks it; the password stays out of ``url``."""

    url: str
    user: str
    password: str
    vhost: str


def management_target(settings: AdminSettings) -> ManagementTarget:
    """The management API of the settings' broker.

    Its URL is ``RABBITMQ_MANAGEMENT_URL``, else the broker's host on the
    management plugin's default port (15672, or 15671 with TLS for
    ``amqps://``). The credentials are those in ``RABBITMQ_MANAGEMENT_URL``,
    else those in ``RABBITMQ_URL``, else RabbitMQ's default ``guest``.
    """
    broker = urlsplit(settings.rabbitmq_url)
    if settings.rabbitmq_management_url is not None:
        given = urlsplit(settings.rabbitmq_management_url)
    else:
        scheme, port = ("https", 15671) if broker.scheme == "amqps" else ("http", 15672)
        host = broker.hostname or "localhost"
        given = urlsplit(f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}")
    credentials = given if given.username is not None else broker
    return ManagementTarget(
        url=urlunsplit(given._replace(netloc=given.netloc.rpartition("@")[2])).rstrip("/"),
        user=_decoded(credentials.username),
        password=_decoded(credentials.password),
        vhost=vhost_of(settings.rabbitmq_url),
    )


def _decoded(credential: str | None) -> str:
    # RabbitMQ's clients, aio-pika among them, fall back to guest for each missing half.
    return "guest" if credential is None else unquote(credential)


class ManagementApi:
    """Reads the vhost's queues from the management API.

    Every failure becomes a ``StatusError`` that says what to check, in one
    line. The password travels only in the request's header, and any secret
    is scrubbed from the words of the broker and of the HTTP library that
    the line quotes.
    """

    def __init__(
        self,
        target: ManagementTarget,
        *,
        secrets: Sequence[str] = (),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._target = target
        self._secrets = sorted({target.password, *secrets} - {""}, key=len, reverse=True)
        self._client = httpx.Client(
            base_url=target.url,
            auth=(target.user, target.password),
            timeout=REQUEST_TIMEOUT_SECONDS,
            transport=transport,
        )

    def __enter__(self) -> ManagementApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def queues(self) -> list[QueueRecord]:
        """Every queue of the vhost, as the broker last sampled it."""
        path = f"/api/queues/{quote(self._target.vhost, safe='')}"
        response = self._get(path, params={"columns": _COLUMNS})
        if response.status_code == 404:
            raise StatusError(self._not_found())
        self._check(response, path)
        try:
            return parse_queues(response.content)
        except ValueError as exc:
            raise StatusError(
                f"the management API at {self._target.url} answered GET {path} "
                f"with something other than a queue list: {exc}"
            ) from None

    def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            return self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise StatusError(
                f"cannot reach the RabbitMQ management API at {self._target.url}: "
                f"{self._scrub(str(exc) or type(exc).__name__)} (is the rabbitmq_management "
                "plugin enabled? RABBITMQ_MANAGEMENT_URL says where it listens)"
            ) from None

    def _check(self, response: httpx.Response, path: str) -> None:
        if response.status_code in (401, 403):
            raise StatusError(
                f"the management API at {self._target.url} refused user {self._target.user!r} "
                f"({response.status_code}: {self._reason(response)}): check its password, "
                "that it has the monitoring, management or administrator tag, and its "
                f"permissions on vhost {self._target.vhost!r}"
            )
        if response.is_error:
            raise StatusError(
                f"the management API at {self._target.url} answered GET {path} with "
                f"{response.status_code}: {self._reason(response)}"
            )

    def _not_found(self) -> str:
        # A missing vhost and a URL that is no management API both answer 404;
        # the overview tells them apart.
        overview = self._get("/api/overview")
        if overview.status_code in (401, 403):
            self._check(overview, "/api/overview")
        if overview.is_error or "management_version" not in overview.text:
            return (
                f"{self._target.url} is not a RabbitMQ management API (set "
                "RABBITMQ_MANAGEMENT_URL to where the rabbitmq_management plugin listens)"
            )
        return (
            f"vhost {self._target.vhost!r} (from RABBITMQ_URL) does not exist on the broker "
            f"at {self._target.url}"
        )

    def _reason(self, response: httpx.Response) -> str:
        """The broker's own words for a refusal (``{"error": ..., "reason": ...}``)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("reason"), str):
            return self._scrub(str(body["reason"]))
        return response.reason_phrase or "no reason given"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# --- the command ----------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of ``pipeline-admin status``."""
    parser.add_argument("--json", action="store_true", help="print a JSON object, for scripts")
    parser.add_argument(
        "--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C"
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=DEFAULT_INTERVAL,
        help=f"seconds between redraws with --watch (default {DEFAULT_INTERVAL:g})",
    )


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def run(args: argparse.Namespace, settings: AdminSettings, out: TextIO) -> int:
    """``pipeline-admin status``: the exit code, or a ``StatusError``."""
    target = management_target(settings)
    with ManagementApi(target, secrets=settings.secret_values()) as api:

        def fetch() -> list[StageStatus]:
            return stage_statuses(api.queues())

        if args.watch:
            return watch(fetch, target.vhost, args.interval, out, as_json_lines=args.json)
        try:
            statuses = fetch()
        except KeyboardInterrupt:
            return 130
        if args.json:
            print(json.dumps(as_json(target.vhost, statuses), indent=2), file=out)
        else:
            print(render_table(target.vhost, statuses), file=out)
        return 0


def watch(
    fetch: Callable[[], list[StageStatus]],
    vhost: str,
    interval: float,
    out: TextIO,
    *,
    as_json_lines: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = lambda: datetime.now().astimezone(),
) -> int:
    """Draw the status every ``interval`` seconds until Ctrl-C, then return 0.

    A failure of the first fetch is raised: it is most likely the
    configuration. Later failures (the broker restarting) are shown in place
    of the table, and the watch goes on. With ``as_json_lines`` each drawing is
    one line of JSON, with ``"error"`` in place of the stages after a failure.
    """
    try:
        result: list[StageStatus] | StatusError = fetch()
        while True:
            _draw(result, vhost, interval, out, as_json_lines, now())
            sleep(interval)
            try:
                result = fetch()
            except StatusError as exc:
                result = exc
    except KeyboardInterrupt:
        if not as_json_lines and out.isatty():
            print(file=out)
        return 0


def _draw(
    result: list[StageStatus] | StatusError,
    vhost: str,
    interval: float,
    out: TextIO,
    as_json_lines: bool,
    at: datetime,
) -> None:
    if as_json_lines:
        shown = (
            {"vhost": vhost, "error": str(result)}
            if isinstance(result, StatusError)
            else as_json(vhost, result)
        )
        print(json.dumps({"at": at.isoformat(timespec="seconds"), **shown}), file=out, flush=True)
        return
    body = (
        f"vhost {vhost}: {result}"
        if isinstance(result, StatusError)
        else render_table(vhost, result)
    )
    screen = _CLEAR_SCREEN if out.isatty() else ""
    header = f"{at:%H:%M:%S}, every {interval:g} s (Ctrl-C stops)"
    print(f"{screen}{header}\n{body}\n", file=out, flush=True)
