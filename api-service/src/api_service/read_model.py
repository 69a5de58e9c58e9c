"""The job read model: what a job's events say about it. Pure functions, no I/O.

A job's record keeps the facts (its timeline: one entry per distinct event)
and derives everything else from them, so events may arrive in any order and
any number of times and the record still ends in the same state:

* duplicates are dropped by ``event_id``;
* an ``EmailSent`` makes the job ``sent`` whatever else happened (a job
  that failed and was replayed can still be sent);
* otherwise the latest event by ``occurred_at`` (not by arrival) decides
  between ``queued``, ``processed`` and ``failed``.
"""

from __future__ import annotations

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


def entry_of(event: JobEvent) -> Entry:
    entry = Entry(event_id=str(event.event_id), event=event.event_type, at=event.occurred_at)
    if isinstance(event, JobFailed):
        return replace(entry, attempts=event.attempts, reason=event.reason)
    if isinstance(event, EmailSent):
        return replace(
            entry, attempts=event.attempts, provider_message_id=event.provider_message_id
        )
    return entry


def apply(record: JobRecord | None, event: JobEvent) -> JobRecord:
    """The record after ``event``; the same record if the event was seen already."""
    caller = event.submitted_by if isinstance(event, JobRequested) else None
    if record is None:
        return JobRecord(job_id=str(event.job_id), caller=caller, timeline=(entry_of(event),))
    if any(e.event_id == str(event.event_id) for e in record.timeline):
        return record
    timeline = tuple(sorted((*record.timeline, entry_of(event)), key=_order))
    return replace(record, caller=record.caller or caller, timeline=timeline)
