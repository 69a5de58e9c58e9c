"""The RabbitMQ topology: one exchange, and per consuming stage its queues.

Every service declares all of it at start, so services may start in any order
and no event is published before the queue that will carry it exists.

Queue arguments are part of a queue's identity: RabbitMQ refuses to redeclare
a queue with different ones. They are therefore constants here, never
settings; operators tune a running system through policies instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXCHANGE = "events"
"""The durable topic exchange every event is published to."""

DELIVERY_LIMIT = 10
"""Quorum-queue backstop: a message redelivered this often (a consumer that
keeps crashing on it) is dead-lettered by the broker itself."""


@dataclass(frozen=True, slots=True)
class Stage:
    """A consuming stage: its work queue, what it is bound to, and its dead letters."""

    name: str
    queue: str
    routing_key: str

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


PROCESSOR = Stage(name="processor", queue="processor.job.requested", routing_key="job.requested")
MAILER = Stage(name="mailer", queue="mailer.data.processed", routing_key="data.processed")

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PROCESSOR, MAILER)}
"""Every consuming stage, by name (``processor``, ``mailer``)."""

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


def format_delay(seconds: float) -> str:
    """``5`` -> ``5s``, ``0.25`` -> ``250ms``: readable, and distinct per delay."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"
