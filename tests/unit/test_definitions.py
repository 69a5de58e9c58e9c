"""rabbitmq/definitions.json: rendered from the code, never hand-edited, least privilege."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline_shared.definitions import (
    ADMIN_USER,
    HASHING_ALGORITHM,
    SERVICE_USERS,
    development_password,
    hash_password,
    password_matches,
    password_variables,
    passwords_from,
    render_definitions,
    topology_definitions,
)
from pipeline_shared.messaging import DEFAULT_RETRY_DELAYS, topology_names
from pipeline_shared.topology import (
    EXCHANGE,
    MAILER,
    PROCESSOR,
    QUEUE_EXCHANGE,
    STAGES,
    STATUS,
    retry_queue_arguments,
)

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS_FILE = ROOT / "rabbitmq" / "definitions.json"
SCRIPT = ROOT / "scripts" / "render_definitions.py"
DEV_PASSWORDS = passwords_from({})


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
    return definitions


def user_rules(definitions: dict[str, Any], key: str, user: str) -> list[dict[str, Any]]:
    return [rule for rule in definitions[key] if rule["user"] == user]


def permissions_of(definitions: dict[str, Any], user: str) -> dict[str, str]:
    (rule,) = user_rules(definitions, "permissions", user)
    return rule


def topic_write(definitions: dict[str, Any], user: str, exchange: str) -> str:
    (rule,) = [
        r for r in user_rules(definitions, "topic_permissions", user) if r["exchange"] == exchange
    ]
    write: str = rule["write"]
    return write


def matches(pattern: str, name: str) -> bool:
    # RabbitMQ matches with Erlang's re (PCRE); these patterns mean the same in Python.
    return re.search(pattern, name) is not None


# --- the file is what the script renders ---------------------------------------------------------


def test_the_committed_file_is_what_the_script_renders() -> None:
    env = {k: v for k, v in os.environ.items() if k not in password_variables().values()}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, (
        f"{result.stderr.strip()}\nrun: .venv/bin/python scripts/render_definitions.py"
    )


def test_rendering_again_with_the_development_passwords_changes_nothing(
    committed: dict[str, Any],
) -> None:
    assert render_definitions(DEV_PASSWORDS, previous=committed) == committed


def test_the_topology_is_the_one_the_services_declare(committed: dict[str, Any]) -> None:
    assert {k: committed[k] for k in ("exchanges", "queues", "bindings")} == topology_definitions(
        DEFAULT_RETRY_DELAYS
    )
    declared = {(kind, name) for kind, name in topology_names(DEFAULT_RETRY_DELAYS)}
    in_file = {("exchange", e["name"]) for e in committed["exchanges"]} | {
        ("queue", q["name"]) for q in committed["queues"]
    }
    assert in_file == declared


def test_every_queue_has_the_arguments_the_code_declares_it_with(committed: dict[str, Any]) -> None:
    queues = {q["name"]: q for q in committed["queues"]}
    for stage in STAGES.values():
        assert queues[stage.queue]["arguments"] == stage.queue_arguments()
        assert queues[stage.dead_letter_queue]["arguments"] == {"x-queue-type": "quorum"}
        for delay in DEFAULT_RETRY_DELAYS:
            assert queues[stage.retry_queue(delay)]["arguments"] == retry_queue_arguments(
                stage, delay
            )
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    assert all(e["type"] == "topic" and e["durable"] for e in committed["exchanges"])


def test_every_queue_is_bound_to_pipeline_queues_under_its_own_name_and_work_queues_to_events(
    committed: dict[str, Any],
) -> None:
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in committed["bindings"]}
    for queue in committed["queues"]:
        assert (QUEUE_EXCHANGE, queue["name"], queue["name"]) in bindings
    from_events = {(dest, key) for source, dest, key in bindings if source == EXCHANGE}
    assert from_events == {
        (stage.queue, key) for stage in STAGES.values() for key in stage.routing_keys
    }


def test_the_file_declares_the_vhost_it_uses(committed: dict[str, Any]) -> None:
    # A broker importing definitions at boot creates neither the default vhost nor guest.
    vhosts = {v["name"] for v in committed["vhosts"]}
    used = {r["vhost"] for key in ("permissions", "topic_permissions") for r in committed[key]}
    used |= {r["vhost"] for key in ("exchanges", "queues", "bindings") for r in committed[key]}
    assert used == vhosts == {"/"}
    assert "guest" not in {u["name"] for u in committed["users"]}


# --- passwords ----------------------------------------------------------------------------------


def test_the_hash_is_rabbitmqs_sha256_scheme() -> None:
    # The worked example of https://www.rabbitmq.com/docs/passwords#computing-password-hash
    assert (
        hash_password("test12", bytes.fromhex("908DC60A"))
        == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    )


def test_a_hash_matches_its_password_only() -> None:
    hashed = hash_password("correct horse")
    assert password_matches(hashed, "correct horse")
    assert not password_matches(hashed, "correct horse ")
    assert not password_matches("not base64!", "correct horse")
    assert hash_password("same") != hash_password("same"), "the salt must be random"


def test_the_committed_users_have_the_development_passwords(committed: dict[str, Any]) -> None:
    users = {u["name"]: u for u in committed["users"]}
    assert set(users) == {ADMIN_USER, *(s.name for s in SERVICE_USERS)}
    for name, user in users.items():
        assert user["hashing_algorithm"] == HASHING_ALGORITHM
        assert password_matches(user["password_hash"], f"{name}-dev"), name
    assert users[ADMIN_USER]["tags"] == ["administrator"]
    assert all(users[s.name]["tags"] == [] for s in SERVICE_USERS)


def test_passwords_come_from_the_environment_or_are_the_development_ones() -> None:
    passwords = passwords_from(
        {"PROCESSOR_SERVICE_RABBITMQ_PASSWORD": "s3cret", "RABBITMQ_ADMIN_PASSWORD": ""}
    )
    assert passwords["processor-service"] == "s3cret"
    assert passwords[ADMIN_USER] == development_password(ADMIN_USER) == "admin-dev"
    assert passwords["mailer-service"] == "mailer-service-dev"
    assert password_variables() == {
        "admin": "RABBITMQ_ADMIN_PASSWORD",
        "api-service": "API_SERVICE_RABBITMQ_PASSWORD",
        "status-service": "STATUS_SERVICE_RABBITMQ_PASSWORD",
        "processor-service": "PROCESSOR_SERVICE_RABBITMQ_PASSWORD",
        "mailer-service": "MAILER_SERVICE_RABBITMQ_PASSWORD",
    }


def test_a_changed_password_gets_a_new_hash_and_the_others_are_kept(
    committed: dict[str, Any],
) -> None:
    passwords = {**DEV_PASSWORDS, "mailer-service": "another one"}
    rendered = render_definitions(passwords, previous=committed)
    before = {u["name"]: u["password_hash"] for u in committed["users"]}
    after = {u["name"]: u["password_hash"] for u in rendered["users"]}
    assert password_matches(after["mailer-service"], "another one")
    assert {k: v for k, v in after.items() if k != "mailer-service"} == {
        k: v for k, v in before.items() if k != "mailer-service"
    }


# --- least privilege ----------------------------------------------------------------------------


@pytest.mark.parametrize("service", [s.name for s in SERVICE_USERS])
def test_no_service_may_configure_anything(committed: dict[str, Any], service: str) -> None:
    configure = permissions_of(committed, service)["configure"]
    assert configure == "^$"
    for name in (EXCHANGE, QUEUE_EXCHANGE, PROCESSOR.queue, "sneaky", "amq.gen-123"):
        assert not matches(configure, name), name


@pytest.mark.parametrize(
    ("service", "exchanges"),
    [
        ("api-service", {EXCHANGE}),  # it publishes jobs, and retries nothing
        ("status-service", {QUEUE_EXCHANGE}),  # it publishes nothing, and retries its own
        ("processor-service", {EXCHANGE, QUEUE_EXCHANGE}),
        ("mailer-service", {EXCHANGE, QUEUE_EXCHANGE}),
    ],
)
def test_a_service_writes_only_to_the_exchanges_it_needs(
    committed: dict[str, Any], service: str, exchanges: set[str]
) -> None:
    write = permissions_of(committed, service)["write"]
    for exchange in (EXCHANGE, QUEUE_EXCHANGE):
        assert matches(write, exchange) == (exchange in exchanges), exchange
    for other in ("amq.default", "amq.topic", "events2", "pipeline-queues", PROCESSOR.queue):
        assert not matches(write, other), other


@pytest.mark.parametrize(
    ("service", "own"),
    [
        ("api-service", None),
        ("status-service", STATUS),
        ("processor-service", PROCESSOR),
        ("mailer-service", MAILER),
    ],
)
def test_a_service_reads_only_its_own_work_queue(
    committed: dict[str, Any], service: str, own: Any
) -> None:
    read = permissions_of(committed, service)["read"]
    for stage in STAGES.values():
        assert matches(read, stage.queue) == (stage is own), stage.queue
        assert not matches(read, stage.dead_letter_queue)
        assert not matches(read, stage.retry_queue(1))
    assert not matches(read, EXCHANGE)


def test_the_processors_read_regex_matches_its_queue_and_not_the_mailers(
    committed: dict[str, Any],
) -> None:
    read = permissions_of(committed, "processor-service")["read"]
    assert matches(read, "processor.job.requested")
    assert not matches(read, "mailer.data.processed")
    assert not matches(read, "processorXjobXrequested")


@pytest.mark.parametrize(
    ("service", "allowed"),
    [
        ("api-service", {"job.requested"}),
        ("status-service", set()),
        ("processor-service", {"data.processed", "job.failed"}),
        ("mailer-service", {"email.sent", "job.failed"}),
    ],
)
def test_a_service_publishes_only_its_own_events(
    committed: dict[str, Any], service: str, allowed: set[str]
) -> None:
    write = topic_write(committed, service, EXCHANGE)
    for key in ("job.requested", "data.processed", "email.sent", "job.failed", "job.#", "#"):
        assert matches(write, key) == (key in allowed), key


@pytest.mark.parametrize(
    ("service", "own"),
    [
        ("api-service", None),
        ("status-service", STATUS),
        ("processor-service", PROCESSOR),
        ("mailer-service", MAILER),
    ],
)
def test_a_service_puts_messages_only_into_its_own_stages_queues(
    committed: dict[str, Any], service: str, own: Any
) -> None:
    write = topic_write(committed, service, QUEUE_EXCHANGE)
    for stage in STAGES.values():
        names = [
            stage.queue,
            stage.dead_letter_queue,
            stage.retry_queue(1),
            stage.retry_queue(0.25),
        ]
        for name in names:
            assert matches(write, name) == (stage is own), name
    assert own is None or not matches(write, own.queue + "x")


@pytest.mark.parametrize("service", [s.name for s in SERVICE_USERS])
def test_topic_permissions_let_no_service_bind(committed: dict[str, Any], service: str) -> None:
    rules = user_rules(committed, "topic_permissions", service)
    assert {r["exchange"] for r in rules} == {EXCHANGE, QUEUE_EXCHANGE}
    assert all(r["read"] == "^$" for r in rules)


def test_the_administrator_may_do_everything_and_has_no_topic_limits(
    committed: dict[str, Any],
) -> None:
    rule = permissions_of(committed, ADMIN_USER)
    assert (rule["configure"], rule["write"], rule["read"]) == (".*", ".*", ".*")
    # No topic permission on an exchange means every routing key is allowed.
    assert user_rules(committed, "topic_permissions", ADMIN_USER) == []
