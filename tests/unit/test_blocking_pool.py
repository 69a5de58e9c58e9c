"""The mailer's pool of daemon threads for blocking provider calls."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mailer_service.blocking_pool import DaemonThreadPool, PoolClosed, still_wanted

pytestmark = pytest.mark.unit


async def test_a_call_runs_in_one_of_the_pools_threads_and_returns_its_value() -> None:
    pool = DaemonThreadPool(2, name="test")
    try:
        name = await pool.run(lambda: threading.current_thread().name)
    finally:
        pool.close()

    assert name.startswith("test-")
    assert name != threading.current_thread().name


async def test_an_exception_in_the_call_reaches_the_caller() -> None:
    pool = DaemonThreadPool(1, name="test")

    def fail() -> None:
        raise ValueError("provider said no")

    try:
        with pytest.raises(ValueError, match="provider said no"):
            await pool.run(fail)
    finally:
        pool.close()


async def test_no_more_calls_run_at_once_than_the_pool_has_threads() -> None:
    pool = DaemonThreadPool(2, name="test")
    running = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    try:
        await asyncio.gather(*(pool.run(work) for _ in range(6)))
    finally:
        pool.close()

    assert most == 2


async def test_a_thread_keeps_its_own_state_from_one_call_to_the_next() -> None:
    pool = DaemonThreadPool(1, name="test")
    local = threading.local()

    def count() -> int:
        local.calls = getattr(local, "calls", 0) + 1
        return int(local.calls)

    try:
        assert [await pool.run(count) for _ in range(3)] == [1, 2, 3]
    finally:
        pool.close()


async def test_a_call_given_up_on_before_it_started_never_runs() -> None:
    pool = DaemonThreadPool(1, name="test")
    release = threading.Event()
    ran: list[str] = []
    try:
        blocker = asyncio.ensure_future(pool.run(release.wait))
        waiting = asyncio.ensure_future(pool.run(lambda: ran.append("late")))
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        await blocker
        await pool.run(lambda: None)  # the queue has moved past the cancelled call
    finally:
        pool.close()

    assert ran == []


async def test_closing_returns_at_once_and_refuses_new_work() -> None:
    pool = DaemonThreadPool(1, name="test")
    hang = threading.Event()
    stuck = asyncio.ensure_future(pool.run(hang.wait))
    await asyncio.sleep(0.05)

    started = time.monotonic()
    pool.close()

    assert time.monotonic() - started < 0.1
    with pytest.raises(PoolClosed):
        await pool.run(lambda: None)
    hang.set()
    await stuck


def test_a_process_exits_at_once_while_a_call_still_hangs() -> None:
    script = textwrap.dedent(
        """
        import asyncio, time
        from mailer_service.blocking_pool import DaemonThreadPool

        async def main():
            pool = DaemonThreadPool(2, name="mailtrap")
            asyncio.ensure_future(pool.run(lambda: time.sleep(60)))
            await asyncio.sleep(0.1)
            pool.close()

        asyncio.run(main())
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)

    assert done.returncode == 0
    assert time.monotonic() - started < 10


async def test_a_call_sees_whether_its_caller_still_waits_for_it() -> None:
    # A send that waited (for the provider's budget) checks this before it sends:
    # a handler that timed out meanwhile must not have its email sent behind it.
    pool = DaemonThreadPool(1, name="test")
    started, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def wait_then_look() -> None:
        seen.append(still_wanted())
        started.set()
        release.wait(5)
        seen.append(still_wanted())

    try:
        waiting = asyncio.create_task(pool.run(wait_then_look))
        await asyncio.to_thread(started.wait, 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        # The next call runs once the first is done, and is wanted.
        assert await pool.run(still_wanted) is True
    finally:
        pool.close()

    assert seen == [True, False]
    assert still_wanted() is True  # outside the pool's threads
