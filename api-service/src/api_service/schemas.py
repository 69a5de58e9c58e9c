"""What the REST API accepts and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from api_service.read_model import JobRecord, Status
from pipeline_shared.contract import EmailAddress, JobData, Subject
from pipeline_shared.events import StepName


class JobRequest(BaseModel):
    """A job: process ``data`` with ``step`` and email the result to ``email``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "email": "ada@example.com",
                    "subject": "Your report",
                    "data": {"visits": [3, 5, 8]},
                }
            ]
        },
    )

    email: EmailAddress = Field(
        description="Where to send the result: one address; an internationalised domain is "
        "sent in its IDNA form, a non-ASCII local part is refused."
    )
    data: JobData = Field(
        description="The data to process: a JSON object, possibly empty, nested at most 32 "
        "levels, with finite numbers and no control characters in its strings but tab and "
        "line breaks."
    )
    subject: Subject | None = Field(default=None, description="Subject of the email (one line).")
    step: StepName = Field(default="summarise", description="Registered processing step to run.")


class JobAccepted(BaseModel):
    job_id: UUID
    status: Literal["queued"] = "queued"


class BatchAccepted(BaseModel):
    """Every job of a batch, in the order of its items."""

    jobs: list[JobAccepted]


BatchJobState = Literal["queued", "unknown", "not_accepted"]


class BatchJobOutcome(BaseModel):
    job_id: UUID
    status: BatchJobState = Field(
        description="queued: the broker has the job; unknown: it may or may not have it "
        "(GET /jobs/{job_id} tells); not_accepted: it does not."
    )


class IncompleteBatch(BaseModel):
    """A 503 for a batch of which not every job is known to be with the broker."""

    detail: str
    outcome: Literal["partial"] = "partial"
    jobs: list[BatchJobOutcome] = Field(description="Each job, in the order of the items.")


class TaskAccepted(BaseModel):
    """The tutorial's answer shape: ``task_id`` is the job id."""

    task_id: UUID
    status: Literal["queued"] = "queued"


class Problem(BaseModel):
    """An error answer."""

    detail: str


class TimelineItem(BaseModel):
    event: str = Field(description="The event's type, e.g. DataProcessed.")
    at: datetime = Field(description="When it happened (UTC).")


class JobView(BaseModel):
    """What the pipeline knows about one job."""

    job_id: UUID
    status: Status = Field(description="queued, processed, sent or failed.")
    created_at: datetime
    updated_at: datetime
    attempts: int = Field(description="Delivery attempts the last stage needed (0 until then).")
    error: str | None = Field(description="Why the job failed, while it is failed.")
    provider_message_id: str | None = Field(description="Mailtrap's message id, once sent.")
    trace_id: str | None = Field(
        description="The job's W3C trace id (32 hex digits): its spans in every service, "
        "where OpenTelemetry exports them, are in this trace."
    )
    timeline: list[TimelineItem]

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        return cls(
            job_id=UUID(record.job_id),
            status=record.status,
            created_at=record.created_at,
            updated_at=record.updated_at,
            attempts=record.attempts,
            error=record.error,
            provider_message_id=record.provider_message_id,
            trace_id=record.trace_id,
            timeline=[TimelineItem(event=e.event, at=e.at) for e in record.timeline],
        )


class JobPage(BaseModel):
    items: list[JobView]
    next_cursor: str | None = Field(
        description="Pass as ``cursor`` for the next page; null at the end."
    )


class Health(BaseModel):
    status: str
    detail: str | None = None
