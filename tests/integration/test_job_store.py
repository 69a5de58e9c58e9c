"""The api's job store on real databases: SQLite always, PostgreSQL when one answers."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, event, text

from api_service.read_model import Entry, JobEvent, JobRecord, apply
from api_service.store import (
    InvalidCursor,
    JobStore,
    KeyOutcome,
    encode_cursor,
    jobs,
)
from pipeline_shared.database import build_engine
from pipeline_shared.events import DataProcessed, EmailSent, JobFailed, JobRequested

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LONG_AGO = datetime(2001, 1, 1, tzinfo=UTC)  # only the purge test uses times this old
STALE_AFTER = 60.0


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    opened = JobStore.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[JobStore]]:
    """Eight stores on one database, as eight api replicas would have."""
    opened = [JobStore.open(database_url) for _ in range(8)]
    yield opened
    for replica in opened:
        await replica.close()


@pytest.fixture
def caller() -> str:
    """A caller of this test's own: the PostgreSQL database is shared by the module."""
    return f"key-{uuid.uuid4().hex[:16]}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def requested(job: str, when: datetime, caller: str | None, **overrides: Any) -> JobRequested:
    fields: dict[str, Any] = {
        "job_id": job,
        "occurred_at": when,
        "email": "ada@example.com",
        "data": {"score": 7},
        "submitted_by": caller,
    }
    return JobRequested(**{**fields, **overrides})


def processed(job: str, when: datetime, **overrides: Any) -> DataProcessed:
    fields: dict[str, Any] = {
        "job_id": job,
        "occurred_at": when,
        "email": "ada@example.com",
        "step": "summarise",
        "data": {"score": 7},
        "result": {"field_count": 1},
    }
    return DataProcessed(**{**fields, **overrides})


def sent(job: str, when: datetime, **overrides: Any) -> EmailSent:
    fields: dict[str, Any] = {
        "job_id": job,
        "occurred_at": when,
        "email": "ada@example.com",
        "transport": "mailtrap",
        "provider_message_id": "msg-1",
        "attempts": 1,
    }
    return EmailSent(**{**fields, **overrides})


def failed(job: str, when: datetime, **overrides: Any) -> JobFailed:
    fields: dict[str, Any] = {
        "job_id": job,
        "occurred_at": when,
        "stage": "processor-service",
        "reason": "unknown processing step 'nope'",
        "error_type": "PermanentFailure",
        "attempts": 1,
    }
    return JobFailed(**{**fields, **overrides})


def new_job() -> str:
    return str(uuid.uuid4())


async def all_pages(
    store: JobStore, caller: str, limit: int, status: Any = None
) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        records, cursor = await store.list_jobs(caller, status, limit, cursor)
        pages.append([record.job_id for record in records])
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor does not advance"


# --- record and get ------------------------------------------------------------


async def test_a_recorded_job_reads_back_with_its_timeline_and_derived_fields(
    store: JobStore, caller: str
) -> None:
    job = new_job()
    await store.record(requested(job, at(0), caller))
    await store.record(processed(job, at(1)))
    await store.record(sent(job, at(2), attempts=2, provider_message_id="msg-7"))

    record = await store.get(job, caller)

    assert record is not None
    assert (record.job_id, record.caller, record.status) == (job, caller, "sent")
    assert (record.created_at, record.updated_at) == (at(0), at(2))
    assert (record.attempts, record.provider_message_id, record.error) == (2, "msg-7", None)
    assert [entry.event for entry in record.timeline] == [
        "JobRequested",
        "DataProcessed",
        "EmailSent",
    ]


async def test_a_failed_job_reads_back_with_its_reason(store: JobStore, caller: str) -> None:
    job = new_job()
    await store.record(requested(job, at(0), caller))
    await store.record(failed(job, at(1), reason="the step raised", attempts=3))

    record = await store.get(job, caller)

    assert record is not None
    assert (record.status, record.error, record.attempts) == ("failed", "the step raised", 3)


async def test_a_job_is_invisible_to_another_caller(store: JobStore, caller: str) -> None:
    job = new_job()
    await store.record(requested(job, at(0), caller))

    assert await store.get(job, "key-someone-else") is None
    assert await store.get(job, caller) is not None


async def test_an_unknown_job_is_none(store: JobStore, caller: str) -> None:
    assert await store.get(new_job(), caller) is None


async def test_recording_the_same_event_twice_keeps_one_timeline_entry(
    store: JobStore, caller: str
) -> None:
    job = new_job()
    request = requested(job, at(0), caller)
    processing = processed(job, at(1))
    for event_ in (request, processing, request, processing):
        await store.record(event_)

    record = await store.get(job, caller)

    assert record is not None
    assert [entry.event_id for entry in record.timeline] == [
        str(request.event_id),
        str(processing.event_id),
    ]


async def test_events_recorded_out_of_order_end_in_the_right_state(
    store: JobStore, caller: str
) -> None:
    job = new_job()
    await store.record(sent(job, at(3)))
    await store.record(failed(job, at(1)))
    await store.record(processed(job, at(2)))
    assert await store.get(job, caller) is None  # whose it is arrives with the request

    await store.record(requested(job, at(0), caller))

    record = await store.get(job, caller)
    assert record is not None
    assert record.status == "sent"
    assert record.created_at == at(0)
    assert [entry.at for entry in record.timeline] == [at(0), at(1), at(2), at(3)]


async def test_a_replayed_failure_is_recorded_as_processed_again(
    store: JobStore, caller: str
) -> None:
    job = new_job()
    for event_ in (requested(job, at(0), caller), processed(job, at(2)), failed(job, at(1))):
        await store.record(event_)

    record = await store.get(job, caller)

    assert record is not None
    assert (record.status, record.error) == ("processed", None)


async def test_an_email_sent_re_published_with_a_new_event_id_is_recorded_once(
    store: JobStore, caller: str
) -> None:
    job = new_job()
    first = sent(job, at(2), attempts=1, provider_message_id="msg-7")
    await store.record(requested(job, at(0), caller))
    await store.record(processed(job, at(1)))
    await store.record(first)
    # DataProcessed redelivered after the email was sent: the mailer re-publishes.
    await store.record(sent(job, at(9), attempts=2, provider_message_id="msg-7"))

    record = await store.get(job, caller)

    assert record is not None
    assert [entry.event for entry in record.timeline] == [
        "JobRequested",
        "DataProcessed",
        "EmailSent",
    ]
    assert record.timeline[-1].event_id == str(first.event_id)
    assert (record.status, record.attempts, record.provider_message_id) == ("sent", 1, "msg-7")
    assert record.updated_at == at(2)


LEGACY_TABLE = (
    "CREATE TABLE IF NOT EXISTS api_jobs (job_id VARCHAR(36) PRIMARY KEY, caller VARCHAR(64), "
    "status VARCHAR(16) NOT NULL, created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, "
    "timeline TEXT NOT NULL, trace_id VARCHAR(32))"
)


def legacy_item(e: Entry) -> dict[str, Any]:
    """A timeline entry as versions before the facts had columns wrote it."""
    return {
        "event_id": e.event_id,
        "event": e.event,
        "at": e.at.isoformat(),
        "attempts": e.attempts,
        "reason": e.reason,
        "provider_message_id": e.provider_message_id,
    }


def write_legacy_row(database_url: str, job: str, caller: str, timeline: tuple[Entry, ...]) -> None:
    """A row as versions before the facts had columns wrote it: a JSON timeline."""
    record = JobRecord(job, caller, timeline)
    row = {
        "job_id": job,
        "caller": caller,
        "status": record.status,
        "created_at": record.created_at.timestamp(),
        "updated_at": record.updated_at.timestamp(),
        "timeline": json.dumps([legacy_item(e) for e in timeline]),
        "trace_id": None,
    }
    engine = build_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(LEGACY_TABLE))  # a database no newer version opened
            connection.execute(
                text(
                    "INSERT INTO api_jobs (job_id, caller, status, created_at, updated_at, "
                    "timeline, trace_id) VALUES (:job_id, :caller, :status, :created_at, "
                    ":updated_at, :timeline, :trace_id)"
                ),
                row,
            )
    finally:
        engine.dispose()


async def test_a_row_written_with_a_re_published_event_twice_reads_with_it_once(
    store: JobStore, database_url: str, caller: str
) -> None:
    # What the store wrote before the timeline held one entry per event type.
    job = new_job()
    timeline = (
        Entry(str(uuid.uuid4()), "JobRequested", at(0)),
        Entry(str(uuid.uuid4()), "DataProcessed", at(1)),
        Entry(str(uuid.uuid4()), "EmailSent", at(2), attempts=1, provider_message_id="msg-7"),
        Entry(str(uuid.uuid4()), "EmailSent", at(9), attempts=2, provider_message_id="msg-7"),
    )
    write_legacy_row(database_url, job, caller, timeline)

    record = await store.get(job, caller)

    assert record is not None
    assert record.timeline == timeline[:3]


async def test_a_legacy_row_is_upgraded_at_start_and_folds_later_events_with_its_facts(
    database_url: str, caller: str
) -> None:
    job = new_job()
    timeline = (
        Entry(str(uuid.uuid4()), "JobRequested", at(0)),
        Entry(str(uuid.uuid4()), "JobFailed", at(3), attempts=2, reason="provider said no"),
    )
    write_legacy_row(database_url, job, caller, timeline)

    upgraded = JobStore.open(database_url)
    try:
        await upgraded.record(processed(job, at(1)))  # before the failure: still failed
        failed_record = await upgraded.get(job, caller)
        await upgraded.record(sent(job, at(5), attempts=3))
        sent_record = await upgraded.get(job, caller)
        failed_list, _ = await upgraded.list_jobs(caller, "failed", 10, None)
        sent_list, _ = await upgraded.list_jobs(caller, "sent", 10, None)
    finally:
        await upgraded.close()
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(jobs.select().where(jobs.c.job_id == job)).one()
    finally:
        engine.dispose()

    assert failed_record is not None
    assert (failed_record.status, failed_record.error) == ("failed", "provider said no")
    assert sent_record is not None
    assert sent_record.status == "sent"
    assert sent_record.created_at == at(0)
    assert sent_record.attempts == 3
    assert [e.event for e in sent_record.timeline] == [
        "JobRequested",
        "DataProcessed",
        "JobFailed",
        "EmailSent",
    ]
    assert failed_list == []
    assert [r.job_id for r in sent_list] == [job]
    assert stored.timeline == "[]"
    assert stored.requested_id == timeline[0].event_id
    assert stored.failed_reason == "provider said no"
    assert stored.created_at == at(0).timestamp()


async def test_an_upgrade_folds_a_timeline_an_older_replica_wrote_with_the_rows_columns(
    database_url: str, caller: str
) -> None:
    # A rolling upgrade gone wrong: this version recorded the request and a late
    # failure; an older replica then wrote a redelivered earlier failure into the
    # row's timeline. The next start must keep the latest failure, not the JSON's.
    job = new_job()
    first = JobStore.open(database_url)
    try:
        await first.record(requested(job, at(0), caller))
        await first.record(failed(job, at(3), reason="late"))
    finally:
        await first.close()
    early = Entry(str(uuid.uuid4()), "JobFailed", at(2), attempts=1, reason="early")
    engine = build_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                jobs.update()
                .where(jobs.c.job_id == job)
                .values(timeline=json.dumps([legacy_item(early)]), created_at=at(2).timestamp())
            )
    finally:
        engine.dispose()

    again = JobStore.open(database_url)
    try:
        record = await again.get(job, caller)
        listed, _ = await again.list_jobs(caller, "failed", 10, None)
    finally:
        await again.close()

    assert record is not None
    assert (record.error, record.created_at) == ("late", at(0))
    assert [r.job_id for r in listed] == [job]
    assert listed[0].created_at == at(0)


async def test_times_far_from_now_are_kept_to_the_microsecond(store: JobStore, caller: str) -> None:
    job = new_job()
    far = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    await store.record(requested(job, datetime(2500, 1, 1, 0, 0, 0, 1, tzinfo=UTC), caller))
    await store.record(processed(job, datetime(2500, 1, 1, 0, 0, 0, 2, tzinfo=UTC)))
    await store.record(failed(job, far))

    record = await store.get(job, caller)

    assert record is not None
    assert [e.at.microsecond for e in record.timeline] == [1, 2, 999999]
    assert (record.status, record.updated_at) == ("failed", far)


async def test_a_record_survives_reopening_the_database(database_url: str, caller: str) -> None:
    job = new_job()
    first = JobStore.open(database_url)
    await first.record(requested(job, at(0), caller))
    await first.close()

    again = JobStore.open(database_url)
    try:
        record = await again.get(job, caller)
    finally:
        await again.close()

    assert record is not None
    assert record.status == "queued"


# --- list_jobs ----------------------------------------------------------------------


async def test_jobs_are_listed_newest_first_and_pages_cover_each_job_exactly_once(
    store: JobStore, caller: str
) -> None:
    # Seven jobs, three of them created at the same instant (the cursor breaks ties).
    created = [at(0), at(1), at(2), at(2), at(2), at(3), at(4)]
    jobs = [new_job() for _ in created]
    for job, when in zip(jobs, created, strict=True):
        await store.record(requested(job, when, caller))
    expected = [job for _, job in sorted(zip(created, jobs, strict=True), reverse=True)]

    pages = await all_pages(store, caller, limit=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [job for page in pages for job in page] == expected


async def test_a_page_exactly_as_long_as_what_is_left_has_no_next_cursor(
    store: JobStore, caller: str
) -> None:
    for second in range(4):
        await store.record(requested(new_job(), at(second), caller))

    records, cursor = await store.list_jobs(caller, None, 4, None)

    assert len(records) == 4
    assert cursor is None


async def test_a_caller_without_jobs_gets_an_empty_page(store: JobStore, caller: str) -> None:
    assert await store.list_jobs(caller, None, 10, None) == ([], None)


async def test_listing_is_filtered_by_status(store: JobStore, caller: str) -> None:
    queued, done, broken, also_done = new_job(), new_job(), new_job(), new_job()
    for second, job in enumerate((queued, done, broken, also_done)):
        await store.record(requested(job, at(second), caller))
    await store.record(sent(done, at(10)))
    await store.record(failed(broken, at(10)))
    await store.record(sent(also_done, at(10)))

    sent_pages = await all_pages(store, caller, limit=1, status="sent")
    failed_jobs, _ = await store.list_jobs(caller, "failed", 10, None)
    queued_jobs, _ = await store.list_jobs(caller, "queued", 10, None)
    processed_jobs, _ = await store.list_jobs(caller, "processed", 10, None)

    assert sent_pages == [[also_done], [done]]
    assert [r.job_id for r in failed_jobs] == [broken]
    assert [r.job_id for r in queued_jobs] == [queued]
    assert processed_jobs == []


async def test_listing_shows_only_the_callers_own_jobs(store: JobStore, caller: str) -> None:
    other = f"key-{uuid.uuid4().hex[:16]}"
    mine, theirs = new_job(), new_job()
    await store.record(requested(mine, at(0), caller))
    await store.record(requested(theirs, at(1), other))
    await store.record(processed(new_job(), at(2)))  # nobody's yet

    my_jobs, _ = await store.list_jobs(caller, None, 10, None)
    their_jobs, _ = await store.list_jobs(other, None, 10, None)

    assert [r.job_id for r in my_jobs] == [mine]
    assert [r.job_id for r in their_jobs] == [theirs]


async def test_a_job_is_listed_by_its_request_time_even_when_the_request_arrived_last(
    store: JobStore, caller: str
) -> None:
    early, late = new_job(), new_job()
    await store.record(requested(late, at(5), caller))
    await store.record(sent(early, at(9)))
    await store.record(requested(early, at(1), caller))

    records, _ = await store.list_jobs(caller, None, 10, None)

    assert [r.job_id for r in records] == [late, early]


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "!!!!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b"[1.5]").decode(),
        base64.urlsafe_b64encode(b"[1.5, 2, 3]").decode(),
        base64.urlsafe_b64encode(b"5").decode(),
        base64.urlsafe_b64encode(b'["soon", "job"]').decode(),
        base64.urlsafe_b64encode(b'[null, "job"]').decode(),
        # Numbers encode_cursor never writes, which json reads as floats all the same.
        base64.urlsafe_b64encode(b'[NaN, "3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60"]').decode(),
        base64.urlsafe_b64encode(b'[1e999, "3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60"]').decode(),
        base64.urlsafe_b64encode(b'[true, "3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60"]').decode(),
        base64.urlsafe_b64encode(
            b"[1" + b"0" * 400 + b', "3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60"]'
        ).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
async def test_a_cursor_this_store_did_not_hand_out_is_invalid(
    store: JobStore, caller: str, cursor: str
) -> None:
    with pytest.raises(InvalidCursor):
        await store.list_jobs(caller, None, 10, cursor)


async def test_a_crafted_cursor_holding_a_nul_character_is_not_a_database_error(
    store: JobStore, caller: str
) -> None:
    await store.record(requested(new_job(), at(0), caller))
    cursor = encode_cursor(at(1).timestamp(), "job\x00id")

    try:
        records, _ = await store.list_jobs(caller, None, 10, cursor)
    except InvalidCursor:
        return
    assert len(records) == 1


# --- idempotency keys -----------------------------------------------------------------


async def test_the_first_use_of_a_key_is_new_and_owns_the_job_id(
    store: JobStore, caller: str
) -> None:
    job = new_job()

    reservation = await store.reserve_key(caller, "key-1", "hash-a", job, STALE_AFTER)

    assert (reservation.outcome, reservation.job_id) == (KeyOutcome.NEW, job)


async def test_the_same_request_after_it_was_accepted_replays_the_first_job(
    store: JobStore, caller: str
) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    await store.settle_key(caller, "key-1", "done")

    again = await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)

    assert (again.outcome, again.job_id) == (KeyOutcome.REPLAY, first)


async def test_a_different_request_with_a_used_key_conflicts(store: JobStore, caller: str) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    pending_conflict = await store.reserve_key(caller, "key-1", "hash-b", new_job(), STALE_AFTER)
    await store.settle_key(caller, "key-1", "done")

    settled_conflict = await store.reserve_key(caller, "key-1", "hash-b", new_job(), STALE_AFTER)

    assert pending_conflict.outcome is KeyOutcome.CONFLICT
    assert (settled_conflict.outcome, settled_conflict.job_id) == (KeyOutcome.CONFLICT, first)


async def test_the_same_request_while_the_first_is_being_accepted_is_pending(
    store: JobStore, caller: str
) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)

    again = await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)

    assert (again.outcome, again.job_id) == (KeyOutcome.PENDING, first)


async def test_a_request_that_was_not_accepted_frees_its_key(store: JobStore, caller: str) -> None:
    await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)
    await store.settle_key(caller, "key-1", "refused")
    retry = new_job()

    again = await store.reserve_key(caller, "key-1", "hash-b", retry, STALE_AFTER)

    assert (again.outcome, again.job_id) == (KeyOutcome.NEW, retry)


async def test_a_stale_pending_reservation_is_taken_over_with_its_own_job_id(
    store: JobStore, caller: str
) -> None:
    # Its api may have died after publishing: the retry publishes that job
    # again, never a new one.
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    await asyncio.sleep(0.3)

    again = await store.reserve_key(caller, "key-1", "hash-a", new_job(), stale_after=0.1)
    after = await store.reserve_key(caller, "key-1", "hash-a", new_job(), stale_after=0.1)

    assert (again.outcome, again.job_id) == (KeyOutcome.RESUME, first)
    assert (after.outcome, after.job_id) == (KeyOutcome.PENDING, first)


async def test_a_reservation_with_an_unknown_outcome_is_resumed_at_once_with_its_job_id(
    store: JobStore, caller: str
) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    await store.settle_key(caller, "key-1", "unknown")

    again = await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)
    other = await store.reserve_key(caller, "key-1", "hash-b", new_job(), STALE_AFTER)

    assert (again.outcome, again.job_id) == (KeyOutcome.RESUME, first)
    assert other.outcome is KeyOutcome.CONFLICT


async def test_of_many_retries_resuming_one_unknown_key_exactly_one_resumes_it(
    store: JobStore, caller: str
) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    await store.settle_key(caller, "key-1", "unknown")

    reservations = await asyncio.gather(
        *(store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER) for _ in range(8))
    )

    assert sorted(r.outcome.value for r in reservations) == ["pending"] * 7 + ["resume"]
    assert {r.job_id for r in reservations} == {first}


async def test_an_accepted_key_is_never_taken_over_as_stale(store: JobStore, caller: str) -> None:
    first = new_job()
    await store.reserve_key(caller, "key-1", "hash-a", first, STALE_AFTER)
    await store.settle_key(caller, "key-1", "done")
    await asyncio.sleep(0.3)

    again = await store.reserve_key(caller, "key-1", "hash-a", new_job(), stale_after=0.1)

    assert (again.outcome, again.job_id) == (KeyOutcome.REPLAY, first)


async def test_idempotency_keys_are_scoped_to_the_caller(store: JobStore, caller: str) -> None:
    other = f"key-{uuid.uuid4().hex[:16]}"
    await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)
    await store.settle_key(caller, "key-1", "done")
    theirs = new_job()

    reservation = await store.reserve_key(other, "key-1", "hash-b", theirs, STALE_AFTER)

    assert (reservation.outcome, reservation.job_id) == (KeyOutcome.NEW, theirs)


async def test_a_key_freed_while_another_request_looks_it_up_is_not_a_database_error(
    caller: str, postgres_database: str
) -> None:
    """PostgreSQL only (SQLite runs one write transaction at a time). The second
    request's reservation meets the first request's key, which the first request
    frees (its publish failed) before the second reads the key back. Seen without
    the hook in about 2 of 1,000 tries of the race."""
    first = JobStore.open(postgres_database)
    engine = build_engine(postgres_database)

    freed: list[bool] = []

    @event.listens_for(engine, "after_execute")
    def first_request_frees_its_key(
        connection: Connection, clauseelement: Any, *args: Any, **kwargs: Any
    ) -> None:
        # Once only: a second INSERT would hold its own row, which this would wait for.
        if not freed and str(clauseelement).startswith("INSERT INTO api_idempotency_keys"):
            freed.append(True)
            first._settle_key(caller, "key-1", "refused")

    second = JobStore(engine)
    try:
        await first.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)

        reservation = await second.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)
    finally:
        await first.close()
        await second.close()

    assert reservation.outcome in (KeyOutcome.NEW, KeyOutcome.PENDING)


# --- many replicas at once --------------------------------------------------------------


async def test_of_many_replicas_reserving_one_key_at_once_exactly_one_gets_it(
    replicas: list[JobStore], caller: str
) -> None:
    job_ids = [new_job() for _ in replicas]

    reservations = await asyncio.gather(
        *(
            replica.reserve_key(caller, "key-1", "hash-a", job, STALE_AFTER)
            for replica, job in zip(replicas, job_ids, strict=True)
        )
    )

    winners = [r for r in reservations if r.outcome is KeyOutcome.NEW]
    assert len(winners) == 1
    assert {r.outcome for r in reservations} - {KeyOutcome.NEW} <= {KeyOutcome.PENDING}
    assert {r.job_id for r in reservations} == {winners[0].job_id}


async def test_events_of_one_job_recorded_by_many_replicas_at_once_keep_one_entry_per_type(
    replicas: list[JobStore], caller: str
) -> None:
    for _ in range(3):
        job = new_job()
        events: list[JobEvent] = [
            requested(job, at(0), caller),
            processed(job, at(1)),
            failed(job, at(2), attempts=2),
            processed(job, at(3)),
            failed(job, at(4), attempts=4),
            processed(job, at(5)),
            sent(job, at(6), attempts=1, provider_message_id="msg-9"),
            failed(job, at(7), attempts=3),
        ]

        await asyncio.gather(
            *(
                replica.record(event_)
                for replica, event_ in zip(replicas, reversed(events), strict=True)
            )
        )

        record = await replicas[0].get(job, caller)
        assert record is not None
        # The first request, processing and send, and the latest failure.
        kept = [events[0], events[1], events[6], events[7]]
        assert [entry.event_id for entry in record.timeline] == [str(e.event_id) for e in kept]
        assert (record.status, record.attempts, record.provider_message_id) == ("sent", 3, "msg-9")
        assert record.created_at == at(0)


# --- retention ---------------------------------------------------------------------------


async def test_purge_removes_old_jobs_and_old_keys_only(store: JobStore, caller: str) -> None:
    old_jobs = [new_job(), new_job()]
    for job in old_jobs:
        await store.record(requested(job, LONG_AGO, caller))
        await store.record(sent(job, LONG_AGO + timedelta(minutes=1)))
    # Requested long ago though still in progress: its age counts from the request.
    young_job = new_job()
    await store.record(requested(young_job, LONG_AGO + timedelta(days=400), caller))
    await store.record(processed(young_job, LONG_AGO + timedelta(days=700)))

    await store.reserve_key(caller, "old-key", "hash-a", new_job(), STALE_AFTER)
    await store.settle_key(caller, "old-key", "done")
    await asyncio.sleep(0.05)
    keys_before = datetime.now(UTC)
    await asyncio.sleep(0.05)
    young_key_job = new_job()
    await store.reserve_key(caller, "young-key", "hash-a", young_key_job, STALE_AFTER)
    await store.settle_key(caller, "young-key", "done")

    purged_jobs, purged_keys = await store.purge(LONG_AGO + timedelta(days=365), keys_before)

    assert purged_jobs == 2
    assert purged_keys >= 1
    for job in old_jobs:
        assert await store.get(job, caller) is None
    assert await store.get(young_job, caller) is not None
    reused = await store.reserve_key(caller, "old-key", "hash-b", new_job(), STALE_AFTER)
    kept = await store.reserve_key(caller, "young-key", "hash-a", new_job(), STALE_AFTER)
    assert reused.outcome is KeyOutcome.NEW
    assert (kept.outcome, kept.job_id) == (KeyOutcome.REPLAY, young_key_job)


async def test_purge_with_nothing_old_removes_nothing(store: JobStore, caller: str) -> None:
    job = new_job()
    await store.record(requested(job, at(0), caller))
    await store.reserve_key(caller, "key-1", "hash-a", new_job(), STALE_AFTER)

    purged = await store.purge(LONG_AGO, datetime.fromtimestamp(time.time() - 3600, UTC))

    assert purged == (0, 0)
    assert await store.get(job, caller) is not None


# --- batches of events -------------------------------------------------------------------


def life_of(job: str, caller: str) -> list[JobEvent]:
    """A job's events with a repeat, a re-published EmailSent and a failure in between."""
    return [
        requested(job, at(0), caller),
        processed(job, at(1)),
        failed(job, at(2), attempts=2),
        processed(job, at(3)),
        sent(job, at(4), attempts=1, provider_message_id=f"msg-{job[:4]}"),
        sent(job, at(9), attempts=2, provider_message_id=f"msg-{job[:4]}"),
    ]


async def test_one_batch_of_many_jobs_events_in_any_order_reads_as_if_recorded_one_by_one(
    store: JobStore, caller: str
) -> None:
    jobs = [new_job() for _ in range(20)]
    events = [event_ for job in jobs for event_ in life_of(job, caller)]
    shuffled = events[::-1] + events[:5]  # reversed, and five delivered twice

    await asyncio.to_thread(store.record_batch, shuffled)

    for job in jobs:
        record = await store.get(job, caller)
        assert record is not None
        assert record.status == "sent"
        assert record.provider_message_id == f"msg-{job[:4]}"
        assert [entry.event for entry in record.timeline] == [
            "JobRequested",
            "DataProcessed",
            "JobFailed",
            "EmailSent",
        ]


async def test_overlapping_batches_from_many_replicas_at_once_lose_no_fact(
    replicas: list[JobStore], caller: str
) -> None:
    # Every replica writes a batch holding one event of each of the same jobs:
    # rows inserted, read and updated by eight transactions at once.
    jobs = [new_job() for _ in range(10)]
    lives = {job: life_of(job, caller) for job in jobs}
    batches = [[lives[job][n % 6] for job in jobs] for n in range(len(replicas))]

    await asyncio.gather(
        *(
            asyncio.to_thread(replica.record_batch, batch)
            for replica, batch in zip(replicas, batches, strict=True)
        )
    )

    for job in jobs:
        record = await replicas[0].get(job, caller)
        assert record is not None, job
        assert {entry.event for entry in record.timeline} == {
            "JobRequested",
            "DataProcessed",
            "JobFailed",
            "EmailSent",
        }
        assert record.status == "sent"


async def test_an_empty_batch_writes_nothing(store: JobStore) -> None:
    await asyncio.to_thread(store.record_batch, [])


# --- the SQL fold is the Python fold -----------------------------------------------------

_opened: dict[str, JobStore] = {}


def store_at(database_url: str) -> JobStore:
    """One store per database for all of a property test's examples."""
    if database_url not in _opened:
        _opened[database_url] = JobStore.open(database_url)
    return _opened[database_url]


def any_event(job: str, kind: str, when: int, named: str | None, attempts: int) -> JobEvent:
    moment = at(when)  # a few instants only: ties are common
    if kind == "requested":
        return requested(job, moment, named)
    if kind == "processed":
        return processed(job, moment, submitted_by=named)
    if kind == "sent":
        return sent(job, moment, submitted_by=named, attempts=attempts)
    return failed(job, moment, submitted_by=named, attempts=attempts, reason=f"no. {attempts}")


events_of = st.lists(
    st.tuples(
        st.sampled_from(["requested", "processed", "sent", "failed"]),
        st.integers(0, 3),
        st.sampled_from([None, "ann", "bob", "Cy"]),  # "Cy" < "ann" in code points
        st.integers(1, 3),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plans=st.lists(events_of, min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    traced=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_records_written_in_sql_are_what_the_read_model_folds(
    database_url: str, plans: list[list[Any]], cuts: list[int], traced: list[bool]
) -> None:
    store = store_at(database_url)
    jobs_events = {new_job(): plan for plan in plans}
    arrivals = [any_event(job, *step) for job, plan in jobs_events.items() for step in plan]
    # Interleave the jobs' events, then cut them into batches of the given sizes.
    arrivals = arrivals[::2] + arrivals[1::2]
    batches, start = [], 0
    for size in cuts * len(arrivals):
        if start >= len(arrivals):
            break
        batches.append(arrivals[start : start + size])
        start += size

    expected: dict[str, JobRecord | None] = dict.fromkeys(jobs_events)
    for number, batch in enumerate(batches):
        traces = {str(e.job_id): f"{number:032x}" for e in batch if traced[number % len(traced)]}
        store.record_batch(batch, traces)
        for event_ in batch:
            job = str(event_.job_id)
            expected[job] = apply(expected[job], event_, traces.get(job))

    for job, record in expected.items():
        assert record is not None
        with store._engine.connect() as connection:
            assert JobStore._read(connection, job) == record
            row = connection.execute(jobs.select().where(jobs.c.job_id == job)).one()
        assert (row.status, row.created_at, row.updated_at) == (
            record.status,
            record.created_at.timestamp(),
            record.updated_at.timestamp(),
        )
