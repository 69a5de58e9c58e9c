"""A hostile client, against the running services: nothing it sends becomes a header or a
recipient, and everything the api accepts is carried to the mailbox.

Each email is checked as it left the pipeline: the outbox's ``.eml`` read the way a mail
client reads it (``email.policy.default`` decodes encoded-words), and the JSON request the
real Mailtrap SDK sent to the stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from e2e.conftest import Pipeline
from pipeline_shared.topology import STAGES
from support.mailbox import (
    MAILTRAP_FIELDS,
    OUTBOX_HEADERS,
    Email,
    Mailbox,
    OutboxMailbox,
    StubMailbox,
)
from support.mailtrap_stub import MailtrapStub
from support.rabbit import Management, new_vhost_name, url_for_vhost
from support.services import Api, Service, clean_environment, free_port
from support.waiting import wait_for

# One process runs the module: its tests share the pipelines below, which each
# process would otherwise start for itself.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("hostile_input")]

PipelineFactory = Callable[..., Pipeline]

JOB_DEADLINE = 20.0
"""Seconds an accepted job may take to end (sent or failed)."""


# --- one running pipeline per transport, shared by the module ----------------


@contextmanager
def running_pipeline(workdir: Path, management: Management, **settings: str) -> Iterator[Pipeline]:
    """The four services in a vhost of their own, stopped and deleted afterwards."""
    vhost = new_vhost_name("hostile")
    management.create_vhost(vhost)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_environment(
        RABBITMQ_URL=url_for_vhost(vhost),
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        OUTBOX_DIR=str(workdir / "outbox"),
        # Retry delays and the send lease keep their defaults: nothing here is retried.
        DATABASE_URL=f"sqlite:///{workdir / 'ledger.sqlite3'}",
        SHUTDOWN_TIMEOUT_SECONDS="10",
        # The endpoints of the workers and status-service are not under test here:
        # off, so no port can clash.
        METRICS_PORT="0",
        **settings,
    )
    pipeline = Pipeline(
        api=Api("api-service", env, workdir, port=port),
        status=Service("status-service", env, workdir),
        processor=Service("processor-service", env, workdir),
        mailer=Service("mailer-service", env, workdir),
        vhost=vhost,
        management=management,
    )
    try:
        pipeline.start()
        yield pipeline
    finally:
        pipeline.stop()
        management.delete_vhost(vhost)


@dataclass
class Target:
    """A running pipeline and the mailbox its emails end in."""

    pipeline: Pipeline
    mailbox: Mailbox

    @property
    def url(self) -> str:
        return self.pipeline.api.url

    @property
    def transport(self) -> str:
        return self.mailbox.transport


@pytest.fixture(scope="module")
def module_mailtrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailtrapStub]:
    stub = MailtrapStub(tmp_path_factory.mktemp("mailtrap"))
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def outbox_target(
    tmp_path_factory: pytest.TempPathFactory, management: Management
) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("outbox-pipeline")
    with running_pipeline(workdir, management) as pipeline:
        yield Target(pipeline, OutboxMailbox(workdir / "outbox"))


@pytest.fixture(scope="module")
def mailtrap_target(
    tmp_path_factory: pytest.TempPathFactory,
    management: Management,
    module_mailtrap: MailtrapStub,
) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("mailtrap-pipeline")
    with running_pipeline(
        workdir,
        management,
        MAILTRAP_TOKEN=module_mailtrap.token,
        MAILTRAP_API_HOST=module_mailtrap.host,
        REQUESTS_CA_BUNDLE=str(module_mailtrap.ca_bundle),
    ) as pipeline:
        yield Target(pipeline, StubMailbox(module_mailtrap))


@pytest.fixture(params=["outbox", "mailtrap"])
def target(request: pytest.FixtureRequest) -> Target:
    """Each transport in turn."""
    found: Target = request.getfixturevalue(f"{request.param}_target")
    return found


@pytest.fixture
def api_url(outbox_target: Target) -> str:
    """An api to send requests that never reach a transport."""
    return outbox_target.url


# --- talking to the api --------------------------------------------------------


def post_jobs(url: str, body: object, *, raw: bytes | None = None) -> httpx.Response:
    """POST /jobs with ``body`` as JSON, surrogates escaped and NaN written as NaN."""
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        f"{url}/jobs",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def post_tutorial(
    url: str, email: str, data: object, *, raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(data).encode()
    return httpx.post(
        f"{url}/process-and-email/",
        params={"email": email},
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def accepted_id(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    answer = response.json()
    return str(answer.get("job_id") or answer["task_id"])


def problems(response: httpx.Response) -> list[dict[str, Any]]:
    """The problems of a 422, after checking it is one."""
    assert response.status_code == 422, f"{response.status_code}: {response.text[:2000]}"
    detail = response.json()["detail"]
    assert isinstance(detail, list), detail
    return detail


def named(response: httpx.Response, *where: str | int) -> list[dict[str, Any]]:
    """The problems of a 422 whose location starts with ``where``; fails if there is none."""
    found = [p for p in problems(response) if tuple(p["loc"][: len(where)]) == where]
    assert found, f"no problem at {where}: {response.text[:2000]}"
    return found


def job_record(url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def wait_until_ended(url: str, job_id: str, timeout: float = JOB_DEADLINE) -> dict[str, Any]:
    """The job's record once it is sent or failed."""

    def ended() -> dict[str, Any] | None:
        record = job_record(url, job_id)
        return record if record["status"] in {"sent", "failed"} else None

    found = wait_for(ended, timeout=timeout, what=f"job {job_id} to be sent or to fail")
    assert found is not None
    return found


def wait_until_sent(target: Target, job_id: str) -> Email:
    record = wait_until_ended(target.url, job_id)
    assert record["status"] == "sent", why_not_sent(target, record)
    return target.mailbox.email_of(job_id)


def dead_letters(pipeline: Pipeline) -> dict[str, list[str]]:
    """The reason of every message held by a dead-letter queue of the pipeline's vhost."""
    found = {}
    for stage in STAGES.values():
        held = pipeline.management.peek(pipeline.vhost, stage.dead_letter_queue)
        if held:
            found[stage.dead_letter_queue] = [
                str((m["properties"].get("headers") or {}).get("x-error-reason")) for m in held
            ]
    return found


def why_not_sent(target: Target, record: dict[str, Any]) -> str:
    """Why a job that should have been sent was not, for an assertion's message."""
    return (
        f"job {record['job_id']} is {record['status']}: {record['error']!r}; "
        f"dead letters: {dead_letters(target.pipeline)}"
    )


def assert_one_plain_email(email: Email, *, to: str, subject: str) -> None:
    """Exactly one recipient, no field the mailer does not write, and the subject as sent."""
    assert email.recipients == (to,)
    if email.transport == "outbox":
        assert sorted(email.fields) == sorted(OUTBOX_HEADERS), email.fields
        assert email.raw.get_all("To") is not None
        assert len(email.raw.get_all("To")) == 1
        assert not email.raw.is_multipart()
    else:
        assert sorted(email.fields) == sorted(MAILTRAP_FIELDS), email.fields
        assert email.raw["to"] == [{"email": to}]
    assert email.content_type == "text/plain"
    assert email.subject == subject


# --- 1. injection ----------------------------------------------------------------


def _b64_word(text: str) -> str:
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


HOSTILE_SUBJECTS = {
    "q-crlf-bcc": "=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?=",
    "q-lf-to": "=?utf-8?q?Hi=0ATo:_evil@x.com,_other@x.com?=",
    "q-cc-latin1": "=?iso-8859-1?q?Hi=0D=0ACc:_evil@x.com?=",
    "b-html-body": _b64_word("x\r\nContent-Type: text/html\r\n\r\n<h1>pwn</h1>"),
    "b-bcc": _b64_word("Hi\r\nBcc: evil@x.com"),
    "words-in-text": "Report "
    + _b64_word("\r\nBcc: evil@x.com")
    + " and =?utf-8?q?=0ACc:_a@x.com?=",
    "q-encoded-u2028": "=?utf-8?q?Hi=E2=80=A8Bcc:_evil@x.com?=",
    "header-lookalike": "Bcc: evil@x.com",
    "raw-crlf-bcc": "Hi\r\nBcc: evil@x.com",
    "raw-lf-html": "Hi\nContent-Type: text/html\n\n<h1>pwn</h1>",
    "raw-cr-to": "Hi\rTo: evil@x.com",
    "word-then-crlf": "=?utf-8?q?Hi?=\r\nBcc: evil@x.com",
    "nul-bcc": "Hi\x00Bcc: evil@x.com",
}


@pytest.mark.parametrize("subject", HOSTILE_SUBJECTS.values(), ids=HOSTILE_SUBJECTS.keys())
def test_a_hostile_subject_is_refused_or_arrives_as_text_with_one_recipient(
    target: Target, subject: str
) -> None:
    response = post_jobs(
        target.url, {"email": "ada@example.com", "subject": subject, "data": {"n": 1}}
    )

    if response.status_code == 422:
        named(response, "body", "subject")
        return
    email = wait_until_sent(target, accepted_id(response))
    assert_one_plain_email(email, to="ada@example.com", subject=subject)
    assert "<h1>" not in email.text


HOSTILE_ADDRESSES = {
    "q-word-local": "=?utf-8?q?evil=40attacker.com=2C_x?=@example.com",
    "b-word-local": _b64_word("evil@attacker.com, x") + "@example.com",
    "q-word-domain": "ada@=?utf-8?q?attacker.com?=",
    "word-lookalike": "=?x@example.com",
    "space-inside": "ada @example.com",
    "leading-space": " ada@example.com",
    "trailing-space": "ada@example.com ",
    "tab": "ada@example.com\tevil@x.com",
    "comma": "ada@example.com,evil@x.com",
    "comma-space": "ada@example.com, evil@x.com",
    "semicolon": "ada@example.com;evil@x.com",
    "non-ascii-local": "jörg@example.com",
    "crlf-bcc": "ada@example.com\r\nBcc: evil@x.com",
    "lf": "ada@example.com\nevil@x.com",
    "display-name": "Ada <ada@example.com>",
    "group": "friends: ada@example.com, evil@x.com;",
    "quoted-local": '"evil@x.com"@example.com',
    "comment": "ada@example.com(evil@x.com)",
    "u2028": "ada@example.com\u2028evil@x.com",
    "nbsp": "ada@example.com\u00a0evil@x.com",
}


@pytest.mark.parametrize("address", HOSTILE_ADDRESSES.values(), ids=HOSTILE_ADDRESSES.keys())
def test_a_hostile_address_is_refused_on_both_endpoints_naming_email(
    api_url: str, address: str
) -> None:
    named(post_jobs(api_url, {"email": address, "data": {}}), "body", "email")
    named(post_tutorial(api_url, address, {}), "query", "email")


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"email": "ada@example.com", "email": "evil@x.com", "data": {}}', ("body", "email")),
        (b'{"email": "ada@example.com", "data": {"k": 1, "k": 2}}', ("body", "data", "k")),
        (
            b'{"email": "ada@example.com", "data": {"a": {"k": 1, "k": 1}}}',
            ("body", "data", "a", "k"),
        ),
        (b'{"email": "ada@example.com", "data": {}, "data": {"x": 1}}', ("body", "data")),
        (
            b'{"email": "ada@example.com", "subject": "a", "subject": "b", "data": {}}',
            ("body", "subject"),
        ),
    ],
    ids=["email", "data-key", "nested-data-key", "data", "subject"],
)
def test_a_duplicate_key_is_a_422_naming_it(
    api_url: str, raw: bytes, where: tuple[str, ...]
) -> None:
    response = post_jobs(api_url, None, raw=raw)

    found = named(response, *where)
    assert any(p["type"] == "duplicate_key" and p["loc"] == list(where) for p in found), found


def test_a_duplicate_key_in_the_tutorials_body_is_a_422_naming_it(api_url: str) -> None:
    response = post_tutorial(api_url, "ada@example.com", None, raw=b'{"k": 1, "k": 2}')

    assert [p["loc"] for p in named(response, "body", "k")] == [["body", "k"]]


@pytest.mark.parametrize("endpoint", ["jobs", "process-and-email"])
def test_an_internationalised_domain_reaches_the_transport_in_its_idna_form(
    target: Target, endpoint: str
) -> None:
    if endpoint == "jobs":
        response = post_jobs(target.url, {"email": "ada@bücher.de", "data": {"n": 1}})
    else:
        response = post_tutorial(target.url, "ada@bücher.de", {"n": 1})

    email = wait_until_sent(target, accepted_id(response))
    subject = "Your data has been processed"
    assert_one_plain_email(email, to="ada@xn--bcher-kva.de", subject=subject)


# --- 2. what the api accepts reaches the mailbox unchanged; the rest is a 422 ----

ACCEPTED_SUBJECTS = {
    "url-first": "https://reports.example.com/weekly/" + "a" * 40 + " is ready",
    "url-later": "Your report: https://reports.example.com/" + "a" * 120,
    "one-200-char-word": "x" * 200,
    "commas-no-spaces": "a," * 100,
    "leading-space": " Report",
    "trailing-space": "Report ",
    "inner-spaces": "Report   of    the week",
    "non-ascii-long": "Bericht über die Woche " * 8,
    "emoji-200": "\U0001f600" * 200,
    "right-to-left": "\u05d3\u05d5\u05d7 \u05e9\u05d1\u05d5\u05e2\u05d9 \u200f(weekly)",
    "zero-width": "a\u200bb\u200dc",
    "looks-quoted": '"Report" (weekly) <ada@example.com>',
    "lone-word-marker": "=?",
    "word-end-marker": "?=",
}


@pytest.mark.parametrize("subject", ACCEPTED_SUBJECTS.values(), ids=ACCEPTED_SUBJECTS.keys())
def test_a_subject_the_api_accepts_arrives_exactly_as_sent(target: Target, subject: str) -> None:
    response = post_jobs(
        target.url, {"email": "ada@example.com", "subject": subject, "data": {"n": 1}}
    )

    email = wait_until_sent(target, accepted_id(response))
    assert_one_plain_email(email, to="ada@example.com", subject=subject)


# Edge values: each is refused with a 422 naming where, or carried exactly.


def nested(depth: int, leaf: object = "deepest") -> dict[str, Any]:
    """A data object that nests ``depth`` levels (itself being level 1), lists and objects
    alternating."""
    value: Any = leaf
    for level in range(depth, 1, -1):
        value = [value] if level % 2 == 0 else {"n": value}
    return {"n": value}


def depth_of(value: object) -> int:
    """How many containers deep ``value`` nests (iteratively: it may be deep)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is not None:
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in children)
    return deepest


@pytest.mark.parametrize("depth", [31, 32])
def test_data_nested_up_to_32_levels_is_accepted_and_emailed(target: Target, depth: int) -> None:
    data = nested(depth, leaf=f"leaf-at-{depth}")
    assert depth_of(data) == depth
    jobs = accepted_id(
        post_jobs(target.url, {"email": "ada@example.com", "data": data, "step": "echo"})
    )
    task = accepted_id(post_tutorial(target.url, "ada@example.com", data))

    for job_id in (jobs, task):
        email = wait_until_sent(target, job_id)
        assert f'"leaf-at-{depth}"' in email.text
    assert dead_letters(target.pipeline) == {}


@pytest.mark.parametrize("depth", [33, 500])
def test_data_nested_deeper_than_32_levels_is_a_422_naming_data(api_url: str, depth: int) -> None:
    data = nested(depth)
    assert depth_of(data) == depth

    named(post_jobs(api_url, {"email": "ada@example.com", "data": data}), "body", "data")
    named(post_tutorial(api_url, "ada@example.com", data), "body")


@pytest.mark.parametrize(
    "char",
    [
        *["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x7f", "\x1b"],
        *["\u202e", "\u2066", "\ufeff"],
    ],
    ids=[
        *["U+2028", "U+2029", "NEL", "VT", "FF", "FS", "GS", "RS", "DEL", "ESC"],
        *["RLO", "LRI", "BOM"],
    ],
)
def test_a_subject_with_a_line_breaking_control_or_reordering_character_is_a_422_naming_subject(
    api_url: str, char: str
) -> None:
    body = {"email": "ada@example.com", "subject": f"Hi{char}Bcc: evil@x.com", "data": {}}

    named(post_jobs(api_url, body), "body", "subject")


DIGITS_300 = "9" + "1234567890" * 29 + "876543210"
DIGITS_400 = "9" * 400


def test_a_300_digit_integer_reaches_the_echo_step_unchanged(target: Target) -> None:
    assert len(DIGITS_300) == 300
    raw = (
        b'{"email": "ada@example.com", "step": "echo", "data": {"big": '
        + DIGITS_300.encode()
        + b', "small": -'
        + DIGITS_300.encode()
        + b"}}"
    )

    email = wait_until_sent(target, accepted_id(post_jobs(target.url, None, raw=raw)))
    result = email.text.split("Result:", 1)[1].split("Your data:", 1)[0]
    assert f'"big": {DIGITS_300}' in result
    assert f'"small": -{DIGITS_300}' in result
    assert f'"big": {DIGITS_300}' in email.text.split("Your data:", 1)[1]


@pytest.mark.parametrize(
    "literal",
    [
        DIGITS_400,
        "-" + DIGITS_400,
        "9" * 5000,
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
    ],
    ids=[
        "400-digits",
        "minus-400-digits",
        "5000-digits",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
    ],
)
def test_a_number_json_or_a_double_cannot_carry_is_a_422(api_url: str, literal: str) -> None:
    body = b'{"email": "ada@example.com", "data": {"x": [1, ' + literal.encode() + b"]}}"

    named(post_jobs(api_url, None, raw=body), "body")
    named(
        post_tutorial(api_url, "ada@example.com", None, raw=b'{"x": ' + literal.encode() + b"}"),
        "body",
    )


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"email": "ada@example.com", "data": {"\ud800": 1}}',
        rb'{"email": "ada@example.com", "data": {"k": "a\udfffb"}}',
        rb'{"email": "ada@example.com", "data": {"k": ["\udc00"]}}',
        rb'{"email": "ada@example.com", "data": {}, "subject": "Hi \ud800"}',
        rb'{"email": "ada\ud800@example.com", "data": {}}',
        rb'{"email": "ada@example.com", "data": {}, "\ud800": 1}',
        rb'{"email": "ada@example.com", "data": {"\ud800": 1, "\ud800": 2}}',
        rb'{"email": "ada@example.com", "data": {}, "step": "\ud800"}',
    ],
    ids=[
        "data-key",
        "data-value",
        "list-item",
        "subject",
        "email",
        "unknown-field",
        "duplicate-key",
        "step",
    ],
)
def test_a_lone_surrogate_anywhere_is_a_422_not_a_500(api_url: str, raw: bytes) -> None:
    response = post_jobs(api_url, None, raw=raw)

    assert problems(response)
    response.content.decode("utf-8")  # the answer itself is valid UTF-8


def test_a_lone_surrogate_in_the_tutorials_body_is_a_422(api_url: str) -> None:
    response = post_tutorial(api_url, "ada@example.com", None, raw=rb'{"\ud800": "\udfff"}')

    named(response, "body")


MANY = 5000
BAD_BODIES = {
    "nan-values": b'{"email": "ada@example.com", "data": {"x": ['
    + b",".join([b"NaN"] * MANY)
    + b"]}}",
    "huge-values": b'{"email": "ada@example.com", "data": {"x": ['
    + b",".join([b"1e999"] * MANY)
    + b"]}}",
    "duplicate-keys": b'{"email": "ada@example.com", "data": {'
    + b",".join([b'"k": 1'] * MANY)
    + b"}}",
    "unknown-fields": json.dumps(
        {"email": "ada@example.com", "data": {}, **{f"extra{n}": n for n in range(MANY)}}
    ).encode(),
    "bad-strings": json.dumps(
        {"email": "ada@example.com", "data": {"x": ["\x01"] * MANY}}
    ).encode(),
}


@pytest.mark.parametrize("raw", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_422_for_thousands_of_bad_values_lists_at_most_21_entries(
    api_url: str, raw: bytes
) -> None:
    found = problems(post_jobs(api_url, None, raw=raw))

    assert 1 <= len(found) <= 21, len(found)
    assert all(set(p) == {"type", "loc", "msg"} for p in found)


@pytest.mark.parametrize("name", ["nan-values", "unknown-fields"])
def test_a_422_that_leaves_problems_out_says_how_many(api_url: str, name: str) -> None:
    found = problems(post_jobs(api_url, None, raw=BAD_BODIES[name]))

    assert len(found) == 21
    assert found[-1]["type"] == "too_many_errors"
    assert found[-1]["msg"] == f"and {MANY - 20} more problems"


def _largest_body(item: bytes, step: str) -> bytes:
    """A job body just under the api's 256 KiB limit: a list of ``item`` repeated."""
    head = b'{"email": "ada@example.com", "step": "' + step.encode() + b'", "data": {"x": ['
    tail = b"]}}"
    count = (256 * 1024 - len(head) - len(tail) - 64) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


@pytest.mark.parametrize(
    ("item", "step"),
    [(b'"abc"', "echo"), (b"1e15", "summarise"), (b"1e15", "echo")],
    ids=["strings-echo", "floats-summarise", "floats-echo"],
)
def test_the_largest_body_the_api_accepts_is_carried_to_the_mailbox(
    pipeline_factory: PipelineFactory, item: bytes, step: str
) -> None:
    """``1e15`` is 4 bytes in the request and ``1000000000000000.0`` (18) in an event;
    echo carries the data twice (data and result). A pipeline of its own: a failure here
    leaves dead letters."""
    pipeline = pipeline_factory()
    pipeline.start()
    target = Target(pipeline, OutboxMailbox(pipeline.api.cwd / "outbox"))
    body = _largest_body(item, step)
    assert 250 * 1024 < len(body) <= 256 * 1024

    job_id = accepted_id(post_jobs(target.url, None, raw=body))

    record = wait_until_ended(target.url, job_id)
    assert record["status"] == "sent", why_not_sent(target, record)
    assert target.mailbox.email_of(job_id).recipients == ("ada@example.com",)


# --- 2, as a property: every request is 202 or 422, every 202 ends sent ---------

DEFAULT_SUBJECT = "Your data has been processed"

VALID_ADDRESSES = {
    "ada@example.com": "ada@example.com",
    "ada@bücher.de": "ada@xn--bcher-kva.de",
    "Ada.Lovelace+tag@Example.COM": "Ada.Lovelace+tag@example.com",
    "o'brien_{x}|y~z@sub.example.org": "o'brien_{x}|y~z@sub.example.org",
}
REFUSED_ADDRESSES = [
    "=?utf-8?q?evil=40attacker.com=2C_x?=@example.com",
    "ada@example.com, evil@x.com",
    "jörg@example.com",
    "ada@example.com\r\nBcc: evil@x.com",
    "ada @example.com",
    "ada\ud800@example.com",
    "not-an-address",
]

SPECIAL_TEXT = [
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\x00",
    "\t",
    "\r\n",
    "\ud800",
    "\udfff",
    "=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?=",
    _b64_word("x\r\nContent-Type: text/html\r\n\r\n<h1>pwn</h1>"),
    "Bcc: evil@x.com",
    "\U0001f600",
    "\U0010fffd",
    "\u202e",
    "é",
    " ",
]
# Mostly text any reader can carry, with an edge case now and then (the edge cases alone
# would make nearly every request a 422).
readable = st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"))
clean_text = st.text(readable, max_size=12)
texts = st.lists(st.one_of(*[clean_text] * 8, st.sampled_from(SPECIAL_TEXT)), max_size=4).map(
    "".join
)
numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([10**299, -(10**299), int(1.7976931348623157e308)]),
    st.sampled_from([1e308, -0.0, 5e-324, -5e-324, 1.7976931348623157e308, 1e15]),
    st.integers(min_value=-(10**420), max_value=10**420),  # may be beyond a double
    st.floats(),  # may be NaN or infinite
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
job_data = st.one_of(
    *[st.dictionaries(texts, json_values, max_size=5)] * 4,
    st.sampled_from([31, 32, 33, 500]).map(nested),
)
job_bodies = st.fixed_dictionaries(
    {
        "email": st.sampled_from([*VALID_ADDRESSES] * 3 + REFUSED_ADDRESSES),
        "data": job_data,
        "step": st.sampled_from(["summarise", "echo", "word_count"]),
    },
    optional={"subject": st.none() | texts | st.text(readable, min_size=190, max_size=210)},
)


def _is_plain_words(error: str) -> bool:
    return not (
        re.search(r"\b[A-Z][A-Za-z]*(Error|Exception|Failure)\b", error)
        or re.search(r"invalid (JobRequested|DataProcessed|EmailSent|JobFailed|event)", error)
        or "exceeds the limit" in error
        or "Traceback" in error
    )


def dead_letters_of(pipeline: Pipeline, job_id: str) -> list[str]:
    return [
        f"{stage.dead_letter_queue}: {(m['properties'].get('headers') or {}).get('x-error-reason')}"
        for stage in STAGES.values()
        for m in pipeline.management.peek(pipeline.vhost, stage.dead_letter_queue)
        if m["properties"].get("correlation_id") == job_id
    ]


def check_one_request(target: Target, body: dict[str, Any]) -> None:
    response = post_jobs(target.url, body)
    assert response.status_code in (202, 422), f"{response.status_code}: {response.text[:500]}"
    if response.status_code == 422:
        assert 1 <= len(problems(response)) <= 21
        return
    assert body["email"] in VALID_ADDRESSES, f"{body['email']!r} was accepted"
    job_id = accepted_id(response)
    record = wait_until_ended(target.url, job_id)
    if record["status"] == "failed":
        assert _is_plain_words(str(record["error"])), record["error"]
    else:
        email = target.mailbox.email_of(job_id)
        subject = body.get("subject") or DEFAULT_SUBJECT
        assert_one_plain_email(email, to=VALID_ADDRESSES[body["email"]], subject=subject)
    assert dead_letters_of(target.pipeline, job_id) == []


def test_every_request_is_202_or_422_and_every_accepted_job_ends_sent(target: Target) -> None:
    dead_before = dead_letters(target.pipeline)

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=job_bodies)
    @example(body={"email": "ada@example.com", "step": "echo", "data": nested(31)})
    @example(body={"email": "ada@example.com", "step": "echo", "data": nested(32)})
    @example(body={"email": "ada@example.com", "data": nested(33)})
    @example(body={"email": "ada@example.com", "data": nested(500)})
    @example(body={"email": "ada@example.com", "subject": "a\u2028b", "data": {}})
    @example(body={"email": "ada@example.com", "subject": "a\x85b", "data": {}})
    @example(body={"email": "ada@example.com", "subject": "a\x0bb", "data": {}})
    @example(body={"email": "ada@example.com", "subject": "a\x0cb", "data": {}})
    @example(body={"email": "ada@example.com", "step": "echo", "data": {"n": int(DIGITS_300)}})
    @example(body={"email": "ada@example.com", "data": {"n": int(DIGITS_400)}})
    @example(body={"email": "ada@example.com", "data": {"n": math.nan, "i": math.inf}})
    @example(body={"email": "ada@example.com", "data": {"\ud800": "\udfff"}})
    @example(
        body={"email": "ada@example.com", "step": "echo", "data": {"f": [1e308, -0.0, 5e-324]}}
    )
    @example(body={"email": "ada@bücher.de", "subject": HOSTILE_SUBJECTS["q-crlf-bcc"], "data": {}})
    def every_answer(body: dict[str, Any]) -> None:
        check_one_request(target, body)

    # Hypothesis pretty-prints each explicit example before running it, a few frames
    # a level: nested(500) takes about 950, under Python's limit of 1000 only near
    # the bottom of plain pytest's stack, not in an xdist worker's, which starts deeper.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 3000))
    try:
        every_answer()
    finally:
        sys.setrecursionlimit(limit)
    assert dead_letters(target.pipeline) == dead_before


# --- 3. slow clients -------------------------------------------------------------

SLOW_CLIENTS = 100
REQUEST_TIMEOUT = 1.0
GRACE = 4.0
"""Seconds past REQUEST_TIMEOUT_SECONDS within which a slow client must have its 408."""


@dataclass
class SlowClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent_at: float


async def open_slow_client(port: int) -> SlowClient:
    """A request whose headers promise 100 bytes of body, of which 10 ever arrive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /jobs HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 100\r\n"
        b"\r\n"
        b'{"email": '
    )
    await writer.drain()
    return SlowClient(reader, writer, time.monotonic())


async def answer_and_close(client: SlowClient, deadline: float) -> tuple[bytes, float]:
    """Everything the api sends until it closes the connection, and when it had closed it."""
    try:
        answer = await asyncio.wait_for(client.reader.read(), deadline - time.monotonic())
    except TimeoutError:
        raise AssertionError("no answer, or the connection was left open") from None
    finally:
        client.writer.close()
    return answer, time.monotonic() - client.sent_at


async def test_slow_clients_get_408_and_do_not_hold_up_others(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT))
    pipeline.api.start()
    pipeline.api.wait_ready()

    slow = await asyncio.gather(*(open_slow_client(pipeline.api.port) for _ in range(SLOW_CLIENTS)))
    async with httpx.AsyncClient(base_url=pipeline.api.url, timeout=10) as client:
        started = time.monotonic()
        normal = await client.post("/jobs", json={"email": "ada@example.com", "data": {"n": 1}})
        normal_took = time.monotonic() - started
    deadline = max(c.sent_at for c in slow) + REQUEST_TIMEOUT + GRACE
    answers = await asyncio.gather(*(answer_and_close(c, deadline) for c in slow))

    assert normal.status_code == 202, normal.text
    assert normal_took < REQUEST_TIMEOUT / 2, f"a normal request took {normal_took:.2f} s"
    for answer, took in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"connection: close" in head.lower()
        assert "detail" in json.loads(body)
        assert REQUEST_TIMEOUT * 0.9 <= took <= REQUEST_TIMEOUT + GRACE, took
    assert pipeline.api.running
    assert httpx.get(f"{pipeline.api.url}/readyz", timeout=5).status_code == 200


async def dribble(writer: asyncio.StreamWriter, parts: list[bytes], every: float) -> None:
    """Send ``parts`` one at a time, ``every`` seconds apart, until the api hangs up."""
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(every)
    except (ConnectionError, OSError):
        return


SLOW_HEADERS = {
    # Connects and sends nothing.
    "silent": [],
    # Half a request line, never finished.
    "half-line": [b"POST /jo"],
    # A header line every 0.3 s, for ever: never idle, never complete.
    "dribbled-headers": [b"POST /jobs HTTP/1.1\r\nHost: x\r\n"]
    + [f"X-Pad-{i}: y\r\n".encode() for i in range(200)],
}


@pytest.mark.parametrize("kind", list(SLOW_HEADERS))
async def test_a_connection_whose_headers_never_complete_is_closed_after_the_timeout(
    pipeline_factory: PipelineFactory, kind: str
) -> None:
    pipeline = pipeline_factory(REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT))
    pipeline.api.start()
    pipeline.api.wait_ready()

    # Each connection's deadline runs from its own opening: measure from there.
    connections, opened_at = [], []
    for _ in range(20):
        opened_at.append(time.monotonic())
        connections.append(await asyncio.open_connection("127.0.0.1", pipeline.api.port))
    senders = [
        asyncio.create_task(dribble(writer, SLOW_HEADERS[kind], 0.3)) for _, writer in connections
    ]
    async with httpx.AsyncClient(base_url=pipeline.api.url, timeout=10) as client:
        normal = await client.post("/jobs", json={"email": "ada@example.com", "data": {}})
    closed_after = []
    try:
        for (reader, _), opened in zip(connections, opened_at, strict=True):
            remaining = opened + REQUEST_TIMEOUT + GRACE - time.monotonic()
            try:
                await asyncio.wait_for(reader.read(), remaining)
            except TimeoutError:
                raise AssertionError(f"a {kind} connection was left open") from None
            except ConnectionError:
                pass
            closed_after.append(time.monotonic() - opened)
    finally:
        for sender in senders:
            sender.cancel()
        for _, writer in connections:
            writer.close()

    assert normal.status_code == 202, normal.text
    assert max(closed_after) <= REQUEST_TIMEOUT + GRACE
    assert min(closed_after) >= REQUEST_TIMEOUT * 0.9
    assert pipeline.api.running


async def test_a_slow_second_request_on_a_kept_alive_connection_is_closed_too(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT))
    pipeline.api.start()
    pipeline.api.wait_ready()
    reader, writer = await asyncio.open_connection("127.0.0.1", pipeline.api.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)

    started = time.monotonic()
    sender = asyncio.create_task(dribble(writer, SLOW_HEADERS["dribbled-headers"], 0.3))
    try:
        await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT + GRACE)
    except TimeoutError:
        raise AssertionError("the second request's headers were never cut off") from None
    finally:
        sender.cancel()
        writer.close()

    assert REQUEST_TIMEOUT * 0.9 <= time.monotonic() - started <= REQUEST_TIMEOUT + GRACE


# --- 4. a sender at a reserved domain ---------------------------------------------


@pytest.mark.parametrize("sender", ["pipeline@mailer.test", "pipeline@host.local"])
@pytest.mark.parametrize("transport", ["outbox", "mailtrap"])
def test_a_sender_at_a_reserved_domain_starts_the_mailer_and_signs_the_email(
    pipeline_factory: PipelineFactory,
    mailtrap: MailtrapStub,
    mailtrap_settings: dict[str, str],
    sender: str,
    transport: str,
) -> None:
    if transport == "mailtrap":
        pipeline = pipeline_factory(**{**mailtrap_settings, "MAIL_FROM": sender})
        mailbox: Mailbox = StubMailbox(mailtrap)
    else:
        pipeline = pipeline_factory(MAIL_FROM=sender)
        mailbox = OutboxMailbox(pipeline.api.cwd / "outbox")
    pipeline.start()

    job_id = accepted_id(post_jobs(pipeline.api.url, {"email": "ada@example.com", "data": {}}))

    email = wait_until_sent(Target(pipeline, mailbox), job_id)
    assert email.sender == sender
    assert email.recipients == ("ada@example.com",)
