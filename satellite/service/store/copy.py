"""Copy one history store into another (`satellite store copy`): SQLite to PostgreSQL, mostly.

What is copied: every job row, the schedules' state (paused or not, and how far their slots were
claimed) and the alert silences that have not ended. What is not: notifications still to send
and their delivery log, alert states (the next evaluation finds them again), skip counters.

The target is migrated first (as `satellite serve` would do at start); the source must already be
at this version's schema (`satellite serve` of this version migrated it). Rows the target holds
already are kept as they are (the same job id, schedule name or silence): a copy can be run again
after an interruption and copies only what is missing. Rows are read in primary key order, a
batch at a time, each batch written in one transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from satellite.service.settings import DatabaseUrl
from satellite.service.store.alert_tables import alert_silences
from satellite.service.store.engine import connect, current_revision, head_revision, migrate
from satellite.service.store.tables import jobs, schedule_state

__all__ = ["CopyError", "CopyReport", "copy_store"]

#: Rows read and written per transaction.
BATCH = 1000
#: Most rows of one table (a bound on the loop; far above any retention's worth).
MAX_ROWS = 1_000_000_000


class CopyError(Exception):
    """The copy cannot start: the same store twice, a missing file, a source at another schema."""


@dataclass
class TableCopy:
    """What happened to one table."""

    copied: int = 0
    present: int = 0
    """Rows the target held already (kept as they were)."""


@dataclass
class CopyReport:
    tables: dict[str, TableCopy] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {"copied": t.copied, "already_there": t.present}
            for name, t in self.tables.items()
        }


async def copy_store(
    source: DatabaseUrl,
    target: DatabaseUrl,
    *,
    batch: int = BATCH,
    progress: Callable[[str, int], None] | None = None,
    now: datetime | None = None,
) -> CopyReport:
    """Copy `source` into `target` (migrated first); `progress(table, rows so far)` per batch."""
    if source.url.render_as_string(hide_password=False) == target.url.render_as_string(
        hide_password=False
    ):
        raise CopyError("--from and --to name the same store")
    path = source.sqlite_path
    if path is not None and not await asyncio.to_thread(path.is_file):
        raise CopyError(f"--from: no SQLite file at {path}")  # aiosqlite would create one
    if target.sqlite_path is not None:
        await asyncio.to_thread(target.sqlite_path.parent.mkdir, parents=True, exist_ok=True)
    src, dst = connect(source, pool_size=1), connect(target, pool_size=1)
    try:
        found, head = await current_revision(src), head_revision()
        if found != head:
            raise CopyError(
                f"--from: the store's schema is {found or 'empty'}, this version's is {head}: "
                "start this version's `satellite serve` on it once (it migrates), then copy"
            )
        await migrate(dst)
        report = CopyReport()
        for table in (jobs, schedule_state):
            report.tables[table.name] = await _copy_keyed(src, dst, table, batch, progress)
        moment = now or datetime.now(UTC)
        report.tables[alert_silences.name] = await _copy_silences(src, dst, moment)
        return report
    finally:
        await src.dispose()
        await dst.dispose()


async def _copy_keyed(
    src: AsyncEngine,
    dst: AsyncEngine,
    table: sa.Table,
    batch: int,
    progress: Callable[[str, int], None] | None,
) -> TableCopy:
    """A table with a one-column primary key, in key order, a batch per transaction."""
    (key,) = table.primary_key.columns
    outcome = TableCopy()
    last: Any = None
    while outcome.copied + outcome.present < MAX_ROWS:
        query = sa.select(table).order_by(key).limit(batch)
        if last is not None:
            query = query.where(key > last)
        async with src.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(query)).mappings()]
        if not rows:
            break
        last = rows[-1][key.name]
        async with dst.begin() as conn:
            ids = [row[key.name] for row in rows]
            there = set((await conn.execute(sa.select(key).where(key.in_(ids)))).scalars())
            new = [row for row in rows if row[key.name] not in there]
            if new:
                await conn.execute(_insert_missing(conn, table, [key.name]), new)
        outcome.copied += len(new)
        outcome.present += len(there)
        if progress is not None:
            progress(table.name, outcome.copied + outcome.present)
        if len(rows) < batch:
            break
    return outcome


async def _copy_silences(src: AsyncEngine, dst: AsyncEngine, now: datetime) -> TableCopy:
    """The silences still on: new ids in the target (its own sequence), the same one not twice."""
    columns = [c for c in alert_silences.columns if c.name != "id"]
    same = ("satellite_id", "rule", "starts_at", "ends_at", "reason")
    async with src.connect() as conn:
        query = sa.select(*columns).where(alert_silences.c.ends_at > now)
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    outcome = TableCopy()
    async with dst.begin() as conn:
        existing = await conn.execute(
            sa.select(*(alert_silences.c[name] for name in same)).where(
                alert_silences.c.ends_at > now
            )
        )
        there = {tuple(row) for row in existing}
        new = [row for row in rows if tuple(row[name] for name in same) not in there]
        if new:
            await conn.execute(sa.insert(alert_silences), new)
    outcome.copied, outcome.present = len(new), len(rows) - len(new)
    return outcome


def _insert_missing(conn: AsyncConnection, table: sa.Table, keys: Sequence[str]) -> Any:
    """An insert that leaves a row the target got meanwhile (a running replica) as it is."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))
