"""The job as submitted, without inline credentials, so that it can be retried.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from satellite.service.store.tables import Json

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("request", Json))


def downgrade() -> None:
    op.drop_column("jobs", "request")
