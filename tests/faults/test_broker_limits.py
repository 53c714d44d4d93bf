"""Scenarios 8 and 9 of issue 17: the broker's own limits, on a private node.

A memory alarm and `consumer_timeout` apply to a whole node, so both run on the private RabbitMQ
node the fault scenarios share (`fault_node`, tests/faults/node.py: the node scenario 4 kills),
never on the machine's broker that other tests share. The node checks consumer timeouts every
second; each test sets the `consumer_timeout` it needs at runtime, before its pollers open their
channels, and the node's defaults are set back after it.

* 8: the watermark is set near zero while a backlog is worked off: the broker blocks the
  poller's result publishes; the poller must stop taking jobs (its prefetch window bounds what
  it holds, its RSS grows by at most 50 MB), resume when the watermark is restored, lose nothing.
* 9: with a short `consumer_timeout`, jobs that finish within it never trip it; one job forced
  past it (a device that answers after longer than the timeout) makes the broker close the
  poller's channel with 406 PRECONDITION_FAILED: the poller must recover within 10 s, without
  exiting, and nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from poller.worker import SPARE_WINDOWS
from tests.faults.checker import Observation, Report, assert_invariants, check
from tests.faults.device import CountingAgent
from tests.faults.harness import (
    LONG,
    Collector,
    Fleet,
    Publisher,
    counting_job,
    executions_by_job,
    scale,
)
from tests.faults.node import NORMAL_WATERMARK, FaultNode
from tests.support.poller_proc import PollerFactory

pytestmark = pytest.mark.timeout(240 if not LONG else 900)

#: Every job goes to the one counting device; 32 run slots, so the window is 8 x 32.
POLLER: dict[str, str | int | float] = {
    "concurrency": 32,
    "per_device_concurrency": 32,
    "shutdown_grace": 5,
}
MB = 1024 * 1024


@pytest.fixture
def node_pollers(fault_node: FaultNode, tmp_path: Path) -> Iterator[PollerFactory]:
    factory = PollerFactory(fault_node.vhost, tmp_path)
    yield factory
    for poller in factory.started:
        poller.kill()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def queue_ready(node: FaultNode, queue: str) -> int:
    """Messages ready in one queue (a connection that never publishes: an alarm spares it)."""
    conn = pika.BlockingConnection(pika.URLParameters(node.vhost.dsn))
    try:
        ready: int = conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()
    return ready


def wait_answered(collector: Collector, obs: Observation, timeout: float) -> set[str]:
    confirmed = [p.job_id for p in obs.published if p.confirmed]
    return collector.wait_for(confirmed, timeout=timeout, settle=1.0)


def test_memory_alarm_blocks_results_the_poller_stops_taking_jobs_and_loses_nothing(
    fault_node: FaultNode,
    node_pollers: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 8: the memory watermark near zero for 15 s (60 s long) during a backlog."""
    from poller import wire  # noqa: PLC0415 - only the queue name

    node = fault_node
    alarm_s = scale(10, 60)
    jobs = scale(1000, 4000)
    obs = Observation()
    node_pollers(sid).terminate()  # declares the queues; the backlog waits for the next one
    # A result's confirm may wait 5 s (the alarm lasts longer): the alarm's time must not
    # count, or every job held in it is returned and runs again once the alarm is over.
    prefetch = 64
    settings: dict[str, str | int | float] = {**POLLER, "prefetch": prefetch, "publish_timeout": 5}
    fleet = Fleet(node_pollers, sid, 1, settings)
    # Its window, and the spare consumer's (opened at start: 64 jobs for one new device).
    window = prefetch * (1 + SPARE_WINDOWS)
    publisher = Publisher(node.vhost.dsn, sid, obs)
    rss: list[int] = []
    try:
        with Collector(node.vhost.dsn, sid, obs) as collector:
            for n in range(jobs):
                publisher.publish_job(counting_job(sid, n, agent.port))
            # A slow device while the alarm is raised (a `rabbitmqctl eval` takes seconds on a
            # loaded machine): the queue still holds a backlog when it hits.
            agent.delay = 2.0
            fleet.start()
            poller = fleet.slots[0]
            # Let the poller work at full speed for a moment, then raise the alarm.
            deadline = time.monotonic() + 30
            while len(collector.answered()) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            base_rss = rss_bytes(poller.pid)
            obs.faults.append(time.monotonic())
            node.eval(node.watermark(0.0001))
            alarm_on = time.monotonic()
            held: list[tuple[int, int]] = []
            answered_at_block = -1
            while time.monotonic() - alarm_on < alarm_s:
                rss.append(rss_bytes(poller.pid))
                elapsed = time.monotonic() - alarm_on
                if answered_at_block < 0 and elapsed > 4:
                    answered_at_block = len(collector.answered())
                if len(held) < 2 and elapsed > alarm_s / 2 + 2 * len(held):
                    ready = queue_ready(node, wire.jobs_queue(sid))
                    held.append((ready, jobs - ready - len(collector.answered())))
                time.sleep(0.25)
            answered_in_alarm = len(collector.answered()) - answered_at_block
            node.eval(node.watermark(NORMAL_WATERMARK))
            alarm_off = time.monotonic()
            agent.delay = 0.02  # work the backlog off quickly
            missing = wait_answered(collector, obs, timeout=scale(60, 180))
            rss.append(rss_bytes(poller.pid))
    finally:
        publisher.close()
    obs.executions = executions_by_job(sid, agent.executions())
    report = check("8 memory alarm", obs)
    fault_report(report)
    assert_invariants(report)
    assert not missing
    assert report.answered == report.confirmed == jobs
    # A blocked broker is no failure: no job held in the alarm was returned and run again.
    assert report.executed_twice == 0, poller.events("result_not_confirmed")[:3]
    growth = max(rss) - base_rss
    print(
        f"scenario 8: alarm {alarm_s} s, poller RSS {base_rss / MB:.1f} MB -> max "
        f"{max(rss) / MB:.1f} MB (+{growth / MB:.1f}), queue (ready, unacked) in the alarm {held}, "
        f"answers in the alarm after 4 s: {answered_in_alarm}, recovered in "
        f"{report.recover_s} s, all answered {time.monotonic() - alarm_off:.1f} s after it"
    )
    assert poller.events("broker_blocked"), poller.log_text()[-3000:]
    assert poller.events("broker_unblocked")
    # Results stopped: the broker read nothing of the poller while the alarm lasted.
    assert answered_in_alarm <= 0, answered_in_alarm
    # The poller stopped taking jobs: it holds at most its window, the rest waits in the queue.
    assert held
    assert all(unacked <= window for _ready, unacked in held), held
    assert all(ready > 0 for ready, _unacked in held), held
    assert growth <= 50 * MB, f"RSS grew by {growth / MB:.1f} MB in the alarm"
    assert poller.proc.poll() is None, "the poller exited"
    assert not fleet.exits
    assert poller.terminate(30) == 0


def test_consumer_timeout_a_job_past_it_closes_the_channel_and_the_poller_recovers(
    fault_node: FaultNode,
    node_pollers: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 9: `consumer_timeout` 5 s (30 s long); a stream of 0.2 s jobs never trips it,
    one job whose device answers after longer than the timeout does."""
    node = fault_node
    timeout_s = scale(5, 30)
    node.eval(node.set_env("consumer_timeout", timeout_s * 1000))
    rate = 40.0
    obs = Observation()
    # One SNMP request per job that waits for the whole job timeout: the slow job runs until
    # its device answers (the default 2 s x 3 tries gives up after 6 s, within a long timeout).
    settings: dict[str, str | int | float] = {
        **POLLER,
        "snmp_timeout": timeout_s + 10,
        "snmp_retries": 0,
    }
    fleet = Fleet(node_pollers, sid, 1, settings)
    fleet.start()
    poller = fleet.slots[0]
    publisher = Publisher(node.vhost.dsn, sid, obs)
    slow_job = f"{sid}-slow"
    with CountingAgent(delay=timeout_s + 3.0) as slow_device:
        try:
            with Collector(node.vhost.dsn, sid, obs) as collector:
                # First: jobs well within the timeout, for longer than the timeout.
                quiet = int(rate * (timeout_s + 2))
                stream = publisher.stream(
                    (counting_job(sid, n, agent.port) for n in range(quiet)), rate
                )
                stream.join(timeout_s + 30)
                assert not wait_answered(collector, obs, timeout=30)
                assert not poller.events("broker_channel_closed"), "a quick job tripped it"
                # Then one job forced past it, amid more quick jobs.
                slow = counting_job(sid, 0, slow_device.port, timeout=timeout_s + 10.0)
                slow["id"] = slow_job
                publisher.publish_job(slow)
                more = int(rate * (timeout_s + 6))
                stream = publisher.stream(
                    (counting_job(sid, n, agent.port) for n in range(quiet, quiet + more)), rate
                )
                closed_at = None
                deadline = time.monotonic() + timeout_s + 20
                while closed_at is None and time.monotonic() < deadline:
                    if poller.events("broker_channel_closed"):
                        closed_at = time.monotonic()
                    time.sleep(0.1)
                assert closed_at is not None, "the slow job did not trip the consumer timeout"
                obs.faults.append(closed_at)
                stream.join(timeout_s + 60)
                missing = wait_answered(collector, obs, timeout=scale(60, 180))
        finally:
            publisher.close()
        slow_runs = slow_device.total()
    obs.executions = executions_by_job(sid, agent.executions())
    report = check("9 consumer timeout", obs)
    fault_report(report)
    closes = poller.events("broker_channel_closed")
    print(
        f"scenario 9: consumer_timeout {timeout_s} s: channel closed {len(closes)} time(s) "
        f"({[c.get('reply_code') for c in closes]}), slow job executed {slow_runs} time(s), "
        f"recovered in {report.recover_s} s, executed twice {report.executed_twice}"
    )
    assert_invariants(report)
    assert not missing
    assert slow_job in {a.job_id for a in obs.answers}
    assert closes[0].get("reply_code") == 406, closes
    # The slow job came back while its first run was still going on: that run answered it,
    # and it was not run again (and did not trip the timeout again, and again).
    assert slow_runs == 1, f"the slow job ran {slow_runs} times, {len(closes)} channel closes"
    assert len(closes) == 1, closes
    assert poller.events("broker_reconnected")
    assert report.recover_s is not None
    assert report.recover_s <= 10, report.recover_s
    assert poller.proc.poll() is None, "the poller exited"
    assert not fleet.exits
    assert poller.terminate(30) == 0
