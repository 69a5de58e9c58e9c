"""How the api answers failures: one handler per kind of error, all JSON with a ``detail``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api_service.batch import BatchIncomplete, BatchNotAccepted
from api_service.intake import KeyConflict, NotAccepted, OutcomeUnknown
from api_service.problems import validation_problems
from api_service.schemas import BatchJobOutcome, IncompleteBatch
from pipeline_shared.errors import BrokerUnavailable

log = logging.getLogger("api")

RETRY_AFTER_SECONDS = 5
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_SECONDS)}


def unavailable(request: Request, body: dict[str, Any], why: object) -> JSONResponse:
    """A 503 asking the client to come back, logged with why."""
    log.warning("answering 503 to %s %s: %s", request.method, request.url.path, why)
    return JSONResponse(body, status_code=503, headers=RETRY_LATER)


def install_error_answers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette names only the first route that matched the path; a path
        # served by several routes (GET and POST /jobs) allows all their methods.
        allowed = sorted(
            {
                method
                for route in app.routes
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods or ()
            }
        )
        return JSONResponse(
            {"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_problems(exc.errors())}, status_code=422)

    @app.exception_handler(NotAccepted)
    async def not_accepted(request: Request, exc: NotAccepted) -> JSONResponse:
        body = {"detail": f"the job was not accepted: {exc.reason}; retry later"}
        return unavailable(request, body, exc.reason)

    @app.exception_handler(OutcomeUnknown)
    async def outcome_unknown(request: Request, exc: OutcomeUnknown) -> JSONResponse:
        body = {
            "detail": f"the broker may or may not have taken the job ({exc.reason}); "
            "GET /jobs/{job_id} tells, or retry with the same Idempotency-Key",
            "job_id": str(exc.job_id),
            "outcome": "unknown",
        }
        return unavailable(request, body, f"job {exc.job_id}: outcome unknown: {exc.reason}")

    @app.exception_handler(BatchNotAccepted)
    async def batch_not_accepted(request: Request, exc: BatchNotAccepted) -> JSONResponse:
        body = {"detail": f"none of the jobs was accepted: {exc.reason}; retry later"}
        return unavailable(request, body, exc.reason)

    @app.exception_handler(BatchIncomplete)
    async def batch_incomplete(request: Request, exc: BatchIncomplete) -> JSONResponse:
        answer = IncompleteBatch(
            detail=f"{exc.summary} ({exc.reason}); GET /jobs/{{job_id}} tells whether a job "
            "with an unknown outcome exists; retry with the same Idempotency-Key to publish "
            "again only the jobs not queued (without one, a retry of the whole batch would "
            "queue its queued jobs twice)",
            jobs=[BatchJobOutcome(job_id=job.job_id, status=job.state) for job in exc.jobs],
        )
        return unavailable(request, answer.model_dump(mode="json"), exc)

    @app.exception_handler(KeyConflict)
    async def key_conflict(request: Request, exc: KeyConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(BrokerUnavailable)
    async def broker_unavailable(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        body = {"detail": f"the message broker is unavailable ({exc}); retry later"}
        return unavailable(request, body, exc)

    @app.exception_handler(SQLAlchemyError)
    async def store_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        body = {"detail": "the job store is unavailable; retry later"}
        return unavailable(request, body, f"job store error {type(exc).__name__}")
