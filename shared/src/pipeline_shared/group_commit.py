"""Group commit: many callers' writes in one transaction, none waiting long for it.

A service hands each item to ``GroupCommit.submit`` and awaits its result.
Items that arrive while a transaction is being written wait and go into the
next one together, so under load one commit (one disk sync, one thread hop)
serves a whole batch, and a lone item is written at once: no timer, no added
latency. The blocking ``write`` runs in a worker thread and returns one result
per item, in order; if it raises, every item of that batch gets the error.

Items that trickle in one at a time under a steady load would still go alone,
each one just after the previous write. With a ``linger``, a write that would
start within ``linger`` seconds of the last one waits that long for company
first; after a quiet spell an item is still written at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 500


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger: float = 0.0,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._last_written = -float("inf")
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The item's result once its batch is committed; raises what the write raised."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        return await done

    async def close(self) -> None:
        """Wait until everything submitted is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_waiting(self) -> None:
        # Items submitted in the same turn of the loop join the first batch.
        await asyncio.sleep(0)
        while self._waiting:
            if (
                len(self._waiting) < self._max_batch
                and time.monotonic() - self._last_written < self._linger
            ):
                # Busy: the last write was a moment ago. Wait as long for company.
                await asyncio.sleep(self._linger)
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            try:
                results = await asyncio.to_thread(self._write, [item for item, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            finally:
                self._last_written = time.monotonic()
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)
