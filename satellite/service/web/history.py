"""What the fleet page asks of the history store (read-only queries; SQLite and PostgreSQL).

Each query is bounded: a time window over the `(satellite_id, created_at)` or
`(status, created_at)` indexes, and a row limit where rows come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from satellite.service.store.tables import jobs

__all__ = ["HostTiming", "SatelliteHistory", "fleet_history", "slowest_hosts"]

#: The window the page's error rates and device timings are computed over.
WINDOW = timedelta(minutes=15)


@dataclass
class SatelliteHistory:
    """One satellite's figures from the history over the window (and its open jobs)."""

    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Error code -> count of jobs answered with it in the window."""
    overdue: int = 0
    queued: int = 0
    oldest_queued_at: datetime | None = None

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_total / self.answered if self.answered else 0.0


@dataclass(frozen=True, slots=True)
class HostTiming:
    host: str
    jobs: int
    mean_ms: float
    max_ms: float
    errors: int


async def fleet_history(
    engine: AsyncEngine, now: datetime, *, window: timedelta = WINDOW
) -> dict[str, SatelliteHistory]:
    """Per satellite: answers and errors by code in the window, overdue and queued jobs."""
    since = now - window
    out: dict[str, SatelliteHistory] = {}
    answered = (
        sa.select(jobs.c.satellite_id, jobs.c.status, jobs.c.error_code, sa.func.count())
        .where((jobs.c.created_at >= since) & jobs.c.status.in_(("ok", "error")))
        .group_by(jobs.c.satellite_id, jobs.c.status, jobs.c.error_code)
    )
    open_jobs = (
        sa.select(
            jobs.c.satellite_id,
            jobs.c.status,
            sa.func.count(),
            sa.func.min(sa.func.coalesce(jobs.c.submitted_at, jobs.c.created_at)),
        )
        .where(jobs.c.status.in_(("queued", "overdue")))
        .group_by(jobs.c.satellite_id, jobs.c.status)
    )
    async with engine.connect() as conn:
        for sid, status, code, count in (await conn.execute(answered)).all():
            item = out.setdefault(sid, SatelliteHistory())
            item.answered += int(count)
            if status == "error":
                key = code or "unknown"
                item.errors[key] = item.errors.get(key, 0) + int(count)
        for sid, status, count, oldest in (await conn.execute(open_jobs)).all():
            item = out.setdefault(sid, SatelliteHistory())
            if status == "overdue":
                item.overdue = int(count)
            else:
                item.queued = int(count)
                item.oldest_queued_at = _aware(oldest)
    return out


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the column type on SQLite: naive UTC comes back, made aware here."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


async def slowest_hosts(
    engine: AsyncEngine,
    satellite_id: str,
    now: datetime,
    *,
    window: timedelta = WINDOW,
    limit: int = 10,
) -> list[HostTiming]:
    """The satellite's devices with the longest mean job duration in the window."""
    mean = sa.func.avg(jobs.c.duration_ms)
    errors = sa.func.sum(sa.case((jobs.c.status == "error", 1), else_=0))
    query = (
        sa.select(jobs.c.host, sa.func.count(), mean, sa.func.max(jobs.c.duration_ms), errors)
        .where(
            (jobs.c.satellite_id == satellite_id)
            & (jobs.c.created_at >= now - window)
            & jobs.c.host.is_not(None)
            & jobs.c.duration_ms.is_not(None)
        )
        .group_by(jobs.c.host)
        .order_by(mean.desc(), jobs.c.host)
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        HostTiming(str(host), int(count), float(avg or 0), float(top or 0), int(err or 0))
        for host, count, avg, top, err in rows
    ]
