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
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    delete,
    or_,
    select,
    text,
    update,
)

from api_service import fact_rows
from api_service.read_model import JobEvent, JobRecord, Status
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
    # Rows written before the facts had columns of their own hold them here as
    # JSON (upgraded at start, see ``_upgrade_timelines``); '[]' in every other.
    Column("timeline", Text, nullable=False),
    Column("trace_id", String(32), nullable=True),
    # The facts (``read_model``): per event type, the kept event's time (epoch
    # microseconds: exact for any datetime), id and what the record derives from
    # it; NULL until there is one.
    Column("requested_at", BigInteger, nullable=True),
    Column("requested_id", String(36), nullable=True),
    Column("processed_at", BigInteger, nullable=True),
    Column("processed_id", String(36), nullable=True),
    Column("sent_at", BigInteger, nullable=True),
    Column("sent_id", String(36), nullable=True),
    Column("sent_attempts", Integer, nullable=True),
    Column("provider_message_id", Text, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("failed_id", String(36), nullable=True),
    Column("failed_attempts", Integer, nullable=True),
    Column("failed_reason", Text, nullable=True),
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

_RECORD = (
    jobs.c.job_id,
    jobs.c.caller,
    jobs.c.timeline,
    jobs.c.trace_id,
    *(jobs.c[name] for name in fact_rows.FACT_COLUMNS),
)
"""The columns a ``JobRecord`` is read from (``fact_rows.record_of``)."""

_RESERVE_KEY = text(
    "INSERT INTO api_idempotency_keys "
    "(caller, key, request_hash, job_id, job_ids, state, created_at) "
    "VALUES (:caller, :key, :request_hash, :job_id, :job_ids, 'pending', :now) "
    "ON CONFLICT (caller, key) DO NOTHING"
)


def _rounds(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``rows`` (in job id order) as lists holding each job at most once: each job's
    first row, then each one's second, and so on, in arrival order per job."""
    rounds: list[list[dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for row in rows:
        turn = seen.get(row["job_id"], 0)
        seen[row["job_id"]] = turn + 1
        if turn == len(rounds):
            rounds.append([])
        rounds[turn].append(row)
    return rounds


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
        self._upsert = fact_rows.upsert(engine.dialect.name)
        self._upsert_rows = fact_rows.upsert_rows() if engine.dialect.name == "postgresql" else None
        self._derive = fact_rows.derive(engine.dialect.name)

    @property
    def shared(self) -> bool:
        """Whether other api replicas may read this store (PostgreSQL), so that a job must
        be written before it is answered; a SQLite file has one api, which shows the jobs
        it has not written yet from memory (``JobRecorder.pending``)."""
        return self._engine.dialect.name != "sqlite"

    @classmethod
    def open(cls, database_url: str) -> JobStore:
        store = cls(build_engine(database_url), build_engine(database_url, durable=False))
        store.create_schema()
        return store

    def create_schema(self) -> None:
        create_tables(self._engine, metadata)
        add_missing_columns(self._engine, jobs)
        add_missing_columns(self._engine, idempotency_keys)
        self._upgrade_timelines()

    def _upgrade_timelines(self, chunk: int = 500) -> None:
        """Give the facts of rows an earlier version wrote (as a JSON timeline) their
        columns, folded with any the row has already (an older replica may have
        written the timeline of a row this version wrote). Idempotent: replicas
        starting together may both do it."""
        after = ""
        while True:
            with self._writer.begin() as connection:
                legacy = (
                    select(*_RECORD)
                    .where(jobs.c.timeline != "[]", jobs.c.job_id > after)
                    .order_by(jobs.c.job_id)
                    .limit(chunk)
                )
                if self._engine.dialect.name == "postgresql":
                    legacy = legacy.with_for_update()  # SQLite's writer holds the database
                rows = connection.execute(legacy).all()
                for row in rows:
                    connection.execute(
                        update(jobs)
                        .where(jobs.c.job_id == row.job_id)
                        .values(timeline="[]", **fact_rows.columns_of(fact_rows.record_of(row)))
                    )
                if rows:
                    connection.execute(self._derive, {"job_ids": [row.job_id for row in rows]})
            if len(rows) < chunk:
                return
            after = rows[-1].job_id

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

        Each event is one blind upsert (``fact_rows``): the fold's rules are in its
        SQL, so events may repeat, come in any order, and come from several
        replicas at once, and no row is read first. Then one statement derives the
        batch's jobs' status and times (whose rows the upserts locked already). The
        read model is rebuilt from events the broker keeps until they are
        recorded: its commits do not wait for the disk (``durable=False``).
        """
        if not events:
            return
        traces = traces or {}
        # In job id order: every replica's transaction locks rows in that order.
        ordered = sorted(events, key=lambda e: str(e.job_id))
        rows = [fact_rows.params(event, traces.get(str(event.job_id))) for event in ordered]
        job_ids = sorted({row["job_id"] for row in rows})
        with self._relaxed.begin() as connection:
            if self._upsert_rows is None:
                connection.execute(self._upsert, rows)
            else:
                for distinct in _rounds(rows):
                    connection.execute(self._upsert_rows, {"rows": fact_rows.rows_json(distinct)})
            connection.execute(self._derive, {"job_ids": job_ids})

    @staticmethod
    def _read(connection: Connection, job_id: str) -> JobRecord | None:
        row = connection.execute(select(*_RECORD).where(jobs.c.job_id == job_id)).one_or_none()
        return fact_rows.record_of(row) if row is not None else None

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
        query = select(*_RECORD, jobs.c.created_at).where(jobs.c.caller == caller)
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
        records = [fact_rows.record_of(row) for row in page]
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
