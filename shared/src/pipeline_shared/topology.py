"""The RabbitMQ topology: one exchange, and per consuming stage its queues.

Every service declares all of it at start, so services may start in any order
and no event is published before the queue that will carry it exists. Where
the services' broker users may not configure anything (docker compose), the
broker imports the same topology from ``rabbitmq/definitions.json`` at boot,
rendered from this module by ``scripts/render_definitions.py``, and each
service only checks that it is there.

Queue arguments are part of a queue's identity: RabbitMQ refuses to redeclare
a queue with different ones. They are therefore constants here, never
settings; operators tune a running system through policies instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

EXCHANGE = "events"
"""The durable topic exchange every event is published to."""

QUEUE_EXCHANGE = "pipeline.queues"
"""A durable topic exchange to which each stage's work, retry and dead-letter
queues are bound under their own names: retries, dead letters and replays
are put into a queue through it. A topic exchange rather than the default
one, so RabbitMQ's topic permissions can confine each service's user to its
own stage's queues."""

DELIVERY_LIMIT = 10
"""Quorum-queue backstop: a message redelivered this often (a consumer that
keeps crashing on it) is dead-lettered by the broker itself."""


@dataclass(frozen=True, slots=True)
class Stage:
    """A consuming stage: its work queue, the events it is bound to, and its dead letters."""

    name: str
    queue: str
    routing_keys: tuple[str, ...]
    reports_failures: bool = True
    """Whether a message it gives up on fails its job (``JobFailed``): true for
    the stages doing a job's work, false for observers such as the read model."""

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"

    def retry_queue(self, delay_seconds: float) -> str:
        return f"{self.queue}.retry.{format_delay(delay_seconds)}"

    def queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            # What the broker dead-letters itself (the delivery limit) lands in
            # the same dead-letter queue as what the consumers dead-letter.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


PROCESSOR = Stage(
    name="processor", queue="processor.job.requested", routing_keys=("job.requested",)
)
MAILER = Stage(name="mailer", queue="mailer.data.processed", routing_keys=("data.processed",))
STATUS = Stage(
    name="status",
    queue="api.job.status",
    routing_keys=("data.processed", "email.sent", "job.failed"),
    reports_failures=False,
)
"""The api's read model of every job, fed by the events of the stages after it. Not
``job.requested``: the api records each job it accepts itself, and a copy of every
JobRequested would cost a delivery, a decode and a quorum enqueue per job for a fact
the api already has (the later events name the job's caller too)."""

RETIRED_BINDINGS: tuple[tuple[str, str], ...] = ((STATUS.queue, "job.requested"),)
"""(queue, routing key) bindings to ``EXCHANGE`` that earlier versions declared:
``declare_topology`` removes them from a broker that still has them."""

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PROCESSOR, MAILER, STATUS)}
"""Every consuming stage, by name (``processor``, ``mailer``, ``status``)."""

DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


def retry_queue_arguments(stage: Stage, delay_seconds: float) -> dict[str, Any]:
    """A retry queue holds each message for its delay, then the broker moves it
    back to the stage's work queue. One queue per delay step, because a
    message's TTL only expires at the head of its queue: mixed delays in one
    queue would hold a short delay behind a long one."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(delay_seconds * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": stage.queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


class QueueSpec(NamedTuple):
    """A queue as it is declared: its name and its arguments."""

    name: str
    arguments: dict[str, Any]


def stage_queues(stage: Stage, retry_delays: Sequence[float]) -> list[QueueSpec]:
    """Every queue of ``stage``: its work queue, its dead-letter queue and one retry
    queue per distinct delay, each bound to ``QUEUE_EXCHANGE`` under its own name."""
    specs = [
        QueueSpec(stage.queue, stage.queue_arguments()),
        QueueSpec(stage.dead_letter_queue, dict(DEAD_LETTER_QUEUE_ARGUMENTS)),
    ]
    for delay in retry_delays:
        name = stage.retry_queue(delay)
        if all(spec.name != name for spec in specs):
            specs.append(QueueSpec(name, retry_queue_arguments(stage, delay)))
    return specs


def format_delay(seconds: float) -> str:
    """``5`` -> ``5s``, ``0.25`` -> ``250ms``: readable, and distinct per delay."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"
