"""Satellites: fleet status (read); the dead-letter queue: list (read), replay and purge (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from satellite.service.api.problems import PROBLEM_JSON, Problem
from satellite.service.auth import require
from satellite.service.deadletters import DeadLetterError, DeadLetters
from satellite.service.fleet import FleetError, FleetWatch

__all__ = ["router"]

router = APIRouter(prefix="/v1/satellites", tags=["satellites"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "a problem document (RFC 9457)"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _PROBLEM,
    403: _PROBLEM,
    404: _PROBLEM,
    503: _PROBLEM,
}
SatelliteId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=10_000
    )
    all: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> ReplayRequest:
        if (self.ids is not None) == self.all:
            raise ValueError('give either "ids": [...] or "all": true')
        return self


def _fleet(request: Request) -> FleetWatch:
    fleet: FleetWatch = request.app.state.fleet
    return fleet


def _problem(exc: FleetError | DeadLetterError) -> Problem:
    """The fleet's or the DLQ's error as a problem; a 503 says when to try again."""
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return Problem(exc.status, exc.code, exc.detail, headers=headers)


@router.get(
    "",
    summary="Every satellite: what `satellite status --json` says",
    responses={401: _PROBLEM, 403: _PROBLEM, 503: _PROBLEM},
    dependencies=[Depends(require("read"))],
)
async def list_satellites(request: Request) -> dict[str, Any]:
    try:
        statuses = await _fleet(request).status()
    except FleetError as exc:
        raise _problem(exc) from None
    return {"ok": all(s.ok for s in statuses), "satellites": [s.as_dict() for s in statuses]}


@router.get(
    "/{satellite_id}",
    summary="One satellite: replicas from heartbeats, queue depth and rates, advice, DLQ",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def get_satellite(satellite_id: SatelliteId, request: Request) -> dict[str, Any]:
    try:
        statuses = await _fleet(request).status(satellite_id)
    except FleetError as exc:
        raise _problem(exc) from None
    return statuses[0].as_dict()


def _dlq(request: Request) -> DeadLetters:
    service: DeadLetters = request.app.state.dead_letters
    return service


@router.get(
    "/{satellite_id}/dlq",
    summary="The satellite's dead-lettered jobs (summaries; they stay in the DLQ)",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def list_dead_letters(satellite_id: SatelliteId, request: Request) -> dict[str, Any]:
    try:
        letters = await _dlq(request).list(satellite_id)
    except DeadLetterError as exc:
        raise _problem(exc) from None
    return {"satellite_id": satellite_id, "dead_letters": letters}


@router.post(
    "/{satellite_id}/dlq/replay",
    summary='Move dead letters back to the job queue: {"ids": [...]} or {"all": true}',
    responses={**_ERRORS, 422: _PROBLEM},
    dependencies=[Depends(require("admin"))],
)
async def replay_dead_letters(
    satellite_id: SatelliteId, body: ReplayRequest, request: Request
) -> dict[str, Any]:
    try:
        report = await _dlq(request).replay(satellite_id, None if body.all else body.ids)
    except DeadLetterError as exc:
        raise _problem(exc) from None
    return {"satellite_id": satellite_id, **report}


@router.delete(
    "/{satellite_id}/dlq",
    summary="Delete every dead letter of the satellite",
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
)
async def purge_dead_letters(satellite_id: SatelliteId, request: Request) -> dict[str, Any]:
    try:
        purged = await _dlq(request).purge(satellite_id)
    except DeadLetterError as exc:
        raise _problem(exc) from None
    return {"satellite_id": satellite_id, "purged": purged}
