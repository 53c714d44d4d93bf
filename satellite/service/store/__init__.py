"""The history store: one row per job id (tables.py), its queries (queries.py), its migrations.

`Store` binds the queries to one engine and one clock; `Store.open()` creates the SQLite file's
directory when needed and brings the schema to the newest migration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from poller.wire import JobResult
from satellite.service.settings import DatabaseUrl
from satellite.service.store import queries
from satellite.service.store.engine import connect, migrate
from satellite.service.store.queries import (
    JobExistsError,
    JobFilter,
    JobRecord,
    Page,
    QueuedJob,
    Status,
)
from satellite.service.store.writer import SqliteWriter

__all__ = ["JobExistsError", "JobFilter", "JobRecord", "Page", "QueuedJob", "Store"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Store:
    """The history store of one replica (an engine and its pool)."""

    def __init__(
        self, engine: AsyncEngine, db: DatabaseUrl, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.engine = engine
        self.db = db
        self.clock = clock
        path = db.sqlite_path
        # SQLite: submits' `queued` rows (group-committed) and ingest's results are written by one
        # thread with its own connection (writer.py): no aiosqlite hops, no writer waits on another.
        self._writer = SqliteWriter(path, self._now) if path is not None else None
        #: The last retention pass stopped on its time budget with old rows left.
        self.purge_pending = False

    def _now(self) -> datetime:
        return self.clock()  # looked up each time: tests replace `clock`

    @classmethod
    async def open(cls, db: DatabaseUrl, *, run_migrations: bool = True) -> Store:
        """Connect (lazily) and migrate; `OSError` when the SQLite directory cannot be made."""
        path = db.sqlite_path
        if path is not None:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        store = cls(connect(db), db)
        if run_migrations:
            try:
                await migrate(store.engine)
            except BaseException:
                await store.close()
                raise
        return store

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        await self.engine.dispose()

    async def ping(self, timeout: float = 5.0) -> bool:
        """Whether the database answers a trivial query within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (TimeoutError, OSError, sa.exc.SQLAlchemyError):
            return False
        return True

    async def record_queued(self, job: QueuedJob) -> JobRecord:
        """Commit the job as `queued` (durable when this returns); `JobExistsError`."""
        if self._writer is None:
            return await queries.record_queued(self.engine, job, self.clock())
        values = queries.queued_row(job, self.clock())
        if not await self._writer.write(values):
            raise JobExistsError(job.id)
        return queries.queued_record(values)

    async def record_queued_many(self, batch: Sequence[QueuedJob]) -> None:
        await queries.record_queued_many(self.engine, batch, self.clock())

    async def mark_not_published_many(self, ids: Sequence[str]) -> int:
        return await queries.mark_not_published_many(self.engine, ids, self.clock())

    async def mark_not_published(self, job_id: str) -> bool:
        return await queries.mark_not_published(self.engine, job_id, self.clock())

    async def apply_results(
        self, results: Sequence[JobResult], sources: Mapping[str, str] | None = None
    ) -> int:
        """Write a group of results; `sources`: job id -> the source of a job first seen here
        (default `amqp`)."""
        if self._writer is None:
            return await queries.apply_results(self.engine, results, self.clock(), sources)
        rows = queries.result_rows(results, self.clock(), sources, json_text=True)
        if rows:
            await self._writer.write_results(rows, queries.prior_answers(results))
        return len(rows)

    async def mark_overdue(self, grace: float) -> int:
        return await queries.mark_overdue(self.engine, self.clock(), grace)

    async def count_status(self, status: Status) -> int:
        return await queries.count_status(self.engine, status)

    async def get_request(self, job_id: str) -> tuple[JobRecord, Any] | None:
        return await queries.get_request(self.engine, job_id)

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await queries.get_job(self.engine, job_id)

    async def search(
        self, where: JobFilter, *, limit: int = 100, cursor: str | None = None
    ) -> Page:
        return await queries.search(self.engine, where, limit=limit, cursor=cursor)

    async def purge(
        self,
        retention_days: int,
        *,
        batch: int = 1000,
        max_batches: int = 1_000_000,
        max_seconds: float = queries.PURGE_PASS_SECONDS,
    ) -> int:
        """Delete the rows created more than `retention_days` ago, in short batches; how many.

        `purge_pending` tells afterwards whether old rows were left (the pass ran out of time).
        """
        cutoff = self.clock() - timedelta(days=retention_days)
        # SQLite: the batches go through the writer's thread, between its groups, rather than
        # taking the one write lock from beside it (its submits would wait in the busy handler).
        deleted, self.purge_pending = await queries.purge_before(
            self.engine,
            cutoff,
            batch=batch,
            max_batches=max_batches,
            max_seconds=max_seconds,
            delete=None if self._writer is None else self._writer.execute,
        )
        return deleted
