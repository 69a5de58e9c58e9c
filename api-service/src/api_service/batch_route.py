"""``POST /jobs/batch``, the HTTP side of batch submission (the flow is ``api_service.batch``).

The request model is made per app, since its limits are settings: at most
MAX_BATCH_JOBS items, each at most MAX_REQUEST_BYTES. This module does not
postpone its annotations (no ``from __future__ import annotations``): FastAPI
resolves a handler's annotations as names in the module's globals, where a
model made in a function is not.
"""

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from api_service.batch import BatchIntake
from api_service.dependencies import CallerDep, IdempotencyKey
from api_service.intake import IntakePolicy
from api_service.recorder import JobRecorder
from api_service.schemas import BatchAccepted, IncompleteBatch, JobAccepted, JobRequest, Problem
from api_service.settings import ApiSettings
from api_service.store import JobStore
from pipeline_shared.events import JobRequested

PATH = "/jobs/batch"


def compact_size(value: Any) -> int:
    """Bytes of ``value`` written as compact JSON in UTF-8: the size of a job as the body
    of ``POST /jobs`` (whitespace and ``\\u`` escapes in the batch do not count)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


async def get_batch_intake(request: Request) -> BatchIntake:
    state = request.app.state
    store: JobStore = state.store
    policy: IntakePolicy = state.intake_policy
    recorder: JobRecorder = state.recorder

    async def record(events: Sequence[JobRequested], traces: Mapping[str, str]) -> None:
        if not store.shared:
            # As for one job (``JobIntake.accept``): this api alone reads the file, and
            # shows the jobs until their group commit writes them.
            for event in events:
                recorder.note(event, traces.get(str(event.job_id)))
            return
        await asyncio.to_thread(store.record_batch, events, traces)

    return BatchIntake(state.broker, store, policy, record, recorder.note)


BatchIntakeDep = Annotated[BatchIntake, Depends(get_batch_intake)]


def add_batch_route(app: FastAPI, settings: ApiSettings) -> None:
    """Add ``POST /jobs/batch`` to ``app``: a ``StrictRoute`` like all its routes (the route
    class ``create_app`` sets), so it authenticates first and reads its body strictly."""
    max_item_bytes = settings.max_request_bytes

    def within_request_limit(item: Any) -> Any:
        # On the item as sent, before validation: the rule that keeps every job's
        # events within MAX_EVENT_BYTES is a rule about the job as a request.
        if compact_size(item) > max_item_bytes:
            raise PydanticCustomError(
                "too_large",
                "this job is larger than {limit} bytes (MAX_REQUEST_BYTES) written as "
                "compact JSON; POST /jobs would refuse it too",
                {"limit": max_item_bytes},
            )
        return item

    class BatchRequest(BaseModel):
        """Jobs to accept together: each item is what ``POST /jobs`` takes."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {
                        "jobs": [
                            {"email": "ada@example.com", "data": {"visits": [3, 5, 8]}},
                            {"email": "grace@example.com", "data": {"visits": [1]}},
                        ]
                    }
                ]
            },
        )

        jobs: list[Annotated[JobRequest, BeforeValidator(within_request_limit)]] = Field(
            min_length=1,
            max_length=settings.max_batch_jobs,
            description=f"1 to {settings.max_batch_jobs} jobs (MAX_BATCH_JOBS), each at most "
            f"{max_item_bytes} bytes written as compact JSON (MAX_REQUEST_BYTES).",
        )

    @app.post(
        PATH,
        status_code=202,
        response_model=BatchAccepted,
        responses={
            200: {
                "model": BatchAccepted,
                "description": "The jobs this Idempotency-Key already created.",
            },
            400: {"model": Problem, "description": "The body could not be read as JSON."},
            401: {"model": Problem, "description": "Missing or invalid API key."},
            409: {
                "model": Problem,
                "description": "The Idempotency-Key was used for another request.",
            },
            413: {
                "model": Problem,
                "description": "The request body is larger than MAX_BATCH_REQUEST_BYTES.",
            },
            422: {
                "description": "The request is invalid; ``detail`` names each problem, a bad "
                "job by its index (``loc``: body, jobs, 3, email). Nothing was published."
            },
            503: {
                "model": IncompleteBatch | Problem,
                "description": "Not every job is known to be with the broker. With ``jobs``: "
                "each job's state, in the items' order; retry with the same Idempotency-Key "
                "to publish again only those not queued. Without: none was taken, and a "
                "retry is safe.",
            },
        },
        tags=["jobs"],
    )
    async def submit_batch(
        batch: BatchRequest,
        response: Response,
        intake: BatchIntakeDep,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> BatchAccepted:
        """Accept many jobs in one request, all or none validated: a newsletter, a digest.
        Answers once the broker has every job, with their ids in the items' order."""
        if idempotency_key is None:
            job_ids = await intake.accept(batch.jobs, caller)
        else:
            job_ids, replayed = await intake.accept_once(batch.jobs, caller, idempotency_key)
            if replayed:
                response.status_code = 200
                response.headers["Idempotent-Replayed"] = "true"
        return BatchAccepted(jobs=[JobAccepted(job_id=job_id) for job_id in job_ids])
