"""The history store on both databases: migrations, the row lifecycle, search and retention."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from poller import wire
from satellite.service.settings import DatabaseUrl, parse_database_url
from satellite.service.store import JobExistsError, JobFilter, QueuedJob, Store, queries
from satellite.service.store.engine import current_revision, head_revision, migrate
from satellite.service.store.queries import NOT_PUBLISHED, decode_cursor
from satellite.service.store.tables import metadata

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(db_url: DatabaseUrl) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    opened.clock = Clock()
    yield opened
    await opened.close()


def clock(store: Store) -> Clock:
    assert isinstance(store.clock, Clock)
    return store.clock


def queued(job_id: str, **kw: object) -> QueuedJob:
    values: dict[str, object] = {
        "id": job_id,
        "satellite_id": "sat1",
        "kind": "snmp.get",
        "host": "10.0.0.1",
        "port": 161,
        "source": "api",
        "submitted_at": T0,
        "timeout": 10.0,
    }
    return QueuedJob(**(values | kw))  # type: ignore[arg-type]


def result(job_id: str, *, status: str = "ok", worker: str = "w1", **kw: object) -> wire.JobResult:
    values: dict[str, object] = {
        "job_id": job_id,
        "kind": "snmp.get",
        "satellite_id": "sat1",
        "worker": worker,
        "status": status,
        "data": {"varbinds": []} if status == "ok" else None,
        "error": (
            {"code": "device_timeout", "message": "no answer", "retryable": True}
            if status == "error"
            else None
        ),
        "attempt": 1,
        "redelivered": False,
        "started_at": T0 + timedelta(seconds=1),
        "finished_at": T0 + timedelta(seconds=2),
        "duration_ms": 1000.0,
    }
    return wire.JobResult.model_validate(values | kw)


async def test_migrations_build_the_schema_of_tables_py(store: Store) -> None:
    assert await current_revision(store.engine) == head_revision()

    def columns(conn: sa.Connection) -> dict[str, set[str]]:
        inspector = sa.inspect(conn)
        return {
            "columns": {c["name"] for c in inspector.get_columns("jobs")},
            "indexes": {str(i["name"]) for i in inspector.get_indexes("jobs")},
        }

    async with store.engine.connect() as conn:
        found = await conn.run_sync(columns)
    table = metadata.tables["jobs"]
    assert found["columns"] == {c.name for c in table.columns}
    assert found["indexes"] == {str(i.name) for i in table.indexes}


_MIGRATE = """
import asyncio, sys
from satellite.service.settings import parse_database_url
from satellite.service.store import Store

async def main():
    store = await Store.open(parse_database_url(sys.argv[1]))
    await store.close()

asyncio.run(main())
"""


async def test_two_replicas_migrating_an_empty_database_at_once_both_start(
    db_url: DatabaseUrl,
) -> None:
    url = db_url.url.render_as_string(hide_password=False)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MIGRATE, url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    async with asyncio.timeout(60):
        outcomes = [(await p.wait(), (await p.stderr.read()).decode()) for p in procs if p.stderr]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    store = await Store.open(db_url, run_migrations=False)
    try:
        assert await current_revision(store.engine) == head_revision()
        await migrate(store.engine)  # and once more: nothing to do
        assert await current_revision(store.engine) == head_revision()
    finally:
        await store.close()


async def test_sqlite_runs_in_wal_mode(db_url: DatabaseUrl) -> None:
    if db_url.dialect != "sqlite":
        pytest.skip("SQLite only")
    store = await Store.open(db_url)
    try:
        async with store.engine.connect() as conn:
            mode = (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar()
            sync = (await conn.execute(sa.text("PRAGMA synchronous"))).scalar()
            busy = (await conn.execute(sa.text("PRAGMA busy_timeout"))).scalar()
    finally:
        await store.close()
    assert (mode, sync, busy) == ("wal", 1, 10_000)


async def test_a_submitted_job_is_queued_then_answered(store: Store) -> None:
    await store.record_queued(queued("j1"))
    record = await store.get_job("j1")
    assert record is not None
    assert (record.status, record.source, record.answers) == ("queued", "api", 0)
    assert record.deadline_at == T0 + timedelta(seconds=10)
    assert record.submitted_at == T0
    assert record.result is None

    clock(store).now = T0 + timedelta(seconds=3)
    assert await store.apply_results([result("j1")]) == 1
    record = await store.get_job("j1")
    assert record is not None
    assert (record.status, record.source, record.answers, record.worker) == ("ok", "api", 1, "w1")
    assert (record.host, record.port, record.submitted_at) == ("10.0.0.1", 161, T0)
    assert record.finished_at == T0 + timedelta(seconds=2)
    assert record.result is not None
    assert record.result["job_id"] == "j1"
    assert record.result["data"] == {"varbinds": []}


async def test_an_unknown_result_is_recorded_with_source_amqp(store: Store) -> None:
    await store.apply_results([result("from-elsewhere", status="error")])
    record = await store.get_job("from-elsewhere")
    assert record is not None
    assert (record.source, record.status, record.error_code) == ("amqp", "error", "device_timeout")
    assert (record.host, record.submitted_at, record.created_at) == (None, None, T0)


async def test_a_second_answer_counts_and_the_same_result_again_does_not(store: Store) -> None:
    """Two answers of one job (a redelivered job run again) are one row with two answers; the
    same result message delivered again (an ingest replica died between its commit and its
    ack: fault scenario 14) is the same answer."""
    await store.apply_results([result("dup")])
    await store.apply_results([result("dup")])
    await store.apply_results([result("twice"), result("twice")])
    await store.apply_results([result("dup", worker="w2", attempt=2)])
    await store.apply_results([result("dup", worker="w2", attempt=2)])
    page = await store.search(JobFilter())
    assert sorted(r.id for r in page.items) == ["dup", "twice"]
    records = {r.id: r for r in page.items}
    assert (records["dup"].answers, records["dup"].worker, records["dup"].attempt) == (2, "w2", 2)
    assert records["twice"].answers == 1


async def test_a_redelivered_copy_and_a_new_answer_in_one_group_count_one_answer(
    store: Store,
) -> None:
    """The row holds answer A; one ingest group then brings a copy of A (redelivered: its
    replica died between commit and ack) and a new answer B, in either order. Only B is new."""
    first = result("ab", worker="w1", attempt=1)
    again = result("ab", worker="w1", attempt=1)
    new = result("ab", worker="w2", attempt=2, finished_at=T0 + timedelta(seconds=9))
    await store.apply_results([first])
    await store.apply_results([again, new])
    record = await store.get_job("ab")
    assert record is not None
    assert (record.answers, record.worker, record.attempt) == (2, "w2", 2)
    # The other order: the copy last (its fields are the row's again, as the last copy's are).
    await store.apply_results([result("ba", worker="w1", attempt=1)])
    await store.apply_results(
        [
            result("ba", worker="w2", attempt=2, finished_at=T0 + timedelta(seconds=9)),
            result("ba", worker="w1", attempt=1),
        ]
    )
    record = await store.get_job("ba")
    assert record is not None
    assert (record.answers, record.worker, record.attempt) == (2, "w1", 1)
    # Two new answers in one group still count two.
    await store.apply_results(
        [
            result("cc", worker="w3", attempt=3, finished_at=T0 + timedelta(seconds=20)),
            result("cc", worker="w4", attempt=4, finished_at=T0 + timedelta(seconds=21)),
        ]
    )
    await store.apply_results([result("cc", worker="w1", attempt=1)])
    record = await store.get_job("cc")
    assert record is not None
    assert record.answers == 3


async def test_a_later_result_updates_the_row(store: Store) -> None:
    await store.apply_results([result("j", status="error")])
    await store.apply_results([result("j", status="ok", attempt=2, redelivered=True)])
    record = await store.get_job("j")
    assert record is not None
    assert (record.status, record.error_code, record.attempt, record.redelivered) == (
        "ok",
        None,
        2,
        True,
    )


async def test_an_id_cannot_be_submitted_twice(store: Store) -> None:
    await store.record_queued(queued("j"))
    with pytest.raises(JobExistsError):
        await store.record_queued(queued("j", host="10.9.9.9"))
    record = await store.get_job("j")
    assert record is not None
    assert record.host == "10.0.0.1"


async def test_submits_at_once_each_get_their_own_outcome(store: Store) -> None:
    # On SQLite these are group-committed together: one taken id must not fail the others.
    await store.record_queued(queued("taken"))
    ids = [f"j{n}" for n in range(50)]
    outcomes = await asyncio.gather(
        *(store.record_queued(queued(job_id)) for job_id in [*ids[:25], "taken", *ids[25:]]),
        return_exceptions=True,
    )
    assert isinstance(outcomes.pop(25), JobExistsError)
    assert [getattr(o, "id", o) for o in outcomes] == ids
    for job_id in ids:
        record = await store.get_job(job_id)
        assert record is not None
        assert record.status == "queued"


async def test_a_submit_cancelled_while_its_row_is_written_does_not_leave_it_queued(
    store: Store,
) -> None:
    # The request went away: it will never publish the job, so the row must not stay queued.
    # On SQLite a row is written at once when the write lock is free (nothing to cancel): hold
    # the lock from another connection so that the row waits for a group on the writer thread.
    path = store.db.sqlite_path
    holder = None
    if path is not None:
        holder = sqlite3.connect(path, isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")
    submit = asyncio.create_task(store.record_queued(queued("gone")))
    await asyncio.sleep(0)  # the submit waits for its group
    await asyncio.sleep(0)  # the group is being written
    submit.cancel()
    if holder is not None:
        holder.execute("COMMIT")
        holder.close()
    with pytest.raises(asyncio.CancelledError):
        await submit
    await store.record_queued(queued("next"))  # after the group of "gone" and its clean-up
    record = await store.get_job("gone")
    assert record is None or (record.status, record.error_code) == ("error", NOT_PUBLISHED)
    assert (await store.get_job("next")) is not None


async def test_a_queued_row_waits_for_a_writer_that_holds_sqlite(store: Store) -> None:
    # A row is written at once on the event loop only when SQLite's write lock is free; when
    # another connection holds it, the row waits (on the writer thread) and is written after.
    path = store.db.sqlite_path
    if path is None:
        pytest.skip("SQLite only")
    holder = sqlite3.connect(path, isolation_level=None, timeout=10)
    holder.execute("BEGIN IMMEDIATE")
    submit = asyncio.create_task(store.record_queued(queued("waits")))
    await asyncio.sleep(0.2)
    assert not submit.done()
    holder.execute("COMMIT")
    holder.close()
    record = await asyncio.wait_for(submit, 10)
    assert record.status == "queued"
    stored = await store.get_job("waits")
    assert stored is not None
    assert stored.status == "queued"


async def test_sqlite_queued_rows_through_the_driver_are_the_rows_sqlalchemy_writes(
    store: Store,
) -> None:
    # The submit's `queued` row skips SQLAlchemy on SQLite (SQLITE_QUEUED_UPSERT): at once on the
    # event loop, and in a group on the writer thread. Both must store what SQLAlchemy's upsert
    # stores, byte for byte, and reuse a `not_published` id the way it does.
    path = store.db.sqlite_path
    if path is None:
        pytest.skip("SQLite only")
    request = {"v": 1, "kind": "snmp.get", "target": {"host": "10.0.0.1", "port": 161}}
    variants: list[dict[str, object]] = [
        {"lane": "interactive", "request": request},
        {"lane": None, "request": None, "retry_of": "old", "host": None, "port": None},
    ]
    for n, kw in enumerate(variants):
        now = clock(store).now = T0 + timedelta(microseconds=123_456 + n)
        await store.record_queued(queued(f"now{n}", **kw))  # at once: the lock is free
        holder = sqlite3.connect(path, isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")
        grouped = asyncio.create_task(store.record_queued(queued(f"group{n}", **kw)))
        await asyncio.sleep(0.1)
        holder.execute("COMMIT")
        holder.close()
        await asyncio.wait_for(grouped, 10)
        await queries.record_queued(store.engine, queued(f"orm{n}", **kw), now)

    def rows(ids: list[str]) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            out = conn.execute(
                "SELECT * FROM jobs WHERE id IN ({})".format(",".join("?" * len(ids))),
                ids,
            ).fetchall()
        return sorted(row[1:] for row in out)  # the id is the first column

    for n in range(len(variants)):
        expected = rows([f"orm{n}"])
        assert expected, "the reference row is missing"
        assert rows([f"now{n}"]) == expected
        assert rows([f"group{n}"]) == expected

    # Reuse of an id the broker did not take, and refusal of a live one, through the driver.
    assert await store.mark_not_published("now0")
    await store.record_queued(queued("now0", host="10.9.9.9"))
    with pytest.raises(JobExistsError):
        await store.record_queued(queued("now0"))
    record = await store.get_job("now0")
    assert record is not None
    assert (record.status, record.error_code, record.host) == ("queued", None, "10.9.9.9")


@pytest.mark.parametrize(
    "value",
    [
        T0,
        T0 + timedelta(microseconds=7),
        datetime(2026, 12, 1, 17, 30, 0, 999_999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 5, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_sqlite_times_are_the_text_sqlalchemy_writes(value: datetime) -> None:
    """The driver's rows write times as SQLAlchemy's SQLite DATETIME does (its `strftime`),
    though with `isoformat` where that writes the same text."""
    expected = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    assert queries._sqlite_time(value) == expected


async def test_an_unpublished_job_leaves_queued_and_its_id_can_be_reused(store: Store) -> None:
    await store.record_queued(queued("j"))
    assert await store.mark_not_published("j")
    record = await store.get_job("j")
    assert record is not None
    assert (record.status, record.error_code) == ("error", NOT_PUBLISHED)
    await store.record_queued(queued("j", host="10.9.9.9"))
    record = await store.get_job("j")
    assert record is not None
    assert (record.status, record.error_code, record.host) == ("queued", None, "10.9.9.9")


async def test_an_answered_job_is_never_marked_not_published(store: Store) -> None:
    await store.record_queued(queued("j"))
    await store.apply_results([result("j")])
    assert not await store.mark_not_published("j")
    record = await store.get_job("j")
    assert record is not None
    assert record.status == "ok"


async def test_queued_jobs_past_deadline_and_grace_become_overdue(store: Store) -> None:
    await store.record_queued(queued("short", timeout=10))
    await store.record_queued(queued("long", timeout=100))
    clock(store).now = T0 + timedelta(seconds=69)
    assert await store.mark_overdue(grace=60) == 0
    clock(store).now = T0 + timedelta(seconds=71)
    assert await store.mark_overdue(grace=60) == 1
    short, long = await store.get_job("short"), await store.get_job("long")
    assert short is not None
    assert long is not None
    assert (short.status, long.status) == ("overdue", "queued")
    assert (await store.count_status("overdue"), await store.count_status("queued")) == (1, 1)
    # A late answer still lands.
    await store.apply_results([result("short")])
    short = await store.get_job("short")
    assert short is not None
    assert short.status == "ok"


async def test_search_filters_and_pages_newest_first(store: Store) -> None:
    for n in range(7):
        clock(store).now = T0 + timedelta(minutes=n)
        host = "10.0.0.1" if n % 2 else "10.0.0.2"
        await store.record_queued(queued(f"j{n}", host=host, satellite_id=f"s{n % 3}"))
    clock(store).now = T0 + timedelta(minutes=10)
    await store.apply_results([result("j3", status="error"), result("other")])

    everything = await store.search(JobFilter(), limit=100)
    assert [r.id for r in everything.items] == ["other", "j6", "j5", "j4", "j3", "j2", "j1", "j0"]
    assert everything.next_cursor is None

    pages, cursor = [], None
    for _ in range(10):
        page = await store.search(JobFilter(), limit=3, cursor=cursor)
        pages.append([r.id for r in page.items])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == [["other", "j6", "j5"], ["j4", "j3", "j2"], ["j1", "j0"]]

    async def ids(**kw: object) -> list[str]:
        return [r.id for r in (await store.search(JobFilter(**kw))).items]  # type: ignore[arg-type]

    assert await ids(host="10.0.0.1") == ["j5", "j3", "j1"]
    assert await ids(satellite_id="s0") == ["j6", "j3", "j0"]
    assert await ids(status="error", error_code="device_timeout") == ["j3"]
    assert await ids(source="amqp") == ["other"]
    assert await ids(kind="snmp.walk") == []
    since, until = T0 + timedelta(minutes=2), T0 + timedelta(minutes=4)
    assert await ids(since=since, until=until) == ["j3", "j2"]


async def test_a_foreign_cursor_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="not a cursor"):
        await store.search(JobFilter(), cursor="bm90LWEtY3Vyc29y")
    with pytest.raises(ValueError, match="not a cursor"):
        decode_cursor("%%%")


async def test_retention_deletes_old_rows_in_batches(store: Store) -> None:
    for n in range(25):
        clock(store).now = T0 + timedelta(hours=n)
        await store.record_queued(queued(f"j{n:02}"))
    clock(store).now = T0 + timedelta(days=1, hours=10)
    # Rows older than one day: created before T0 + 10 h.
    assert await store.purge(1, batch=4) == 10
    left = await store.search(JobFilter(), limit=1000)
    assert sorted(r.id for r in left.items) == [f"j{n:02}" for n in range(10, 25)]


async def test_retention_removes_exactly_the_rows_created_before_the_cutoff(store: Store) -> None:
    """A row created before now - retention goes, whatever its status or source; a row created
    at the cutoff or later stays; a late answer to an old job does not make it young."""
    cutoff = T0 + timedelta(days=1)
    clock(store).now = T0
    await store.apply_results([result(f"old-{n}") for n in range(5)])
    await store.record_queued(queued("old-queued"))
    clock(store).now = cutoff - timedelta(microseconds=1)
    await store.record_queued(queued("queued-just-before"))
    await store.apply_results([result("answered-just-before", status="error")])
    clock(store).now = cutoff
    await store.record_queued(queued("queued-at-cutoff"))
    await store.apply_results([result("answered-at-cutoff")])
    clock(store).now = cutoff + timedelta(hours=5)
    await store.apply_results([result("young"), result("old-0")])

    clock(store).now = cutoff + timedelta(days=1)
    assert await store.purge(1, batch=3) == 8
    left = await store.search(JobFilter(), limit=1000)
    assert sorted(r.id for r in left.items) == ["answered-at-cutoff", "queued-at-cutoff", "young"]
    assert await store.purge(1, batch=3) == 0


async def test_one_retention_pass_goes_on_past_a_thousand_batches(tmp_path: Path) -> None:
    """A pass ends when no old row is left, or when its time budget is spent (then the service
    comes back at the next sweep): it used to stop after 1,000 batches, at most a million rows
    an hour at the default batch, far below the ingest's 5,000 results/s."""
    # SQLite only: the loop is the same on PostgreSQL, and SQLite's transactions are cheaper.
    store = await Store.open(parse_database_url(f"sqlite:///{tmp_path / 'history.sqlite3'}"))
    try:
        store.clock = Clock()
        await store.apply_results([result(f"old-{n:04}") for n in range(1003)])
        clock(store).now = T0 + timedelta(days=2)
        # Out of time after its first batch: the pass says old rows are left.
        assert await store.purge(1, batch=1, max_seconds=0) == 1
        assert store.purge_pending
        assert await store.purge(1, batch=1, max_seconds=600) == 1002
        assert not store.purge_pending
    finally:
        await store.close()
