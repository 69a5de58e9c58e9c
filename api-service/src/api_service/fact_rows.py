"""A job's facts as the columns of its row, written without reading the row first.

``read_model`` states the rules in Python: per event type one kept event (the
earliest by ``occurred_at``, ties broken by event id; the latest ``JobFailed``),
the caller and the trace, and the status and times derived from them. Here the
same rules are SQL, so that recording an event is one blind statement:

* each event is an ``INSERT ... ON CONFLICT (job_id) DO UPDATE`` whose ``SET``
  keeps, column by column, whichever of the stored and the new event the rule
  keeps (``upsert``), and settles the caller and the trace; a batch's events
  are one ``executemany`` in job id order (on PostgreSQL, one statement over a
  JSON array of them: ``upsert_rows``);
* a batch ends with one ``UPDATE`` deriving ``status``, ``created_at`` and
  ``updated_at`` of its jobs from their columns (``derive``), kept in the row
  because ``GET /jobs`` filters and orders by them.

No row is read, locked, decoded or rewritten to record an event (the read
model cost 50-74 µs an event that way: ``bench/read_model_cost.py``), and the
statements mean the same on SQLite and PostgreSQL; ids and callers compare in
code-point order on both, as in Python. ``record_of`` reads a row back as the
``JobRecord`` the Python fold would have made (a property test checks both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, bindparam, text

from api_service.read_model import Entry, JobEvent, JobRecord, facts


@dataclass(frozen=True, slots=True)
class Fact:
    """How one event type is kept: its columns, and which of two events stays."""

    event: str
    prefix: str
    details: tuple[tuple[str, str], ...]
    """What the record derives from the event: (column, the event's and the
    ``Entry``'s attribute)."""
    latest: bool = False  # keep the latest (JobFailed), not the earliest

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"{self.prefix}_at", f"{self.prefix}_id", *(c for c, _ in self.details))


FACTS: Mapping[str, Fact] = {
    fact.event: fact
    for fact in (
        Fact("JobRequested", "requested", ()),
        Fact("DataProcessed", "processed", ()),
        Fact(
            "EmailSent",
            "sent",
            (("sent_attempts", "attempts"), ("provider_message_id", "provider_message_id")),
        ),
        Fact(
            "JobFailed",
            "failed",
            (("failed_attempts", "attempts"), ("failed_reason", "reason")),
            latest=True,
        ),
    )
}


FACT_COLUMNS = tuple(column for fact in FACTS.values() for column in fact.columns)
"""Every fact's columns, in one order."""
_NO_FACTS = dict.fromkeys(FACT_COLUMNS)


def _collate(dialect: str) -> str:
    # PostgreSQL compares text by the database's locale (which may skip hyphens);
    # the rules compare in code-point order, as Python and SQLite do.
    return ' COLLATE "C"' if dialect == "postgresql" else ""


def _after(a: str, b: str, dialect: str) -> str:
    """SQL: event ``a`` (``a_at``, ``a_id``) occurred after event ``b``."""
    c = _collate(dialect)
    return f"({a}_at > {b}_at OR ({a}_at = {b}_at AND {a}_id{c} > {b}_id{c}))"


def _on_conflict(dialect: str) -> str:
    """The ``ON CONFLICT`` clause that folds a new event into a job's stored row.

    An event sets its own type's columns; the others are NULL, and a NULL never
    replaces a fact."""
    kept = []
    for fact in FACTS.values():
        stored, new = f"api_jobs.{fact.prefix}", f"excluded.{fact.prefix}"
        # Whether the new event takes the stored one's place.
        wins = _after(new, stored, dialect) if fact.latest else _after(stored, new, dialect)
        replaces = f"{new}_id IS NOT NULL AND ({stored}_id IS NULL OR {wins})"
        kept += [
            f"{column} = CASE WHEN {replaces} THEN excluded.{column} ELSE api_jobs.{column} END"
            for column in fact.columns
        ]
    c = _collate(dialect)
    # read_model._caller: a request names its caller; another event names the caller
    # of a job nobody claimed (the least of those named), never takes one over.
    caller = (
        "CASE WHEN excluded.caller IS NULL THEN api_jobs.caller "
        "WHEN excluded.requested_id IS NOT NULL THEN excluded.caller "
        "WHEN api_jobs.caller IS NULL THEN excluded.caller "
        "WHEN api_jobs.requested_id IS NOT NULL THEN api_jobs.caller "
        f"WHEN excluded.caller{c} < api_jobs.caller{c} THEN excluded.caller "
        "ELSE api_jobs.caller END"
    )
    return (
        f"ON CONFLICT (job_id) DO UPDATE SET {', '.join(kept)}, "
        f"caller = {caller}, trace_id = COALESCE(api_jobs.trace_id, excluded.trace_id)"
    )


_INSERT = (
    "INSERT INTO api_jobs (job_id, caller, status, created_at, updated_at, timeline, trace_id, "
    f"{', '.join(FACT_COLUMNS)}) "
)


def upsert(dialect: str) -> TextClause:
    """The statement that records one event, of any type (``params`` binds it).

    One statement for every type, so that a batch is one ``executemany`` in job id
    order: each replica's transaction locks its rows in that one order, and two
    never wait for each other's rows in a cycle."""
    values = ", ".join(f":{column}" for column in FACT_COLUMNS)
    # Made of this module's constants only; every value is a bound parameter.
    return text(
        f"{_INSERT}VALUES (:job_id, :caller, :status, :at, :at, '[]', :trace_id, {values}) "
        + _on_conflict(dialect)
    )


def _sql_type(column: str) -> str:
    if column.endswith("_at"):
        return "bigint"
    return "integer" if column.endswith("_attempts") else "text"


def upsert_rows() -> TextClause:
    """PostgreSQL: the statement that records many events of distinct jobs at once,
    bound to ``rows``, a JSON array of ``params`` (``rows_json``).

    One statement and one parameter for a whole batch: psycopg's work per row of an
    ``executemany`` was most of the read model's cost on PostgreSQL. The rows are
    inserted, and so locked, in job id order; ``ON CONFLICT`` may change a row only
    once a statement, so a job's second event of a batch goes in the next one."""
    fields = ", ".join(f"{column} {_sql_type(column)}" for column in FACT_COLUMNS)
    names = ", ".join(FACT_COLUMNS)
    return text(
        f"{_INSERT}SELECT job_id, caller, status, at, at, '[]', trace_id, {names} "  # noqa: S608
        "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(job_id text, caller text, "
        f"status text, at double precision, trace_id text, {fields}) "
        "ORDER BY job_id " + _on_conflict("postgresql")
    )


def rows_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, separators=(",", ":"))


def params(event: JobEvent, trace_id: str | None) -> dict[str, Any]:
    """The values ``upsert`` takes for ``event``."""
    fact = FACTS[event.event_type]
    at = micros(event.occurred_at)
    values: dict[str, Any] = {
        **_NO_FACTS,
        "job_id": str(event.job_id),
        "caller": event.submitted_by,
        # What a new row says until the batch's ``derive``: this event alone.
        "status": _STATUS[fact.prefix],
        "at": at / 1e6,
        "trace_id": trace_id,
        f"{fact.prefix}_at": at,
        f"{fact.prefix}_id": str(event.event_id),
    }
    for column, attribute in fact.details:
        values[column] = getattr(event, attribute)
    return values


_STATUS = {"requested": "queued", "processed": "processed", "sent": "sent", "failed": "failed"}
_NEVER, _ALWAYS = str(2**63 - 1), str(-(2**63) + 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(moment: datetime) -> int:
    """``moment`` as whole microseconds since the epoch: exact, unlike a float."""
    return (moment - _EPOCH) // _MICROSECOND


def _time(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


def derive(dialect: str) -> TextClause:
    """The statement that derives status and times of the jobs ``job_ids`` (expanding)."""
    least, greatest = ("LEAST", "GREATEST") if dialect == "postgresql" else ("min", "max")
    others = ("processed_at", "sent_at", "failed_at")
    earliest = f"{least}({', '.join(f'COALESCE({c}, {_NEVER})' for c in others)})"
    every = ("requested_at", *others)
    latest = f"{greatest}({', '.join(f'COALESCE({c}, {_ALWAYS})' for c in every)})"
    failed_last = (
        "failed_id IS NOT NULL"
        f" AND (processed_id IS NULL OR {_after('failed', 'processed', dialect)})"
        f" AND (requested_id IS NULL OR {_after('failed', 'requested', dialect)})"
    )
    processed_last = (
        "processed_id IS NOT NULL"
        f" AND (requested_id IS NULL OR {_after('processed', 'requested', dialect)})"
    )
    return text(
        "UPDATE api_jobs SET status = CASE WHEN sent_id IS NOT NULL THEN 'sent' "  # noqa: S608
        f"WHEN {failed_last} THEN 'failed' WHEN {processed_last} THEN 'processed' "
        f"ELSE 'queued' END, created_at = COALESCE(requested_at, {earliest}) / 1000000.0, "
        f"updated_at = {latest} / 1000000.0 WHERE job_id IN :job_ids"
    ).bindparams(bindparam("job_ids", expanding=True))


def record_of(row: Any) -> JobRecord:
    """The record a row holds (its columns, and a legacy row's JSON timeline)."""
    entries = [
        Entry(
            event_id,
            fact.event,
            _time(getattr(row, f"{fact.prefix}_at")),
            **{attribute: getattr(row, column) for column, attribute in fact.details},
        )
        for fact in FACTS.values()
        if (event_id := getattr(row, f"{fact.prefix}_id")) is not None
    ]
    if row.timeline != "[]":
        entries.extend(legacy_timeline(row.timeline))
    return JobRecord(
        job_id=row.job_id, caller=row.caller, timeline=facts(entries), trace_id=row.trace_id
    )


def legacy_timeline(raw: str) -> list[Entry]:
    """The entries of a timeline as rows held it before the facts had columns."""
    return [Entry(**{**item, "at": datetime.fromisoformat(item["at"])}) for item in json.loads(raw)]


def columns_of(record: JobRecord) -> dict[str, Any]:
    """A record's facts as column values (to upgrade a legacy row)."""
    values: dict[str, Any] = {}
    for entry in record.timeline:
        fact = FACTS[entry.event]
        values[f"{fact.prefix}_at"] = micros(entry.at)
        values[f"{fact.prefix}_id"] = entry.event_id
        for column, attribute in fact.details:
            values[column] = getattr(entry, attribute)
    return values
