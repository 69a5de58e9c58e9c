"""What the api's routes depend on: the broker, the job store and the caller.

Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a
thread hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api_service.auth import ApiKeys
from api_service.intake import IntakePolicy, JobIntake
from api_service.recorder import JobRecorder
from api_service.store import JobStore

bearer = HTTPBearer(auto_error=False, description="An API key from API_KEYS.")


class Connection(Protocol):
    @property
    def problem(self) -> str | None: ...


async def get_connector(request: Request) -> Connection:
    """Why jobs cannot be accepted, if they cannot (``api_service.connecting``)."""
    connector: Connection = request.app.state.connector
    return connector


async def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


async def get_recorder(request: Request) -> JobRecorder:
    recorder: JobRecorder = request.app.state.recorder
    return recorder


async def get_intake(request: Request) -> JobIntake:
    policy: IntakePolicy = request.app.state.intake_policy
    state = request.app.state
    return JobIntake(state.broker, state.store, policy, state.recorder)


def caller_of(request: Request) -> str:
    """The caller's id from the request's ``Authorization`` header, or 401."""
    keys: ApiKeys = request.app.state.api_keys
    given = request.headers.getlist("authorization")
    if len(given) > 1 and keys.required:
        # Two keys name no one caller: never the first, or the last, of them.
        raise HTTPException(
            401,
            "send one Authorization header, not several",
            headers={"WWW-Authenticate": "Bearer"},
        )
    caller = keys.caller_of(given[0] if given else None)
    if caller is None:
        raise HTTPException(
            401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return caller


async def authenticate(
    request: Request,
    # Declared so that the OpenAPI document shows the bearer scheme; the
    # header itself is read by ``caller_of``.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The caller's id, or 401."""
    return caller_of(request)


StoreDep = Annotated[JobStore, Depends(get_store)]
RecorderDep = Annotated[JobRecorder, Depends(get_recorder)]
CallerDep = Annotated[str, Depends(authenticate)]
ConnectorDep = Annotated[Connection, Depends(get_connector)]
IntakeDep = Annotated[JobIntake, Depends(get_intake)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes retries safe: the same key and body return the first job, and a "
        "retry after an unknown outcome publishes that same job again, never a second one.",
    ),
]
