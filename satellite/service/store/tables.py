"""The history store's schema (SQLAlchemy Core): one row per job id.

One schema for SQLite and PostgreSQL. Times are stored as naive UTC (`UtcDateTime`) on both, so
that comparisons and ordering mean the same thing everywhere; they come back timezone-aware.
The migrations in `migrations/versions/` build exactly these tables; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["JOB_STATUSES", "SOURCES", "Json", "UtcDateTime", "jobs", "metadata"]

JOB_STATUSES = ("queued", "ok", "error", "overdue")
#: Fixed sources; schedules add `schedule:<name>`.
SOURCES = ("api", "cli", "amqp")

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """An aware datetime in, the same instant out; stored as naive UTC on every database."""

    impl = sa.DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: give a timezone")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


Json = sa.JSON().with_variant(JSONB(), "postgresql")

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("satellite_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("host", sa.String(255)),
    sa.Column("port", sa.Integer),
    sa.Column("source", sa.String(80), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_code", sa.String(64)),
    # When the store first saw the job: submitted through the service, or first answered.
    # Search ranges, newest-first order and retention use it.
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("submitted_at", UtcDateTime),
    sa.Column("deadline_at", UtcDateTime),
    sa.Column("started_at", UtcDateTime),
    sa.Column("finished_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("attempt", sa.Integer),
    sa.Column("redelivered", sa.Boolean),
    sa.Column("worker", sa.String(255)),
    sa.Column("duration_ms", sa.Float),
    sa.Column("answers", sa.Integer, nullable=False, server_default="0"),
    sa.Column("result", Json),
    sa.Column("lane", sa.String(16)),
    sa.Column("retry_of", sa.String(128)),
    # The job as submitted through the service, without `auth` (credentials never stored).
    sa.Column("request", Json),
    sa.Index(None, "created_at", "id"),
    sa.Index(None, "satellite_id", "created_at"),
    sa.Index(None, "host", "created_at"),
    sa.Index(None, "kind", "created_at"),
    sa.Index(None, "status", "created_at"),
    sa.Index(None, "error_code", "created_at"),
    sa.Index(None, "source", "created_at"),
    sa.Index(None, "status", "deadline_at"),
)
