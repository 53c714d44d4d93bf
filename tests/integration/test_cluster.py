"""Losing a broker node for good: pollers on a private 3-node RabbitMQ cluster (issue 13).

Two satellites' pollers list all three nodes in `US_AMQP_DSN` and connect to node 1; their job
queues, dead-letter queues and the core's result queue are declared through node 1, so node 1
leads them (quorum) or is their home (classic). `fresh` runs with today's defaults (every queue
quorum); `legacy` finds the classic dead-letter queue an older version made on node 1. With
jobs queued, node 1 is SIGKILLed and stays down: both pollers must consume again through a
surviving node within `RECOVERY_S`, and every job must be answered. The core's side (jobs in,
results out) talks to node 2 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pika
import pytest

from poller import wire
from poller.broker import NACKS_BEFORE_RECONNECT, Broker, BrokerOptions, Topology
from poller.broker import properties as amqp_properties
from poller.config import parse_dsn
from poller.errors import BrokerUnavailableError, PublishNotConfirmedError
from poller.health import check
from tests.support.poller_proc import JobClient, PollerFactory, PollerProcess, snmp_job
from tests.support.rabbitmq_cluster import Cluster
from tests.support.snmpd import Snmpd
from tests.support.tls_broker import _listening

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

#: Jobs per satellite, queued before node 1 is lost.
JOBS = 1000
#: How soon a poller must consume again through a surviving node.
RECOVERY_S = 30.0


@pytest.fixture
def pollers(cluster: Cluster, tmp_path: Path) -> Iterator[PollerFactory]:
    """`poller run` processes whose DSN lists the three nodes, node 1 first."""
    factory = PollerFactory(cluster.node(1).vhost, tmp_path)
    yield factory
    for poller in factory.started:
        poller.kill()


def _sid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _start(
    pollers: PollerFactory, cluster: Cluster, sid: str, *, wait: bool = True
) -> PollerProcess:
    # One job at a time (each waits for its result's confirm): jobs stay queued for a while.
    return pollers(
        sid, wait=wait, amqp_dsn=cluster.dsn(1, 2, 3), concurrency=1, prefetch=1, heartbeat=5
    )


def _queue_jobs(url: str, snmpd: Snmpd, ids: dict[str, list[str]]) -> None:
    """Publish every job (no confirms: fast) and wait until the queues hold them all."""
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as conn:
        channel = conn.channel()
        for sid, job_ids in ids.items():
            for job_id in job_ids:
                channel.basic_publish(
                    wire.jobs_exchange(),
                    wire.jobs_routing_key(sid),
                    json.dumps(snmp_job(snmpd.host, snmpd.port, job_id=job_id)).encode(),
                    pika.BasicProperties(
                        content_type="application/json", delivery_mode=2, message_id=job_id
                    ),
                )
        deadline = time.monotonic() + 30
        for sid, job_ids in ids.items():
            depth = 0
            while depth < len(job_ids) and time.monotonic() < deadline:
                ok = channel.queue_declare(wire.jobs_queue(sid), passive=True)
                depth = ok.method.message_count
                conn.sleep(0.1)
            assert depth == len(job_ids), f"{sid}: {depth} of {len(job_ids)} jobs queued"


def _result_ids(url: str) -> set[str]:
    """Job ids of every result in the core's queue `usm_poller.results` (taken from it)."""
    ids = set()
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as conn:
        channel = conn.channel()
        for _ in range(100_000):
            method, _props, body = channel.basic_get(wire.results_queue(), auto_ack=True)
            if method is None:
                break
            ids.add(wire.decode_result(body).job_id)
    return ids


def _logged_at(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def _wait_connected(poller: PollerProcess, deadline: float) -> dict[str, object]:
    """The replica's first connection line, not its lane process's (the health file can say
    ready a moment before it is logged; a first attempt that failed under load makes it
    `broker_reconnected`)."""
    while time.monotonic() < deadline:
        lines = poller.replica_events("broker_connected") + poller.replica_events(
            "broker_reconnected"
        )
        if lines:
            return lines[0]
        time.sleep(0.1)
    raise AssertionError(f"poller {poller.satellite_id} logged no connection")


def _wait_reconnected(poller: PollerProcess, since: float, deadline: float) -> dict[str, object]:
    """The poller's first `broker_reconnected` line logged after `since` (wall clock)."""
    while time.monotonic() < deadline:
        for line in poller.replica_events("broker_reconnected"):
            if _logged_at(line) >= since:
                return line
        time.sleep(0.2)
    raise AssertionError(
        f"poller {poller.satellite_id} did not consume again within {RECOVERY_S:g} s of the "
        f"node's loss:\n" + "\n".join(poller.log_text().splitlines()[-30:])
    )


def test_losing_the_node_of_the_dead_letter_queues_and_of_the_connection(
    cluster: Cluster, pollers: PollerFactory, snmpd: Snmpd
) -> None:
    node1, node2 = cluster.node(1), cluster.node(2)
    fresh, legacy = _sid("fresh"), _sid("legacy")
    # An older version's classic dead-letter queue, on node 1.
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(node1.url()))) as conn:
        conn.channel().queue_declare(wire.dead_letter_queue(legacy), durable=True)

    # Each poller declares its topology through node 1, then stops so that jobs can queue up.
    for sid in (fresh, legacy):
        assert _start(pollers, cluster, sid).terminate() == 0
    held = cluster.queue_nodes()
    for queue in (
        wire.jobs_queue(fresh),
        wire.dead_letter_queue(fresh),
        wire.jobs_queue(legacy),
        wire.dead_letter_queue(legacy),
    ):
        assert held[queue] == node1.name, (queue, held)
    types = {
        row["name"]: row["type"]
        for row in json.loads(
            cluster.rabbitmqctl("list_queues", "name", "type", "--formatter", "json", "-q")
        )
    }
    assert types[wire.dead_letter_queue(fresh)] == "quorum"
    assert types[wire.dead_letter_queue(legacy)] == "classic"

    clients = {sid: JobClient(node2.url(), sid) for sid in (fresh, legacy)}
    try:
        ids = {sid: [f"{sid}-{n}" for n in range(JOBS)] for sid in clients}
        _queue_jobs(node2.url(), snmpd, ids)
        running = {sid: _start(pollers, cluster, sid, wait=False) for sid in (fresh, legacy)}
        for sid, poller in running.items():
            poller.wait_ready()
            connected = _wait_connected(poller, time.monotonic() + 10)
            assert f":{node1.port}/" in str(connected["broker"]), connected
            assert clients[sid].collect(1, timeout=30), f"{sid}: no result before the kill"

        killed_at = time.time()
        cluster.kill(1)

        deadline = time.monotonic() + RECOVERY_S
        for poller in running.values():
            line = _wait_reconnected(poller, killed_at, deadline)
            assert f":{node1.port}/" not in str(line["broker"]), line
            assert _logged_at(line) - killed_at < RECOVERY_S
            healthy, reason = check(poller.health_path)
            while not healthy and time.monotonic() < deadline:  # the file lags a little
                time.sleep(0.2)
                healthy, reason = check(poller.health_path)
            assert healthy, reason

        for sid, client in clients.items():
            results = client.collect_ids(ids[sid], timeout=120)
            by_id = {r.result.job_id: r.result for r in results}
            missing = set(ids[sid]) - set(by_id)
            assert not missing, f"{sid}: {len(missing)} jobs never answered"
            assert {r.status for r in by_id.values()} == {"ok"}
            # Jobs were still queued when node 1 went: some ran only after the reconnect.
            assert any(r.started_at.timestamp() > killed_at for r in by_id.values())
        assert node1.index in cluster.killed  # still down
        assert not _listening(node1.port)

        # The core's own result queue (quorum, led by node 1 until the loss) has them all too.
        in_results_queue = _result_ids(node2.url())
        for sid in clients:
            assert set(ids[sid]) <= in_results_queue, f"{sid}: results missing in the queue"

        # The fresh satellite's dead-letter queue lives on: a bad job still lands in it (and
        # no job was dead-lettered on the way).
        clients[fresh].publish(b"not json", message_id="bad-after-loss")
        deadline = time.monotonic() + 15
        dead: list[tuple[pika.BasicProperties, bytes]] = []
        while not dead and time.monotonic() < deadline:
            dead = clients[fresh].drain_dlq()
            time.sleep(0.2)
        assert [props.message_id for props, _ in dead] == ["bad-after-loss"], [
            (props.message_id, props.headers) for props, _ in dead[:3]
        ]
    finally:
        for client in clients.values():
            client.close()

    # Fresh: nothing to skip. Legacy: its classic DLQ, once as "other arguments" before the
    # loss and once per reconnect as "not found" (its node is down), and consumption went on.
    assert not running[fresh].replica_events("declare_skipped")
    skipped = running[legacy].replica_events("declare_skipped")
    assert {line["name"] for line in skipped} == {wire.dead_letter_queue(legacy)}
    after = [line for line in skipped if _logged_at(line) >= killed_at]
    assert after, skipped
    assert "home node" in str(after[0]["broker_says"])
    assert after[0]["bindings_skipped"] == 1


async def test_a_connection_whose_publishes_are_nacked_for_good_is_replaced(
    cluster: Cluster,
) -> None:
    """RabbitMQ 3.10 nacks every publish of a channel opened just after a quorum queue lost its
    leader (even once a new leader is elected); the poller reconnects instead of going on."""
    node1, node2 = cluster.node(1), cluster.node(2)
    tag = uuid.uuid4().hex[:8]
    queue, exchange, consumed = f"nack-q-{tag}", f"nack-x-{tag}", f"nack-jobs-{tag}"
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(node1.url()))) as conn:
        channel = conn.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        for name in (queue, consumed):
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue, exchange, "#")
    assert cluster.queue_nodes()[queue] == node1.name
    # Connected through node 2 before the loss; the first publish to the queue comes after it.
    broker = Broker(
        parse_dsn(node2.url()),
        BrokerOptions(connection_name="test_cluster", publish_timeout=10, declare=False),
        queue=consumed,
        topology=Topology(),
        on_delivery=lambda _d: None,
    )
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(30)
        cluster.kill(1)
        deadline = time.monotonic() + RECOVERY_S
        nacked = 0
        while True:
            try:
                await broker.publish(exchange, "k", b"{}", amqp_properties(message_id="m"))
                break
            except (PublishNotConfirmedError, BrokerUnavailableError):
                nacked += 1
                assert time.monotonic() < deadline, f"still nacked after {RECOVERY_S:g} s"
                await asyncio.sleep(0.05)
        if nacked >= NACKS_BEFORE_RECONNECT:  # the usual case here: it was replaced
            assert broker.reconnects >= 1
        assert broker.nack_rebuilds == 0  # reset by the ack
    finally:
        await broker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
