"""`/healthz` (the process answers) and `/readyz` (the broker and the store are reachable)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from satellite.service.api.problems import PROBLEM_JSON, problem_response

__all__ = ["Readiness", "router"]

#: Checks by name → whether each passed (app.state.readiness).
Readiness = Callable[[], Awaitable[dict[str, bool]]]

router = APIRouter(tags=["health"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "a problem document"}


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The broker and the history store are reachable",
    responses={503: _PROBLEM},
)
async def readyz(request: Request) -> JSONResponse:
    readiness: Readiness = request.app.state.readiness
    checks = await readiness()
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(name for name, ok in checks.items() if not ok)
    return problem_response(
        503, "not_ready", f"not reachable: {failing}", checks=checks, headers={"Retry-After": "5"}
    )
