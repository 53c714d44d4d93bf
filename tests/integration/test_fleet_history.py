"""The fleet page's history queries on both databases (satellite/service/web/history.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from poller import wire
from satellite.service.settings import DatabaseUrl
from satellite.service.store import QueuedJob, Store
from satellite.service.web.history import fleet_history, slowest_hosts

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(db_url: DatabaseUrl) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    yield opened
    await opened.close()


def queued(job_id: str, sid: str, host: str, at: datetime) -> QueuedJob:
    return QueuedJob(job_id, sid, "snmp.get", host, 161, "api", at, 10.0)


def result(job_id: str, sid: str, ms: float, code: str | None = None) -> wire.JobResult:
    error = None if code is None else wire.ErrorInfo(code=code, message="m", retryable=False)
    return wire.JobResult(
        job_id=job_id,
        kind="snmp.get",
        satellite_id=sid,
        worker="w",
        status="ok" if code is None else "error",
        error=error,
        attempt=1,
        redelivered=False,
        started_at=T0,
        finished_at=T0,
        duration_ms=ms,
    )


async def test_errors_by_code_open_jobs_and_the_slowest_hosts(store: Store) -> None:
    store.clock = lambda: T0 - timedelta(hours=1)  # outside the window: not counted
    await store.apply_results([result("old", "s1", 1.0, "timeout")])
    store.clock = lambda: T0
    for n, (host, ms, code) in enumerate(
        [("10.0.0.1", 10.0, None), ("10.0.0.1", 30.0, "timeout"), ("10.0.0.2", 5.0, None)]
    ):
        await store.record_queued(queued(f"j{n}", "s1", host, T0))
        await store.apply_results([result(f"j{n}", "s1", ms, code)])
    await store.apply_results([result("a1", "s1", 1.0, "auth_failed")])  # no host (AMQP)
    await store.record_queued(queued("waiting-1", "s2", "10.0.0.9", T0 - timedelta(minutes=2)))
    await store.record_queued(queued("waiting-2", "s2", "10.0.0.9", T0 - timedelta(minutes=1)))
    await store.record_queued(queued("late", "s2", "10.0.0.9", T0 - timedelta(minutes=5)))
    assert await store.mark_overdue(150.0) == 1  # only "late" is past deadline + grace

    now = T0 + timedelta(minutes=1)
    found = await fleet_history(store.engine, now)
    s1, s2 = found["s1"], found["s2"]
    assert (s1.answered, s1.errors) == (4, {"timeout": 1, "auth_failed": 1})
    assert s1.error_rate == 0.5
    assert (s2.queued, s2.overdue, s2.answered) == (2, 1, 0)
    assert s2.oldest_queued_at == T0 - timedelta(minutes=2)

    slow = await slowest_hosts(store.engine, "s1", now)
    assert [(h.host, h.jobs, h.mean_ms, h.max_ms, h.errors) for h in slow] == [
        ("10.0.0.1", 2, 20.0, 30.0, 1),
        ("10.0.0.2", 1, 5.0, 5.0, 0),
    ]
    assert await slowest_hosts(store.engine, "s2", now) == []
