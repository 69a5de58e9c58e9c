"""A fixed pool of daemon threads for blocking calls, which never holds up the exit.

``ThreadPoolExecutor`` joins its threads when the interpreter exits, so a
mailer whose provider request hangs cannot exit before the request's own
timeout, whatever ``SHUTDOWN_TIMEOUT_SECONDS`` says. Here the threads are
daemons: ``close`` stops taking work and returns at once, and a call still
running in a thread is abandoned with the process (its message has gone
back to the queue, and its claim in the ledger decides what happens next).

The threads live as long as the pool, so per-thread state (one HTTPS session
per thread) is kept from one call to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Work = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]

_running = threading.local()  # the future of the call a pool thread is running


def still_wanted() -> bool:
    """Within a pool call: whether its caller still awaits the result. False once the
    awaiting coroutine was cancelled (a handler that timed out gave up on it): a call
    that waited (for a provider's budget, say) checks before doing what cannot be
    undone. True outside a pool thread."""
    future: asyncio.Future[Any] | None = getattr(_running, "future", None)
    # Only the done flag is read here; the loop's thread is the one that sets it.
    return future is None or not future.cancelled()


class PoolClosed(RuntimeError):
    """Work was submitted to a pool that was closed."""


class DaemonThreadPool:
    def __init__(self, size: int, name: str) -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, function: Callable[[], T]) -> T:
        """``function()`` in one of the pool's threads; at most ``size`` run at once."""
        if self._closed:
            raise PoolClosed("the thread pool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._work.put((loop, future, function))
        return await future

    def close(self) -> None:
        """Take no more work; threads finish what they hold (or are abandoned at exit)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._work.put(None)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            loop, future, function = item
            if future.cancelled():
                continue  # given up on before it started: never run it
            _running.future = future
            try:
                result = function()
            except BaseException as exc:  # handed to the awaiting coroutine
                _settle(loop, future, None, exc)
            else:
                _settle(loop, future, result, None)
            finally:
                _running.future = None


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    def settle() -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # A closed loop raises RuntimeError: nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)
