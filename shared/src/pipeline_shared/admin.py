"""pipeline-admin: look into the dead-letter queues, replay or purge them.

    pipeline-admin status [--watch] [--json]
    pipeline-admin dlq list processor
    pipeline-admin dlq show mailer 6f1c0b2e-...
    pipeline-admin dlq replay mailer [--job 6f1c0b2e-...]
    pipeline-admin dlq purge processor [--yes]

It connects through ``RABBITMQ_URL``. Listing and showing leave the messages
where they are (they are read without an ack and returned when the command
ends); replaying copies each chosen message back to its stage's work queue
with a fresh attempt count, waits for the broker's confirm, and only then
removes it from the dead-letter queue. ``status`` reads the management HTTP
API instead (see ``admin_status``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity

from pipeline_shared import admin_status
from pipeline_shared.logs import configure_logging
from pipeline_shared.messaging import ATTEMPTS_HEADER, copy_message
from pipeline_shared.settings import AdminSettings, load_settings, redact_url
from pipeline_shared.topology import QUEUE_EXCHANGE, STAGES, Stage

PROGRAM = "pipeline-admin"
DEFAULT_LIMIT = 1000

# Headers that describe one failure; a replayed message starts afresh without them.
_FAILURE_HEADERS = (
    ATTEMPTS_HEADER,
    "x-error-reason",
    "x-error-type",
    "x-failed-service",
    "x-failed-at",
    "x-retry-reason",
    "x-retry-error-type",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


class AdminError(Exception):
    """A problem to report in one line, with exit code 1."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What an operator wants to know about one dead message."""

    job_id: str
    event_type: str
    reason: str
    error_type: str
    attempts: int
    failed_at: str
    failed_service: str

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        reason = headers.get("x-error-reason")
        error_type = headers.get("x-error-type")
        if reason is None:
            # Dead-lettered by the broker itself (the delivery limit).
            broker_reason = headers.get("x-first-death-reason") or headers.get(
                "x-last-death-reason", "unknown"
            )
            reason = f"dead-lettered by the broker: {broker_reason}"
            error_type = "BrokerDeadLetter"
        attempts = headers.get(ATTEMPTS_HEADER) or headers.get("x-delivery-count") or 1
        return cls(
            job_id=message.correlation_id or "-",
            event_type=message.type or "-",
            reason=str(reason),
            error_type=str(error_type or "-"),
            attempts=int(attempts),
            failed_at=str(headers.get("x-failed-at", "-")),
            failed_service=str(headers.get("x-failed-service", "-")),
        )

    def line(self) -> str:
        return (
            f"{self.job_id}  {self.event_type:<13}  attempts={self.attempts}  "
            f"{self.failed_at}  {self.error_type}: {self.reason}"
        )


async def _dead_letter_queue(channel: AbstractChannel, stage: Stage) -> AbstractQueue:
    try:
        return await channel.get_queue(stage.dead_letter_queue, ensure=True)
    except ChannelNotFoundEntity:
        raise AdminError(
            f"queue {stage.dead_letter_queue} does not exist: has any service started?"
        ) from None


async def _browse(queue: AbstractQueue, limit: int) -> list[AbstractIncomingMessage]:
    """Up to ``limit`` messages, unacked: they go back to the queue when the channel closes."""
    messages: list[AbstractIncomingMessage] = []
    while len(messages) < limit:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        messages.append(message)
    return messages


async def list_dead(channel: AbstractChannel, stage: Stage, limit: int, out: TextIO) -> int:
    messages = await _browse(await _dead_letter_queue(channel, stage), limit)
    for message in messages:
        print(DeadLetter.of(message).line(), file=out)
    print(f"{len(messages)} message(s) in {stage.dead_letter_queue}", file=out)
    return 0


async def show_dead(
    channel: AbstractChannel, stage: Stage, job_id: str, limit: int, out: TextIO
) -> int:
    messages = await _browse(await _dead_letter_queue(channel, stage), limit)
    found = [m for m in messages if m.correlation_id == job_id]
    if not found:
        raise AdminError(f"no message of job {job_id} in {stage.dead_letter_queue}")
    for message in found:
        letter = DeadLetter.of(message)
        print(f"job:          {letter.job_id}", file=out)
        print(f"event:        {letter.event_type} (message_id {message.message_id})", file=out)
        print(f"failed in:    {letter.failed_service} at {letter.failed_at}", file=out)
        print(f"attempts:     {letter.attempts}", file=out)
        print(f"error:        {letter.error_type}: {letter.reason}", file=out)
        print(f"published by: {message.app_id} at {message.timestamp}", file=out)
        print("headers:", json.dumps(message.headers or {}, default=str, indent=2), file=out)
        print("body:", _pretty_body(message.body), file=out)
    return 0


def _pretty_body(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return repr(body[:2000])


async def replay_dead(
    channel: AbstractChannel, stage: Stage, job_id: str | None, limit: int, out: TextIO
) -> int:
    queue = await _dead_letter_queue(channel, stage)
    queues = await channel.get_exchange(QUEUE_EXCHANGE, ensure=False)
    replayed = 0
    for message in await _browse(queue, limit):
        if job_id is not None and message.correlation_id != job_id:
            continue
        copy = copy_message(message, {}, without=_FAILURE_HEADERS)
        await queues.publish(copy, routing_key=stage.queue, mandatory=True)
        await message.ack()
        replayed += 1
        print(f"replayed {message.correlation_id} to {stage.queue}", file=out)
    if job_id is not None and replayed == 0:
        raise AdminError(f"no message of job {job_id} in {stage.dead_letter_queue}")
    print(f"{replayed} message(s) replayed to {stage.queue}", file=out)
    return 0


async def purge_dead(channel: AbstractChannel, stage: Stage, assume_yes: bool, out: TextIO) -> int:
    queue = await _dead_letter_queue(channel, stage)
    count = queue.declaration_result.message_count or 0
    if not assume_yes and not _confirm(
        f"Delete {count} message(s) from {stage.dead_letter_queue}? [y/N] "
    ):
        print("nothing purged", file=out)
        return 1
    result = await queue.purge()
    print(f"purged {result.message_count} message(s) from {stage.dead_letter_queue}", file=out)
    return 0


def _confirm(question: str) -> bool:
    try:
        return input(question).strip().lower() in {"y", "yes"}
    except EOFError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="group", required=True)
    status = commands.add_parser("status", help="each stage's queues: depth, rates, dead letters")
    admin_status.configure_parser(status)
    dlq = commands.add_parser("dlq", help="the dead-letter queues")
    actions = dlq.add_subparsers(dest="action", required=True)
    stages = sorted(STAGES)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=help_text)
        action.add_argument("stage", choices=stages, help="which stage's dead letters")
        return action

    listing = add("list", "one line per dead message")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    show = add("show", "everything about one job's dead message(s)")
    show.add_argument("job_id")
    show.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    replay = add("replay", "send dead messages back to the work queue, with a fresh attempt count")
    replay.add_argument("--job", dest="job_id", help="only this job's message(s)")
    replay.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    purge = add("purge", "delete every dead message of the stage")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


async def run(args: argparse.Namespace, url: str, out: TextIO) -> int:
    stage = STAGES[args.stage]
    try:
        connection = await aio_pika.connect(url, client_properties={"connection_name": PROGRAM})
    except CONNECTION_EXCEPTIONS as exc:
        raise AdminError(f"cannot reach the broker at {redact_url(url)}: {exc}") from exc
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if args.action == "list":
            return await list_dead(channel, stage, args.limit, out)
        if args.action == "show":
            return await show_dead(channel, stage, args.job_id, args.limit, out)
        if args.action == "replay":
            return await replay_dead(channel, stage, args.job_id, args.limit, out)
        return await purge_dead(channel, stage, args.yes, out)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = load_settings(AdminSettings, PROGRAM)
    # The command reports problems itself, in one line; the AMQP libraries
    # would add their own tracebacks.
    configure_logging("ERROR", secrets=settings.secret_values())
    for library in ("aiormq", "aio_pika"):
        logging.getLogger(library).setLevel(logging.CRITICAL)
    try:
        if args.group == "status":
            code = admin_status.run(args, settings, sys.stdout)
        else:
            code = asyncio.run(run(args, settings.rabbitmq_url, sys.stdout))
    except (AdminError, admin_status.StatusError) as exc:
        sys.exit(f"{PROGRAM}: {exc}")
    sys.exit(code)
