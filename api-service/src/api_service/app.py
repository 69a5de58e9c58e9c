"""The api's composition root: ``create_app(settings)`` builds everything it needs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import Body, FastAPI, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from api_service.answers import RETRY_LATER, install_error_answers
from api_service.batch_route import PATH as BATCH_PATH
from api_service.batch_route import add_batch_route
from api_service.body_limit import BodySizeLimit
from api_service.connecting import BrokerConnector
from api_service.dependencies import (
    CallerDep,
    ConnectorDep,
    IdempotencyKey,
    IntakeDep,
    RecorderDep,
    StoreDep,
)
from api_service.http_metrics import install_http_metrics
from api_service.http_tracing import install_http_tracing
from api_service.intake import IntakePolicy
from api_service.read_model import Status
from api_service.recorder import JobRecorder
from api_service.schemas import (
    Health,
    JobAccepted,
    JobPage,
    JobRequest,
    JobView,
    Problem,
    TaskAccepted,
)
from api_service.settings import ApiSettings
from api_service.store import InvalidCursor, JobStore
from api_service.strict_route import StrictRoute
from pipeline_shared.contract import EmailAddress, JobData
from pipeline_shared.messaging import Broker
from pipeline_shared.settings import redact_url

SERVICE = "api-service"
PURGE_INTERVAL_SECONDS = 3600

log = logging.getLogger("api")

_UNAVAILABLE = {
    "model": Problem,
    "description": "The message broker or the job store is unavailable; retry after "
    "``Retry-After`` seconds.",
}
_UNAUTHORIZED = {"model": Problem, "description": "Missing or invalid API key."}
_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body could not be read as JSON."},
    401: _UNAUTHORIZED,
    413: {"model": Problem, "description": "The request body is larger than the limit."},
    422: {"description": "The request is invalid; ``detail`` says which field and why."},
    503: _UNAVAILABLE,
}


def create_app(settings: ApiSettings) -> FastAPI:

    async def purge_periodically(store: JobStore) -> None:
        """Job records hold personal data: keep them only JOB_RETENTION_DAYS."""
        while True:
            now = datetime.now(UTC)
            try:
                purged, keys_purged = await store.purge(
                    now - timedelta(days=settings.job_retention_days),
                    now - timedelta(hours=settings.idempotency_key_hours),
                )
                if purged or keys_purged:
                    log.info("purged %d job record(s), %d idempotency key(s)", purged, keys_purged)
            except SQLAlchemyError as exc:
                log.warning("could not purge old job records: %s", type(exc).__name__)
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await asyncio.to_thread(JobStore.open, settings.database_url)
        log.info("job records at %s", redact_url(settings.database_url))
        if not settings.keys.required:
            log.warning(
                "API_KEYS is not set: anyone who can reach %s:%d may submit jobs "
                "(allowed on a loopback address only)",
                settings.api_host,
                settings.api_port,
            )
        broker = Broker.from_settings(settings, app_id=SERVICE)
        recorder = JobRecorder(store.record_batch)
        app.state.broker, app.state.store, app.state.recorder = broker, store, recorder
        # Connect in the background: the api answers /healthz (and 503s)
        # while the broker is away, and the robust connection takes over once
        # the first connection is made. The job events after JobRequested reach
        # the store through status-service, a process of its own.
        connector = BrokerConnector(broker)
        app.state.connector = connector
        connecting = asyncio.create_task(connector.run())
        purging = asyncio.create_task(purge_periodically(store))
        try:
            yield
        finally:
            purging.cancel()
            connecting.cancel()
            await asyncio.gather(connecting, purging, return_exceptions=True)
            await broker.close()
            await recorder.close()
            await store.close()

    app = FastAPI(
        title="Email pipeline API",
        summary="Submit a job: its data is processed and the result emailed, in the background.",
        version="0.1.0",
        lifespan=lifespan,
    )
    # Every route authenticates before reading, refuses what it did not ask
    # for, and reads bodies strictly: a duplicate key or NaN is a 422, not a guess.
    app.router.route_class = StrictRoute
    # A redirect to the same path with a slash would be built from the
    # client's Host header, and sent before authentication.
    app.router.redirect_slashes = False
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        timeout_seconds=settings.request_timeout_seconds,
        max_bytes_by_path={BATCH_PATH: settings.max_batch_request_bytes},
    )
    install_http_metrics(app)  # it counts the body limit's answers too
    install_http_tracing(app)  # and around it, each request's trace
    app.state.api_keys = settings.keys
    app.state.intake_policy = IntakePolicy(
        publish_budget=settings.publish_timeout_seconds,
        key_stale_after=3 * settings.publish_timeout_seconds,
        key_wait=2 * settings.publish_timeout_seconds + 5,
    )

    install_error_answers(app)
    add_batch_route(app, settings)

    @app.post(
        "/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses={
            **_SUBMIT_ERRORS,
            200: {
                "model": JobAccepted,
                "description": "The job this Idempotency-Key already created.",
            },
            409: {
                "model": Problem,
                "description": "The Idempotency-Key was used for another request.",
            },
        },
        tags=["jobs"],
    )
    async def submit_job(
        job: JobRequest,
        response: Response,
        intake: IntakeDep,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> JobAccepted:
        """Accept a job. Answers once the job is safely with the broker."""
        if idempotency_key is None:
            return JobAccepted(job_id=await intake.accept(job, caller))
        job_id, replayed = await intake.accept_once(job, caller, idempotency_key)
        if replayed:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        return JobAccepted(job_id=job_id)

    @app.get(
        "/jobs/{job_id}",
        response_model=JobView,
        responses={
            401: _UNAUTHORIZED,
            404: {"model": Problem, "description": "No such job."},
            503: _UNAVAILABLE,
        },
        tags=["jobs"],
    )
    async def get_job(
        job_id: UUID, store: StoreDep, recorder: RecorderDep, caller: CallerDep
    ) -> JobView:
        """A job's status and timeline. 404 means the job was never accepted (for this caller)."""
        unwritten = recorder.pending(str(job_id))  # first: see JobRecorder.pending
        record = unwritten.onto(await store.get(str(job_id), caller))
        if record is None or record.caller != caller:
            raise HTTPException(404, f"no job {job_id}")
        return JobView.of(record)

    @app.get(
        "/jobs",
        response_model=JobPage,
        responses={401: _UNAUTHORIZED, 503: _UNAVAILABLE},
        tags=["jobs"],
    )
    async def list_jobs(
        store: StoreDep,
        caller: CallerDep,
        status: Annotated[Status | None, Query(description="Only jobs in this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
        cursor: Annotated[
            str | None,
            Query(
                min_length=1, max_length=200, description="``next_cursor`` of the previous page."
            ),
        ] = None,
    ) -> JobPage:
        """The caller's jobs, newest created first, a page at a time."""
        try:
            records, next_cursor = await store.list_jobs(caller, status, limit, cursor)
        except InvalidCursor as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ("query", "cursor"),
                        "msg": str(exc),
                        "input": cursor,
                    }
                ]
            ) from exc
        return JobPage(items=[JobView.of(r) for r in records], next_cursor=next_cursor)

    @app.post(
        "/process-and-email/",
        status_code=202,
        response_model=TaskAccepted,
        responses={
            **_SUBMIT_ERRORS,
            200: {
                "model": TaskAccepted,
                "description": "The job this Idempotency-Key already created.",
            },
            409: {
                "model": Problem,
                "description": "The Idempotency-Key was used for another request.",
            },
        },
        tags=["jobs"],
    )
    async def process_and_email(
        email: Annotated[EmailAddress, Query(description="Where to send the result.")],
        data: Annotated[JobData, Body(description="The data to process, a JSON object.")],
        response: Response,
        intake: IntakeDep,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> TaskAccepted:
        """The tutorial's endpoint, kept for people coming from it; prefer ``POST /jobs``.
        Its ``task_id`` works with ``GET /jobs/{job_id}``."""
        job = JobRequest(email=email, data=data)
        if idempotency_key is None:
            return TaskAccepted(task_id=await intake.accept(job, caller))
        job_id, replayed = await intake.accept_once(job, caller, idempotency_key)
        if replayed:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        return TaskAccepted(task_id=job_id)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={
            503: {
                "model": Health,
                "description": "Not connected to the broker; ``detail`` says so.",
            }
        },
        tags=["health"],
    )
    async def readyz(connector: ConnectorDep) -> Health | JSONResponse:
        """Jobs can be accepted: the broker connection is open. (Whether their status is
        followed is status-service's ``/readyz``.)"""
        problem = connector.problem
        if problem is None:
            return Health(status="ready")
        return JSONResponse(
            Health(status="unavailable", detail=problem).model_dump(),
            status_code=503,
            headers=RETRY_LATER,
        )

    return app
