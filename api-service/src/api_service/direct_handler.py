"""Running a route's endpoint without FastAPI's generic request handler.

For every request, FastAPI's handler works out again what its endpoint
needs: it walks the dependency tree (cache keys, scopes, generator checks),
looks each parameter up under all its aliases, reads the body through its
form and streaming branches, and opens exit stacks and telemetry scopes the
api never uses. On ``POST /jobs`` that was most of the request's own cost
(``bench/api_request_cost.py``). The api's endpoints need little: path,
query and header parameters, one JSON body, the ``Response`` to set a status
on, and dependencies that read the app's state from the request (or name the
caller, which ``StrictRoute`` has authenticated already). ``direct_handler``
looks at a route once, at start, and its handler does only that per request,
validating each value with the route's own fields, so values, defaults and
422s are FastAPI's. A route needing anything else keeps FastAPI's handler,
and so does every request while ``app.dependency_overrides`` holds anything.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from uuid import UUID

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, QueryParams

from api_service.dependencies import authenticate

DirectHandler = Callable[[Request, Any, Any, bool], Coroutine[Any, Any, Response]]
"""``handler(request, caller, body, large)``: the request (its body read), the
authenticated caller (None on a route without one), the body's JSON value
(``NO_BODY`` if empty), and whether it is large enough to validate in a worker thread."""

NO_BODY: Any = object()
"""The value of an empty body: a missing one, for a required body parameter."""

_NO_CONTENT = frozenset({204, 205, 304})
_SCALARS = (str, int, float, bool, UUID)


def _is_scalar(annotation: Any) -> bool:
    """Whether a parameter of this type is one value as FastAPI reads it (a string,
    number, UUID, literal or enum, or an optional one): lists, models and anything
    else FastAPI reads in its own ways keep its handler."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_scalar(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return all(arg is type(None) or _is_scalar(arg) for arg in get_args(annotation))
    if origin is Literal:
        return True
    return annotation in _SCALARS or (isinstance(annotation, type) and issubclass(annotation, Enum))


def _missing(loc: tuple[str | int, ...]) -> dict[str, Any]:
    return {"type": "missing", "loc": loc, "msg": "Field required", "input": None}


def _validated(field: Any, value: Any, loc: tuple[str | int, ...], errors: list[Any]) -> Any:
    """``value`` as ``field`` reads it (FastAPI's rules for a value not sent), or None with
    its problems added to ``errors``."""
    if value is NO_BODY or (value is None and loc[0] != "body"):
        if field.field_info.is_required():
            errors.append(_missing(loc))
            return None
        default = copy.deepcopy(field.default)
        if not field.field_info.validate_default:
            return default
        value = default
    checked, problems = field.validate(value, {}, loc=loc)
    errors.extend(problems)
    return checked


@dataclass(frozen=True, slots=True)
class _Param:
    field: Any
    where: str  # "path", "query" or "header"


def _params(dependant: Dependant) -> list[_Param] | None:
    params = [
        *(_Param(f, "path") for f in dependant.path_params),
        *(_Param(f, "query") for f in dependant.query_params),
        *(_Param(f, "header") for f in dependant.header_params),
    ]
    if not all(_is_scalar(p.field.field_info.annotation) for p in params):
        return None
    return params


def _needs_more(dependant: Dependant) -> bool:
    """Whether ``dependant`` takes what no handler here provides: cookies, background
    tasks, security scopes, a websocket or bare connection, a limit on concurrency."""
    return bool(
        dependant.cookie_params
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or getattr(dependant, "concurrency", None) is not None
        or not inspect.iscoroutinefunction(dependant.call)
    )


def _state_reader(sub: Dependant) -> Callable[[Request], Awaitable[Any]] | None:
    """``sub``'s call if it needs only the request (a coroutine function), else None."""
    takes_more = (
        sub.path_params
        or sub.query_params
        or sub.header_params
        or sub.body_params
        or sub.dependencies
        or sub.response_param_name
    )
    call = sub.call
    name = sub.request_param_name
    if takes_more or _needs_more(sub) or call is None or not name:
        return None
    return lambda request: call(**{name: request})


def direct_handler(route: APIRoute) -> DirectHandler | None:
    """A handler for ``route`` that does only what its endpoint needs, or None if the
    endpoint needs what it does not do (see the module's docstring)."""
    dependant = route.dependant
    endpoint = dependant.call
    params = _params(dependant)
    unusual = (
        _needs_more(dependant)
        or len(dependant.body_params) > 1
        or getattr(route, "_embed_body_fields", True)  # unknown to this FastAPI: its handler
        # FastAPI calls a dependency listed twice once a request: keep it simple.
        or len({sub.call for sub in dependant.dependencies}) < len(dependant.dependencies)
        or not isinstance(route.response_class, DefaultPlaceholder)
        or route.response_model_include is not None
        or route.response_model_exclude is not None
        or not route.response_model_by_alias
        or route.response_model_exclude_unset
        or route.response_model_exclude_defaults
        or route.response_model_exclude_none
    )
    response_field = route.response_field
    if unusual or params is None or endpoint is None or response_field is None:
        return None
    providers: list[tuple[str | None, Callable[[Request], Awaitable[Any]] | None]] = []
    for sub in dependant.dependencies:
        if sub.call is authenticate:
            providers.append((sub.name, None))  # the caller StrictRoute authenticated
            continue
        reader = _state_reader(sub)
        if reader is None:
            return None
        providers.append((sub.name, reader))
    body_field = dependant.body_params[0] if dependant.body_params else None
    status_code = route.status_code
    request_name = dependant.request_param_name
    response_name = dependant.response_param_name

    async def handle(request: Request, caller: Any, body: Any, large: bool) -> Response:
        values: dict[str, Any] = {}
        for name, reader in providers:
            value = caller if reader is None else await reader(request)
            if name is not None:
                values[name] = value
        errors: list[Any] = []
        sources: dict[str, Any] = {}
        for param in params:
            source = sources.get(param.where)
            if source is None:
                source = sources[param.where] = _source(request, param.where)
            alias = param.field.alias
            values[param.field.name] = _validated(
                param.field, source.get(alias), (param.where, alias), errors
            )
        if body_field is not None:
            validate = asyncio.to_thread if large else _now
            values[body_field.name] = await validate(
                _validated, body_field, body, ("body",), errors
            )
        if errors:
            raise RequestValidationError(errors, body=None if body is NO_BODY else body)
        if request_name is not None:
            values[request_name] = request
        settable = Response()
        del settable.headers["content-length"]
        settable.status_code = None  # type: ignore[assignment]
        if response_name is not None:
            values[response_name] = settable
        result = await endpoint(**values)
        if isinstance(result, Response):
            return result
        checked, problems = response_field.validate(result, {}, loc=("response",))
        if problems:
            raise ResponseValidationError(problems, body=result)
        status = settable.status_code or status_code or 200
        content = (
            b"" if status < 200 or status in _NO_CONTENT else response_field.serialize_json(checked)
        )
        answer = Response(content, status_code=status, media_type="application/json")
        answer.headers.raw.extend(settable.headers.raw)
        return answer

    return handle


async def _now(function: Callable[..., Any], /, *args: Any) -> Any:
    return function(*args)


def _source(request: Request, where: str) -> QueryParams | Headers | dict[str, Any]:
    if where == "path":
        return request.path_params
    if where == "query":
        return request.query_params
    return request.headers


def overridden(route: APIRoute) -> bool:
    """Whether the app overrides dependencies now (tests do): FastAPI's handler honours it."""
    provider = route.dependency_overrides_provider
    return bool(getattr(provider, "dependency_overrides", None))
