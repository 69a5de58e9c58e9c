"""Batch sending: the emails in hand go to the provider in one request.

Each delivery's handler still sends its own email (``BatchingTransport.send``)
and gets its own outcome, so the ledger, the retries and the reconciliation
of uncertain sends work per job as before. Underneath, the emails handed in
within ``wait_seconds`` of each other share one provider request, up to
``max_emails`` and ``max_bytes`` (Mailtrap: 500 messages and 50 MB); a lone
email waits at most ``wait_seconds``. The provider answers each item on its
own, and a request that fails as a whole gives every item the same outcome
(so a timeout makes every item *uncertain*: reconciled, never blindly re-sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailer_service.compose import OutgoingEmail
from mailer_service.transport import EmailTransport, Receipt, SendOutcomeUnknown
from pipeline_shared.errors import HandlerFailure

log = logging.getLogger("mailer.batching")

# What a request adds to an email's text and subject (addresses, keys, JSON).
_OVERHEAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_emails: int = 500
    max_bytes: int = 45 * 1024 * 1024
    """Below the provider's 50 MB: sizes are estimated, not measured."""
    wait_seconds: float = 0.02


class BatchSender(EmailTransport, Protocol):
    async def send_batch(
        self, emails: Sequence[OutgoingEmail], wanted: Callable[[int], bool]
    ) -> list[Receipt | HandlerFailure]:
        """One outcome per email, in order; never raises for the provider's answers.
        Leaves out the emails no longer ``wanted`` when the request may leave."""
        ...


def estimated_size(email: OutgoingEmail) -> int:
    return len(email.text.encode()) + len((email.subject or "").encode()) + _OVERHEAD_BYTES


def split(sizes: Sequence[int], limits: BatchLimits) -> list[range]:
    """Consecutive groups of the items, none over the limits (an item over the byte
    limit alone goes alone: the provider, not we, refuses it)."""
    groups: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        count = index - start
        if count and (count >= limits.max_emails or total + size > limits.max_bytes):
            groups.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


class BatchingTransport:
    """An ``EmailTransport`` that sends through ``sender.send_batch``."""

    def __init__(self, sender: BatchSender, limits: BatchLimits) -> None:
        self._sender = sender
        self._limits = limits
        self.name = sender.name
        self._waiting: list[tuple[OutgoingEmail, int, asyncio.Future[Receipt]]] = []
        self._waiting_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def reconciles(self) -> bool:
        return self._sender.reconciles

    @property
    def settle_seconds(self) -> float:
        return self._sender.settle_seconds

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        return await self._sender.find_sent(email, since)

    async def send(self, email: OutgoingEmail) -> Receipt:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Receipt] = loop.create_future()
        size = estimated_size(email)
        self._waiting.append((email, size, done))
        self._waiting_bytes += size
        full = (
            len(self._waiting) >= self._limits.max_emails
            or self._waiting_bytes >= self._limits.max_bytes
        )
        if full:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._limits.wait_seconds, self._flush)
        try:
            return await done
        except asyncio.CancelledError:
            self._withdraw(done)
            raise

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, done in self._waiting:
            done.cancel()
        self._waiting.clear()
        await self._sender.close()

    def _withdraw(self, done: asyncio.Future[Receipt]) -> None:
        # Not sent yet: leave it out of the next request. (Already in a request,
        # it goes out; the cancelled handler's claim then settles it.)
        for index, (_, size, waiting) in enumerate(self._waiting):
            if waiting is done:
                del self._waiting[index]
                self._waiting_bytes -= size
                return

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        for group in split([size for _, size, _ in waiting], self._limits):
            batch = [(email, done) for email, _, done in waiting[group.start : group.stop]]
            task = asyncio.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[OutgoingEmail, asyncio.Future[Receipt]]]) -> None:
        try:
            # A handler that gave up (cancelled) has its future done: read from the
            # worker thread, which only needs to see that it is set.
            outcomes = await self._sender.send_batch(
                [email for email, _ in batch], lambda index: not batch[index][1].done()
            )
        except Exception as exc:  # a bug; the request may have gone out
            log.exception("sending a batch of %d email(s) failed", len(batch))
            unknown = SendOutcomeUnknown(f"sending the batch failed: {type(exc).__name__}")
            outcomes = [unknown] * len(batch)
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)
