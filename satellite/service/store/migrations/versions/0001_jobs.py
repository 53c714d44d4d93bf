"""The jobs table: one row per job id, and the indexes of the search filters.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from satellite.service.store.tables import Json, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_jobs_created_at_id": ["created_at", "id"],
    "ix_jobs_satellite_id_created_at": ["satellite_id", "created_at"],
    "ix_jobs_host_created_at": ["host", "created_at"],
    "ix_jobs_kind_created_at": ["kind", "created_at"],
    "ix_jobs_status_created_at": ["status", "created_at"],
    "ix_jobs_error_code_created_at": ["error_code", "created_at"],
    "ix_jobs_source_created_at": ["source", "created_at"],
    "ix_jobs_status_deadline_at": ["status", "deadline_at"],
}


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("satellite_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("port", sa.Integer),
        sa.Column("source", sa.String(80), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64)),
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
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    for name, columns in _INDEXES.items():
        op.create_index(name, "jobs", columns)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_table("jobs")
