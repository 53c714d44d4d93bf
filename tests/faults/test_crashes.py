"""Scenarios 1, 2, 3, 10 and 11 of issue 17: pollers killed, stopped, restarted, crashed.

Three real pollers consume one satellite's quorum queue; jobs are SNMP GETs of the counting
device (`tests/faults/device.py`), so every execution is counted at the device as well as in
the results. Short versions by default; `USM_FAULTS_LONG=1` (bench/faults.py --long) runs the
long ones.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.faults.checker import Expectation, Observation, Report, assert_invariants, check
from tests.faults.device import CountingAgent
from tests.faults.harness import (
    LONG,
    Collector,
    Fleet,
    Publisher,
    counting_job,
    drain_dlq,
    executions_by_job,
    scale,
)
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost

#: Settings of every scenario poller: a small window so that a kill returns few jobs, and
#: all jobs go to one device (the counting agent) without waiting for its per-device slots.
POLLER = {"concurrency": 16, "per_device_concurrency": 16, "shutdown_grace": 5}

pytestmark = pytest.mark.timeout(300 if not LONG else 1800)


def _run_stream(
    name: str,
    *,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    jobs: int,
    rate: float,
    every: float,
    fault: Callable[[Fleet, int], None],
    idempotent: bool = True,
    settings: dict[str, str | int | float] | None = None,
    expect: Expectation = Expectation(),
) -> tuple[Report, Fleet, Observation]:
    """Start 3 pollers, stream `jobs` at `rate`/s, call `fault` every `every` s while the
    stream runs (restarting pollers that exited), wait for the answers, check."""
    obs = Observation()
    fleet = Fleet(start_poller, sid, 3, {**POLLER, **(settings or {})})
    fleet.start()
    publisher = Publisher(amqp_vhost.dsn, sid, obs)
    try:
        with Collector(amqp_vhost.dsn, sid, obs) as collector:
            stream = publisher.stream(
                (counting_job(sid, n, agent.port, idempotent=idempotent) for n in range(jobs)),
                rate,
            )
            fleet.run_while(
                stream.is_alive,
                every=every,
                fault=lambda n: fault(fleet, n),
                faults=obs.faults,
                limit=jobs / rate + 60,
            )
            stream.join(10)
            confirmed = [p.job_id for p in obs.published if p.confirmed]
            deadline = time.monotonic() + 120
            missing = set(confirmed)
            while missing and time.monotonic() < deadline:
                fleet.supervise()
                missing = collector.wait_for(missing, timeout=1.0, settle=0.0)
            collector.wait_for((), timeout=0, settle=2.0)
            drain_dlq(amqp_vhost.dsn, sid, obs, expect=len(expect.dlq), wait=10)
    finally:
        publisher.close()
    obs.executions = executions_by_job(sid, agent.executions())
    return check(name, obs, expect), fleet, obs


def test_sigkill_loop_loses_nothing_and_flags_every_duplicate(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 1: one of three pollers SIGKILLed every 2 s; a supervisor restarts it."""
    report, fleet, _obs = _run_stream(
        "1 SIGKILL loop",
        amqp_vhost=amqp_vhost,
        start_poller=start_poller,
        agent=agent,
        sid=sid,
        jobs=scale(1500, 10_000),
        rate=scale(100, 250),
        every=2.0,
        fault=lambda fleet, n: fleet.sigkill(n % 3),
    )
    fault_report(report)
    assert_invariants(report)
    assert report.answered == report.confirmed == report.published
    assert sum(1 for _, code in fleet.exits if code == -signal.SIGKILL) >= 5


def test_sigkill_loop_never_runs_a_non_idempotent_job_twice(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 1 with `idempotent: false`: a redelivered job is `outcome_unknown`, not rerun."""
    report, _fleet, obs = _run_stream(
        "1 SIGKILL loop, non-idempotent",
        amqp_vhost=amqp_vhost,
        start_poller=start_poller,
        agent=agent,
        sid=sid,
        jobs=scale(1500, 10_000),
        rate=scale(100, 250),
        every=2.0,
        fault=lambda fleet, n: fleet.sigkill(n % 3),
        idempotent=False,
    )
    fault_report(report)
    assert_invariants(report)
    assert report.non_idempotent_twice == 0
    assert report.executed_twice == 0
    unknown = [a for a in obs.answers if a.code == "outcome_unknown"]
    assert unknown, "some jobs were held by a killed poller and came back redelivered"
    assert all(a.redelivered for a in unknown)
