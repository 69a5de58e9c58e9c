"""The api's state in SQL: the job read model and the idempotency keys.

SQLite by default (one host), PostgreSQL when ``DATABASE_URL`` names it, so
several api replicas share one view; one code path for both (SQLAlchemy
Core). The tables are created at start if missing, and a table made by an
earlier version gains the columns it lacks (``add_missing_columns``). Calls
are blocking and are made in threads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Literal
from uuid import UUID

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    or_,
    select,
    text,
    update,
)

from api_service.read_model import Entry, JobEvent, JobRecord, Status, apply, facts
from pipeline_shared.database import (
    add_missing_columns,
    build_engine,
    create_tables,
    for_writing,
)

metadata = MetaData()

jobs = Table(
    "api_jobs",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("caller", String(64), nullable=True),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("timeline", Text, nullable=False),
    Column("trace_id", String(32), nullable=True),
    Index("api_jobs_caller_created", "caller", "created_at"),
    Index("api_jobs_status_created", "status", "created_at"),
)

idempotency_keys = Table(
    "api_idempotency_keys",
    metadata,
    Column("caller", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("job_id", String(36), nullable=False),
    Column("state", String(16), nullable=False),  # pending | unknown | done
    Column("created_at", Float, nullable=False),
    # A batch's job ids in its items' order, as a JSON list (``job_id`` is the first);
    # NULL for a single job's key, and for every key written before batches existed.
    Column("job_ids", Text, nullable=True),
    # Positions of a batch's jobs the broker confirmed, as a JSON list, once known.
    Column("confirmed", Text, nullable=True),
    PrimaryKeyConstraint("caller", "key"),
)

_INSERT_JOB = text(
    "INSERT INTO api_jobs (job_id, caller, status, created_at, updated_at, timeline, trace_id) "
    "VALUES (:job_id, :caller, :status, :created_at, :updated_at, :timeline, :trace_id) "
    "ON CONFLICT (job_id) DO NOTHING"
)
_LOCK_JOBS = (
    "SELECT job_id, caller, timeline, trace_id FROM api_jobs "
    "WHERE job_id IN :job_ids ORDER BY job_id"
)
_UPDATE_JOB = text(
    "UPDATE api_jobs SET caller = :caller, status = :status, created_at = :created_at, "
    "updated_at = :updated_at, timeline = :timeline, trace_id = :trace_id "
    "WHERE job_id = :job_id"
)
_RESERVE_KEY = text(
    "INSERT INTO api_idempotency_keys "
    "(caller, key, request_hash, job_id, job_ids, state, created_at) "
    "VALUES (:caller, :key, :request_hash, :job_id, :job_ids, 'pending', :now) "
    "ON CONFLICT (caller, key) DO NOTHING"
)


def _fold(record: JobRecord | None, events: Sequence[JobEvent], trace_id: str | None) -> JobRecord:
    """``record`` after ``events`` of its trace: the very same object when they add nothing."""
    folded = record
    for event in events:
        folded = apply(folded, event, trace_id)
    assert folded is not None
    return folded


def _timeline_json(timeline: Sequence[Entry]) -> str:
    # Field by field: ``dataclasses.asdict`` deep-copies every value, and was half
    # of the read model's CPU.
    return json.dumps(
        [
            {
                "event_id": e.event_id,
                "event": e.event,
                "at": e.at.isoformat(),
                "attempts": e.attempts,
                "reason": e.reason,
                "provider_message_id": e.provider_message_id,
            }
            for e in timeline
        ]
    )


def _timeline_of(raw: str) -> tuple[Entry, ...]:
    # Rows written before the timeline held one entry per event type may hold
    # re-published events twice: read them as the read model keeps them now.
    return facts(
        Entry(**{**item, "at": datetime.fromisoformat(item["at"])}) for item in json.loads(raw)
    )


def _record_of(row: Any) -> JobRecord:
    return JobRecord(
        job_id=row.job_id,
        caller=row.caller,
        timeline=_timeline_of(row.timeline),
        trace_id=row.trace_id,
    )


def _row_values(record: JobRecord) -> dict[str, Any]:
    return {
        "job_id": record.job_id,
        "caller": record.caller,
        "status": record.status,
        "created_at": record.created_at.timestamp(),
        "updated_at": record.updated_at.timestamp(),
        "timeline": _timeline_json(record.timeline),
        "trace_id": record.trace_id,
    }


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


class InvalidCursor(ValueError):
    pass


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        # Only what encode_cursor writes: a time as a finite number (json reads
        # NaN and 1e999 as floats too).
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise TypeError("the time is not a number")
        if not math.isfinite(created_at):
            raise ValueError("the time is not finite")
        return float(created_at), str(UUID(job_id))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise InvalidCursor("cursor is not one this api handed out") from exc


KeyState = Literal["done", "unknown", "refused"]


class KeyOutcome(Enum):
    NEW = "new"  # this request owns the key: publish the job
    RESUME = "resume"  # an earlier attempt may have published the job: publish it again
    REPLAY = "replay"  # the same request was accepted before: answer its job
    CONFLICT = "conflict"  # the key was used for a different request
    PENDING = "pending"  # the same request is being accepted right now


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: KeyOutcome
    job_id: str
    job_ids: tuple[str, ...] = ()
    """A batch's job ids, in its items' order (empty for a single job's key)."""
    confirmed: frozenset[int] = frozenset()
    """Positions of a batch's jobs the broker confirmed on an earlier attempt."""


def _reservation(outcome: KeyOutcome, row: Any) -> Reservation:
    return Reservation(
        outcome,
        row.job_id,
        tuple(json.loads(row.job_ids)) if row.job_ids else (),
        frozenset(json.loads(row.confirmed)) if row.confirmed else frozenset(),
    )


class JobStore:
    def __init__(self, engine: Engine, relaxed: Engine | None = None) -> None:
        self._engine = engine
        self._writer = for_writing(engine)
        # The read model's writes: the same database, commits that need not
        # wait for the disk (the idempotency keys keep ``engine``'s).
        self._relaxed = for_writing(relaxed or engine)
        # SQLite has no FOR UPDATE: its writers hold the database's one write lock.
        locking = _LOCK_JOBS + (" FOR UPDATE" if engine.dialect.name == "postgresql" else "")
        self._lock_jobs = text(locking).bindparams(bindparam("job_ids", expanding=True))
        self._known_jobs = text("SELECT job_id FROM api_jobs WHERE job_id IN :job_ids").bindparams(
            bindparam("job_ids", expanding=True)
        )

    @classmethod
    def open(cls, database_url: str) -> JobStore:
        store = cls(build_engine(database_url), build_engine(database_url, durable=False))
        store.create_schema()
        return store

    def create_schema(self) -> None:
        create_tables(self._engine, metadata)
        add_missing_columns(self._engine, jobs)
        add_missing_columns(self._engine, idempotency_keys)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)
        await asyncio.to_thread(self._relaxed.dispose)

    # --- the read model -------------------------------------------------

    async def record(self, event: JobEvent, trace_id: str | None = None) -> None:
        """Fold ``event`` into its job's record (idempotent)."""
        traces = {str(event.job_id): trace_id} if trace_id else {}
        await asyncio.to_thread(self.record_batch, [event], traces)

    def record_batch(
        self, events: Sequence[JobEvent], traces: Mapping[str, str] | None = None
    ) -> None:
        """Fold many events into their jobs' records in one transaction (blocking).

        Find which of the batch's jobs are known; insert a record for each of the
        others (as the batch alone describes it); read the known ones, locked,
        and write back those the batch changed. The fold is idempotent and
        order-free (``read_model``), so events may repeat, and a job another
        replica inserted meanwhile (the insert does nothing) is read, locked, and
        folded like the known ones. Inserts, then locks, each in job id order: on
        PostgreSQL an insert waits for another replica's uncommitted insert of the
        same job, so locking first could deadlock two replicas. The read model is
        rebuilt from events the broker keeps until they are recorded: its
        commits do not wait for the disk (``durable=False``).
        """
        if not events:
            return
        by_job: dict[str, list[JobEvent]] = {}
        for event in events:
            by_job.setdefault(str(event.job_id), []).append(event)
        job_ids = sorted(by_job)  # one lock order for every replica
        traces = traces or {}
        with self._relaxed.begin() as connection:
            known = set(connection.execute(self._known_jobs, {"job_ids": job_ids}).scalars())
            missing = [job for job in job_ids if job not in known]
            to_fold = [job for job in job_ids if job in known]
            if missing:
                fresh = [_row_values(_fold(None, by_job[job], traces.get(job))) for job in missing]
                inserted = connection.execute(_INSERT_JOB, fresh).rowcount
                if not (connection.dialect.supports_sane_multi_rowcount and inserted == len(fresh)):
                    # Some were inserted by another replica meanwhile: fold into those.
                    to_fold = job_ids
            rows = (
                connection.execute(self._lock_jobs, {"job_ids": to_fold}).all() if to_fold else []
            )
            changed = []
            for row in rows:
                stored = _record_of(row)
                updated = _fold(stored, by_job[row.job_id], traces.get(row.job_id))
                if updated is not stored:
                    changed.append(_row_values(updated))
            if changed:
                connection.execute(_UPDATE_JOB, changed)

    @staticmethod
    def _read(connection: Connection, job_id: str, *, lock: bool = False) -> JobRecord | None:
        query = select(jobs.c.job_id, jobs.c.caller, jobs.c.timeline, jobs.c.trace_id).where(
            jobs.c.job_id == job_id
        )
        row = connection.execute(query.with_for_update() if lock else query).one_or_none()
        return _record_of(row) if row is not None else None

    async def get(self, job_id: str, caller: str) -> JobRecord | None:
        return await asyncio.to_thread(self._get, job_id, caller)

    def _get(self, job_id: str, caller: str) -> JobRecord | None:
        with self._engine.connect() as connection:
            record = self._read(connection, job_id)
        return record if record is not None and record.caller == caller else None

    async def list_jobs(
        self, caller: str, status: Status | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """Newest created first; the cursor continues after the last item of a page."""
        return await asyncio.to_thread(self._list_jobs, caller, status, limit, cursor)

    def _list_jobs(
        self, caller: str, status: Status | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        query = select(
            jobs.c.job_id, jobs.c.caller, jobs.c.timeline, jobs.c.trace_id, jobs.c.created_at
        ).where(jobs.c.caller == caller)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    jobs.c.created_at < created_at,
                    and_(jobs.c.created_at == created_at, jobs.c.job_id < job_id),
                )
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.job_id.desc()).limit(limit + 1)
        with self._engine.connect() as connection:
            rows = connection.execute(query).all()
        page = rows[:limit]
        records = [_record_of(row) for row in page]
        more = len(rows) > limit
        return records, encode_cursor(page[-1].created_at, page[-1].job_id) if more else None

    # --- idempotency keys -------------------------------------------------

    async def reserve_key(
        self, caller: str, key: str, request_hash: str, job_id: str, stale_after: float
    ) -> Reservation:
        return await asyncio.to_thread(
            self._reserve_key, caller, key, request_hash, [job_id], stale_after, batch=False
        )

    async def reserve_batch_key(
        self, caller: str, key: str, request_hash: str, job_ids: Sequence[str], stale_after: float
    ) -> Reservation:
        """Like ``reserve_key`` for a batch: the reservation holds all its job ids, and
        the positions of those confirmed on an earlier attempt."""
        return await asyncio.to_thread(
            self._reserve_key, caller, key, request_hash, job_ids, stale_after, batch=True
        )

    def _reserve_key(
        self,
        caller: str,
        key: str,
        request_hash: str,
        job_ids: Sequence[str],
        stale_after: float,
        *,
        batch: bool,
    ) -> Reservation:
        where = and_(idempotency_keys.c.caller == caller, idempotency_keys.c.key == key)
        values = {
            "caller": caller,
            "key": key,
            "request_hash": request_hash,
            "job_id": job_ids[0],
            "job_ids": json.dumps(list(job_ids)) if batch else None,
        }
        while True:
            now = time.time()
            with self._writer.begin() as connection:
                if connection.execute(_RESERVE_KEY, {**values, "now": now}).rowcount:
                    return Reservation(KeyOutcome.NEW, job_ids[0], tuple(job_ids) if batch else ())
                row = connection.execute(
                    select(
                        idempotency_keys.c.request_hash,
                        idempotency_keys.c.job_id,
                        idempotency_keys.c.job_ids,
                        idempotency_keys.c.confirmed,
                        idempotency_keys.c.state,
                        idempotency_keys.c.created_at,
                    ).where(where)
                ).one_or_none()
                if row is None:
                    continue  # freed between our insert and our look: try to take it again
                if row.request_hash != request_hash:
                    return _reservation(KeyOutcome.CONFLICT, row)
                if row.state == "done":
                    return _reservation(KeyOutcome.REPLAY, row)
                # An attempt whose outcome is unknown, or one that died with its
                # api, may have reached the broker: take it over with its job id,
                # never a new one (compare-and-set, so only one retry does).
                if row.state == "unknown" or row.created_at < now - stale_after:
                    taken = connection.execute(
                        update(idempotency_keys)
                        .where(where, idempotency_keys.c.created_at == row.created_at)
                        .values(state="pending", created_at=now)
                    ).rowcount
                    if taken:
                        return _reservation(KeyOutcome.RESUME, row)
                    continue
                return _reservation(KeyOutcome.PENDING, row)

    async def settle_key(
        self, caller: str, key: str, outcome: KeyState, confirmed: Collection[int] = ()
    ) -> None:
        """Record what became of the job a reservation was made for: ``done`` (accepted),
        ``unknown`` (it may have reached the broker), or ``refused`` (it did not: the key
        is free again). For a batch, ``confirmed`` holds the positions of all its jobs the
        broker confirmed so far, which a retry does not publish again."""
        await asyncio.to_thread(self._settle_key, caller, key, outcome, confirmed)

    def _settle_key(
        self, caller: str, key: str, outcome: KeyState, confirmed: Collection[int] = ()
    ) -> None:
        where = and_(idempotency_keys.c.caller == caller, idempotency_keys.c.key == key)
        with self._writer.begin() as connection:
            if outcome == "refused":
                connection.execute(delete(idempotency_keys).where(where))
            else:
                positions = json.dumps(sorted(confirmed)) if confirmed else None
                connection.execute(
                    update(idempotency_keys).where(where).values(state=outcome, confirmed=positions)
                )

    # --- retention ----------------------------------------------------------

    async def purge(self, jobs_before: datetime, keys_before: datetime) -> tuple[int, int]:
        return await asyncio.to_thread(self._purge, jobs_before, keys_before)

    def _purge(self, jobs_before: datetime, keys_before: datetime) -> tuple[int, int]:
        with self._writer.begin() as connection:
            purged_jobs = connection.execute(
                delete(jobs).where(jobs.c.created_at < jobs_before.timestamp())
            ).rowcount
            purged_keys = connection.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.created_at < keys_before.timestamp()
                )
            ).rowcount
        return purged_jobs, purged_keys
