"""Idempotency keys that cover a batch of jobs, on real databases (SQLite always, PostgreSQL
when one answers), and the migration that brings a key table from before batches up to date."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Float, MetaData, PrimaryKeyConstraint, String, Table, inspect, text

from api_service.store import JobStore, KeyOutcome
from pipeline_shared.database import build_engine

STALE_AFTER = 60.0


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    opened = JobStore.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
def caller() -> str:
    """A caller of this test's own: the PostgreSQL database is shared by the module."""
    return f"key-{uuid.uuid4().hex[:16]}"


def new_ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


async def test_a_new_batch_key_owns_all_its_job_ids_in_order(store: JobStore, caller: str) -> None:
    ids = new_ids(3)

    reservation = await store.reserve_batch_key(caller, "k", "hash-a", ids, STALE_AFTER)

    assert reservation.outcome is KeyOutcome.NEW
    assert reservation.job_ids == tuple(ids)
    assert reservation.confirmed == frozenset()


async def test_an_accepted_batch_replays_its_job_ids_not_the_ones_offered_again(
    store: JobStore, caller: str
) -> None:
    ids = new_ids(3)
    await store.reserve_batch_key(caller, "k", "hash-a", ids, STALE_AFTER)
    await store.settle_key(caller, "k", "done", {0, 1, 2})

    again = await store.reserve_batch_key(caller, "k", "hash-a", new_ids(3), STALE_AFTER)

    assert (again.outcome, again.job_ids) == (KeyOutcome.REPLAY, tuple(ids))


async def test_a_batch_left_unknown_resumes_with_its_ids_and_what_was_confirmed(
    store: JobStore, caller: str
) -> None:
    ids = new_ids(4)
    await store.reserve_batch_key(caller, "k", "hash-a", ids, STALE_AFTER)
    await store.settle_key(caller, "k", "unknown", {0, 2})

    resumed = await store.reserve_batch_key(caller, "k", "hash-a", new_ids(4), STALE_AFTER)
    # While it is being resumed, the same request waits, and keeps what was confirmed.
    waiting = await store.reserve_batch_key(caller, "k", "hash-a", new_ids(4), STALE_AFTER)

    assert resumed.outcome is KeyOutcome.RESUME
    assert (resumed.job_ids, resumed.confirmed) == (tuple(ids), frozenset({0, 2}))
    assert (waiting.outcome, waiting.confirmed) == (KeyOutcome.PENDING, frozenset({0, 2}))


async def test_a_stale_pending_batch_is_taken_over_with_its_ids(
    store: JobStore, caller: str
) -> None:
    ids = new_ids(2)
    await store.reserve_batch_key(caller, "k", "hash-a", ids, stale_after=0.05)
    time.sleep(0.1)

    taken = await store.reserve_batch_key(caller, "k", "hash-a", new_ids(2), stale_after=0.05)

    assert (taken.outcome, taken.job_ids) == (KeyOutcome.RESUME, tuple(ids))


async def test_a_refused_batch_frees_its_key(store: JobStore, caller: str) -> None:
    await store.reserve_batch_key(caller, "k", "hash-a", new_ids(2), STALE_AFTER)
    await store.settle_key(caller, "k", "refused")
    fresh = new_ids(2)

    again = await store.reserve_batch_key(caller, "k", "hash-a", fresh, STALE_AFTER)

    assert (again.outcome, again.job_ids) == (KeyOutcome.NEW, tuple(fresh))


async def test_a_key_used_by_a_single_job_conflicts_with_a_batch_and_back(
    store: JobStore, caller: str
) -> None:
    await store.reserve_key(caller, "single", "hash-a", str(uuid.uuid4()), STALE_AFTER)
    await store.reserve_batch_key(caller, "batch", "hash-b", new_ids(2), STALE_AFTER)

    batch_on_single = await store.reserve_batch_key(
        caller, "single", "hash-b", new_ids(2), STALE_AFTER
    )
    single_on_batch = await store.reserve_key(
        caller, "batch", "hash-a", str(uuid.uuid4()), STALE_AFTER
    )

    assert batch_on_single.outcome is KeyOutcome.CONFLICT
    assert single_on_batch.outcome is KeyOutcome.CONFLICT


async def test_a_single_jobs_key_reads_back_without_batch_fields(
    store: JobStore, caller: str
) -> None:
    job_id = str(uuid.uuid4())
    await store.reserve_key(caller, "k", "hash-a", job_id, STALE_AFTER)
    await store.settle_key(caller, "k", "done")

    replay = await store.reserve_key(caller, "k", "hash-a", str(uuid.uuid4()), STALE_AFTER)

    assert (replay.outcome, replay.job_id, replay.job_ids) == (KeyOutcome.REPLAY, job_id, ())


# --- a key table made before batches ------------------------------------------------


def make_table_of_the_first_release(database_url: str, caller: str, job_id: str) -> None:
    """The key table as the first release made it, holding one accepted key."""
    old = MetaData()
    keys = Table(
        "api_idempotency_keys",
        old,
        Column("caller", String(64), nullable=False),
        Column("key", String(255), nullable=False),
        Column("request_hash", String(64), nullable=False),
        Column("job_id", String(36), nullable=False),
        Column("state", String(16), nullable=False),
        Column("created_at", Float, nullable=False),
        PrimaryKeyConstraint("caller", "key"),
    )
    engine = build_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS api_idempotency_keys"))
            old.create_all(connection)
            connection.execute(
                keys.insert().values(
                    caller=caller,
                    key="old",
                    request_hash="hash-old",
                    job_id=job_id,
                    state="done",
                    created_at=time.time(),
                )
            )
    finally:
        engine.dispose()


async def test_a_key_table_from_before_batches_gains_their_columns_and_keeps_its_keys(
    database_url: str, caller: str
) -> None:
    job_id = str(uuid.uuid4())
    make_table_of_the_first_release(database_url, caller, job_id)

    store = JobStore.open(database_url)
    try:
        replay = await store.reserve_key(caller, "old", "hash-old", new_ids(1)[0], STALE_AFTER)
        ids = new_ids(2)
        batch = await store.reserve_batch_key(caller, "new", "hash-new", ids, STALE_AFTER)
        engine = build_engine(database_url)
        columns = {c["name"] for c in inspect(engine).get_columns("api_idempotency_keys")}
        engine.dispose()
    finally:
        await store.close()

    assert (replay.outcome, replay.job_id) == (KeyOutcome.REPLAY, job_id)
    assert (batch.outcome, batch.job_ids) == (KeyOutcome.NEW, tuple(ids))
    assert {"job_ids", "confirmed"} <= columns


async def test_opening_an_up_to_date_store_again_changes_nothing(database_url: str) -> None:
    for _ in range(2):
        store = JobStore.open(database_url)
        await store.close()
