"""Errors as RFC 9457 problem documents (`application/problem+json`) with a stable `code`.

Every refusal of the API has the same shape: `type` (a URI naming the code), `title`, `status`,
`detail` and `code`; validation problems add `errors`, a list of `{"loc", "msg"}` with field
paths and reasons, never the values sent (they may hold credentials).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from poller.logging import get_logger
from satellite.service.auth import AuthProblem

__all__ = ["PROBLEM_JSON", "Problem", "install_problem_handlers", "problem_response"]

log = get_logger("satellite.service.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://satellite-poller.dev/problems/"


class Problem(Exception):  # noqa: N818 - a problem document, as RFC 9457 calls it
    """An API refusal, rendered as problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
}


async def _problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, code, detail, headers=dict(exc.headers or {}))


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": ".".join(str(p) for p in err.get("loc", ())), "msg": str(err.get("msg", ""))}
        for err in exc.errors()[:20]
    ]
    detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
    return problem_response(422, "invalid_request", detail, errors=errors)


async def _auth(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthProblem)
    return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers)


async def _store(_request: Request, exc: Exception) -> JSONResponse:
    """The history store failed (down, locked, timed out): nothing was published."""
    cause = getattr(exc, "orig", None) or exc
    log.warning("store_unavailable", error=type(cause).__name__)
    return problem_response(
        503,
        "store_unavailable",
        "the history store cannot be reached now; nothing was submitted",
        headers={"Retry-After": "5"},
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(sa.exc.SQLAlchemyError, _store)
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(AuthProblem, _auth)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
