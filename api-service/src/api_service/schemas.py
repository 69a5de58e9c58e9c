"""What the REST API accepts and answers."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from pipeline_shared.events import StepName, Subject


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

    email: EmailStr = Field(description="Where to send the result.")
    data: dict[str, Any] = Field(description="The data to process: a JSON object, possibly empty.")
    subject: Subject | None = Field(default=None, description="Subject of the email (one line).")
    step: StepName = Field(default="summarise", description="Registered processing step to run.")


class JobAccepted(BaseModel):
    job_id: UUID
    status: Literal["queued"] = "queued"


class TaskAccepted(BaseModel):
    """The tutorial's answer shape: ``task_id`` is the job id."""

    task_id: UUID
    status: Literal["queued"] = "queued"


class Problem(BaseModel):
    """An error answer."""

    detail: str


class Health(BaseModel):
    status: str
    detail: str | None = None
