"""`satellite store copy`: a SQLite history into PostgreSQL (docs/core-service.md), as run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from satellite.service.alerts import add_silence
from satellite.service.settings import DatabaseUrl, parse_database_url
from satellite.service.store import QueuedJob, Store
from satellite.service.store.alert_tables import alert_silences
from satellite.service.store.tables import jobs, schedule_state
from tests.integration.test_service_store import queued, result
from tests.support.database import _reset

JOBS = 2_345  # more than two batches of the copy's 1,000


def satellite(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "satellite", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


async def fill(db: DatabaseUrl) -> None:
    """Jobs (answered, queued, one answered twice), a paused schedule, silences (on, ended)."""
    store = await Store.open(db)
    try:
        now = datetime.now(UTC)
        batch: list[QueuedJob] = [queued(f"job-{n:05d}", submitted_at=now) for n in range(JOBS)]
        await store.record_queued_many(batch)
        answers = [result(f"job-{n:05d}") for n in range(0, JOBS, 2)]
        await store.apply_results(answers)
        await store.apply_results(answers[:1])  # a copy of a result: answers = 2
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.insert(schedule_state),
                [
                    {"name": "if-table", "paused": True, "claimed_until": 1e9, "updated_at": now},
                    {"name": "ping", "paused": False, "claimed_until": 1e9, "updated_at": now},
                ],
            )
        for sid, ends in (("7", now + timedelta(hours=2)), ("8", now - timedelta(minutes=1))):
            await add_silence(
                store.engine, sid, rule=None, now=now - timedelta(hours=1), ends_at=ends,
                reason="maintenance", created_by="noc",
            )  # fmt: skip
    finally:
        await store.close()


async def read(db: DatabaseUrl) -> dict[str, list[dict[str, object]]]:
    store = await Store.open(db, run_migrations=False)
    try:
        async with store.engine.connect() as conn:
            out: dict[str, list[dict[str, object]]] = {}
            for table, key in ((jobs, "id"), (schedule_state, "name"), (alert_silences, "id")):
                rows = await conn.execute(sa.select(table).order_by(table.c[key]))
                out[table.name] = [dict(row) for row in rows.mappings()]
            return out
    finally:
        await store.close()


@pytest.fixture
def stores(tmp_path: Path, pg_database: str) -> tuple[DatabaseUrl, DatabaseUrl]:
    asyncio.run(_reset(pg_database))
    sqlite = parse_database_url(f"sqlite:///{tmp_path / 'history.sqlite3'}")
    asyncio.run(fill(sqlite))
    return sqlite, parse_database_url(pg_database)


def test_a_sqlite_history_is_copied_into_postgresql_whole_and_again_without_doubles(
    stores: tuple[DatabaseUrl, DatabaseUrl], pg_database: str, tmp_path: Path
) -> None:
    sqlite, pg = stores
    source = f"sqlite:///{sqlite.sqlite_path}"
    done = satellite("store", "copy", "--from", source, "--to", pg_database, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tables"] == {
        "jobs": {"copied": JOBS, "already_there": 0},
        "schedule_state": {"copied": 2, "already_there": 0},
        "alert_silences": {"copied": 1, "already_there": 0},  # the ended one is not copied
    }
    assert report["to"] == pg.masked

    before, after = asyncio.run(read(sqlite)), asyncio.run(read(pg))
    assert after["jobs"] == before["jobs"]  # every column, times, JSON and counts alike
    assert after["schedule_state"] == before["schedule_state"]
    [silence] = after["alert_silences"]
    on = next(s for s in before["alert_silences"] if s["satellite_id"] == "7")
    assert {k: v for k, v in silence.items() if k != "id"} == {
        k: v for k, v in on.items() if k != "id"
    }

    # Again (an interrupted copy run once more): nothing doubled, nothing changed; and a job the
    # target got meanwhile (a running replica) is kept as the target has it.
    async def answer_one_more() -> None:
        store = await Store.open(pg)
        try:
            await store.apply_results([result("job-00001", worker="w-pg")])
        finally:
            await store.close()

    asyncio.run(answer_one_more())
    again = satellite("store", "copy", "--from", source, "--to", pg_database)
    assert again.returncode == 0, again.stderr
    assert f"jobs: 0 copied, {JOBS:,} already there" in again.stdout
    assert "alert_silences: 0 copied, 1 already there" in again.stdout
    rows = asyncio.run(read(pg))
    assert len(rows["jobs"]) == JOBS
    assert next(j for j in rows["jobs"] if j["id"] == "job-00001")["worker"] == "w-pg"
    assert len(rows["alert_silences"]) == 1
    # The target's own sequence goes on after the copied silence: a new one gets a new id.
    asyncio.run(add_silence_to(pg))


async def add_silence_to(db: DatabaseUrl) -> None:
    store = await Store.open(db, run_migrations=False)
    try:
        now = datetime.now(UTC)
        await add_silence(
            store.engine, "9", rule=None, now=now, ends_at=now + timedelta(hours=1),
            reason="new", created_by=None,
        )  # fmt: skip
    finally:
        await store.close()


def test_wrong_stores_are_one_line_and_exit_2(tmp_path: Path, pg_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("US_", "USM_"))}
    env["USM_CORE_STATE_DIR"] = str(tmp_path / "state")  # --to's default: its history.sqlite3
    missing = satellite(
        "store", "copy", "--from", f"sqlite:///{tmp_path / 'none.sqlite3'}", env=env
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert "no SQLite file" in missing.stderr
    assert not (tmp_path / "none.sqlite3").exists()  # not created by trying

    same = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    twice = satellite("store", "copy", "--from", same, "--to", same)
    assert twice.returncode == 2
    assert "the same store" in twice.stderr

    bad = satellite("store", "copy", "--from", "mysql://x/y")
    assert bad.returncode == 2
    assert bad.stderr.startswith("satellite: --from:")

    # An empty SQLite file (no schema): say what to do, change nothing.
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    old = satellite("store", "copy", "--from", f"sqlite:///{empty}", "--to", pg_database)
    assert old.returncode == 2, old.stderr
    assert "satellite serve" in old.stderr


def test_a_target_that_does_not_answer_is_exit_1_with_the_reason(
    stores: tuple[DatabaseUrl, DatabaseUrl],
) -> None:
    sqlite, _ = stores
    source = f"sqlite:///{sqlite.sqlite_path}"
    down = satellite("store", "copy", "--from", source, "--to", "postgresql://u@127.0.0.1:1/h")
    assert down.returncode == 1, down.stderr
    assert down.stderr.startswith("satellite: the copy stopped: ")
    assert down.stderr.count("\n") == 1
    js = satellite(
        "store", "copy", "--from", source, "--to", "postgresql://u@127.0.0.1:1/h", "--json"
    )
    assert json.loads(js.stdout)["error"]["code"] == "store"
