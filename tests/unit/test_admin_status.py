"""pipeline-admin status: the management API's queue list turned into rows, their
table and JSON, where the API is, how each failure reads, and the watch loop."""

from __future__ import annotations

import io
import json
from base64 import b64encode
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline_shared.admin import build_parser
from pipeline_shared.admin_status import (
    ManagementApi,
    ManagementTarget,
    StageStatus,
    StatusError,
    as_json,
    management_target,
    parse_queues,
    render_table,
    stage_statuses,
    watch,
)
from pipeline_shared.settings import AdminSettings


@pytest.fixture(autouse=True)
def no_settings_from_outside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The settings tests see only what they set."""
    for name in ("RABBITMQ_URL", "RABBITMQ_MANAGEMENT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def queue(name: str, ready: int = 0, unacked: int = 0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "messages_ready": ready, "messages_unacknowledged": unacked, **extra}


def rates(publish: float, deliver: float, ack: float) -> dict[str, Any]:
    return {
        "publish_details": {"rate": publish},
        "deliver_get_details": {"rate": deliver},
        "ack_details": {"rate": ack},
    }


A_VHOST = [
    queue("processor.job.requested", 7, 2, consumers=3, message_stats=rates(4.5, 4.25, 4.0)),
    queue("processor.job.requested.retry.120s"),
    queue("processor.job.requested.retry.1s", 1),
    queue("processor.job.requested.retry.250ms"),
    queue("processor.job.requested.retry.30s", 2, 1),
    queue("processor.job.requested.dlq", 4, 1),
    queue("mailer.data.processed"),
    queue("mailer.data.processed.dlq"),
    queue("api.job.status", consumers=1),
    queue("api.job.status.dlq"),
    queue("someone.elses.queue", 99),
]


def statuses(queues: list[dict[str, Any]] = A_VHOST) -> list[StageStatus]:
    return stage_statuses(parse_queues(json.dumps(queues).encode()))


def by_stage(rows: list[StageStatus]) -> dict[str, StageStatus]:
    return {row.stage: row for row in rows}


# --- rows ---------------------------------------------------------------------


def test_each_stage_gets_one_row_in_pipeline_order() -> None:
    assert [row.stage for row in statuses()] == ["processor", "mailer", "status"]


def test_a_row_holds_the_work_queue_depth_consumers_and_rates() -> None:
    work = by_stage(statuses())["processor"].work

    assert work is not None
    assert (work.ready, work.unacked, work.consumers) == (7, 2, 3)
    assert (work.publish_rate, work.deliver_rate, work.ack_rate) == (4.5, 4.25, 4.0)


def test_retrying_adds_up_every_retry_queue_of_the_stage_shortest_delay_first() -> None:
    row = by_stage(statuses())["processor"]

    assert row.retrying == 4
    assert row.retry_queues == (
        ("processor.job.requested.retry.250ms", 0),
        ("processor.job.requested.retry.1s", 1),
        ("processor.job.requested.retry.30s", 3),
        ("processor.job.requested.retry.120s", 0),
    )


def test_dead_letters_count_ready_and_unacked_messages_of_the_dlq() -> None:
    assert by_stage(statuses())["processor"].dead_letters == 5


def test_queues_of_no_stage_are_ignored() -> None:
    rows = statuses()
    assert all("someone" not in name for row in rows for name, _ in row.retry_queues)
    assert sum(row.work.ready for row in rows if row.work) == 7


def test_a_queue_the_broker_has_not_sampled_yet_counts_as_empty_and_idle() -> None:
    work = by_stage(statuses([{"name": "mailer.data.processed"}]))["mailer"].work

    assert work is not None
    assert (work.ready, work.unacked, work.consumers, work.publish_rate) == (0, 0, 0, 0.0)


def test_missing_queues_have_no_figures_and_are_named() -> None:
    row = by_stage(statuses([queue("mailer.data.processed")]))["mailer"]

    assert row.dead_letters is None
    assert row.missing == ["mailer.data.processed.dlq"]
    assert by_stage(statuses([]))["status"].missing == ["api.job.status", "api.job.status.dlq"]


@pytest.mark.parametrize("body", [b"not json", b'{"name": "x"}', b'[{"messages_ready": 1}]'])
def test_an_answer_that_is_not_a_queue_list_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="not a queue list"):
        parse_queues(body)


# --- the table and the JSON ---------------------------------------------------


def test_the_table_aligns_one_line_per_stage_under_its_headings() -> None:
    lines = render_table("/", statuses()).splitlines()

    assert lines[0] == "vhost /: messages, and rates in messages per second"
    assert lines[1].split() == [
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
    ]
    assert lines[2].split() == [
        "processor",
        "processor.job.requested",
        "7",
        "2",
        "3",
        "4.50",
        "4.25",
        "4.00",
        "4",
        "5",
    ]
    assert len(lines) == 5
    assert len({len(line) for line in lines[1:]}) == 1, "columns are aligned"


def test_the_table_shows_dashes_for_a_missing_queue_and_names_it() -> None:
    lines = render_table("/", statuses([queue("processor.job.requested")])).splitlines()

    mailer = next(line for line in lines if line.startswith("mailer"))
    assert mailer.split()[2:8] == ["-"] * 6
    assert lines[-1].startswith("missing: processor.job.requested.dlq, mailer.data.processed,")


def test_the_table_of_an_empty_vhost_says_that_no_service_has_started() -> None:
    assert "has any service started here?" in render_table("/", statuses([]))


def test_the_json_gives_every_figure_by_name_and_null_for_missing_queues() -> None:
    shown = as_json("jobs", statuses(A_VHOST[:6]))

    assert shown["vhost"] == "jobs"
    processor, mailer, _ = shown["stages"]
    assert processor == {
        "stage": "processor",
        "queue": "processor.job.requested",
        "exists": True,
        "ready": 7,
        "unacked": 2,
        "consumers": 3,
        "publish_rate": 4.5,
        "deliver_rate": 4.25,
        "ack_rate": 4.0,
        "retrying": 4,
        "retry_queues": {
            "processor.job.requested.retry.250ms": 0,
            "processor.job.requested.retry.1s": 1,
            "processor.job.requested.retry.30s": 3,
            "processor.job.requested.retry.120s": 0,
        },
        "dead_letter_queue": "processor.job.requested.dlq",
        "dead_letters": 5,
    }
    assert mailer["exists"] is False
    assert mailer["ready"] is None
    assert mailer["dead_letters"] is None
    json.dumps(shown)


# --- where the management API is, and as whom ---------------------------------


def target(rabbitmq_url: str, rabbitmq_management_url: str | None = None) -> ManagementTarget:
    settings = AdminSettings(
        _env_file=None,
        rabbitmq_url=rabbitmq_url,
        rabbitmq_management_url=rabbitmq_management_url,
    )
    return management_target(settings)


def test_by_default_the_api_is_on_the_brokers_host_at_port_15672_with_its_credentials() -> None:
    found = target(rabbitmq_url="amqp://ops:p%40ss@rabbit.internal:5672/jobs%2Fa")

    assert found == ManagementTarget(
        url="http://rabbit.internal:15672", user="ops", password="p@ss", vhost="jobs/a"
    )


def test_an_amqps_broker_means_https_on_port_15671() -> None:
    assert target(rabbitmq_url="amqps://u:p@rabbit/").url == "https://rabbit:15671"


def test_an_ipv6_broker_host_keeps_its_brackets() -> None:
    assert target(rabbitmq_url="amqp://u:p@[::1]:5672/").url == "http://[::1]:15672"


def test_a_url_without_credentials_or_vhost_means_guest_on_the_default_vhost() -> None:
    found = target(rabbitmq_url="amqp://rabbit")

    assert (found.user, found.password, found.vhost) == ("guest", "guest", "/")


def test_rabbitmq_management_url_wins_and_its_credentials_stay_out_of_the_url() -> None:
    found = target(
        rabbitmq_url="amqp://ops:amqp-pass@rabbit/",
        rabbitmq_management_url="https://watcher:w%3Atch@proxy.example/rabbitmq/",
    )

    assert found.url == "https://proxy.example/rabbitmq"
    assert (found.user, found.password) == ("watcher", "w:tch")


def test_the_management_urls_password_is_a_secret_for_the_logs() -> None:
    settings = AdminSettings(
        _env_file=None,
        rabbitmq_url="amqp://ops:amqp-pass@rabbit/",
        rabbitmq_management_url="http://watcher:http-pass@rabbit:15672",
    )

    assert {"amqp-pass", "http-pass"} <= set(settings.secret_values())


@pytest.mark.parametrize("url", ["rabbit:15672", "ftp://rabbit/", "http://", "http://r:99999"])
def test_a_management_url_that_is_not_http_with_a_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="rabbitmq_management_url"):
        AdminSettings(_env_file=None, rabbitmq_management_url=url)


# --- how the management API's answers and failures read -----------------------

TARGET = ManagementTarget(url="http://rabbit:15672", user="ops", password="s3cret-pw", vhost="/")
OVERVIEW = {"management_version": "3.13.7", "rabbitmq_version": "3.13.7"}


def failure(handler: Callable[[httpx.Request], httpx.Response]) -> str:
    with (
        ManagementApi(TARGET, transport=httpx.MockTransport(handler)) as client,
        pytest.raises(StatusError) as caught,
    ):
        client.queues()
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret-pw" not in message
    return message


def test_the_queues_are_asked_of_the_vhost_quoted_with_credentials_and_few_columns() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[queue("processor.job.requested", 3)])

    with ManagementApi(TARGET, transport=httpx.MockTransport(answer)) as client:
        (record,) = client.queues()

    assert record.messages_ready == 3
    (request,) = seen
    assert request.url.raw_path.startswith(b"/api/queues/%2F?")
    assert "message_stats.ack_details.rate" in request.url.params["columns"]
    assert request.headers["authorization"] == "Basic " + b64encode(b"ops:s3cret-pw").decode()


def test_an_unreachable_api_is_one_line_pointing_at_the_plugin() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    message = failure(refuse)
    assert message.startswith("cannot reach the RabbitMQ management API at http://rabbit:15672")
    assert "rabbitmq_management plugin" in message


def test_a_refused_login_names_the_user_and_the_brokers_reason_but_not_the_password() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "not_authorized", "reason": "Login failed"})

    message = failure(refuse)
    assert "refused user 'ops' (401: Login failed)" in message


def test_a_secret_the_broker_echoes_is_scrubbed() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "boom", "reason": "bad s3cret-pw"})

    assert failure(echo).endswith("with 500: bad ***")


def test_a_404_from_a_management_api_means_the_vhost_does_not_exist() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/overview":
            return httpx.Response(200, json=OVERVIEW)
        return httpx.Response(404, json={"error": "Object Not Found", "reason": "Not Found"})

    assert failure(answer).startswith("vhost '/' (from RABBITMQ_URL) does not exist")


def test_a_404_from_something_else_says_it_is_not_a_management_api() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html>nginx</html>")

    assert failure(answer).startswith("http://rabbit:15672 is not a RabbitMQ management API")


def test_an_answer_that_is_not_a_queue_list_is_one_line() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>login</html>")

    assert "something other than a queue list" in failure(answer)


# --- the command line and the watch loop --------------------------------------


def test_the_status_command_parses_its_options() -> None:
    args = build_parser().parse_args(["status", "--watch", "--interval", "0.5", "--json"])

    assert (args.group, args.watch, args.interval, args.json) == ("status", True, 0.5, True)
    assert build_parser().parse_args(["status"]).interval == 2.0


@pytest.mark.parametrize("interval", ["0", "-1", "soon", "inf"])
def test_an_interval_that_is_not_a_positive_number_is_refused(interval: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--interval", interval])


def stop_after(sleeps: int) -> Callable[[float], None]:
    """A ``sleep`` that presses Ctrl-C on its ``sleeps``-th call."""
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == sleeps:
            raise KeyboardInterrupt

    return sleep


def at_noon() -> datetime:
    return datetime(2030, 1, 1, 12, 0, 0)


def test_watch_redraws_every_interval_and_ctrl_c_ends_it_with_exit_code_0() -> None:
    out = io.StringIO()
    rows = statuses()

    code = watch(lambda: rows, "/", 3, out, sleep=stop_after(3), now=at_noon)

    assert code == 0
    assert out.getvalue().count("12:00:00, every 3 s (Ctrl-C stops)") == 3
    assert out.getvalue().count("processor.job.requested") == 3
    assert "\x1b[" not in out.getvalue(), "no screen control codes unless on a terminal"


def test_watch_fails_at_once_when_the_first_fetch_fails() -> None:
    def fetch() -> list[StageStatus]:
        raise StatusError("cannot reach the RabbitMQ management API")

    with pytest.raises(StatusError):
        watch(fetch, "/", 1, io.StringIO(), sleep=stop_after(5), now=at_noon)


def test_watch_shows_a_later_failure_in_place_of_the_table_and_goes_on() -> None:
    results: list[list[StageStatus] | StatusError] = [
        statuses(),
        StatusError("cannot reach the RabbitMQ management API at http://rabbit:15672"),
        statuses(),
    ]

    def fetch() -> list[StageStatus]:
        result = results.pop(0)
        if isinstance(result, StatusError):
            raise result
        return result

    out = io.StringIO()
    assert watch(fetch, "/", 1, out, sleep=stop_after(3), now=at_noon) == 0

    drawings = out.getvalue().split("12:00:00")[1:]
    assert "processor.job.requested" in drawings[0]
    assert "vhost /: cannot reach the RabbitMQ management API" in drawings[1]
    assert "processor.job.requested" in drawings[2]


def test_watch_with_json_prints_one_object_per_line() -> None:
    out = io.StringIO()

    watch(lambda: statuses(), "/", 1, out, as_json_lines=True, sleep=stop_after(2), now=at_noon)

    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["at"] == "2030-01-01T12:00:00"
    assert first["stages"][0]["ready"] == 7
