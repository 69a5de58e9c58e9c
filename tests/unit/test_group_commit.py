"""Group commit: which items share a write, and what each caller gets back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from pipeline_shared.group_commit import GroupCommit

pytestmark = pytest.mark.unit


class Writes:
    """A blocking write that records each batch and answers each item doubled."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.seconds = seconds
        self.started = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        time.sleep(self.seconds)
        return [2 * item for item in items]


async def test_items_submitted_together_share_one_write_and_each_gets_its_result() -> None:
    writes = Writes()
    commit = GroupCommit(writes)

    results = await asyncio.gather(*(commit.submit(n) for n in range(5)))

    assert results == [0, 2, 4, 6, 8]
    assert writes.batches == [[0, 1, 2, 3, 4]]


async def test_items_arriving_during_a_write_go_together_into_the_next() -> None:
    writes = Writes(seconds=0.1)
    commit = GroupCommit(writes)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.to_thread(writes.started.wait, 5)

    later = await asyncio.gather(*(commit.submit(n) for n in range(1, 4)))

    assert await first == 0
    assert later == [2, 4, 6]
    assert writes.batches == [[0], [1, 2, 3]]


async def test_a_failed_write_fails_every_item_of_its_batch_and_no_other() -> None:
    calls = 0

    def write(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk gone")
        return list(items)

    commit = GroupCommit(write)
    failed = await asyncio.gather(commit.submit(1), commit.submit(2), return_exceptions=True)
    assert [type(result) for result in failed] == [OSError, OSError]
    assert await commit.submit(3) == 3


async def test_with_a_linger_a_lone_item_after_a_quiet_spell_is_written_at_once() -> None:
    writes = Writes()
    commit = GroupCommit(writes, linger=1.0)

    started = time.monotonic()
    assert await commit.submit(1) == 2

    assert time.monotonic() - started < 0.5  # not the linger's 1 s


async def test_with_a_linger_items_just_after_a_write_wait_for_company() -> None:
    writes = Writes()
    commit = GroupCommit(writes, linger=0.2)
    await commit.submit(0)  # a write a moment ago: busy

    first = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0.05)  # within the linger: joins the same write
    second = asyncio.ensure_future(commit.submit(2))

    assert await asyncio.gather(first, second) == [2, 4]
    assert writes.batches == [[0], [1, 2]]
