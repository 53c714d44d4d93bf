"""SQLite's hot writes: one thread, one connection, one commit for whatever is pending.

Through aiosqlite a single `record_queued` costs about nine hops between the event loop and the
driver's thread (connect, begin, execute, commit, return to the pool...), each a GIL hand-over
that takes up to a switch interval on a busy host: most of an HTTP submit's time was spent there.
`SqliteWriter` keeps its own synchronous connection on one dedicated thread and makes one hop per
group: the submits that arrive while a group is being written are written together by the next
one, in one transaction (a group commit, as ingest does for results). Ingest's result groups go
through the same thread: SQLite has one writer at a time, and a `queued` insert that waited for
ingest's transaction through the busy handler (which sleeps) cost more than the insert itself.

A `queued` row goes through the driver (`SQLITE_QUEUED_UPSERT`, the same row SQLAlchemy's
upsert writes): a submit waits for it before it publishes, and SQLAlchemy's statement and
parameter processing were most of that wait (`Store.record_queued` 132 -> 80 µs in isolation,
medians of 2,000 rows; sqlite3's own execute and commit are about 20 µs of it).

Nothing is weakened: a submit's future resolves only after the commit that holds its row (WAL,
`synchronous=NORMAL`, as on the async engine), so the job is durable before it is published. A
row whose submit went away (its future cancelled) while the group was written is turned into
`error` / `not_published` at once: it will never be published, so it must not stay `queued`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from poller.logging import get_logger
from satellite.service.store.engine import SQLITE_BUSY_TIMEOUT_MS, sqlite_pragmas
from satellite.service.store.queries import (
    NOT_PUBLISHED,
    SQLITE_PRIOR_ANSWERS_UPDATE,
    SQLITE_QUEUED_UPSERT,
    SQLITE_RESULTS_UPSERT,
    sqlite_prior_params,
    sqlite_queued_params,
    sqlite_result_params,
)
from satellite.service.store.tables import jobs

__all__ = ["SqliteWriter"]

log = get_logger("satellite.service.store")

#: Most rows in one group (a burst beyond it waits for the next group).
MAX_GROUP = 500
#: `queued` rows written on the event loop between two passive checkpoints (on the thread).
CHECKPOINT_EVERY = 500
_SQLITE_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED

_Pending = tuple[dict[str, Any], "asyncio.Future[bool]"]


def _never_wait_pragmas(dbapi_connection: Any, record: Any) -> None:
    sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    finally:
        cursor.close()


class SqliteWriter:
    """Group-committed `queued` inserts into one SQLite file, from a thread of its own."""

    def __init__(self, path: Path, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._engine = sa.create_engine(
            f"sqlite:///{path}",
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            poolclass=sa.pool.StaticPool,  # one connection, used by the one thread below
            hide_parameters=True,
        )
        event.listen(self._engine, "connect", sqlite_pragmas)
        # A second connection for `queued` rows written at once on the event loop when SQLite's
        # write lock is free: it never waits for the lock (busy timeout 0: a busy database sends
        # the row to the thread) and never checkpoints (the thread does, every CHECKPOINT_EVERY
        # rows), so a write is an append to the WAL without fsync (synchronous=NORMAL).
        self._now_engine = sa.create_engine(
            f"sqlite:///{path}",
            connect_args={"timeout": 0, "check_same_thread": False},
            poolclass=sa.pool.StaticPool,
            hide_parameters=True,
        )
        event.listen(self._now_engine, "connect", _never_wait_pragmas)
        # Its driver connection, held for the life of the writer: a row is one execute and one
        # commit of sqlite3, with no SQLAlchemy transaction or statement around them.
        self._now_conn: Any = None
        self._since_checkpoint = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    async def write(self, values: dict[str, Any]) -> bool:
        """Commit the row; False when the id is taken (a job that is not reusable)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if not self._pending and (self._flusher is None or self._flusher.done()):
            written = self._write_now(values)
            if written is not None:
                return written
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((values, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="store-queued-writer")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            group = [(values, future) for values, future in group if not future.done()]
            if not group:  # every submit of it went away before its row was written
                continue
            try:
                written = await loop.run_in_executor(self._thread, self._write, group)
            except Exception as exc:  # noqa: BLE001 - rolled back: each submit of the group gets it
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            gone = []
            for (values, future), ok in zip(group, written, strict=True):
                if future.done():  # the submit went away: its row must not stay queued
                    if ok:
                        gone.append(values["id"])
                else:
                    future.set_result(ok)
            if gone:
                try:
                    await loop.run_in_executor(self._thread, self._abandon, gone)
                except (sa.exc.SQLAlchemyError, OSError):  # `overdue` at their deadline
                    log.warning("store_abandoned_rows_kept", count=len(gone))

    def _write_now(self, values: dict[str, Any]) -> bool | None:
        """Commit one row on the caller's thread; None when another writer holds the lock.

        Through the driver (`SQLITE_QUEUED_UPSERT`, the same row as SQLAlchemy's upsert
        writes): a submit waits for this write before it publishes."""
        if self._now_conn is None:
            self._now_conn = self._now_engine.raw_connection()
        conn = self._now_conn.driver_connection
        try:
            cursor = conn.execute(SQLITE_QUEUED_UPSERT, sqlite_queued_params(values))
            written: bool = cursor.rowcount == 1
            conn.commit()
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            if getattr(exc, "sqlite_errorcode", None) in _SQLITE_BUSY:
                return None
            raise sa.exc.DBAPIError.instance(
                SQLITE_QUEUED_UPSERT, None, exc, sqlite3.Error, hide_parameters=True
            ) from exc
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            asyncio.get_running_loop().run_in_executor(self._thread, self._checkpoint)
        return written

    def _checkpoint(self) -> None:
        with self._engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def _write(self, group: list[_Pending]) -> list[bool]:
        with self._engine.begin() as conn:
            return [
                conn.exec_driver_sql(SQLITE_QUEUED_UPSERT, sqlite_queued_params(v)).rowcount == 1
                for v, _ in group
            ]

    async def write_results(
        self, rows: list[dict[str, Any]], priors: list[dict[str, Any]] | None = None
    ) -> None:
        """Commit a group of `result_rows(..., json_text=True)` (ingest), with its
        `prior_answers`, in turn with the `queued` groups."""
        if self._closed:
            raise RuntimeError("the store is closed")
        await asyncio.get_running_loop().run_in_executor(
            self._thread, self._results, rows, priors or []
        )

    def _results(self, rows: list[dict[str, Any]], priors: list[dict[str, Any]]) -> None:
        params = sqlite_result_params(rows)
        with self._engine.begin() as conn:
            if priors:
                conn.exec_driver_sql(SQLITE_PRIOR_ANSWERS_UPDATE, sqlite_prior_params(priors))
            conn.exec_driver_sql(SQLITE_RESULTS_UPSERT, params)

    async def execute(self, statement: Any) -> int:
        """Run one statement in its own transaction, in turn with the groups; its row count."""
        if self._closed:
            raise RuntimeError("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._execute, statement
        )

    def _execute(self, statement: Any) -> int:
        with self._engine.begin() as conn:
            return conn.execute(statement).rowcount

    def _abandon(self, ids: list[str]) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(ids) & (jobs.c.status == "queued") & (jobs.c.answers == 0))
                .values(status="error", error_code=NOT_PUBLISHED, updated_at=self._clock())
            )

    async def close(self) -> None:
        """Finish the pending writes, then close the connection and the thread."""
        self._closed = True
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._engine.dispose)
        if self._now_conn is not None:
            self._now_conn.close()
            self._now_conn = None
        self._now_engine.dispose()
        self._thread.shutdown(wait=True)
