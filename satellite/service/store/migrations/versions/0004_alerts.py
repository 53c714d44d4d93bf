"""Alerts: states, evaluation claims, silences, the notification outbox and its archive.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from satellite.service.store.tables import Json, UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_evaluations",
        sa.Column("slot", sa.BigInteger, primary_key=True),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "alert_states",
        sa.Column("rule", sa.String(32), primary_key=True),
        sa.Column("satellite_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", UtcDateTime, nullable=False),
        sa.Column("summary", sa.String(500), nullable=False, server_default=""),
        sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("evaluated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "alert_silences",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("satellite_id", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(32)),
        sa.Column("starts_at", UtcDateTime, nullable=False),
        sa.Column("ends_at", UtcDateTime, nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_by", sa.String(128)),
    )
    op.create_index(
        "ix_alert_silences_satellite_id_ends_at", "alert_silences", ["satellite_id", "ends_at"]
    )
    op.create_table(
        "alert_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event", sa.String(140), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("satellite_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", UtcDateTime, nullable=False),
        sa.Column("summary", sa.String(500), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("next_attempt_at", UtcDateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_until", UtcDateTime),
        sa.Column("sent_at", UtcDateTime),
        sa.Column("last_error", sa.String(300)),
        sa.UniqueConstraint("event", "channel", name="uq_alert_outbox_event_channel"),
    )
    op.create_index(
        "ix_alert_outbox_sent_at_next_attempt_at", "alert_outbox", ["sent_at", "next_attempt_at"]
    )
    op.create_table(
        "alert_archive",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("outbox_id", sa.Integer, nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("satellite_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("error", sa.String(300)),
        sa.Column("replica", sa.String(128)),
        sa.Column("detail", Json),
    )
    op.create_index("ix_alert_archive_at", "alert_archive", ["at"])


def downgrade() -> None:
    for table in (
        "alert_archive",
        "alert_outbox",
        "alert_silences",
        "alert_states",
        "alert_evaluations",
    ):
        op.drop_table(table)
