"""Alerts: their states and silences, the notifications' archive (read); silences (admin)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from satellite.service.alerts import (
    RULES,
    AlertsConfig,
    active_silences,
    add_silence,
    alert_states_list,
    archive_page,
    pending_outbox,
    silenced,
)
from satellite.service.api.problems import PROBLEM_JSON, Problem
from satellite.service.auth import Principal, require
from satellite.service.notify import channel_report
from satellite.service.store import Store

__all__ = ["alerts_overview", "router"]

router = APIRouter(prefix="/v1", tags=["alerts"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "a problem document (RFC 9457)"}
_ERRORS: dict[int | str, dict[str, Any]] = {401: _PROBLEM, 403: _PROBLEM}
#: The longest silence (a year).
SILENCE_MAX_S = 366 * 86400


class SilenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    satellite_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    for_s: float = Field(gt=0, le=SILENCE_MAX_S, description="seconds from now")
    reason: str = Field(min_length=1, max_length=500)
    rule: str | None = Field(default=None, description="one rule; none: every rule")


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _config(request: Request) -> AlertsConfig:
    config: AlertsConfig = request.app.state.alerts_config
    return config


@router.get(
    "/alerts",
    summary="Alert states per satellite (firing first), the silences, the channels' state",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def list_alerts(request: Request) -> dict[str, Any]:
    return await alerts_overview(_store(request), _config(request))


async def alerts_overview(store: Store, config: AlertsConfig) -> dict[str, Any]:
    """`GET /v1/alerts` (and the alerts page): states per satellite, silences, channels."""
    now = datetime.now(UTC)
    states = await alert_states_list(store.engine)
    silences = await active_silences(store.engine, now)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for state in states:
        state["silenced"] = silenced(silences, state["satellite_id"], state["rule"])
        grouped.setdefault(state["satellite_id"], []).append(state)
    order = {"firing": 0, "pending": 1}
    satellites: list[dict[str, Any]] = [
        {
            "satellite_id": sid,
            "firing": sum(1 for s in items if s["state"] == "firing"),
            "alerts": sorted(items, key=lambda s: (order.get(s["state"], 2), s["rule"])),
        }
        for sid, items in grouped.items()
    ]
    satellites.sort(key=lambda s: (-s["firing"], s["satellite_id"]))
    return {
        "firing": sum(s["firing"] for s in satellites),
        "satellites": satellites,
        "silences": silences,
        "channels": await channel_report(store.engine, config),
        "rules": {
            name: {
                **asdict(rule),
                "channels": None if rule.channels is None else list(rule.channels),
            }
            for name, rule in config.rules.items()
        },
    }


@router.get(
    "/notifications",
    summary="The notifications' archive (every attempt, newest first) and what still waits",
    responses=_ERRORS,
    dependencies=[Depends(require("read"))],
)
async def list_notifications(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    satellite: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
) -> dict[str, Any]:
    store = _store(request)
    return {
        "notifications": await archive_page(store.engine, limit=limit, satellite_id=satellite),
        "pending": await pending_outbox(store.engine),
    }


@router.post(
    "/alerts/silences",
    status_code=201,
    summary="Silence a satellite's alerts (one rule or all) until a time: no notifications",
    responses={**_ERRORS, 422: _PROBLEM},
)
async def create_silence(
    body: SilenceRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("admin"))],
) -> dict[str, Any]:
    if body.rule is not None and body.rule not in RULES:
        raise Problem(422, "unknown_rule", f"rule must be one of {', '.join(RULES)}")
    now = datetime.now(UTC)
    return await add_silence(
        _store(request).engine,
        body.satellite_id,
        rule=body.rule,
        now=now,
        ends_at=now + timedelta(seconds=body.for_s),
        reason=body.reason,
        created_by=principal.name,
    )
