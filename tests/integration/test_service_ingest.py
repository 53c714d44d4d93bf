"""Result ingest with the real broker on both databases: results published as a poller publishes
them end up as history rows, once per job id, acked only after the commit."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pika
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from poller import wire
from poller.broker import BrokerOptions
from poller.config import parse_dsn
from satellite.dispatch import cli_correlation_id
from satellite.service.ingest import Ingest
from satellite.service.settings import DatabaseUrl
from satellite.service.store import JobRecord, QueuedJob, Store
from satellite.service.store.tables import jobs
from tests.support.database import pg_admin
from tests.support.rabbitmq import AmqpVhost, list_bindings, list_queues

pytestmark = pytest.mark.integration


def result_body(job_id: str, sid: str, *, status: str = "ok", worker: str = "w1") -> bytes:
    now = datetime.now(UTC)
    return wire.encode(
        wire.JobResult(
            job_id=job_id,
            kind="snmp.get",
            satellite_id=sid,
            worker=worker,
            status="ok" if status == "ok" else "error",
            data={"varbinds": []},
            error=None
            if status == "ok"
            else wire.ErrorInfo(code="device_timeout", message="silence", retryable=True),
            attempt=1,
            redelivered=False,
            started_at=now,
            finished_at=now,
            duration_ms=1.5,
        )
    )


@dataclass
class Publisher:
    """Publishes to `usm_poller.results` exactly as a poller does (confirms on)."""

    dsn: str
    conn: pika.BlockingConnection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(self.dsn))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.channel.exchange_declare(wire.results_exchange(), "topic", durable=True)

    def result(
        self,
        body: bytes,
        key: str,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            correlation_id=correlation_id,
        )
        self.channel.basic_publish(wire.results_exchange(), key, body, props)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.conn.close()


@pytest.fixture
def publisher(amqp_vhost: AmqpVhost) -> Iterator[Publisher]:
    pub = Publisher(amqp_vhost.dsn)
    yield pub
    pub.close()


@pytest.fixture
async def store(db_url: DatabaseUrl) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    yield opened
    await opened.close()


@dataclass
class IngestFactory:
    """Starts ingest replicas in this test's loop; stops what is left at the end."""

    store: Store
    dsn: str
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    running: list[Ingest] = field(default_factory=list)

    def __call__(self, *, linger: float = 0.05, retry_max: float = 0.5) -> Ingest:
        ingest = Ingest(
            self.store,
            parse_dsn(self.dsn),
            BrokerOptions(connection_name="test ingest", prefetch=400, backoff_max=1.0),
            batch=200,
            linger=linger,
            retry_initial=0.1,
            retry_max=retry_max,
        )
        self.running.append(ingest)
        self.tasks[id(ingest)] = asyncio.create_task(ingest.run())
        return ingest

    async def crash(self, ingest: Ingest) -> None:
        """Cancel the replica's work and close its connection, as a killed process would."""
        task = self.tasks[id(ingest)]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ingest.close()


@pytest.fixture
async def start_ingest(amqp_vhost: AmqpVhost, store: Store) -> AsyncIterator[IngestFactory]:
    factory = IngestFactory(store, amqp_vhost.dsn)
    yield factory
    for ingest in factory.running:
        await stop(ingest, factory.tasks[id(ingest)])


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not true after {timeout} s")


async def stop(ingest: Ingest, task: asyncio.Task[None]) -> None:
    if task.done():
        return
    await ingest.stop()
    async with asyncio.timeout(30):
        await task
    await ingest.close()


async def wait_for_rows(
    store: Store, ids: list[str], *, answers: int = 1, timeout: float = 30.0
) -> dict[str, JobRecord]:
    found: dict[str, JobRecord] = {}
    async with asyncio.timeout(timeout):
        while True:
            for job_id in ids:
                record = await store.get_job(job_id)
                if record is not None:
                    found[job_id] = record
            if len(found) == len(ids) and all(r.answers >= answers for r in found.values()):
                return found
            await asyncio.sleep(0.1)


async def test_the_history_queue_is_a_quorum_queue_bound_to_results_and_replies(
    amqp_vhost: AmqpVhost, start_ingest: IngestFactory
) -> None:
    ingest = start_ingest()
    assert await ingest.broker.wait_ready(30)
    queues = {q["name"]: q for q in list_queues(amqp_vhost.name)}
    assert queues["usm_poller.history"]["type"] == "quorum"
    assert queues["usm_poller.history"]["durable"] is True
    bindings = set(list_bindings(amqp_vhost.name))
    assert ("usm_poller.results", "usm_poller.history", "result.#") in bindings
    assert ("usm_poller.results", "usm_poller.history", "reply.#") in bindings


async def test_published_results_become_rows_and_a_copy_counts_as_an_answer(
    store: Store, publisher: Publisher, start_ingest: IngestFactory, sid: str
) -> None:
    ingest = start_ingest()
    assert await ingest.broker.wait_ready(30)
    ids = [f"{sid}-{n}" for n in range(50)]
    for n, job_id in enumerate(ids):
        status = "error" if n % 5 == 0 else "ok"
        publisher.result(
            result_body(job_id, sid, status=status), wire.result_routing_key(sid, "snmp.get")
        )
    # One of them again (a redelivered result), and one as an RPC reply.
    publisher.result(result_body(ids[1], sid), wire.result_routing_key(sid, "snmp.get"))
    publisher.result(result_body(f"{sid}-reply", sid), wire.reply_routing_key(sid, "amq.gen-x"))
    rows = await wait_for_rows(store, [*ids, f"{sid}-reply"])
    assert {r.source for r in rows.values()} == {"amqp"}
    assert rows[ids[0]].status == "error"
    assert rows[ids[0]].error_code == "device_timeout"
    assert rows[ids[2]].status == "ok"
    rows = await wait_for_rows(store, [ids[1]], answers=2)
    assert rows[ids[1]].answers == 2
    assert (await store.get_job(ids[2])) is not None
    assert ingest.stats.malformed == 0


async def test_results_of_toolkit_jobs_are_source_cli_and_others_amqp(
    store: Store, publisher: Publisher, start_ingest: IngestFactory, sid: str
) -> None:
    # The poller copies a job's correlation id into its result; the toolkit marks its own.
    ingest = start_ingest()
    assert await ingest.broker.wait_ready(30)
    key = wire.result_routing_key(sid, "snmp.get")
    marks = {
        f"{sid}-cli": cli_correlation_id(),
        f"{sid}-other": "core-17",
        f"{sid}-none": None,
        f"{sid}-lookalike": "satellite-client.1",
    }
    for job_id, correlation_id in marks.items():
        publisher.result(result_body(job_id, sid), key, correlation_id=correlation_id)
    rows = await wait_for_rows(store, list(marks))
    assert {job_id: row.source for job_id, row in rows.items()} == {
        f"{sid}-cli": "cli",
        f"{sid}-other": "amqp",
        f"{sid}-none": "amqp",
        f"{sid}-lookalike": "amqp",
    }
    # A job the history knows already keeps its source (the service recorded it first).
    await store.record_queued(
        QueuedJob(
            id=f"{sid}-api",
            satellite_id=sid,
            kind="snmp.get",
            host="h",
            port=None,
            source="api",
            submitted_at=datetime.now(UTC),
            timeout=5.0,
        )
    )
    publisher.result(result_body(f"{sid}-api", sid), key, correlation_id=cli_correlation_id())
    rows = await wait_for_rows(store, [f"{sid}-api"], answers=1)
    assert rows[f"{sid}-api"].source == "api"


async def test_a_malformed_result_is_acked_and_counted_without_its_body(
    store: Store,
    publisher: Publisher,
    start_ingest: IngestFactory,
    amqp_vhost: AmqpVhost,
    sid: str,
) -> None:
    ingest = start_ingest()
    assert await ingest.broker.wait_ready(30)
    secret = f"community-{uuid.uuid4().hex}"
    with capture_logs() as logs:
        publisher.result(f'{{"not": "{secret}"'.encode(), "result.x.y", message_id="bad-1")
        publisher.result(result_body(f"{sid}-after", sid), wire.result_routing_key(sid, "k"))
        await wait_for_rows(store, [f"{sid}-after"])
    assert ingest.stats.malformed == 1
    assert [e["message_id"] for e in logs if e["event"] == "result_malformed"] == ["bad-1"]
    assert secret not in repr(logs)
    async with asyncio.timeout(30):
        while True:
            depth = {q["name"]: q["messages"] for q in list_queues(amqp_vhost.name)}
            if depth["usm_poller.history"] == 0:
                break
            await asyncio.sleep(0.2)


async def test_results_published_while_no_replica_runs_are_archived_when_one_starts(
    store: Store, publisher: Publisher, start_ingest: IngestFactory, sid: str
) -> None:
    first = start_ingest()
    assert await first.broker.wait_ready(30)  # the queue exists from now on
    await first.stop()
    await first.close()
    ids = [f"{sid}-offline-{n}" for n in range(20)]
    for job_id in ids:
        publisher.result(result_body(job_id, sid), wire.result_routing_key(sid, "snmp.get"))
    await asyncio.sleep(0.5)
    assert all([await store.get_job(job_id) is None for job_id in ids])
    start_ingest()
    rows = await wait_for_rows(store, ids)
    assert sorted(rows) == sorted(ids)


async def test_a_committed_group_is_acked_with_one_ack(
    store: Store,
    publisher: Publisher,
    start_ingest: IngestFactory,
    amqp_vhost: AmqpVhost,
    sid: str,
) -> None:
    """Groups are committed in order and each is the oldest unacked run of the channel: one
    `basic.ack` with `multiple` per group, not one per result, and none left unacked."""
    first = start_ingest()
    assert await first.broker.wait_ready(30)  # the queue exists from now on
    await first.stop()
    await first.close()
    ids = [f"{sid}-grouped-{n}" for n in range(120)]
    for job_id in ids:
        publisher.result(result_body(job_id, sid), wire.result_routing_key(sid, "snmp.get"))
    ingest = start_ingest(linger=0.2)
    rows = await wait_for_rows(store, ids)
    assert sorted(rows) == sorted(ids)
    await eventually(lambda: ingest.stats.results == len(ids))
    assert ingest.stats.acks == ingest.stats.commits < len(ids)
    async with asyncio.timeout(30):
        while True:
            (queue,) = [
                q
                for q in list_queues(amqp_vhost.name, "name", "messages")
                if q["name"] == "usm_poller.history"
            ]
            if queue["messages"] == 0:  # ready and unacked: every result was acked
                break
            await asyncio.sleep(0.2)


async def test_a_database_that_is_down_stops_acks_and_nothing_is_lost(
    db_url: DatabaseUrl,
    store: Store,
    publisher: Publisher,
    start_ingest: IngestFactory,
    sid: str,
) -> None:
    """While the database refuses connections nothing is acked: a replica that dies then
    leaves every result to the next one, and one that lives on writes them when it is back."""
    if db_url.dialect != "postgresql":
        pytest.skip("PostgreSQL: its connections can be refused and cut from outside")
    name = db_url.url.database
    dying = start_ingest(retry_max=0.5)
    assert await dying.broker.wait_ready(30)
    await store.engine.dispose()
    await pg_admin(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )
    try:
        ids = [f"{sid}-down-{n}" for n in range(10)]
        for job_id in ids:
            publisher.result(result_body(job_id, sid), wire.result_routing_key(sid, "snmp.get"))
        await eventually(lambda: dying.stats.db_failures >= 2)
        # The replica dies (its connection closes) while the database is still down.
        await start_ingest.crash(dying)
        survivor = start_ingest(retry_max=0.5)
        assert await survivor.broker.wait_ready(30)
        await eventually(lambda: survivor.stats.db_failures >= 2)
    finally:
        await pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    rows = await wait_for_rows(store, ids)
    assert {r.answers for r in rows.values()} == {1}
    assert survivor.stats.results == 10
    assert dying.stats.results == 0


async def test_text_postgresql_cannot_hold_is_set_aside_and_the_rest_is_written(
    db_url: DatabaseUrl,
    store: Store,
    publisher: Publisher,
    start_ingest: IngestFactory,
    sid: str,
) -> None:
    ingest = start_ingest(linger=0.5)
    assert await ingest.broker.wait_ready(30)
    key = wire.result_routing_key(sid, "snmp.get")
    # JSON allows \u0000; PostgreSQL's text and jsonb do not.
    poison = result_body(f"{sid}-nul", sid).replace(b'"worker":"w1"', b'"worker":"w\\u00001"')
    publisher.result(result_body(f"{sid}-a", sid), key)
    publisher.result(poison, key)
    publisher.result(result_body(f"{sid}-b", sid), key)
    await wait_for_rows(store, [f"{sid}-a", f"{sid}-b"])
    if db_url.dialect == "postgresql":
        await eventually(lambda: ingest.stats.unstorable >= 1)
        assert await store.get_job(f"{sid}-nul") is None
    else:
        await wait_for_rows(store, [f"{sid}-nul"])


async def test_two_replicas_one_crashing_write_each_result_once(
    db_url: DatabaseUrl, store: Store, publisher: Publisher, start_ingest: IngestFactory, sid: str
) -> None:
    """Two replicas share the queue; one dies (cancelled mid-group, its connection closed) while
    results flow: every result ends up as exactly one row, none lost, none doubled (a result the
    dead replica committed but did not ack counts a second answer on its row)."""
    if db_url.dialect != "postgresql":
        pytest.skip("several replicas share a store on PostgreSQL")
    dying, surviving = start_ingest(), start_ingest()
    assert await dying.broker.wait_ready(30)
    assert await surviving.broker.wait_ready(30)
    key = wire.result_routing_key(sid, "snmp.get")
    ids = [f"{sid}-r-{n:04}" for n in range(1000)]
    bodies = [result_body(job_id, sid) for job_id in ids]

    def publish(part: list[bytes]) -> None:
        for body in part:
            publisher.result(body, key)

    await asyncio.to_thread(publish, bodies[:500])
    await eventually(lambda: dying.stats.commits >= 1)
    await start_ingest.crash(dying)
    await asyncio.to_thread(publish, bodies[500:])
    mine = jobs.c.id.like(f"{sid}-r-%")

    async def count() -> int:
        async with store.engine.connect() as conn:
            found = await conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(mine))
        return int(found or 0)

    for _ in range(300):
        if await count() >= len(ids):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # nothing more arrives
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(jobs.c.id, jobs.c.answers).where(mine))).all()
    assert sorted(job_id for job_id, _ in rows) == ids  # one row per result: none lost or doubled
    assert all(answers >= 1 for _, answers in rows)
    # Every write counted an answer (the dead replica may have committed a group it never
    # counted nor acked: that group was written again by the survivor, as second answers).
    assert sum(answers for _, answers in rows) >= dying.stats.results + surviving.stats.results
