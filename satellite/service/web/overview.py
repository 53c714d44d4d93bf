"""The fleet page's rows: `satellite status` per satellite, both lanes, and the history's figures.

`collect()` asks the management API once for every queue (in a worker thread, like
`FleetWatch.status`), builds each satellite's `SatelliteStatus` with the toolkit's
`satellite_status()` (the code behind `GET /v1/satellites`), adds the interactive lane's queue
(DESIGN §13) and the history's error codes, overdue and queued jobs; `attention_order()` sorts
the rows so that what needs a person comes first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from poller import __version__, wire
from satellite.management import ManagementError
from satellite.service.fleet import HEARTBEAT_MAX_AGE, REQUEST_TIMEOUT, FleetError, FleetWatch
from satellite.service.web.history import SatelliteHistory
from satellite.status import QueueView, SatelliteStatus, satellite_status

__all__ = ["Row", "attention_order", "collect", "make_row"]

Level = Literal["critical", "warning", "ok"]
_RANK: dict[Level, int] = {"critical": 0, "warning": 1, "ok": 2}
#: An error rate above this (with at least `ERROR_RATE_MIN_JOBS` answers) is a warning.
ERROR_RATE_WARN = 0.2
ERROR_RATE_MIN_JOBS = 5


@dataclass
class Row:
    """One satellite on the fleet page."""

    status: SatelliteStatus
    interactive: QueueView | None
    history: SatelliteHistory
    now: datetime
    level: Level = "ok"
    reasons: list[str] = field(default_factory=list)

    @property
    def satellite_id(self) -> str:
        return self.status.satellite_id

    @property
    def replicas(self) -> int:
        return len(self.status.replicas)

    @property
    def dead_letters(self) -> int:
        return self.status.queue.dead_letters if self.status.queue else 0

    @property
    def quarantined(self) -> list[str]:
        return sorted({q.device for r in self.status.replicas for q in r.heartbeat.quarantine})

    @property
    def versions(self) -> list[str]:
        return sorted({r.heartbeat.version for r in self.status.replicas})

    @property
    def skew(self) -> bool:
        return bool(self.versions) and self.versions != [__version__]

    @property
    def rate_in(self) -> float:
        return sum(q.publish_rate for q in self._queues())

    @property
    def rate_out(self) -> float:
        return sum(q.ack_rate for q in self._queues())

    @property
    def oldest_age_s(self) -> float | None:
        """Seconds the oldest job submitted through the service has been waiting (or None)."""
        oldest = self.history.oldest_queued_at
        return None if oldest is None else max(0.0, (self.now - oldest).total_seconds())

    def _queues(self) -> list[QueueView]:
        return [q for q in (self.status.queue, self.interactive) if q is not None]

    def as_dict(self) -> dict[str, Any]:
        return {
            "satellite_id": self.satellite_id,
            "level": self.level,
            "reasons": self.reasons,
            "replicas": self.replicas,
            "bulk": self.status.queue.as_dict() if self.status.queue else None,
            "interactive": self.interactive.as_dict() if self.interactive else None,
            "oldest_age_s": self.oldest_age_s,
            "rate_in": round(self.rate_in, 2),
            "rate_out": round(self.rate_out, 2),
            "errors": self.history.errors,
            "answered": self.history.answered,
            "advice": self.status.advice.as_dict() if self.status.advice else None,
            "versions": self.versions,
            "quarantined": self.quarantined,
            "dead_letters": self.dead_letters,
            "overdue": self.history.overdue,
        }


def make_row(
    status: SatelliteStatus,
    interactive: QueueView | None,
    history: SatelliteHistory | None,
    now: datetime,
) -> Row:
    """A row with its attention level and the reasons for it, in the order they matter."""
    row = Row(status, interactive, history or SatelliteHistory(), now)
    critical = list(status.problems)
    if row.history.overdue:
        critical.append(f"{row.history.overdue} overdue")
    warning: list[str] = []
    if row.dead_letters:
        warning.append(f"DLQ {row.dead_letters}")
    if row.skew:
        warning.append("version skew")
    if row.quarantined:
        warning.append(f"{len(row.quarantined)} quarantined")
    if row.history.answered >= ERROR_RATE_MIN_JOBS and row.history.error_rate > ERROR_RATE_WARN:
        warning.append(f"errors {row.history.error_rate:.0%}")
    advice = status.advice
    if advice is not None and advice.needed is not None and advice.needed > advice.replicas:
        warning.append(advice.verdict)
    row.level = "critical" if critical else "warning" if warning else "ok"
    row.reasons = critical + warning
    return row


def attention_order(rows: list[Row]) -> list[Row]:
    """Critical first, then warnings; within a level the most reasons, the most DLQ, overdue,
    errors and backlog first; then by id."""

    def key(row: Row) -> tuple[Any, ...]:
        ready = sum(q.ready for q in row._queues())
        return (
            _RANK[row.level],
            -len(row.reasons),
            -(row.history.overdue + row.dead_letters),
            -row.history.error_total,
            -ready,
            row.satellite_id,
        )

    return sorted(rows, key=key)


def _collect(fleet: FleetWatch, only: str | None) -> list[tuple[SatelliteStatus, QueueView | None]]:
    with fleet.management_api() as api:
        queues: dict[str, dict[str, Any]] = {str(q.get("name")): q for q in api.queues()}
        ids = {sid for name in queues if (sid := wire.satellite_of_jobs_queue(name))}
        ids |= set(fleet.fleet.satellites())
        if only is not None:
            ids &= {only}
        out = []
        for sid in sorted(ids):
            lane = queues.get(wire.interactive_queue(sid))
            status = satellite_status(
                sid,
                queue=queues.get(wire.jobs_queue(sid)),
                dlq=queues.get(wire.dead_letter_queue(sid)),
                lane=lane,
                fleet=fleet.fleet,
                core_version=__version__,
                heartbeat_max_age=HEARTBEAT_MAX_AGE,
            )
            out.append((status, QueueView.from_management(lane) if lane is not None else None))
        return out


async def collect(
    fleet: FleetWatch,
    history: dict[str, SatelliteHistory],
    now: datetime,
    only: str | None = None,
) -> list[Row]:
    """Every satellite's row (or one's), in attention order; `FleetError` 503 without the
    management API."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            found = await asyncio.to_thread(_collect, fleet, only)
    except TimeoutError:
        raise FleetError(503, "management_unavailable", "no answer in time") from None
    except ManagementError as exc:
        raise FleetError(503, "management_unavailable", str(exc)) from None
    rows = [make_row(status, lane, history.get(status.satellite_id), now) for status, lane in found]
    return attention_order(rows)
