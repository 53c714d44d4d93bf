"""Schedules in a started `Core` (in process): real broker, real store (both databases).

Each job a schedule publishes is read back from the satellite's real queue by its id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import sqlalchemy as sa

from poller import wire
from satellite.cli import main as satellite_cli
from satellite.service.app import Core, create_app
from satellite.service.scheduler import LEASE_SECONDS, Claimed, db_now
from satellite.service.settings import DatabaseUrl, load_settings
from satellite.service.store import JobFilter, JobRecord, Store
from satellite.service.store.tables import jobs, metadata, schedule_outbox
from satellite.service.tokens import TokensFile
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

WAIT = 30.0


def schedules_yaml(
    sid: str, *, name: str = "ping", every: int = 2, targets: int = 5, **kw: Any
) -> str:
    extra = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in kw.items())
    hosts = ", ".join(f'{{host: "192.0.2.{n + 1}"}}' for n in range(targets))
    return (
        "schedules:\n"
        f"  - name: {name}\n"
        f"    satellite: {sid}\n"
        f"    every: {every}\n"
        "    kind: icmp.ping\n"
        "    timeout: 1\n"
        f"    targets: [{hosts}]\n" + extra
    )


class Queue:
    """The satellite's real job queue, read with basic_get (ids, properties, bodies)."""

    def __init__(self, dsn: str, sid: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(dsn))
        self.ch = self.conn.channel()
        self.name = wire.jobs_queue(sid)
        self.seen: list[tuple[pika.BasicProperties, dict[str, Any]]] = []

    def drain(self) -> list[tuple[pika.BasicProperties, dict[str, Any]]]:
        for _ in range(100_000):
            method, props, body = self.ch.basic_get(self.name, auto_ack=True)
            if method is None:
                break
            self.seen.append((props, json.loads(body)))
        return self.seen

    def ids(self) -> list[str]:
        return [body["id"] for _, body in self.drain()]

    def close(self) -> None:
        self.conn.close()


async def declare(dsn: str, sid: str) -> None:
    assert await asyncio.to_thread(satellite_cli, ["declare", sid, "--dsn", dsn]) == 0


@pytest.fixture
async def queue(amqp_vhost: AmqpVhost, sid: str) -> AsyncIterator[Queue]:
    await declare(amqp_vhost.dsn, sid)
    q = Queue(amqp_vhost.dsn, sid)
    yield q
    q.close()


Starter = Callable[..., Any]


@pytest.fixture
async def start_core(
    amqp_vhost: AmqpVhost, db_url: DatabaseUrl, tmp_path: Path
) -> AsyncIterator[Starter]:
    started: list[Core] = []

    async def start(schedules: Path) -> Core:
        settings = load_settings(
            {
                "US_AMQP_DSN": amqp_vhost.dsn,
                "USM_CORE_DB": db_url.url.render_as_string(hide_password=False),
                "USM_CORE_SCHEDULES_FILE": str(schedules),
            }
        )
        core = await Core.start(settings)
        assert await core.replies.broker.wait_ready(WAIT)
        started.append(core)
        return core

    yield start
    for core in started:
        if core.scheduler_task is not None and not core.scheduler_task.done():
            await core.stop()


async def until(check: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def watch(queue: Queue, seconds: float) -> None:
    """Read the queue for `seconds` (its jobs expire after one interval when nobody reads)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.to_thread(queue.drain)
        await asyncio.sleep(0.3)


def slot_of(job_id: str) -> int:
    return int(job_id.split(":")[1])


async def test_two_replicas_publish_every_slot_of_every_target_once(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path, db_url: DatabaseUrl
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, overlap="queue"))
    first = await start_core(path)
    second = await start_core(path)
    began = time.time()
    await watch(queue, 7)
    await first.stop()
    await second.stop()
    ended = time.time()
    seen = queue.drain()
    ids = [body["id"] for _, body in seen]
    assert len(ids) == len(set(ids)), "a job id was published twice"
    # What the replicas claimed is in the history (recorded before it is published). On a
    # loaded host a slot's last jobs may leave late, with little of their one-interval
    # expiration left, and expire in the queue before this test reads them: by design.
    store = await Store.open(db_url, run_migrations=False)
    try:
        page = await store.search(JobFilter(satellite_id=sid, source="schedule:ping"), limit=500)
    finally:
        await store.close()
    recorded = [r.id for r in page.items]
    assert set(ids) <= set(recorded)
    slots = sorted({slot_of(i) for i in recorded})
    # Every slot that was wholly inside the run has all 5 targets, once.
    whole = [s for s in slots if s >= began + 1 and s + 2 <= ended - 1]
    assert len(whole) >= 2, (recorded, began, ended)
    for slot in whole:
        assert sorted(i for i in recorded if slot_of(i) == slot) == sorted(
            f"ping:{slot}:192.0.2.{n + 1}" for n in range(5)
        )
    props, body = seen[0]
    assert props.message_id == body["id"]
    assert wire.RESENT_HEADER not in (props.headers or {})
    assert props.expiration == str(2000) or int(props.expiration) <= 2000
    job = wire.decode_job(json.dumps(body).encode())
    assert job.not_after is not None
    due = job.not_after.timestamp() - 2
    assert slot_of(job.id) <= due < slot_of(job.id) + 2


async def test_history_and_the_api(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=3600))
    core = await start_core(path)
    tokens = TokensFile(tmp_path / "tokens.yaml")
    admin, reader = tokens.create("a", ["admin"]), tokens.create("r", ["read"])
    transport = httpx.ASGITransport(app=create_app(core, tokens=tokens))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://core:8480", timeout=WAIT
    ) as api:
        as_reader = {"Authorization": f"Bearer {reader}"}
        as_admin = {"Authorization": f"Bearer {admin}"}
        listed = (await api.get("/v1/schedules", headers=as_reader)).json()["items"]
        assert [s["name"] for s in listed] == ["ping"]
        assert listed[0]["every"] == 3600
        assert listed[0]["next_fire"] is not None
        assert (await api.post("/v1/schedules/ping/run", headers=as_reader)).status_code == 403
        assert (await api.get("/v1/schedules/nope", headers=as_reader)).status_code == 404
        ran = await api.post(
            "/v1/schedules/ping/run", headers=as_admin, json={"target": "192.0.2.3"}
        )
        assert ran.status_code == 200, ran.text
        (job_id,) = ran.json()["published"]
        assert job_id.startswith("ping:run")
        assert job_id.endswith(":192.0.2.3")
        assert queue.ids() == [job_id]
        record = await core.store.get_job(job_id)
        assert record is not None
        assert (record.source, record.status, record.host) == (
            "schedule:ping",
            "queued",
            "192.0.2.3",
        )
        shown = (await api.get("/v1/schedules/ping", headers=as_reader)).json()
        assert shown["last_interval"]["sent"] == 1
        assert shown["last_interval"]["pending"] == 1
        paused = await api.post("/v1/schedules/ping/pause", headers=as_admin)
        assert paused.json()["paused"] is True
        assert paused.json()["next_fire"] is None
        resumed = await api.post("/v1/schedules/ping/resume", headers=as_admin)
        assert resumed.json()["paused"] is False


async def test_pause_is_kept_in_the_store_across_a_restart(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=1, targets=2, overlap="queue"))
    core = await start_core(path)
    assert core.scheduler is not None
    await core.scheduler.set_paused("ping", True)
    await core.stop()
    queue.drain()
    count = len(queue.seen)
    again = await start_core(path)
    assert again.scheduler is not None
    await watch(queue, 3)
    assert len(queue.seen) == count
    assert (await again.scheduler.stats("ping")).paused is True
    await again.scheduler.set_paused("ping", False)
    await until(lambda: len(queue.ids()) >= count + 2)


async def test_a_bad_file_is_refused_and_the_last_good_one_keeps_running(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=1, targets=1, overlap="queue"))
    core = await start_core(path)
    assert core.scheduler is not None
    path.write_text(schedules_yaml(sid, every=0, targets=1, colour="blue"))
    core.scheduler.file.hangup = True
    await until(lambda: core.scheduler is not None and core.scheduler.file.refused == 1)
    assert core.scheduler.file.problems == [
        f"{path}: schedule ping: colour: is not a schedule field",
        f"{path}: schedule ping: every: must be a whole number of seconds, 1 to 604800",
    ]
    queue.drain()
    count = len(queue.seen)
    await until(lambda: len(queue.ids()) >= count + 2)
    # A good file again is taken on its next change (no SIGHUP needed).
    path.write_text(schedules_yaml(sid, name="other", every=1, targets=1, overlap="queue"))
    await until(lambda: core.scheduler is not None and "other" in core.scheduler.file.schedules)


async def test_overlap_skip_counts_a_target_still_waiting(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    # No poller answers; each job's deadline (timeout 5 s) outlasts the next slot (every 1 s).
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=1, targets=2).replace("timeout: 1", "timeout: 5"))
    core = await start_core(path)
    assert core.scheduler is not None
    await watch(queue, 4)
    stats = await core.scheduler.stats("ping")
    assert stats.skipped.get("overlap", 0) >= 2
    ids = queue.ids()
    # One job per target until the first deadline has passed (5 s), not one per second.
    assert len(ids) <= 2 * 1 + 2


async def test_a_dead_replicas_claims_are_published_unless_answered(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=3600, targets=2))
    core = await start_core(path)
    scheduler = core.scheduler
    assert scheduler is not None
    schedule = scheduler.get("ping")
    engine = core.store.engine
    # A replica that claimed two jobs and died before publishing them (lease already expired):
    async with engine.begin() as conn:
        now = await db_now(conn)
        claimed = await scheduler._record(
            conn, schedule, [(now, t, 1000) for t in schedule.targets], now
        )
        await conn.execute(
            schedule_outbox.update().values(owner="dead", lease_until=now - LEASE_SECONDS)
        )
        # ... and one of them was published and answered before it died.
        await conn.execute(
            jobs.update().where(jobs.c.id == claimed[0].id).values(status="ok", answers=1)
        )
    assert all(isinstance(c, Claimed) for c in claimed)
    await until(lambda: queue.ids() != [])
    await asyncio.sleep(1.5)
    assert queue.ids() == [claimed[1].id]
    # Whether the dead replica published it is unknown: the copy says so, and a poller that
    # runs it a second time answers `redelivered: true`.
    props, _ = queue.seen[-1]
    assert (props.headers or {}).get(wire.RESENT_HEADER) is True
    async with engine.connect() as conn:
        left = (
            await conn.execute(sa.select(sa.func.count()).select_from(schedule_outbox))
        ).scalar_one()
    assert left == 0


async def test_migration_0003_builds_the_schedule_tables_of_tables_py(db_url: DatabaseUrl) -> None:
    store = await Store.open(db_url)
    try:

        def shape(conn: sa.Connection) -> dict[str, tuple[set[str], set[str]]]:
            inspector = sa.inspect(conn)
            return {
                name: (
                    {c["name"] for c in inspector.get_columns(name)},
                    {str(i["name"]) for i in inspector.get_indexes(name)},
                )
                for name in ("schedule_state", "schedule_outbox", "schedule_skips")
            }

        async with store.engine.connect() as conn:
            found = await conn.run_sync(shape)
    finally:
        await store.close()
    for name, (columns, indexes) in found.items():
        table = metadata.tables[name]
        assert columns == {c.name for c in table.columns}
        assert indexes == {str(i.name) for i in table.indexes}


async def test_not_after_and_expiration_keep_a_stopped_pollers_backlog_to_one_interval(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    # Nobody reads the queue (the satellite's poller is stopped) for 6 intervals of 1 s.
    path = tmp_path / "schedules.yaml"
    path.write_text(schedules_yaml(sid, every=1, targets=3, overlap="queue"))
    core = await start_core(path)
    assert core.scheduler is not None
    await asyncio.sleep(6)
    published = core.scheduler.published
    depth = queue.ch.queue_declare(queue.name, passive=True).method.message_count
    assert published >= 12
    assert depth <= 3 * 2, (depth, published)
    # What is still queued has not passed its not_after by more than the interval.
    now = time.time()
    for _, body in queue.drain():
        job = wire.decode_job(json.dumps(body).encode())
        assert job.not_after is not None
        assert job.not_after.timestamp() > now - 1.5


async def test_a_run_of_3000_targets_fits_the_databases_parameter_limits(
    start_core: Starter, queue: Queue, sid: str, tmp_path: Path
) -> None:
    # 3,000 history rows of 13 columns are more parameters than one PostgreSQL statement takes.
    (tmp_path / "many.csv").write_text("".join(f"10.9.{i // 250}.{i % 250}\n" for i in range(3000)))
    path = tmp_path / "schedules.yaml"
    path.write_text(
        schedules_yaml(sid, every=3600, targets=1, spread=False).replace(
            '    targets: [{host: "192.0.2.1"}]\n', "    targets_file: many.csv\n"
        )
    )
    core = await start_core(path)
    assert core.scheduler is not None
    published = await core.scheduler.run_now("ping")
    assert len(published) == 3000
    ids = queue.ids()
    assert sorted(ids) == sorted(published)


async def test_a_real_poller_answers_and_the_schedule_counts_the_answers(
    *,
    start_core: Starter,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    amqp_vhost: AmqpVhost,
    sid: str,
    tmp_path: Path,
) -> None:
    await declare(amqp_vhost.dsn, sid)
    await asyncio.to_thread(start_poller, sid)
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: sysname\n"
        f"    satellite: {sid}\n"
        "    every: 2\n"
        "    kind: snmp.get\n"
        "    params: {oids: [1.3.6.1.2.1.1.5.0]}\n"
        f"    auth: {{version: '2c', community: {snmpd.community}}}\n"
        "    timeout: 5\n"
        f"    targets: [{{host: {snmpd.host}, port: {snmpd.port}}}]\n"
    )
    core: Core = await start_core(path)
    assert core.scheduler is not None
    assert await core.ingest.broker.wait_ready(WAIT)

    async def answered() -> list[JobRecord]:
        where = JobFilter(source="schedule:sysname", status="ok")
        return (await core.store.search(where, limit=10)).items

    deadline = time.monotonic() + WAIT
    while len(records := await answered()) < 2:
        assert time.monotonic() < deadline, await core.scheduler.stats("sysname")
        await asyncio.sleep(0.5)
    for record in records:
        assert record.result is not None
        assert record.id.startswith("sysname:")
        assert record.id.endswith(f":{snmpd.host}:{snmpd.port}")
        assert record.answers == 1
