"""Schedules: the claim cursor and pause of each schedule, the outbox, the skip counts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from satellite.service.store.tables import Json, UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_state",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("claimed_until", sa.Float, nullable=False),
        sa.Column("last_slot", sa.Float),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_schedule_state"),
    )
    op.create_table(
        "schedule_outbox",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("schedule", sa.String(64), nullable=False),
        sa.Column("satellite_id", sa.String(64), nullable=False),
        sa.Column("body", Json, nullable=False),
        sa.Column("not_after", sa.Float, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("lease_until", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_outbox"),
    )
    op.create_index("ix_schedule_outbox_lease_until", "schedule_outbox", ["lease_until"])
    op.create_table(
        "schedule_skips",
        sa.Column("schedule", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("schedule", "at", "reason", name="pk_schedule_skips"),
    )


def downgrade() -> None:
    op.drop_table("schedule_skips")
    op.drop_index("ix_schedule_outbox_lease_until", "schedule_outbox")
    op.drop_table("schedule_outbox")
    op.drop_table("schedule_state")
