"""Every query of the history store; each runs on SQLite and on PostgreSQL alike.

The lifecycle of a row:

* `record_queued` before a job submitted through the service is published (`queued`, with its
  deadline = submitted + timeout).
* `mark_not_published` when the publish was not confirmed: the row becomes `error` with code
  `not_published` (kept, visible, never left `queued`); submitting the same id again reuses it.
* `apply_results`, one transaction per group of results from the ingest: an unknown id is
  inserted (source `amqp`, or `cli` for the toolkit's jobs: ingest says which); a known one
  takes the newest result's fields; `answers` grows by the number of answers seen, so a
  repeated answer (a redelivered job) counts but never doubles the row. The same result message
  delivered twice (an ingest replica died after its commit and before its ack) is one answer: a
  result equal to the row's (worker, attempt, finish time) is not counted again.
* `mark_overdue` turns `queued` rows past deadline + grace into `overdue` (a late answer still
  turns them into `ok`/`error`).
* `purge_before` deletes rows older than the retention in small batches, each its own
  transaction, so that no lock is held for long.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, JsonValue
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from poller.wire import JobResult, Timestamp
from satellite.service.store.tables import jobs

__all__ = [
    "NOT_PUBLISHED",
    "PG_RESULTS_UPSERT",
    "PRIOR_ANSWERS_UPDATE",
    "SQLITE_PRIOR_ANSWERS_UPDATE",
    "SQLITE_QUEUED_UPSERT",
    "SQLITE_RESULTS_UPSERT",
    "JobExistsError",
    "JobFilter",
    "JobRecord",
    "Page",
    "QueuedJob",
    "apply_results",
    "count_status",
    "get_job",
    "get_request",
    "mark_not_published",
    "mark_not_published_many",
    "mark_overdue",
    "pg_result_arrays",
    "prior_answers",
    "purge_batch",
    "purge_before",
    "queued_record",
    "queued_row",
    "queued_upsert",
    "record_queued",
    "record_queued_many",
    "result_rows",
    "results_upsert",
    "search",
    "sqlite_prior_params",
    "sqlite_queued_params",
    "sqlite_result_params",
]

#: Error code of a job whose publish the broker did not confirm.
NOT_PUBLISHED = "not_published"
MAX_PAGE = 1000
#: Seconds one retention pass may run before it yields (the caller comes back for the rest).
PURGE_PASS_SECONDS = 30.0

Status = Literal["queued", "ok", "error", "overdue"]


class JobExistsError(Exception):
    """A job with this id is already recorded (and was published)."""


class JobRecord(BaseModel):
    """One job as the history keeps it; `result` is the wire v1 result (or null)."""

    model_config = ConfigDict(frozen=True)

    id: str
    satellite_id: str
    kind: str
    host: str | None
    port: int | None
    source: str
    status: Status
    error_code: str | None
    created_at: Timestamp
    submitted_at: Timestamp | None
    deadline_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    updated_at: Timestamp
    attempt: int | None
    redelivered: bool | None
    worker: str | None
    duration_ms: float | None
    answers: int
    lane: str | None
    retry_of: str | None
    result: dict[str, JsonValue] | None


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What is known of a job when it is submitted through the service."""

    id: str
    satellite_id: str
    kind: str
    host: str | None
    port: int | None
    source: str
    submitted_at: datetime
    timeout: float
    lane: str | None = None
    retry_of: str | None = None
    request: dict[str, Any] | None = None
    """The job as submitted, without `auth` (kept for a retry)."""

    @property
    def deadline_at(self) -> datetime:
        return self.submitted_at + timedelta(seconds=self.timeout)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Search filters; every one given must match."""

    satellite_id: str | None = None
    host: str | None = None
    kind: str | None = None
    status: str | None = None
    error_code: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Page:
    items: list[JobRecord] = field(default_factory=list)
    next_cursor: str | None = None


def _insert(conn: AsyncConnection) -> Any:
    """The dialect's INSERT, which has `on_conflict_do_update` on both databases."""
    return postgresql.insert(jobs) if conn.dialect.name == "postgresql" else sqlite.insert(jobs)


def _record(row: sa.Row[Any]) -> JobRecord:
    values = dict(row._mapping)
    values.pop("request", None)
    return JobRecord.model_validate(values)


async def get_request(engine: AsyncEngine, job_id: str) -> tuple[JobRecord, Any] | None:
    """A job's record and the request kept for a retry (None when there is none)."""
    async with engine.connect() as conn:
        row = (await conn.execute(jobs.select().where(jobs.c.id == job_id))).first()
    return None if row is None else (_record(row), row._mapping["request"])


async def record_queued(engine: AsyncEngine, job: QueuedJob, now: datetime) -> JobRecord:
    """Record a job as `queued` before it is published, and return its record (no read back);
    `JobExistsError` when the id is taken.

    An id left `not_published` by a failed submit may be submitted again: the row is reused.
    """
    values = queued_row(job, now)
    async with engine.begin() as conn:
        done = await conn.execute(queued_upsert(_insert(conn), tuple(values)), values)
    if done.rowcount != 1:
        raise JobExistsError(job.id)
    return queued_record(values)


def queued_upsert(insert: Any, columns: Sequence[str]) -> Any:
    """The dialect's `insert` of a `queued` row with these `columns` (execute it with the
    values of `queued_row`); an id left `not_published` is reused.

    One statement: its row count is 0 when the id is taken by a job that is not reusable. The
    values are parameters, not part of the statement: one statement serves every row.
    """
    return insert.on_conflict_do_update(
        index_elements=[jobs.c.id],
        set_={k: insert.excluded[k] for k in columns if k != "id"},
        where=(jobs.c.error_code == NOT_PUBLISHED) & (jobs.c.answers == 0),
    )


def queued_record(values: dict[str, Any]) -> JobRecord:
    """The record of a row just written from `queued_row` values (built from them as they
    are: `queued_row` makes them of the record's types from a validated job)."""
    fields = dict(_BLANK_RESULT, **values)
    del fields["request"]
    return JobRecord.model_construct(**fields)


#: A `queued` record's fields that only a result fills in.
_BLANK_RESULT: dict[str, Any] = dict.fromkeys(
    ("started_at", "finished_at", "attempt", "redelivered", "worker", "duration_ms", "result")
)


def queued_row(job: QueuedJob, now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "satellite_id": job.satellite_id,
        "kind": job.kind,
        "host": job.host,
        "port": job.port,
        "source": job.source,
        "status": "queued",
        "error_code": None,
        "created_at": now,
        "submitted_at": job.submitted_at,
        "deadline_at": job.deadline_at,
        "updated_at": now,
        "answers": 0,
        "lane": job.lane,
        "retry_of": job.retry_of,
        "request": job.request,
    }


#: The columns of `queued_row`, in its order (the `?` of `SQLITE_QUEUED_UPSERT`).
_QUEUED_COLUMNS = (
    "id",
    "satellite_id",
    "kind",
    "host",
    "port",
    "source",
    "status",
    "error_code",
    "created_at",
    "submitted_at",
    "deadline_at",
    "updated_at",
    "answers",
    "lane",
    "retry_of",
    "request",
)
#: SQLite's `queued_upsert`, run through the driver with `sqlite_queued_params`: the submit's
#: hot write without SQLAlchemy's statement and parameter processing (about 110 of its 130 µs).
SQLITE_QUEUED_UPSERT = (
    "INSERT INTO jobs ({names}) VALUES ({marks}) "  # noqa: S608 - constants; values bound
    "ON CONFLICT (id) DO UPDATE SET {update} "
    "WHERE jobs.error_code = '{reusable}' AND jobs.answers = 0".format(
        names=", ".join(_QUEUED_COLUMNS),
        marks=", ".join("?" for _ in _QUEUED_COLUMNS),
        update=", ".join(f"{name} = excluded.{name}" for name in _QUEUED_COLUMNS[1:]),
        reusable=NOT_PUBLISHED,
    )
)


def sqlite_queued_params(values: dict[str, Any]) -> tuple[Any, ...]:
    """`queued_row` values as the parameters of `SQLITE_QUEUED_UPSERT`: the same text SQLAlchemy
    stores for them (times as `UtcDateTime` writes them, the request as its JSON)."""
    return (
        values["id"],
        values["satellite_id"],
        values["kind"],
        values["host"],
        values["port"],
        values["source"],
        values["status"],
        values["error_code"],
        _sqlite_time(values["created_at"]),
        _sqlite_time(values["submitted_at"]),
        _sqlite_time(values["deadline_at"]),
        _sqlite_time(values["updated_at"]),
        values["answers"],
        values["lane"],
        values["retry_of"],
        json.dumps(values["request"]),
    )


async def record_queued_many(
    engine: AsyncEngine, batch: Sequence[QueuedJob], now: datetime
) -> None:
    """Record a batch as `queued` in one transaction; `JobExistsError(*ids)` when ids are taken.

    Ids left `not_published` by a failed submit are reused, as by `record_queued`.
    """
    ids = [job.id for job in batch]
    # COALESCE: `NOT (NULL = ...)` is NULL, which would hide a taken id whose code is NULL.
    reusable = (sa.func.coalesce(jobs.c.error_code, "") == NOT_PUBLISHED) & (jobs.c.answers == 0)
    try:
        async with engine.begin() as conn:
            taken = await conn.scalars(sa.select(jobs.c.id).where(jobs.c.id.in_(ids) & ~reusable))
            existing = list(taken)
            if existing:
                raise JobExistsError(*existing)
            await conn.execute(jobs.delete().where(jobs.c.id.in_(ids) & reusable))
            await conn.execute(jobs.insert(), [queued_row(job, now) for job in batch])
    except sa.exc.IntegrityError:
        # Another replica recorded one of the ids between the check and the insert.
        raise JobExistsError(*ids) from None


async def mark_not_published_many(engine: AsyncEngine, ids: Sequence[str], now: datetime) -> int:
    """`mark_not_published` for many ids in one statement; how many rows changed."""
    if not ids:
        return 0
    async with engine.begin() as conn:
        done = await conn.execute(
            jobs.update()
            .where(jobs.c.id.in_(ids) & (jobs.c.status == "queued") & (jobs.c.answers == 0))
            .values(status="error", error_code=NOT_PUBLISHED, updated_at=now)
        )
    return done.rowcount


async def mark_not_published(engine: AsyncEngine, job_id: str, now: datetime) -> bool:
    """The broker did not confirm the publish: the row leaves `queued` for `error`."""
    async with engine.begin() as conn:
        done = await conn.execute(
            jobs.update()
            .where((jobs.c.id == job_id) & (jobs.c.status == "queued") & (jobs.c.answers == 0))
            .values(status="error", error_code=NOT_PUBLISHED, updated_at=now)
        )
    return done.rowcount == 1


def _result_row(
    result: JobResult, answers: int, now: datetime, source: str, *, json_text: bool = False
) -> dict[str, Any]:
    """The row of a result; `json_text`: `result` as JSON text (PostgreSQL's arrays) rather
    than the Python value SQLAlchemy's JSON type encodes."""
    return {
        "id": result.job_id,
        "satellite_id": result.satellite_id[:64],
        "kind": result.kind[:32],
        "source": source,
        "status": result.status,
        "error_code": result.error.code[:64] if result.error else None,
        "created_at": now,
        "updated_at": now,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "attempt": result.attempt,
        "redelivered": result.redelivered,
        "worker": result.worker[:255],
        "duration_ms": result.duration_ms,
        "answers": answers,
        "result": result.model_dump_json() if json_text else result.model_dump(mode="json"),
    }


#: Columns a later result overwrites; the rest (source, target, submitted time) stay.
_FROM_RESULT = (
    "status",
    "error_code",
    "updated_at",
    "started_at",
    "finished_at",
    "attempt",
    "redelivered",
    "worker",
    "duration_ms",
    "result",
)


async def apply_results(
    engine: AsyncEngine,
    results: Sequence[JobResult],
    now: datetime,
    sources: Mapping[str, str] | None = None,
) -> int:
    """Write a group of results in one transaction; the number of rows written.

    Copies of one job in the group become one row whose `answers` grows by the copies; the
    last copy's fields win. A job the history does not know yet is inserted with its source
    from `sources` (by job id; `amqp` when absent); a known job keeps its own. Raises
    SQLAlchemy's errors when the database fails (nothing is written then: the caller keeps the
    deliveries unacked).
    """
    if engine.dialect.name == "postgresql":
        return await _apply_results_pg(engine, results, now, sources)
    rows = result_rows(results, now, sources)
    if not rows:
        return 0
    priors = prior_answers(results)
    async with engine.begin() as conn:
        if priors:
            await conn.execute(PRIOR_ANSWERS_UPDATE, priors)
        await conn.execute(results_upsert(_insert(conn)), rows)
    return len(rows)


def _answer_key(result: JobResult) -> tuple[str, int, datetime]:
    """What tells one answer from another: a copy of the same message has the same key."""
    return result.worker[:255], result.attempt, result.finished_at


def result_rows(
    results: Sequence[JobResult],
    now: datetime,
    sources: Mapping[str, str] | None = None,
    *,
    json_text: bool = False,
) -> list[dict[str, Any]]:
    """One row per job of the group; distinct answers of a job count as that many answers.
    `sources`: job id -> the source of a job first seen here (`amqp` when absent)."""
    merged: dict[str, tuple[JobResult, set[tuple[str, int, datetime]]]] = {}
    for result in results:
        keys = merged[result.job_id][1] if result.job_id in merged else set()
        keys.add(_answer_key(result))
        merged[result.job_id] = (result, keys)
    sources = sources or {}
    return [
        _result_row(result, len(keys), now, sources.get(job_id, "amqp"), json_text=json_text)
        for job_id, (result, keys) in merged.items()
    ]


def prior_answers(results: Sequence[JobResult]) -> list[dict[str, Any]]:
    """The answers of a group the upsert does not compare with the row: per job, each distinct
    answer but the last one (whose fields the row takes). Parameters of `PRIOR_ANSWERS_UPDATE`
    (`sqlite_prior_params` for SQLite's driver), run in the group's transaction before the
    upsert; empty unless a job has two different answers in the group (rare).

    The upsert adds the group's distinct answers and takes one back when the row holds the
    group's last answer already (a redelivered copy). When the row holds another of the
    group's answers (a copy of the answer it holds, and a new one after it), that update takes
    it back instead: a copy never counts, in whichever order the group brings it.
    """
    keys: dict[str, dict[tuple[str, int, datetime], None]] = {}
    last: dict[str, tuple[str, int, datetime]] = {}
    for result in results:
        key = _answer_key(result)
        keys.setdefault(result.job_id, {})[key] = None
        last[result.job_id] = key
    return [
        {"prior_id": job_id, "prior_worker": w, "prior_attempt": a, "prior_finished_at": f}
        for job_id, seen in keys.items()
        if len(seen) > 1
        for (w, a, f) in seen
        if (w, a, f) != last[job_id]
    ]


#: One answer taken back from a row that holds one of the group's earlier answers already.
PRIOR_ANSWERS_UPDATE = (
    jobs.update()
    .where(
        (jobs.c.id == sa.bindparam("prior_id"))
        & (jobs.c.answers > 0)
        & (jobs.c.worker == sa.bindparam("prior_worker"))
        & (jobs.c.attempt == sa.bindparam("prior_attempt"))
        & (jobs.c.finished_at == sa.bindparam("prior_finished_at"))
    )
    .values(answers=jobs.c.answers - 1)
)
SQLITE_PRIOR_ANSWERS_UPDATE = (
    "UPDATE jobs SET answers = answers - 1 WHERE id = ? AND answers > 0 AND worker = ? "
    "AND attempt = ? AND finished_at = ?"
)


def sqlite_prior_params(priors: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """`prior_answers` as the parameters of `SQLITE_PRIOR_ANSWERS_UPDATE`."""
    return [
        (
            p["prior_id"],
            p["prior_worker"],
            p["prior_attempt"],
            _sqlite_time(p["prior_finished_at"]),
        )
        for p in priors
    ]


#: The upserts' `answers`: they add up, except for a copy of the answer the row holds already
#: (the same result message redelivered to the ingest: a replica died after its commit and
#: before its ack). `IS` is SQL's null-safe equality in SQLite, `IS NOT DISTINCT FROM` in
#: PostgreSQL.
_SAME_ANSWER = (
    "jobs.answers > 0 AND jobs.worker {eq} excluded.worker AND jobs.attempt {eq} "
    "excluded.attempt AND jobs.finished_at {eq} excluded.finished_at"
)


def _answers_sql(eq: str) -> str:
    same = _SAME_ANSWER.format(eq=eq)
    return (
        f"answers = CASE WHEN {same} THEN jobs.answers + excluded.answers - 1 "
        "ELSE jobs.answers + excluded.answers END"
    )


#: PostgreSQL's result upsert: one column array per parameter, unnested by the server. Its text
#: does not depend on the group's size, so each connection prepares it once, and a group is one
#: statement with 14 parameters however many rows it holds; SQLAlchemy's executemany processed
#: every row's every value in Python first (about half of the ingest's CPU time per result).
_PG_ARRAYS = (
    ("id", "varchar"),
    ("satellite_id", "varchar"),
    ("kind", "varchar"),
    ("source", "varchar"),
    ("status", "varchar"),
    ("error_code", "varchar"),
    ("started_at", "timestamp"),
    ("finished_at", "timestamp"),
    ("attempt", "integer"),
    ("redelivered", "boolean"),
    ("worker", "varchar"),
    ("duration_ms", "double precision"),
    ("answers", "integer"),
    ("result", "text"),
)
_PG_TIMES = frozenset({"started_at", "finished_at"})
PG_RESULTS_UPSERT = sa.text(
    "INSERT INTO jobs ({names}, created_at, updated_at) "  # noqa: S608 - constants; values bound
    "SELECT {selected}, CAST(:now AS timestamp), CAST(:now AS timestamp) "
    "FROM unnest({arrays}) AS u({names}) "
    "ON CONFLICT (id) DO UPDATE SET {update}, {answers}".format(
        names=", ".join(name for name, _ in _PG_ARRAYS),
        selected=", ".join(
            "CAST(u.result AS jsonb)" if name == "result" else f"u.{name}" for name, _ in _PG_ARRAYS
        ),
        arrays=", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in _PG_ARRAYS),
        update=", ".join(f"{name} = excluded.{name}" for name in _FROM_RESULT),
        answers=_answers_sql("IS NOT DISTINCT FROM"),
    )
)


#: SQLite's result upsert, run through the driver (`exec_driver_sql`) with one tuple per row from
#: `sqlite_result_params`: SQLAlchemy's executemany processed each value of each row in Python.
_SQLITE_COLUMNS = (
    "id",
    "satellite_id",
    "kind",
    "source",
    "status",
    "error_code",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "attempt",
    "redelivered",
    "worker",
    "duration_ms",
    "answers",
    "result",
)
_SQLITE_TIMES = frozenset({"created_at", "updated_at", "started_at", "finished_at"})
SQLITE_RESULTS_UPSERT = (
    "INSERT INTO jobs ({names}) VALUES ({marks}) "  # noqa: S608 - constants; values bound
    "ON CONFLICT (id) DO UPDATE SET {update}, {answers}".format(
        names=", ".join(_SQLITE_COLUMNS),
        marks=", ".join("?" for _ in _SQLITE_COLUMNS),
        update=", ".join(f"{name} = excluded.{name}" for name in _FROM_RESULT),
        answers=_answers_sql("IS"),
    )
)


def _sqlite_time(value: datetime | None) -> str | None:
    """The text SQLAlchemy's SQLite DATETIME stores for `UtcDateTime` (naive UTC, microseconds
    always written: the text compares and sorts like the instant).

    SQLAlchemy writes `strftime("%Y-%m-%d %H:%M:%S.%f")`; `isoformat` writes the same text
    (its first 26 characters, before the offset) in about a fifth of the time, for every year
    that `%Y` writes with four digits."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.year < 1000:  # `%Y` does not pad the year; isoformat does
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value.isoformat(" ", "microseconds")[:26]


def sqlite_result_params(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """`result_rows(..., json_text=True)` as the parameters of `SQLITE_RESULTS_UPSERT`."""
    return [
        tuple(
            _sqlite_time(row[name]) if name in _SQLITE_TIMES else row[name]
            for name in _SQLITE_COLUMNS
        )
        for row in rows
    ]


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def pg_result_arrays(
    results: Sequence[JobResult], now: datetime, sources: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The parameters of `PG_RESULTS_UPSERT`: `result_rows`, by id, as one list per column."""
    rows = sorted(result_rows(results, now, sources, json_text=True), key=lambda row: row["id"])
    params: dict[str, Any] = {
        name: [row[name] for row in rows] for name, _ in _PG_ARRAYS if name not in _PG_TIMES
    }
    for name in _PG_TIMES:
        params[name] = [_naive_utc(row[name]) for row in rows]
    params["now"] = _naive_utc(now)
    return params


async def _apply_results_pg(
    engine: AsyncEngine,
    results: Sequence[JobResult],
    now: datetime,
    sources: Mapping[str, str] | None = None,
) -> int:
    params = pg_result_arrays(results, now, sources)
    if not params["id"]:
        return 0
    priors = prior_answers(results)
    async with engine.begin() as conn:
        if priors:
            await conn.execute(PRIOR_ANSWERS_UPDATE, priors)
        await conn.execute(PG_RESULTS_UPSERT, params)
    return len(params["id"])


def results_upsert(insert: Any) -> Any:
    """The dialect's `insert` of `result_rows`: a later result overwrites, answers add up,
    except for a copy of the answer the row holds already (the same message redelivered)."""
    update = {name: getattr(insert.excluded, name) for name in _FROM_RESULT}
    same = (
        (jobs.c.answers > 0)
        & jobs.c.worker.is_not_distinct_from(insert.excluded.worker)
        & jobs.c.attempt.is_not_distinct_from(insert.excluded.attempt)
        & jobs.c.finished_at.is_not_distinct_from(insert.excluded.finished_at)
    )
    update["answers"] = sa.case(
        (same, jobs.c.answers + insert.excluded.answers - 1),
        else_=jobs.c.answers + insert.excluded.answers,
    )
    return insert.on_conflict_do_update(index_elements=[jobs.c.id], set_=update)


async def mark_overdue(engine: AsyncEngine, now: datetime, grace: float) -> int:
    """`queued` jobs whose deadline + grace has passed become `overdue`; how many."""
    async with engine.begin() as conn:
        done = await conn.execute(
            jobs.update()
            .where(
                (jobs.c.status == "queued") & (jobs.c.deadline_at < now - timedelta(seconds=grace))
            )
            .values(status="overdue", updated_at=now)
        )
    return done.rowcount


async def count_status(engine: AsyncEngine, status: Status) -> int:
    """How many jobs have this status (the (status, created_at) index answers it)."""
    async with engine.connect() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == status)
        )
    return int(count or 0)


async def get_job(engine: AsyncEngine, job_id: str) -> JobRecord | None:
    async with engine.connect() as conn:
        row = (await conn.execute(jobs.select().where(jobs.c.id == job_id))).first()
    return None if row is None else _record(row)


def encode_cursor(record: JobRecord) -> str:
    raw = json.dumps([record.created_at.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a page continues after; `ValueError` when it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = datetime.fromisoformat(created)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("is not a cursor returned by this API") from None
    if not isinstance(job_id, str) or when.tzinfo is None:
        raise ValueError("is not a cursor returned by this API")
    return when, job_id


async def search(
    engine: AsyncEngine, where: JobFilter, *, limit: int = 100, cursor: str | None = None
) -> Page:
    """Jobs matching `where`, newest first, `limit` per page; `ValueError` for a bad cursor."""
    limit = max(1, min(limit, MAX_PAGE))
    query = jobs.select()
    for column, value in (
        (jobs.c.satellite_id, where.satellite_id),
        (jobs.c.host, where.host),
        (jobs.c.kind, where.kind),
        (jobs.c.status, where.status),
        (jobs.c.error_code, where.error_code),
        (jobs.c.source, where.source),
    ):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(jobs.c.created_at >= where.since)
    if where.until is not None:
        query = query.where(jobs.c.created_at < where.until)
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            (jobs.c.created_at < created) | ((jobs.c.created_at == created) & (jobs.c.id < job_id))
        )
    query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    items = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items, encode_cursor(items[-1]) if more and items else None)


def purge_batch(cutoff: datetime, batch: int) -> Any:
    """The DELETE of (at most) the `batch` oldest rows created before `cutoff`."""
    oldest = (
        sa.select(jobs.c.id)
        .where(jobs.c.created_at < cutoff)
        .order_by(jobs.c.created_at)
        .limit(batch)
    )
    return jobs.delete().where(jobs.c.id.in_(oldest.scalar_subquery()))


async def purge_before(
    engine: AsyncEngine,
    cutoff: datetime,
    *,
    batch: int = 1000,
    max_batches: int = 1_000_000,
    max_seconds: float = PURGE_PASS_SECONDS,
    delete: Callable[[Any], Awaitable[int]] | None = None,
) -> tuple[int, bool]:
    """Delete rows created before `cutoff`, `batch` rows per transaction: how many were deleted,
    and whether old rows may be left (the pass ran out of batches or time).

    Each batch is its own short transaction (its row locks last one batch), and the pass goes
    on until no old row is left, or `max_batches` or `max_seconds` are spent (the next pass
    carries on). `delete` runs one batch's statement in its own transaction (default: on
    `engine`; SQLite's writer thread passes its own).
    """

    async def on_engine(statement: Any) -> int:
        async with engine.begin() as conn:
            return (await conn.execute(statement)).rowcount

    run = delete or on_engine
    total = 0
    loop = asyncio.get_running_loop()
    give_up = loop.time() + max_seconds
    for _ in range(max_batches):
        done = await run(purge_batch(cutoff, batch))
        total += done
        if done < batch:
            return total, False
        if loop.time() >= give_up:
            break
    return total, True
