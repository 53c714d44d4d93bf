"""Jobs: submit (`Prefer: wait=N`), look up (`?wait=N`), search. Parse, call, render.

The submit (`POST /v1/satellites/{id}/jobs`) is the API's hot path: `install_lean_submit()`
puts a plain Starlette route for it ahead of FastAPI's, which skips FastAPI's request handler
(dependency solving, parameter validation) and does the same work with the same functions: the
`submit` scope check of `require()`, `_submit()`, and errors raised to the app's problem
handlers. FastAPI's route stays for the OpenAPI document (and behind the lean one, unreached).

`LeanSubmitApp` (the service's FastAPI application) goes one step further: a request that the
router would give to the lean route (the first route, its path and method) is served in front
of FastAPI's stack (its telemetry check, Starlette's middleware, the exception middleware, the
exit stack, the router, the route's wrapper) by `_lean_asgi`, inside the two middlewares whose
work it keeps: Starlette's `ServerErrorMiddleware` (an unexpected error is the same 500,
re-raised to the server's log) and `AccessLog` (the same `request_finished` line). A refusal is
rendered by the app's own exception handler for it, looked up as Starlette's exception
middleware does. Without the lean route first (or with a `root_path`) requests take the stack.
"""

from __future__ import annotations

import inspect
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from satellite.service.api.access import AccessLog
from satellite.service.api.problems import PROBLEM_JSON, Problem
from satellite.service.auth import require
from satellite.service.jobs import (
    LANES,
    MAX_BATCH_JOBS,
    MAX_WAIT_SECONDS,
    JobService,
    JobSubmitError,
    Submitted,
)
from satellite.service.store import JobFilter, JobRecord

__all__ = ["JobPage", "LeanSubmitApp", "install_lean_submit", "parse_prefer_wait", "router"]

#: A job's `source`: api, cli, amqp, or schedule:<a schedule's name>.
SOURCE_PATTERN = r"^(api|cli|amqp|schedule:[A-Za-z0-9_.-]{1,64})$"

router = APIRouter(prefix="/v1", tags=["jobs"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "a problem document (RFC 9457)"}
_WAIT_RE = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?\s*(?=$|[,;])", re.I)


class BatchAccepted(BaseModel):
    satellite_id: str
    ids: list[str]
    """The jobs published (confirmed by the broker), in the order given."""
    not_published: list[str]
    """Jobs the broker did not take (recorded as error `not_published`); submit them again."""


#: Largest batch body (the number of jobs is limited too: `MAX_BATCH_JOBS`).
MAX_BATCH_BYTES = 8 * 1024 * 1024


class JobPage(BaseModel):
    items: list[JobRecord]
    next_cursor: str | None
    """Pass as `cursor` for the next (older) page; null on the last page."""


def parse_prefer_wait(prefer: str | None) -> float | None:
    """The `wait` preference of a `Prefer` header (RFC 7240) in seconds, at most 60."""
    if not prefer:
        return None
    match = _WAIT_RE.search(prefer)
    if match is None:
        return None
    value = float(match.group(1))
    return min(value, MAX_WAIT_SECONDS) if math.isfinite(value) else None


def _service(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "too_large", f"the body is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _record_response(
    record: JobRecord, status: int, headers: dict[str, str] | None = None
) -> Response:
    """The record as JSON, serialised once by its model (no dict in between)."""
    body = record.__pydantic_serializer__.to_json(record)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


_LANE_SCHEMA: dict[str, Any] = {
    "type": "string",
    "enum": list(LANES),
    "description": (
        "Not a wire field: the queue the job is sent to (docs/design.md §13). `interactive` "
        "overtakes the satellite's bulk backlog. Default: `interactive` for a request that "
        "waits (`Prefer: wait=N`), `bulk` otherwise and in a batch."
    ),
}

_JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "A job in the wire v1 shape (docs/wire.md); `v` and `id` may be left out: the service "
        "fills them in. `lane` is the API's own field (the wire has none)."
    ),
    "required": ["kind", "target"],
    "properties": {
        "v": {"type": "integer", "enum": [1]},
        "id": {"type": "string", "maxLength": 128},
        "kind": {"type": "string"},
        "target": {"type": "object"},
        "lane": _LANE_SCHEMA,
    },
}

_JOB_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _JOB_SCHEMA}}}
}


@router.post(
    "/satellites/{satellite_id}/jobs",
    summary="Submit a job; with `Prefer: wait=N` wait up to N s (at most 60) for its result",
    status_code=202,
    response_model=JobRecord,
    responses={
        200: {"model": JobRecord, "description": "the result arrived within the wait"},
        202: {"model": JobRecord, "description": "queued; follow `Location`"},
        401: _PROBLEM,
        403: _PROBLEM,
        404: _PROBLEM,
        409: _PROBLEM,
        413: _PROBLEM,
        422: _PROBLEM,
        503: _PROBLEM,
    },
    openapi_extra=_JOB_BODY,
    dependencies=[Depends(require("submit"))],
)
async def submit_job(
    satellite_id: str,
    request: Request,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    return await _submit(request, satellite_id, prefer)


async def _submit(request: Request, satellite_id: str, prefer: str | None) -> Response:
    service = _service(request)
    body = await _read_body(request, service.max_job_bytes)
    wait = parse_prefer_wait(prefer)
    try:
        submitted = await service.submit(satellite_id, body, wait=wait)
    except JobSubmitError as exc:
        raise _submit_problem(exc) from None
    return _submitted_response(submitted, wait)


_submitter = require("submit")


async def _lean_submit(request: Request) -> Response:
    """`submit_job` without FastAPI's request handler (see the module docstring)."""
    await _submitter(request)
    return await _submit(
        request, request.path_params["satellite_id"], request.headers.get("prefer")
    )


def install_lean_submit(app: FastAPI) -> None:
    """Serve `POST /v1/satellites/{id}/jobs` through `_lean_submit`, ahead of every route."""
    route = Route(
        "/v1/satellites/{satellite_id}/jobs",
        _lean_submit,
        methods=["POST"],
        include_in_schema=False,
    )
    app.router.routes.insert(0, route)


class LeanSubmitApp(FastAPI):
    """FastAPI with the lean submit route's requests served in front of its stack (see the
    module docstring); everything else, and the OpenAPI document, as FastAPI does."""

    _lean_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not self.root_path:
            route = self.router.routes[0] if self.router.routes else None
            if (
                isinstance(route, Route)
                and route.endpoint is _lean_submit
                and not scope.get("root_path")
                and (match := route.path_regex.match(scope["path"])) is not None
            ):
                # What the router and the route would put in the scope.
                scope["app"] = self
                scope.setdefault("router", self.router)
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {
                    key: route.param_convertors[key].convert(value)
                    for key, value in match.groupdict().items()
                }
                stack = self._lean_stack
                if stack is None:
                    stack = self._lean_stack = self._build_lean_stack()
                await stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _build_lean_stack(self) -> ASGIApp:
        handler = self.exception_handlers.get(500) or self.exception_handlers.get(Exception)
        return ServerErrorMiddleware(AccessLog(_lean_asgi), handler=handler, debug=self.debug)


async def _lean_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """`_lean_submit` as an ASGI app; refusals through the app's exception handlers."""
    request = Request(scope, receive, send)
    try:
        await _submitter(request)
        response = await _submit(
            request, scope["path_params"]["satellite_id"], request.headers.get("prefer")
        )
    except Exception as exc:
        handled = _handle(request, exc)
        if handled is None:
            raise
        response = await handled if inspect.isawaitable(handled) else handled
    await response(scope, receive, send)


def _handle(request: Request, exc: Exception) -> Any:
    """The app's handler's answer to `exc` (a response or an awaitable of one), as Starlette's
    `ExceptionMiddleware` finds it: by status for an `HTTPException`, else by the exception's
    classes in order; None when no handler takes it (the 500 of `ServerErrorMiddleware`)."""
    handlers = request.app.exception_handlers
    handler = None
    if isinstance(exc, HTTPException):
        handler = handlers.get(exc.status_code)
    if handler is None:
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                break
    return None if handler is None else handler(request, exc)


def _submit_problem(exc: JobSubmitError) -> Problem:
    """A refused submit as a problem; `Retry-After` when the service says when to retry."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return Problem(exc.status, exc.code, exc.detail, headers=headers)


def _submitted_response(submitted: Submitted, wait: float | None) -> Response:
    record = submitted.record
    headers = {"Location": f"/v1/jobs/{quote(record.id, safe='')}"}
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait:g}"
    return _record_response(record, 200 if submitted.answered else 202, headers)


@router.post(
    "/satellites/{satellite_id}/jobs:batch",
    summary=f"Submit up to {MAX_BATCH_JOBS} jobs: a JSON array, or NDJSON (one job per line)",
    status_code=202,
    response_model=BatchAccepted,
    responses={
        401: _PROBLEM,
        403: _PROBLEM,
        404: _PROBLEM,
        409: _PROBLEM,
        413: _PROBLEM,
        422: _PROBLEM,
        503: _PROBLEM,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": _JOB_SCHEMA}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
    dependencies=[Depends(require("submit"))],
)
async def submit_batch(satellite_id: str, request: Request) -> BatchAccepted:
    service = _service(request)
    body = await _read_body(request, MAX_BATCH_BYTES)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    ndjson = content_type in ("application/x-ndjson", "application/jsonl", "application/ndjson")
    try:
        outcome = await service.submit_batch(satellite_id, body, ndjson=ndjson)
    except JobSubmitError as exc:
        raise _submit_problem(exc) from None
    return BatchAccepted(
        satellite_id=satellite_id, ids=outcome.published, not_published=outcome.not_published
    )


@router.post(
    "/jobs/{job_id}/retry",
    summary="Submit the job again under a new id (`Prefer: wait=N` as for a submit)",
    status_code=202,
    response_model=JobRecord,
    responses={
        200: {"model": JobRecord, "description": "the result arrived within the wait"},
        202: {"model": JobRecord, "description": "queued; follow `Location`"},
        401: _PROBLEM,
        403: _PROBLEM,
        404: _PROBLEM,
        409: _PROBLEM,
        503: _PROBLEM,
    },
    dependencies=[Depends(require("submit"))],
)
async def retry_job(
    job_id: str,
    request: Request,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    wait = parse_prefer_wait(prefer)
    try:
        submitted = await _service(request).retry(job_id, wait=wait)
    except JobSubmitError as exc:
        raise _submit_problem(exc) from None
    return _submitted_response(submitted, wait)


@router.get(
    "/jobs/{job_id}",
    summary="One job; `wait=N` long-polls up to N s (at most 60) while it is queued",
    response_model=JobRecord,
    responses={401: _PROBLEM, 403: _PROBLEM, 404: _PROBLEM},
    dependencies=[Depends(require("read"))],
)
async def get_job(
    job_id: str,
    request: Request,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0.0,
) -> Response:
    record = await _service(request).get(job_id, wait=wait)
    if record is None:
        raise Problem(404, "job_not_found", f"no job {job_id!r} in the history")
    return _record_response(record, 200)


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@router.get(
    "/jobs",
    summary="Search the history, newest first, with cursor pagination",
    response_model=JobPage,
    responses={401: _PROBLEM, 403: _PROBLEM, 422: _PROBLEM},
    dependencies=[Depends(require("read"))],
)
async def search_jobs(
    request: Request,
    *,
    satellite: Annotated[str | None, Query(max_length=64)] = None,
    host: Annotated[str | None, Query(max_length=255)] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    status: Literal["queued", "ok", "error", "overdue"] | None = None,
    code: Annotated[str | None, Query(max_length=64)] = None,
    # The sources there are (a typo would find nothing, silently): docs/core-service.md.
    source: Annotated[str | None, Query(max_length=80, pattern=SOURCE_PATTERN)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    where = JobFilter(
        satellite_id=satellite,
        host=host,
        kind=kind,
        status=status,
        error_code=code,
        source=source,
        since=_utc(since),
        until=_utc(until),
    )
    try:
        page = await _service(request).search(where, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise Problem(422, "invalid_cursor", f"cursor {exc}") from None
    return JobPage(items=page.items, next_cursor=page.next_cursor)
