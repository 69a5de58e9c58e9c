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
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailer_service.compose import OutgoingEmail
from mailer_service.transport import EmailTransport, Receipt, SendOutcomeUnknown
from pipeline_shared.errors import HandlerFailure, TransientFailure

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
    async def take_slot(self) -> None:
        """Wait for the provider's request budget to allow one more request."""
        ...

    async def send_batch(
        self, emails: Sequence[OutgoingEmail], wanted: Sequence[Callable[[], bool]] | None = None
    ) -> list[Receipt | HandlerFailure]:
        """One request (its budget slot already taken); one outcome per email, in
        order; never raises for the provider's answers. ``wanted`` says, from any
        thread, whether each email's handler still waits for it: an email sent on
        its own later (after a refused batch) is dropped once it does not."""
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
    """An ``EmailTransport`` that sends through ``sender.send_batch``.

    One dispatcher cuts the batches: it waits (at most ``wait_seconds``, unless
    a batch is full) for emails to gather, then for a free request (at most
    ``concurrency`` in flight) and a slot in the provider's budget, and only
    then takes every email waiting, up to the limits. So emails keep gathering
    while the budget or the provider makes them wait, and a request leaves with
    as many as it can carry; an email whose handler gave up meanwhile is left
    out.
    """

    def __init__(self, sender: BatchSender, limits: BatchLimits, *, concurrency: int) -> None:
        self._sender = sender
        self._limits = limits
        self.name = sender.name
        self._waiting: list[tuple[OutgoingEmail, int, asyncio.Future[Receipt]]] = []
        self._waiting_bytes = 0
        self._full = asyncio.Event()
        self._requests = asyncio.Semaphore(concurrency)
        self._dispatcher: asyncio.Task[None] | None = None
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
        done: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        size = estimated_size(email)
        self._waiting.append((email, size, done))
        self._waiting_bytes += size
        if self._is_full():
            self._full.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        # A handler that gives up cancels ``done``: the dispatcher leaves it out.
        return await done

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for _, _, done in self._waiting:
            done.cancel()
        self._waiting.clear()
        await self._sender.close()

    def _is_full(self) -> bool:
        return (
            len(self._waiting) >= self._limits.max_emails
            or self._waiting_bytes >= self._limits.max_bytes
        )

    async def _dispatch(self) -> None:
        while self._waiting:
            if not self._is_full():
                # Company for a lone email, for a moment at most.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._limits.wait_seconds)
            await self._requests.acquire()
            try:
                await self._sender.take_slot()
            except Exception as exc:
                # Nothing left: the emails waiting were not sent, and may be.
                self._requests.release()
                failure = TransientFailure(
                    f"the provider request budget cannot be read: {type(exc).__name__}"
                )
                for _, done in self._cut(everything=True):
                    if not done.done():
                        done.set_exception(failure)
                continue
            except BaseException:
                self._requests.release()
                raise
            batch = self._cut()
            if not batch:
                self._requests.release()
                continue
            task = asyncio.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _cut(
        self, *, everything: bool = False
    ) -> list[tuple[OutgoingEmail, asyncio.Future[Receipt]]]:
        """The next batch: the live emails waiting, up to the limits (or all)."""
        live = [entry for entry in self._waiting if not entry[2].done()]
        group = split([size for _, size, _ in live], self._limits)[0] if live else range(0)
        if everything:
            group = range(len(live))
        batch, rest = live[: group.stop], live[group.stop :]
        self._waiting = rest
        self._waiting_bytes = sum(size for _, size, _ in rest)
        if not self._is_full():
            self._full.clear()
        return [(email, done) for email, _, done in batch]

    async def _send(self, batch: list[tuple[OutgoingEmail, asyncio.Future[Receipt]]]) -> None:
        try:
            outcomes = await self._sender.send_batch(
                [email for email, _ in batch], [_waited_for(done) for _, done in batch]
            )
        except Exception as exc:  # a bug; the request may have gone out
            log.exception("sending a batch of %d email(s) failed", len(batch))
            unknown = SendOutcomeUnknown(f"sending the batch failed: {type(exc).__name__}")
            outcomes = [unknown] * len(batch)
        finally:
            self._requests.release()
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)


def _waited_for(done: asyncio.Future[Receipt]) -> Callable[[], bool]:
    # Read from a sending thread: only the done flag, which the loop sets.
    return lambda: not done.done()
