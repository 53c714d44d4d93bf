"""Schedules (DESIGN §11): list and show (read); run now, pause, resume (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from satellite.service.api.problems import PROBLEM_JSON, Problem
from satellite.service.auth import require
from satellite.service.scheduler import Scheduler, ScheduleStats, UnknownScheduleError

__all__ = ["router"]

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "a problem document (RFC 9457)"}
_ERRORS: dict[int | str, dict[str, Any]] = {401: _PROBLEM, 403: _PROBLEM, 404: _PROBLEM}
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Annotated[str, Field(min_length=1, max_length=262)] | None = None
    """`host` or `host:port`; all targets when absent."""


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        raise Problem(
            404,
            "no_schedules",
            "this service runs no schedules (set USM_CORE_SCHEDULES_FILE)",
        )
    return scheduler


def _view(stats: ScheduleStats) -> dict[str, Any]:
    return {
        "name": stats.name,
        "enabled": stats.enabled,
        "paused": stats.paused,
        "every": stats.every,
        "cron": stats.cron,
        "targets": stats.targets,
        "next_fire": stats.next_fire.isoformat() if stats.next_fire else None,
        "last_fire": stats.last_fire.isoformat() if stats.last_fire else None,
        "last_interval": {
            "seconds": stats.interval,
            "sent": stats.sent,
            "answered": stats.answered,
            "failed": stats.failed,
            "pending": stats.pending,
            "skipped": stats.skipped,
        },
    }


async def _stats(scheduler: Scheduler, name: str) -> ScheduleStats:
    try:
        return await scheduler.stats(name)
    except UnknownScheduleError:
        raise Problem(404, "unknown_schedule", f"no schedule {name!r} in the file") from None


@router.get(
    "",
    summary="Every schedule: next and last fire, jobs of the last interval",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def list_schedules(request: Request) -> dict[str, Any]:
    scheduler = _scheduler(request)
    names = sorted(scheduler.file.schedules)
    return {"items": [_view(await _stats(scheduler, name)) for name in names]}


@router.get(
    "/{name}",
    summary="One schedule",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def show_schedule(request: Request, name: Name) -> dict[str, Any]:
    return _view(await _stats(_scheduler(request), name))


@router.post(
    "/{name}/run",
    summary="Send the schedule's jobs now, outside its clock (all targets, or one)",
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
)
async def run_schedule(
    request: Request, name: Name, body: Annotated[RunRequest | None, Body()] = None
) -> dict[str, Any]:
    scheduler = _scheduler(request)
    try:
        ids = await scheduler.run_now(name, body.target if body else None)
    except UnknownScheduleError as exc:
        raise Problem(404, "unknown_schedule", f"no schedule or target: {exc}") from None
    return {"published": ids}


async def _pause(request: Request, name: str, paused: bool) -> dict[str, Any]:
    scheduler = _scheduler(request)
    try:
        await scheduler.set_paused(name, paused)
    except UnknownScheduleError:
        raise Problem(404, "unknown_schedule", f"no schedule {name!r} in the file") from None
    return _view(await _stats(scheduler, name))


@router.post(
    "/{name}/pause",
    summary="Pause the schedule (kept in the store: survives restarts)",
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
)
async def pause_schedule(request: Request, name: Name) -> dict[str, Any]:
    return await _pause(request, name, True)


@router.post(
    "/{name}/resume",
    summary="Resume the schedule from its next slot",
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
)
async def resume_schedule(request: Request, name: Name) -> dict[str, Any]:
    return await _pause(request, name, False)
