"""Scenarios 4 and 5 of issue 17: broker nodes SIGKILLed under load.

4. A lone private broker node (never the machine's broker) is SIGKILLed and started again
   several times while jobs stream: nothing confirmed is lost, every poller consumes again
   within `CONSUMERS_BACK_S` of each restart, and no poller exits.
5. The session's private 3-node cluster (`tests/support/rabbitmq_cluster.py`), pollers given
   all three URLs: kill (a) the job queue's leader, (b) the node the pollers are connected to,
   (c) the node that holds a classic object (an RPC caller's reply queue), (d) two nodes of
   three (the minority left refuses or holds publishes; nothing is lost when they return).

The core's side is the core's own client (`satellite.client.Client`): it fails over between
the URLs and bounds every confirm, so a publish while the broker is down is recorded as
unconfirmed. Results are collected from a quorum queue of the test's own, acked after they are
recorded (a copy redelivered to the collector is recorded once). Short versions by default;
`USM_FAULTS_LONG=1` (bench/faults.py --long) runs the long ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from poller import wire
from poller.errors import BrokerError
from poller.health import check as health_check
from satellite.client import Client
from satellite.config import CoreSettings
from tests.faults.checker import Observation, PublishedJob, Report, assert_invariants, check
from tests.faults.device import CountingAgent, oid_for
from tests.faults.harness import (
    LONG,
    Collector,
    Fleet,
    Publisher,
    counting_job,
    executions_by_job,
    scale,
)
from tests.faults.node import FaultNode
from tests.support.poller_proc import JobClient, PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.rabbitmq_cluster import Cluster

pytestmark = pytest.mark.timeout(300 if not LONG else 1800)

#: Settings of every scenario poller: heartbeats of 5 s (a dead node is noticed at once anyway:
#: its TCP connections are reset), a small window, all jobs to the one counting device.
POLLER: dict[str, str | int | float] = {
    "concurrency": 16,
    "per_device_concurrency": 16,
    "shutdown_grace": 5,
    "heartbeat": 5,
}
#: How soon after a node is back every poller must consume again (issue 17, scenario 4).
CONSUMERS_BACK_S = 15.0
#: How long the core waits for a confirm before it counts a publish as unconfirmed.
CONFIRM_TIMEOUT = 3.0


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.heartbeat = 10
    params.blocked_connection_timeout = 30
    params.socket_timeout = 3
    params.stack_timeout = 5
    return pika.BlockingConnection(params)


class CorePublisher(Publisher):
    """Publishes through the core's client (failover over `urls`, bounded confirms)."""

    def __init__(
        self, urls: list[str], sid: str, obs: Observation, *, reply_to: str | None = None
    ) -> None:
        super().__init__(urls[0], sid, obs)
        settings = CoreSettings.from_dsn(
            ",".join(urls),
            connect_timeout=2.0,
            connect_retry_timeout=3.0,
            operation_timeout=CONFIRM_TIMEOUT,
            connection_name="faults-core",
        )
        self._client = Client(settings)
        self._reply_to = reply_to
        #: Monotonic time each confirmed job's confirm came back.
        self.confirmed_at: dict[str, float] = {}
        #: Jobs the client sent a second time after a lost connection (its one retry).
        self.resent: list[str] = []
        self.stop = threading.Event()

    def publish_job(self, job: dict[str, Any], **_props: Any) -> bool:
        at = time.monotonic()
        request = wire.decode_job(json.dumps(job).encode())
        client, reply_to = self._client, self._reply_to
        sends = itertools.count()

        def send() -> None:
            # As `Client.submit` does: the second send of a job is marked resent.
            again = next(sends) > 0
            if again:
                self.resent.append(request.id)
            client._publish(self._sid, request, reply_to=reply_to, resent=again)

        try:
            # submit() takes no reply_to, and call() waits for the answer: the client's own parts.
            client._with_reconnect(
                send,
                retry=request.idempotent,
            )
            confirmed = True
        except BrokerError:
            confirmed = False
        if confirmed:
            self.confirmed_at[request.id] = time.monotonic()
        self._obs.published.append(PublishedJob(request.id, confirmed, at, request.idempotent))
        return confirmed

    def endless(self, port: int) -> Iterator[dict[str, Any]]:
        """Counting jobs until `stop` is set."""
        for n in itertools.count():
            if self.stop.is_set():
                return
            yield counting_job(self._sid, n, port)

    def close(self) -> None:
        self.stop.set()
        self._client.close()


class FailoverCollector(Collector):
    """Collects results from a quorum queue of its own, over several URLs; acks each after
    recording it, and records a copy redelivered to it only once."""

    def __init__(self, urls: list[str], sid: str, obs: Observation) -> None:
        super().__init__(urls[0], sid, obs)
        self._urls = urls
        self._seen: set[bytes] = set()
        self.copies = 0

    def __enter__(self) -> FailoverCollector:
        super().__enter__()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for url in self._urls:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError), _connect(url) as conn:
                conn.channel().queue_delete(self.queue)
                return

    def _declare(self, ch: Any) -> None:
        ch.exchange_declare(wire.results_exchange(), "topic", durable=True)
        ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.queue, wire.results_exchange(), f"result.{self._sid}.#")
        ch.queue_bind(self.queue, wire.results_exchange(), f"reply.{self._sid}.#")

    def _run(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            try:
                with _connect(self._urls[n % len(self._urls)]) as conn:
                    ch = conn.channel()
                    self._declare(ch)
                    ch.basic_qos(prefetch_count=200)
                    self._ready.set()
                    for method, _props, body in ch.consume(self.queue, inactivity_timeout=0.2):
                        if self._stop.is_set():
                            break
                        if method is not None:
                            digest = hashlib.sha256(body).digest()
                            if digest in self._seen:
                                self.copies += 1
                            else:
                                self._seen.add(digest)
                                self._record(body)
                            ch.basic_ack(method.delivery_tag)
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        ch.cancel()
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.errors.append(exc)
                time.sleep(0.3)


@dataclass
class Run:
    """One scenario run: the fleet, the core's side, and what they observed."""

    obs: Observation
    fleet: Fleet
    publisher: CorePublisher
    collector: FailoverCollector
    stream: threading.Thread
    #: Seconds from each node's return until every poller consumed again.
    consumers_back: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        """Wait, restarting pollers that exited (there should be none)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.fleet.supervise()
            time.sleep(0.05)

    def consuming(self) -> list[bool]:
        return [health_check(p.health_path)[0] for p in self.fleet.slots]

    def wait_consuming(self, timeout: float) -> float | None:
        """Seconds until every poller is connected and consuming; None after `timeout`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.fleet.supervise()
            if all(self.consuming()):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def wait_not_consuming(self, timeout: float = 10.0) -> None:
        """Until no poller says it consumes (they saw the connection drop), at most `timeout`."""
        deadline = time.monotonic() + timeout
        while any(self.consuming()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self, name: str, agent: CountingAgent, timeout: float = 120.0) -> Report:
        """Stop the stream, wait for every confirmed job's answer, check."""
        self.publisher.stop.set()
        self.stream.join(30)
        assert not self.stream.is_alive(), "the core's publisher is stuck"
        confirmed = {p.job_id for p in self.obs.published if p.confirmed}
        deadline = time.monotonic() + timeout
        missing = set(confirmed)
        while missing and time.monotonic() < deadline:
            self.fleet.supervise()
            missing = self.collector.wait_for(missing, timeout=1.0, settle=0.0)
        self.collector.wait_for((), timeout=0, settle=2.0)
        self.obs.executions = executions_by_job(self.fleet.sid, agent.executions())
        return check(name, self.obs)


@contextlib.contextmanager
def _running(
    factory: PollerFactory,
    sid: str,
    *,
    poller_dsn: str,
    core_urls: list[str],
    agent: CountingAgent,
    rate: float,
    reply_to: str | None = None,
) -> Iterator[Run]:
    """Three pollers on `poller_dsn`, the core streaming jobs at `rate`/s through `core_urls`."""
    obs = Observation()
    fleet = Fleet(factory, sid, 3, {**POLLER, "amqp_dsn": poller_dsn})
    fleet.start()
    publisher = CorePublisher(core_urls, sid, obs, reply_to=reply_to)
    try:
        with FailoverCollector(core_urls, sid, obs) as collector:
            stream = publisher.stream(publisher.endless(agent.port), rate)
            try:
                yield Run(obs, fleet, publisher, collector, stream)
            finally:
                publisher.stop.set()
                stream.join(30)
    finally:
        publisher.close()
        for poller in fleet.slots:
            poller.kill()


def _report(run: Run, report: Report, fault_report: Callable[[Report], None]) -> None:
    fault_report(report)
    assert_invariants(report)
    assert not run.fleet.exits, f"pollers exited: {run.fleet.exits}"
    assert report.unexpected == 0


# ---------------------------------------------------------------------------- scenario 4


@pytest.mark.cluster
def test_lone_broker_killed_and_restarted_loses_nothing(
    fault_node: FaultNode,
    tmp_path: Path,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 4: the only broker node (the private node the fault scenarios share) SIGKILLed
    and started again under load, N times."""
    node = fault_node
    restarts, gap = scale(2, 10), float(scale(3, 20))
    factory = PollerFactory(node.vhost, tmp_path)
    with _running(
        factory, sid, poller_dsn=node.url(), core_urls=[node.url()], agent=agent, rate=20
    ) as run:
        for _ in range(restarts):
            run.sleep(gap)
            run.obs.faults.append(time.monotonic())
            node.kill()
            run.wait_not_consuming()
            node.start()
            back = run.wait_consuming(60)
            run.consumers_back.append(float("inf") if back is None else back)
        run.sleep(2.0)
        report = run.finish(f"4 lone broker SIGKILLed x{restarts}", agent)
    _report(run, report, fault_report)
    assert report.answered == report.confirmed > 0
    assert max(run.consumers_back) <= CONSUMERS_BACK_S, run.consumers_back
    for poller in run.fleet.slots:
        assert len(poller.events("broker_reconnected")) >= restarts, poller.log_text()[-3000:]


# ---------------------------------------------------------------------------- scenario 5


@pytest.fixture(scope="module")
def cluster_vhost(rabbitmq_cluster: Cluster) -> Iterator[str]:
    """A vhost of this module's own on the session's cluster (deleted after)."""
    vhost = f"faults-{uuid.uuid4().hex[:8]}"
    rabbitmq_cluster.heal()
    rabbitmq_cluster.rabbitmqctl("add_vhost", vhost)
    rabbitmq_cluster.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    rabbitmq_cluster.heal()
    with contextlib.suppress(RuntimeError, AssertionError):
        rabbitmq_cluster.rabbitmqctl("delete_vhost", vhost)


def _urls(cluster: Cluster, vhost: str, *order: int) -> list[str]:
    return [cluster.node(i).url(vhost) for i in order]


def _declare(cluster: Cluster, vhost: str, sid: str, node: int) -> None:
    """Declare the satellite's topology through `node` (its quorum queues' leader)."""
    with Client(CoreSettings.from_dsn(cluster.node(node).url(vhost))) as client:
        client.declare([sid])


def _holders(cluster: Cluster, vhost: str) -> dict[str, int]:
    """{quorum queue: the node that leads it}, in one rabbitmqctl call (`Cluster.queue_nodes`
    makes one per node, and is needed for classic queues)."""
    out = cluster.rabbitmqctl(
        "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", "-q"
    )
    held: dict[str, int] = {}
    for row in json.loads(out or "[]"):
        where = str(row.get("leader") or "")
        for node in cluster.nodes:
            if node.name in where:
                held[str(row["name"])] = node.index
                break
    return held


def _restart_in_background(cluster: Cluster, *nodes: int) -> threading.Thread:
    thread = threading.Thread(target=cluster.start, args=nodes, name="node-start", daemon=True)
    thread.start()
    return thread


KINDS = ("leader", "connected", "classic", "minority")


@dataclass
class Loss:
    """One loss of scenario 5: which nodes, when; its jobs are those published in its window
    (from the end of the loss before it until every poller consumed again after this one)."""

    kind: str
    victims: tuple[int, ...]
    start: float
    fault: float = 0.0
    #: When the killed nodes were started again (the end of the minority's window).
    restarting: float = 0.0
    end: float = math.inf


def _pollers_node(cluster: Cluster, fleet: Fleet) -> int:
    """The node most of the fleet's pollers are connected to now (their last connect line)."""
    ports = {node.port: node.index for node in cluster.nodes}
    on: Counter[int] = Counter()
    for poller in fleet.slots:
        connects = [
            line
            for line in poller.log_lines()
            if line.get("event") in {"broker_connected", "broker_reconnected"}
        ]
        if connects:
            port = int(str(connects[-1].get("broker", "")).rsplit(":", 1)[1].split("/", 1)[0])
            on[ports[port]] += 1
    assert on, "no poller said where it is connected"
    return on.most_common(1)[0][0]


class ReplyQueue:
    """An RPC caller's reply queue (classic, exclusive) on node 3, as satellite's ReplyQueue
    makes one; the core's jobs name it, so their results are routed there as well. Losing
    node 3 loses it with its connection: `open()` declares it again."""

    def __init__(self, cluster: Cluster, vhost: str) -> None:
        self.cluster, self.vhost = cluster, vhost
        self.name = f"faults-reply-{uuid.uuid4().hex[:8]}"
        self._conn: pika.BlockingConnection | None = None

    def open(self) -> None:
        if self._conn is not None:
            # An idle BlockingConnection notices that its node went only when it reads.
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                self._conn.process_data_events(0)
            if self._conn.is_open:
                return
        self._conn = _connect(self.cluster.node(3).url(self.vhost))
        ch = self._conn.channel()
        ch.queue_declare(
            self.name, exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
        )
        ch.queue_bind(self.name, wire.results_exchange(), wire.reply_binding_key(self.name))

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                self._conn.close()


def _victims(kind: str, run: Run, cluster: Cluster, vhost: str) -> tuple[int, ...]:
    if kind == "leader":
        return (_holders(cluster, vhost)[wire.jobs_queue(run.fleet.sid)],)
    if kind == "connected":
        return (_pollers_node(cluster, run.fleet),)
    if kind == "classic":
        return (3,)  # the reply queue's node (and the core's first URL)
    return (1, 2)  # the minority: node 3 is left alone


def _part(obs: Observation, losses: list[Loss]) -> Observation:
    """What the jobs published in these losses' windows saw; their faults."""
    ids = {p.job_id for p in obs.published if any(loss.start <= p.at < loss.end for loss in losses)}
    return Observation(
        published=[p for p in obs.published if p.job_id in ids],
        answers=[a for a in obs.answers if a.job_id in ids],
        executions={k: n for k, n in (obs.executions or {}).items() if k in ids},
        faults=[loss.fault for loss in losses],
    )


@pytest.mark.cluster
# The core's client (kombu/py-amqp) can leave a socket unclosed when the node it connects to
# is lost or in a minority; garbage-collected later, it is an unraisable ResourceWarning in
# whatever test runs then. A leak on the core's side, not a lost job: reported, not fixed here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cluster_node_loss_loses_nothing(  # noqa: PLR0917 - pytest fixtures
    cluster: Cluster,
    cluster_vhost: str,
    tmp_path: Path,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 5, one fleet and one stream for the four losses in turn: the job queue's leader
    is node 1 (declared there), the pollers list all three nodes and connect to node 2, the
    core talks to node 3 first, an RPC caller's classic reply queue is on node 3. (a) the job
    queue's leader, (b) the pollers' node, (c) node 3, (d) nodes 1 and 2 are killed, each
    time started again before the next loss; long: the four losses three times over. Each
    loss's jobs (those published in its window) are checked on their own, and all together."""
    vhost = cluster_vhost
    _declare(cluster, vhost, sid, node=1)
    reply = ReplyQueue(cluster, vhost)
    reply.open()
    assert _holders(cluster, vhost)[wire.jobs_queue(sid)] == 1
    on_3 = cluster.rabbitmqctl(
        "list_queues", "-p", vhost, "--local", "name", "--formatter", "json", "-q", node=3
    )
    assert reply.name in {row["name"] for row in json.loads(on_3 or "[]")}
    down = float(scale(3, 20))
    factory = PollerFactory(cluster.node(2).vhost, tmp_path)
    losses: list[Loss] = []
    try:
        with _running(
            factory,
            sid,
            poller_dsn=",".join(_urls(cluster, vhost, 2, 3, 1)),
            core_urls=_urls(cluster, vhost, 3, 1, 2),
            agent=agent,
            rate=scale(25, 40),
            reply_to=reply.name,
        ) as run:
            start = 0.0
            for kind in KINDS * scale(1, 3):
                if kind == "classic":
                    reply.open()
                run.sleep(2.0)
                loss = Loss(kind, _victims(kind, run, cluster, vhost), start)
                losses.append(loss)
                loss.fault = time.monotonic()
                run.obs.faults.append(loss.fault)
                for node in loss.victims:
                    cluster.kill(node)
                run.sleep(down)
                loss.restarting = time.monotonic()
                starting = _restart_in_background(cluster, *loss.victims)
                run.sleep(1.0)
                starting.join(90)
                assert not starting.is_alive(), f"{kind}: the killed nodes did not start again"
                back = run.wait_consuming(60)
                run.consumers_back.append(float("inf") if back is None else back)
                loss.end = start = time.monotonic()
            losses[-1].end = math.inf  # the last window: until the stream stops
            run.sleep(2.0)
            whole = run.finish("5 cluster: every loss", agent)
    finally:
        reply.close()
    reports = []
    for letter, kind in zip("abcd", KINDS, strict=True):
        mine = [loss for loss in losses if loss.kind == kind]
        times = f" x{len(mine)}" if len(mine) > 1 else ""
        report = check(f"5{letter} cluster: kill the {kind}{times}", _part(run.obs, mine))
        fault_report(report)
        reports.append(report)
    print(
        "scenario 5: victims "
        + ", ".join(f"{loss.kind} {loss.victims}" for loss in losses)
        + f"; every poller consuming again {[round(b, 1) for b in run.consumers_back]} s after"
    )
    for report in (*reports, whole):
        assert_invariants(report)
        assert report.unexpected == 0
        assert report.answered >= report.confirmed > 0, report.row()
    assert not run.fleet.exits, f"pollers exited: {run.fleet.exits}"
    assert max(run.consumers_back) <= CONSUMERS_BACK_S, run.consumers_back
    # A publish that started after two nodes were lost and was confirmed before they were
    # started again would have been confirmed by a minority.
    minority = [loss for loss in losses if loss.kind == "minority"]
    taken = [
        p.job_id
        for p in run.obs.published
        for loss in minority
        if p.confirmed
        and loss.fault + 1 < p.at
        and run.publisher.confirmed_at[p.job_id] < loss.restarting
    ]
    assert not taken, f"confirmed while two of three nodes were down: {taken[:5]}"
    refused = [
        p for p in run.obs.published for loss in minority if not p.confirmed and loss.fault < p.at
    ]
    assert refused, "the minority refused nothing"


def test_a_job_the_core_resent_is_answered_flagged(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    client: JobClient,
    agent: CountingAgent,
    sid: str,
) -> None:
    """Found by scenario 5c: the core's client publishes a job again when its node dies before
    the confirm, and both copies can be queued. The copy it resent carries `x-usm-resent`: the
    poller flags its result `redelivered` (a non-idempotent one is `outcome_unknown`)."""
    start_poller(sid, concurrency=4, per_device_concurrency=4)
    plain, resent = counting_job(sid, 1, agent.port), counting_job(sid, 2, agent.port)
    risky = counting_job(sid, 3, agent.port, idempotent=False)
    with Client(CoreSettings.from_dsn(amqp_vhost.dsn)) as core:
        for job, again in ((plain, False), (resent, True), (risky, True)):
            request = wire.decode_job(json.dumps(job).encode())
            core._publish(sid, request, resent=again)
    results = client.by_id(3, timeout=30)
    assert results[plain["id"]].redelivered is False
    assert results[resent["id"]].redelivered is True
    assert results[resent["id"]].status == "ok"
    error = results[risky["id"]].error
    assert error is not None
    assert error.code == "outcome_unknown"
    assert agent.executions().get(oid_for(3), 0) == 0
