"""The alerts' tables (issue 18): states, evaluation claims, silences, the outbox, the archive.

On the history store's `metadata` (tables.py), built by migration `0004`. Every replica
evaluates the rules; the store decides who acts: an evaluation slot is claimed once
(`alert_evaluations`), a state change is a compare-and-set on `alert_states.seq`, and each
notification is one outbox row per channel, unique per (state change, channel).
"""

from __future__ import annotations

import sqlalchemy as sa

from satellite.service.store.tables import Json, UtcDateTime, metadata

__all__ = ["alert_archive", "alert_evaluations", "alert_outbox", "alert_silences", "alert_states"]

alert_evaluations = sa.Table(
    "alert_evaluations",
    metadata,
    # floor(epoch seconds / interval): one evaluation of every rule per interval, by one replica.
    sa.Column("slot", sa.BigInteger, primary_key=True),
    sa.Column("replica", sa.String(128), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
)

alert_states = sa.Table(
    "alert_states",
    metadata,
    sa.Column("rule", sa.String(32), primary_key=True),
    sa.Column("satellite_id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # ok | firing
    sa.Column("since", UtcDateTime, nullable=False),
    sa.Column("summary", sa.String(500), nullable=False, server_default=""),
    # Bumped by every state change (compare-and-set): a change happens once across replicas.
    sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("evaluated_at", UtcDateTime, nullable=False),
)

alert_silences = sa.Table(
    "alert_silences",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("satellite_id", sa.String(64), nullable=False),
    sa.Column("rule", sa.String(32)),  # None: every rule
    sa.Column("starts_at", UtcDateTime, nullable=False),
    sa.Column("ends_at", UtcDateTime, nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("created_by", sa.String(128)),
    sa.Index(None, "satellite_id", "ends_at"),
)

alert_outbox = sa.Table(
    "alert_outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # "<rule>/<satellite>/<seq>": the state change this notifies.
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
    sa.UniqueConstraint("event", "channel"),
    sa.Index(None, "sent_at", "next_attempt_at"),
)

alert_archive = sa.Table(
    "alert_archive",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("outbox_id", sa.Integer, nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("channel", sa.String(64), nullable=False),
    sa.Column("rule", sa.String(32), nullable=False),
    sa.Column("satellite_id", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # sent | failed
    sa.Column("http_status", sa.Integer),
    sa.Column("error", sa.String(300)),
    sa.Column("replica", sa.String(128)),
    sa.Column("detail", Json),
    sa.Index(None, "at"),
)
