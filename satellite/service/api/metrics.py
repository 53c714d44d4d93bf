"""`GET /metrics`: Prometheus text format (scope `read` over TCP, like every other read)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from satellite.service.auth import require
from satellite.service.metrics import CONTENT_TYPE, ServiceMetrics

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics of this replica",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
    dependencies=[Depends(require("read"))],
)
async def metrics(request: Request) -> Response:
    registry: ServiceMetrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
