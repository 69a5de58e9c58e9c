"""Event contracts: the messages that travel between the services.

A message body is one event's JSON object at the top level. Every event shares
one envelope (``event_id``, ``event_type``, ``schema_version``, ``job_id``,
``occurred_at``, ``submitted_by``) and adds its own fields.

Versioning rules, which let a producer be deployed before its consumers:

* Within a schema version, only *optional* fields may be added. Consumers
  ignore fields they do not know (a tolerant reader), so an upgraded producer
  does not break an older consumer.
* Anything else (removing or renaming a field, changing a type, making a
  field required) is a new ``schema_version``.
* A consumer rejects a version it does not know; the messaging layer
  dead-letters such a message with the reason instead of guessing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal
from uuid import UUID, uuid4

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from pipeline_shared.contract import MAX_REPORTED_PROBLEMS, EmailAddress, JobData, Subject

SCHEMA_VERSION = 1
"""The schema version this code writes and the only one it reads."""

StepName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
"""The name of a processing step, as registered in the processor."""


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every event carries."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    routing_key: ClassVar[str]

    event_id: UUID = Field(
        default_factory=uuid4,
        description="Unique id of this event; also the AMQP message_id.",
    )
    event_type: str = Field(description="The event's class name, e.g. JobRequested.")
    schema_version: int = Field(
        default=SCHEMA_VERSION,
        description="Version of this event's schema; see the versioning rules.",
    )
    job_id: UUID = Field(description="The job this event belongs to; also the AMQP correlation_id.")
    occurred_at: AwareDatetime = Field(
        default_factory=utc_now,
        description="When the event happened, in UTC.",
    )
    submitted_by: str | None = Field(
        default=None,
        max_length=64,
        description="Opaque id of the API caller that submitted the job; scopes who may see it. "
        "Every event of a job carries it on, so the api's read model knows whose job it is from "
        "whichever of its events it records first.",
    )

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported schema_version {value}; this consumer reads {SCHEMA_VERSION}"
            )
        return value

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class JobRequested(Event):
    """A caller asked for its data to be processed and emailed to it."""

    routing_key: ClassVar[str] = "job.requested"

    event_type: Literal["JobRequested"] = "JobRequested"
    email: EmailAddress = Field(description="Recipient of the result email.")
    subject: Subject | None = Field(default=None, description="Subject of the email.")
    step: StepName = Field(default="summarise", description="Processing step to run.")
    data: JobData = Field(description="The job's input data, a JSON object.")


class DataProcessed(Event):
    """The processor ran the job's step; the result is ready to be emailed."""

    routing_key: ClassVar[str] = "data.processed"

    event_type: Literal["DataProcessed"] = "DataProcessed"
    email: EmailAddress = Field(description="Recipient of the result email.")
    subject: Subject | None = Field(default=None, description="Subject of the email.")
    step: StepName = Field(description="The processing step that ran.")
    data: JobData = Field(description="The job's input data, as it was requested.")
    result: JobData = Field(description="What the processing step produced.")
    requested_at: AwareDatetime | None = Field(
        default=None,
        description="When the job was requested: its JobRequested's occurred_at. The mailer "
        "measures each job's time from request to email from it.",
    )


class EmailSent(Event):
    """The email provider accepted the job's email."""

    routing_key: ClassVar[str] = "email.sent"

    event_type: Literal["EmailSent"] = "EmailSent"
    email: EmailAddress = Field(description="Recipient of the email.")
    transport: str = Field(description="Which transport sent it: mailtrap or outbox.")
    provider_message_id: str | None = Field(
        default=None, description="The provider's id for the sent message."
    )
    attempts: int | None = Field(
        default=None, ge=1, description="On which delivery attempt the email was sent."
    )


class JobFailed(Event):
    """A job could not be completed; ``reason`` says why."""

    routing_key: ClassVar[str] = "job.failed"

    event_type: Literal["JobFailed"] = "JobFailed"
    stage: str = Field(description="Service whose stage failed, e.g. processor-service.")
    reason: str = Field(description="Human-readable reason for the failure.")
    error_type: str = Field(description="Class of the failure, e.g. PermanentFailure.")
    attempts: int | None = Field(
        default=None, ge=1, description="Delivery attempts made before giving up."
    )


AnyEvent = Annotated[
    JobRequested | DataProcessed | EmailSent | JobFailed,
    Field(discriminator="event_type"),
]

EVENT_TYPES: tuple[type[Event], ...] = (JobRequested, DataProcessed, EmailSent, JobFailed)

any_event_adapter: TypeAdapter[JobRequested | DataProcessed | EmailSent | JobFailed] = TypeAdapter(
    AnyEvent
)
"""Parses a body whose event type is not known in advance (built once: it is not cheap)."""


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One readable line for a failed parse, e.g. ``invalid JobRequested: email: value is not
    a valid email address``. Input values are left out: they may be personal data."""
    errors = exc.errors(include_input=False, include_url=False)
    problems = []
    for error in errors[:MAX_REPORTED_PROBLEMS]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    if len(errors) > MAX_REPORTED_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_REPORTED_PROBLEMS} more")
    return f"invalid {what}: " + "; ".join(problems)
