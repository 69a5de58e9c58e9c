"""The job read model: what a job's events say about it. Pure functions, no I/O.

A job's record keeps the facts (its timeline: at most one entry per event
type) and derives everything else from them, so events may arrive in any
order, any number of times and re-published under new event ids, and the
record still ends in the same state:

* the timeline keeps, per event type, the earliest ``JobRequested``,
  ``DataProcessed`` and ``EmailSent`` by ``occurred_at`` and the latest
  ``JobFailed`` (ties in time broken by ``event_id``). So a redelivered event
  adds nothing, and neither does an event re-published with a new
  ``event_id`` (the mailer re-publishes ``EmailSent`` when it meets a job it
  sent already; a processor killed mid-job publishes ``DataProcessed``
  twice); a failure after a replay replaces the earlier failure;
* an ``EmailSent`` makes the job ``sent`` whatever else happened (a job
  that failed and was replayed can still be sent);
* otherwise the latest entry by ``occurred_at`` (not by arrival) decides
  between ``queued``, ``processed`` and ``failed``; a ``failed`` job's
  ``error`` is the kept ``JobFailed``'s reason;
* ``attempts`` is the highest attempt count of the kept ``EmailSent`` and
  ``JobFailed`` (0 without either); ``provider_message_id`` is the kept (the
  first) ``EmailSent``'s;
* ``trace_id`` is the job's trace, from the first event that came with one
  (every event of a job travels in the trace its request started);
* ``caller`` is the ``JobRequested``'s ``submitted_by``. Every event of a
  job carries its caller on, so a job whose ``JobRequested`` was never
  recorded (the api records it itself, and stopped before its write) is
  still its caller's from its next event; but a later event never takes a
  job from the caller its request named (see ``_caller``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from pipeline_shared.events import DataProcessed, EmailSent, JobFailed, JobRequested

JobEvent = JobRequested | DataProcessed | EmailSent | JobFailed
Status = Literal["queued", "processed", "sent", "failed"]

_STATUS_OF: dict[str, Status] = {
    "JobRequested": "queued",
    "DataProcessed": "processed",
    "JobFailed": "failed",
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One event in a job's timeline, with what the record derives from it."""

    event_id: str
    event: str
    at: datetime
    attempts: int | None = None
    reason: str | None = None
    provider_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    caller: str | None
    timeline: tuple[Entry, ...]
    trace_id: str | None = None

    @property
    def created_at(self) -> datetime:
        requested = [e.at for e in self.timeline if e.event == "JobRequested"]
        return min(requested or [e.at for e in self.timeline])

    @property
    def updated_at(self) -> datetime:
        return max(e.at for e in self.timeline)

    @property
    def status(self) -> Status:
        if any(e.event == "EmailSent" for e in self.timeline):
            return "sent"
        latest = max((e for e in self.timeline if e.event in _STATUS_OF), key=_order, default=None)
        return _STATUS_OF[latest.event] if latest is not None else "queued"

    @property
    def error(self) -> str | None:
        if self.status != "failed":
            return None
        failures = [e for e in self.timeline if e.event == "JobFailed"]
        return max(failures, key=_order).reason

    @property
    def attempts(self) -> int:
        return max((e.attempts or 0 for e in self.timeline), default=0)

    @property
    def provider_message_id(self) -> str | None:
        sent = [e for e in self.timeline if e.event == "EmailSent"]
        return min(sent, key=_order).provider_message_id if sent else None


def _order(entry: Entry) -> tuple[datetime, str]:
    # Ties in time are broken by event id, so that arrival order never matters.
    return entry.at, entry.event_id


def _supersedes(entry: Entry, kept: Entry) -> bool:
    """Whether ``entry`` takes the place of ``kept``, an entry of the same type."""
    if entry.event == "JobFailed":
        # A job can really fail more than once: it fails, an operator replays
        # it from the dead-letter queue (with a fresh attempt count), and it
        # fails again, maybe at a later stage after a new DataProcessed. The
        # latest failure is the one that describes the job now: keeping the
        # first would show such a job as processed for good, or with an error
        # the replay got past. A failure published twice (a stage killed
        # between publishing JobFailed and acking) collapses the same way.
        return _order(entry) > _order(kept)
    return _order(entry) < _order(kept)


def facts(entries: Iterable[Entry]) -> tuple[Entry, ...]:
    """At most one entry per event type, sorted by ``occurred_at``: the earliest
    of each type, but the latest ``JobFailed``. The result depends only on the
    set of entries, not on their order or on repeats."""
    kept: dict[str, Entry] = {}
    for entry in entries:
        held = kept.get(entry.event)
        if held is None or _supersedes(entry, held):
            kept[entry.event] = entry
    return tuple(sorted(kept.values(), key=_order))


def _caller(record: JobRecord, event: JobEvent) -> str | None:
    """Whose job it is once ``event`` is folded into ``record``.

    The request's caller, always: only the api may publish ``JobRequested``.
    Until the request is recorded, the caller the job's other events carry on
    (the least of them, should two ever disagree, so that arrival order does not
    matter); a later stage can name the caller of a job nobody claimed, never
    take one over.
    """
    named = event.submitted_by
    if named is None:
        return record.caller
    if isinstance(event, JobRequested) or record.caller is None:
        return named
    if any(entry.event == "JobRequested" for entry in record.timeline):
        return record.caller
    return min(record.caller, named)


def entry_of(event: JobEvent) -> Entry:
    entry = Entry(event_id=str(event.event_id), event=event.event_type, at=event.occurred_at)
    if isinstance(event, JobFailed):
        return replace(entry, attempts=event.attempts, reason=event.reason)
    if isinstance(event, EmailSent):
        return replace(
            entry, attempts=event.attempts, provider_message_id=event.provider_message_id
        )
    return entry


def apply(record: JobRecord | None, event: JobEvent, trace_id: str | None = None) -> JobRecord:
    """The record after ``event`` (which travelled in trace ``trace_id``); the same
    record (``is``) if it adds no fact."""
    if record is None:
        return JobRecord(
            job_id=str(event.job_id),
            caller=event.submitted_by,
            timeline=(entry_of(event),),
            trace_id=trace_id,
        )
    timeline = facts((*record.timeline, entry_of(event)))
    caller = _caller(record, event)
    trace_id = record.trace_id or trace_id
    if timeline == record.timeline and caller == record.caller and trace_id == record.trace_id:
        return record
    return replace(record, caller=caller, timeline=timeline, trace_id=trace_id)
