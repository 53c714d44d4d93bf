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

from poller import wire
from poller.worker import TEST_CRASH_EXIT
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

NOTHING_DEAD = Expectation()

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
    expect: Expectation = NOTHING_DEAD,
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
            confirmed = [
                p.job_id for p in obs.published if p.confirmed and p.job_id not in expect.dlq
            ]
            # The long versions leave a bigger backlog (scenario 10: a crash per 100 jobs, each
            # returning the poller's whole window, outruns 150 jobs/s): longer to work it off.
            deadline = time.monotonic() + scale(120, 600)
            missing = set(confirmed)
            look_at_dlq = time.monotonic() + 10
            while missing and time.monotonic() < deadline:
                fleet.supervise()
                missing = collector.wait_for(missing, timeout=1.0, settle=0.0)
                if not expect.dlq and time.monotonic() > look_at_dlq:
                    # Nothing should be dead-lettered here: what is counts against the run
                    # (`dlq_unexpected`), and is waited for no longer.
                    drain_dlq(amqp_vhost.dsn, sid, obs, wait=0)
                    missing -= {d.job_id for d in obs.dead if d.job_id is not None}
                    look_at_dlq = time.monotonic() + 10
            collector.wait_for((), timeout=0, settle=2.0)
            deadline = time.monotonic() + 120
            while len(obs.dead) < len(expect.dlq) and time.monotonic() < deadline:
                fleet.supervise()  # a poison job needs pollers to kill until it is dead-lettered
                drain_dlq(amqp_vhost.dsn, sid, obs, expect=len(expect.dlq), wait=1)
            if not expect.dlq and not expect.dlq_without_id:
                drain_dlq(amqp_vhost.dsn, sid, obs, wait=0)
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
        rate=scale(100, 150),
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
        rate=scale(100, 150),
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


def test_rolling_restart_runs_nothing_twice_and_each_exits_0_within_its_grace(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 2: SIGTERM each poller in turn during the stream; a new one takes its place."""
    grace = float(POLLER["shutdown_grace"])
    stops: list[tuple[int, float]] = []

    def sigterm(fleet: Fleet, n: int) -> None:
        slot = n % 3
        t0 = time.monotonic()
        code = fleet.slots[slot].terminate(timeout=grace + 30)
        stops.append((code, time.monotonic() - t0))
        fleet.restart(slot)

    report, fleet, _obs = _run_stream(
        "2 rolling restart",
        amqp_vhost=amqp_vhost,
        start_poller=start_poller,
        agent=agent,
        sid=sid,
        jobs=scale(1500, 5000),
        rate=scale(100, 100),
        every=3.0,
        fault=sigterm,
    )
    fault_report(report)
    assert_invariants(report)
    assert report.executed_twice == 0
    assert report.answered_twice == 0
    assert len(stops) >= 3
    assert [code for code, _ in stops] == [0] * len(stops)
    # Running jobs take 0.2 s: each drain ends long before the grace period.
    assert max(took for _, took in stops) < grace + 5, stops
    assert not fleet.exits, "only the scenario's SIGTERMs stop pollers"


def test_hung_poller_is_dropped_its_jobs_redelivered_and_it_consumes_again(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 3: SIGSTOP one poller (AMQP heartbeat 2 s) for longer than 3 heartbeats, then
    SIGCONT: its jobs come back within ~3 heartbeats, and it reconnects without crashing."""
    heartbeat = 2
    hang = scale(12, 60)
    stopped: list[float] = []
    resumed: list[float] = []
    hung = {}

    def hang_one(fleet: Fleet, n: int) -> None:
        if n == 0:
            hung["poller"] = fleet.slots[0]
            fleet.slots[0].proc.send_signal(signal.SIGSTOP)
            stopped.append(time.monotonic())
        elif n == hang // 3 + 1 - 0 and not resumed:
            hung["poller"].proc.send_signal(signal.SIGCONT)
            resumed.append(time.monotonic())

    report, fleet, obs = _run_stream(
        "3 hung poller",
        amqp_vhost=amqp_vhost,
        start_poller=start_poller,
        agent=agent,
        sid=sid,
        # The stream runs on for 6 s after the SIGCONT (the sixth fault, at ~18 s): the poller
        # reconnects within a second (0.5 s backoff; it answered again 0.5 s after it here).
        jobs=(hang + scale(12, 15)) * 60,
        rate=60,
        every=3.0,
        fault=hang_one,
        settings={"heartbeat": heartbeat},
    )
    poller = hung["poller"]
    obs.faults = stopped  # recovery: from the SIGSTOP
    report = check("3 hung poller", obs)
    fault_report(report)
    assert_invariants(report)
    assert resumed
    assert resumed[0] - stopped[0] >= hang - 1
    assert report.recover_s is not None
    # Redelivered after ~3 heartbeats (the broker's 2 missed + detection), with room for a
    # loaded machine: well before the poller came back.
    assert report.recover_s < 4 * heartbeat + 4
    assert report.recover_s < resumed[0] - stopped[0]
    assert poller.proc.poll() is None, "the hung poller did not survive"
    assert not fleet.exits
    assert poller.events("broker_connection_lost")
    assert poller.events("broker_reconnected")
    # An ack sent on the new channel for a delivery of the old one closes it with 406
    # PRECONDITION_FAILED (unknown delivery tag): the poller drops those acks instead.
    closed = [e.get("reply_code") for e in poller.events("broker_channel_closed")]
    assert 406 not in closed, "an ack for the old channel was sent on the new one"
    name = fleet.worker_name(poller)
    after = [a for a in obs.answers if a.worker == name and a.at > resumed[0]]
    assert after, "the poller consumes again after SIGCONT"
    assert poller.terminate(30) == 0


def test_crash_between_confirm_and_ack_duplicates_only_flagged(  # noqa: PLR0917 - fixtures
    monkeypatch: pytest.MonkeyPatch,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 10: the test hook kills the poller after a result's confirm, before its ack,
    on 1% of jobs: nothing lost, the killed job answered again, every duplicate flagged."""
    monkeypatch.setenv(
        "USM_TEST_CRASH_AFTER_CONFIRM", "0.01"
    )  # test-only hook, poller/testhooks.py
    report, fleet, obs = _run_stream(
        "10 kill between confirm and ack",
        amqp_vhost=amqp_vhost,
        start_poller=start_poller,
        agent=agent,
        sid=sid,
        # 1% of 800 jobs: ~8 kills (none at all: 0.99**800 = 0.03%); each proves what 15 did.
        jobs=scale(800, 10_000),
        rate=scale(100, 150),
        every=1e9,
        fault=lambda _fleet, _n: None,
        settings={},
    )
    obs.faults = list(fleet.exit_times)
    report = check(report.scenario, obs)
    fault_report(report)
    assert_invariants(report)
    kills = [code for _, code in fleet.exits]
    assert kills
    assert set(kills) == {86}, kills
    crash_lines = [e["job_id"] for e in fleet.events("test_crash")]
    crashed = set(crash_lines)  # a job run again after its kill may be killed again (1%)
    twice = {a.job_id for a in obs.answers if a.redelivered}
    assert len(crash_lines) >= len(kills) - 1  # the last one may still be running
    assert crashed <= twice, "every job killed after its confirm was answered again, flagged"
    # Duplicates = kills, give or take the jobs whose confirms came in the same frame as the
    # killed job's (their tasks had not acked yet): at least one per kill.
    assert report.answered_twice >= len(crashed)


def test_poison_job_alone_reaches_the_dlq(  # noqa: PLR0917 - pytest fixtures
    monkeypatch: pytest.MonkeyPatch,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    """Scenario 11: one batch holds a job that kills every process that runs it, among
    innocent ones; the poller is restarted each time and gets the same batch back. From their
    third delivery on (`USM_POLLER_SANDBOX_AFTER`, 2) the jobs run in sandbox children, one
    each: the poison job kills only its own child from then on, until its last allowed
    delivery, when it is answered `worker_crashed` and dead-lettered; every innocent job is
    answered, none dead-lettered, and the poller exits only the two times before."""
    innocents = scale(40, 200)
    poison = f"{sid}-{innocents // 2}"
    # Declare the topology, then queue the whole batch before a poller runs.
    start_poller(sid).terminate()
    obs = Observation()
    publisher = Publisher(amqp_vhost.dsn, sid, obs)
    monkeypatch.setenv("USM_TEST_CRASH_ON_JOB", poison)  # test-only hook, poller/testhooks.py
    fleet = Fleet(start_poller, sid, 1, dict(POLLER))
    expect = Expectation(dlq=frozenset({poison}))
    try:
        with Collector(amqp_vhost.dsn, sid, obs) as collector:
            for n in range(innocents + 1):
                # The wire protocol's default timeout (30 s): the whole batch comes back
                # suspect at once, and runs `USM_POLLER_SANDBOX_SLOTS` jobs at a time.
                publisher.publish_job(counting_job(sid, n, agent.port, timeout=30.0))
            fleet.slots.append(fleet.spawn())
            deadline = time.monotonic() + 240
            while len(obs.dead) < 1 and time.monotonic() < deadline:
                fleet.supervise()
                drain_dlq(amqp_vhost.dsn, sid, obs, expect=1, wait=0.5)
            wanted = {p.job_id for p in obs.published} - {poison}
            collector.wait_for(wanted, timeout=60, settle=1.0)
            drain_dlq(amqp_vhost.dsn, sid, obs, wait=0)
    finally:
        publisher.close()
    obs.faults = list(fleet.exit_times)
    obs.executions = executions_by_job(sid, agent.executions())
    report = check("11 poison job", obs, expect)
    fault_report(report)
    assert_invariants(report)
    crashes = fleet.events("test_crash")
    assert {e["job_id"] for e in crashes} == {poison}
    # Every delivery of the poison job crashed whatever ran it: the poller twice, then a
    # sandbox child each time, up to the queue's delivery limit.
    assert len(crashes) == wire.DEFAULT_DELIVERY_LIMIT
    assert [code for _, code in fleet.exits] == [TEST_CRASH_EXIT] * 2
    assert [(a.code, a.attempt) for a in obs.answers if a.job_id == poison] == [
        ("worker_crashed", wire.DEFAULT_DELIVERY_LIMIT)
    ]
    assert [d.reason for d in obs.dead] == ["rejected"]  # by the poller, with its answer
