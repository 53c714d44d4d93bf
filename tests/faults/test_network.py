"""Scenarios 6 and 7 of issue 17: the network between a poller and its broker fails.

The poller under test runs in a network namespace of the test (`tests/support/netns.py`,
`BrokerLink`): its only way to the broker is a veth link to a second namespace, where a
forwarder connects to the machine's broker and the counting device answers. Faults are
iptables rules on that link, on the broker's TCP port only (the device stays reachable):

6. a partition, both ways or broker -> poller only: the poller notices within 3 AMQP
   heartbeats, reconnects within 10 s of the heal, the broker hands its jobs to a bystander
   poller (in the `net` namespace, never cut off), nothing is lost and nothing hangs;
7. a lossy uplink (this kernel has no netem: iptables' `statistic` match drops packets at
   random): 5% then 20% of the poller's packets to the broker lost: no heartbeat disconnect at
   5%, nothing lost at either.

Short versions by default (one 10 s partition per direction, 8 s per loss rate, heartbeat
2 s); `USM_FAULTS_LONG=1` (bench/faults.py --long) runs 30 s and 120 s partitions and 2 minutes
per loss rate with a 5 s heartbeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from tests.faults.checker import Observation, Report, assert_invariants, check
from tests.faults.device import CountingAgent
from tests.faults.harness import (
    LONG,
    Collector,
    Publisher,
    counting_job,
    executions_by_job,
    scale,
)
from tests.support.netns import BrokerLink
from tests.support.poller_proc import PollerFactory, PollerProcess
from tests.support.rabbitmq import AmqpVhost

#: The AMQP heartbeat the scenario pollers ask for (seconds).
HEARTBEAT = scale(2, 5)
POLLER: dict[str, Any] = {
    "concurrency": 16,
    "per_device_concurrency": 16,
    "shutdown_grace": 5,
    "heartbeat": HEARTBEAT,
}
#: The poller must notice a dead link within this many heartbeats (issue 17).
NOTICE_HEARTBEATS = 3
#: ... and be consuming again within this many seconds of the heal.
RECONNECT_S = 10.0
PARTITIONS = (30, 120) if LONG else (10,)
LOSS_PHASE_S = scale(8, 120)
RATE = 40.0

pytestmark = pytest.mark.timeout(240 if not LONG else 1800)


def _wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def _first_after(poller: PollerProcess, event: str, wall: float) -> float | None:
    """Seconds from `wall` to the poller's first `event` after it, or None."""
    times = sorted(_wall(e) for e in poller.events(event) if _wall(e) >= wall)
    return times[0] - wall if times else None


def _happened(poller: PollerProcess, event: str, wall: float) -> bool:
    return _first_after(poller, event, wall) is not None


@dataclass
class Scene:
    link: BrokerLink
    obs: Observation
    agent: CountingAgent
    publisher: Publisher
    collector: Collector
    poller: PollerProcess  # in the `poller` namespace: the one the faults hit
    bystander: PollerProcess | None  # in the `net` namespace: never cut off
    factory: PollerFactory
    sid: str
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    stream: threading.Thread | None = None

    def start_stream(self, rate: float) -> None:
        def jobs() -> Iterator[dict[str, Any]]:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                yield counting_job(self.sid, n, self.agent.port)

        self.stream = self.publisher.stream(jobs(), rate)

    def finish(self, timeout: float = 90.0) -> None:
        """Stop the stream and wait (bounded) until every confirmed job has an answer."""
        self.stop.set()
        if self.stream is not None:
            self.stream.join(15)
        confirmed = [p.job_id for p in self.obs.published if p.confirmed]
        self.collector.wait_for(confirmed, timeout=timeout, settle=1.0)
        self.obs.executions = executions_by_job(self.sid, self.agent.executions())

    def name_of(self, poller: PollerProcess) -> str:
        return f"poller-{self.sid}-{self.factory.started.index(poller)}"


@contextlib.contextmanager
def _scene(
    link: BrokerLink,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    sid: str,
    *,
    bystander: bool,
) -> Iterator[Scene]:
    with link.inside("net"):  # the device lives on the network side of the link
        agent = CountingAgent(delay=0.2, host=link.net_ip)
    dsn = link.dsn(amqp_vhost.dsn)
    with agent:
        poller = start_poller(sid, wait=False, wrap=link.wrap("poller"), amqp_dsn=dsn, **POLLER)
        other = None
        if bystander:
            other = start_poller(sid, wait=False, wrap=link.wrap("net"), amqp_dsn=dsn, **POLLER)
        for p in (poller, other):
            if p is not None:
                p.wait_ready(60)
        obs = Observation()
        publisher = Publisher(amqp_vhost.dsn, sid, obs)
        try:
            with Collector(amqp_vhost.dsn, sid, obs) as collector:
                scene = Scene(
                    link, obs, agent, publisher, collector, poller, other, start_poller, sid
                )
                try:
                    yield scene
                finally:
                    scene.stop.set()
        finally:
            publisher.close()


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.parametrize("length", PARTITIONS, ids=lambda s: f"{s}s")
def test_partition_is_noticed_healed_and_loses_nothing(  # noqa: PLR0917 - pytest fixtures
    broker_link: BrokerLink,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    sid: str,
    fault_report: Callable[[Report], None],
    length: int,
) -> None:
    """Scenario 6: a partition between the poller and the broker while jobs stream in, first
    both ways, then broker -> poller only (the poller's frames still reach the broker)."""
    noticed: dict[str, float | None] = {}
    back: dict[str, float | None] = {}
    cuts: dict[str, float] = {}
    with _scene(broker_link, amqp_vhost, start_poller, sid, bystander=True) as scene:
        poller = scene.poller
        scene.start_stream(RATE)
        time.sleep(2)
        for way, inbound_only in (("both ways", False), ("broker to poller", True)):
            cut_wall, cuts[way] = time.time(), time.monotonic()
            broker_link.partition(inbound_only=inbound_only)
            scene.obs.faults.append(cuts[way])
            time.sleep(length)
            broker_link.heal()
            heal_wall = time.time()
            _wait(functools.partial(_happened, poller, "broker_reconnected", heal_wall), 30)
            noticed[way] = _first_after(poller, "broker_connection_lost", cut_wall)
            back[way] = _first_after(poller, "broker_reconnected", heal_wall)
            time.sleep(1.5)  # the poller takes jobs again
        scene.finish()

    def figure(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f}"

    figures = "; ".join(
        f"{way}: noticed {figure(noticed[way])} s, back {figure(back[way])} s after the heal"
        for way in noticed
    )
    report = check(f"6 partition {length} s, both ways then broker to poller", scene.obs)
    report = dataclasses.replace(
        report, scenario=f"{report.scenario} (hb {HEARTBEAT} s; {figures})"
    )
    fault_report(report)
    assert_invariants(report)
    assert report.answered == report.confirmed == report.published
    assert poller.proc.poll() is None, "the partitioned poller exited"
    assert scene.bystander is not None
    assert scene.bystander.proc.poll() is None, "the bystander exited"
    mine = scene.name_of(poller)
    for way, cut in cuts.items():
        took = noticed[way]
        assert took is not None, f"{way}: the poller never noticed the partition"
        assert took <= NOTICE_HEARTBEATS * HEARTBEAT, f"{way}: noticed after {took:.1f} s"
        took = back[way]
        assert took is not None, f"{way}: the poller did not reconnect after the heal"
        assert took <= RECONNECT_S, f"{way}: reconnected {took:.1f} s after the heal"
        during = [a for a in scene.obs.answers if cut < a.at < cut + length]
        assert any(a.worker != mine and a.redelivered for a in during), (
            f"{way}: the broker handed the partitioned poller's jobs to the bystander"
        )
        assert any(a.worker == mine and a.at > cut + length for a in scene.obs.answers), (
            f"{way}: the poller answers jobs again after the heal"
        )
    # Every job published before a cut is answered once the broker gave up on the poller (or
    # the poller on the link) and the bystander ran it: well before the heal.
    assert report.recover_s is not None
    assert report.recover_s < length


def test_lossy_uplink_keeps_the_connection_and_loses_nothing(
    broker_link: BrokerLink,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 7: 5% then 20% of the poller's packets to the broker dropped at random."""
    disconnects: dict[float, int] = {}
    with _scene(broker_link, amqp_vhost, start_poller, sid, bystander=False) as scene:
        poller = scene.poller
        scene.start_stream(RATE / 2)
        time.sleep(1)
        for share in (0.05, 0.20):
            broker_link.uplink_loss(share)
            start = time.time()
            scene.obs.faults.append(time.monotonic())
            time.sleep(LOSS_PHASE_S)
            disconnects[share] = len(
                [e for e in poller.events("broker_connection_lost") if start <= _wall(e)]
            )
        dropped = broker_link.dropped()
        broker_link.heal()
        healed = time.time()
        if poller.events("broker_connection_lost"):
            _wait(functools.partial(_happened, poller, "broker_reconnected", healed - 60), 30)
        time.sleep(1)
        scene.finish()
    report = check(f"7 lossy uplink 5% then 20%, {LOSS_PHASE_S} s each", scene.obs)
    figures = (
        f"hb {HEARTBEAT} s, {dropped} packets dropped, "
        f"disconnects {disconnects[0.05]}/{disconnects[0.20]}"
    )
    report = dataclasses.replace(report, scenario=f"{report.scenario} ({figures})")
    fault_report(report)
    assert_invariants(report)
    assert report.answered == report.confirmed == report.published
    assert dropped > 0, "the rules dropped packets"
    assert disconnects[0.05] == 0, "heartbeat disconnects at 5% loss"
    assert poller.proc.poll() is None, "the poller exited"
