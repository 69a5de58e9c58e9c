"""The api's composition root: ``create_app(settings)`` builds everything it needs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from uuid import uuid4

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import EmailStr

from api_service.body_limit import BodySizeLimit
from api_service.schemas import Health, JobAccepted, JobRequest, Problem, TaskAccepted
from api_service.settings import ApiSettings
from pipeline_shared.errors import BrokerUnavailable
from pipeline_shared.events import JobRequested
from pipeline_shared.messaging import Broker

SERVICE = "api-service"
RETRY_AFTER_SECONDS = 5

log = logging.getLogger("api")

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "The request body is larger than the limit."},
    422: {"description": "The request is invalid; ``detail`` says which field and why."},
    503: {
        "model": Problem,
        "description": "The message broker is unavailable; retry after ``Retry-After`` seconds.",
    },
}


def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


async def publish_job(broker: Broker, request: JobRequest) -> JobRequested:
    """Publish the job and return once the broker has confirmed it."""
    event = JobRequested(
        job_id=uuid4(),
        email=request.email,
        subject=request.subject,
        step=request.step,
        data=request.data,
    )
    await broker.publish(event)
    log.info("job %s: JobRequested published (step %s)", event.job_id, event.step)
    return event


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = Broker(
            settings.rabbitmq_url,
            app_id=SERVICE,
            publish_timeout=settings.publish_timeout_seconds,
            retry_delays=settings.retry_delays,
        )
        app.state.broker = broker
        # Connect in the background: the api answers /healthz (and 503s)
        # while the broker is away, and the robust connection takes over once
        # the first connection is made.
        connecting = asyncio.create_task(broker.connect_until_ready())
        try:
            yield
        finally:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await broker.close()

    app = FastAPI(
        title="Email pipeline API",
        summary="Submit a job: its data is processed and the result emailed, in the background.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(BrokerUnavailable)
    async def broker_unavailable(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        log.warning("answering 503 to %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": f"the message broker is unavailable ({exc}); retry later"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.post(
        "/jobs", status_code=202, response_model=JobAccepted, responses=_ERRORS, tags=["jobs"]
    )
    async def submit_job(job: JobRequest, broker: BrokerDep) -> JobAccepted:
        """Accept a job. Answers once the job is safely with the broker."""
        event = await publish_job(broker, job)
        return JobAccepted(job_id=event.job_id)

    @app.post(
        "/process-and-email/",
        status_code=202,
        response_model=TaskAccepted,
        responses=_ERRORS,
        tags=["jobs"],
    )
    async def process_and_email(
        email: Annotated[EmailStr, Query(description="Where to send the result.")],
        data: Annotated[dict[str, Any], Body(description="The data to process, a JSON object.")],
        broker: BrokerDep,
    ) -> TaskAccepted:
        """The tutorial's endpoint, kept for people coming from it; prefer ``POST /jobs``."""
        event = await publish_job(broker, JobRequest(email=email, data=data))
        return TaskAccepted(task_id=event.job_id)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not connected to the broker."}},
        tags=["health"],
    )
    async def readyz(broker: BrokerDep) -> Health | JSONResponse:
        """The broker connection is open, so jobs can be accepted."""
        if broker.is_ready:
            return Health(status="ready")
        return JSONResponse(
            Health(status="unavailable", detail="not connected to the message broker").model_dump(),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    return app
