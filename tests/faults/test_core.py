"""Scenario 14 of issue 17: a core replica (`satellite serve`) SIGKILLed, two replicas on one
PostgreSQL, with a real poller answering the jobs.

* While it ingests: jobs are answered while no replica runs (their results wait in
  `usm_poller.history`), then two replicas ingest them with small commits and one is SIGKILLed
  in the middle. The history must hold one row per answered job, none lost, and each row's
  `answers` must be what the pollers published: a result the broker redelivers because the
  replica died after its commit and before its ack is the same answer, not a second one.
* While it publishes scheduled jobs: a replica running alone exits (a test hook,
  `USM_TEST_SERVE_CRASH_AFTER_CONFIRM`) right after the broker confirmed a whole slot of a
  `spread: false` schedule and before it deleted the slot's outbox rows: the deterministic
  version of a SIGKILL in the confirm window. Its restarted copy takes the rows over and sends
  them again, marked `x-usm-resent`; with no poller running until then, both copies of every
  job are queued. Every (slot, target) job is answered and in the history, and a second answer
  is flagged (long: four crashes, and the restarted replica's own slot answered once each).

Both go through the shared checker: the history's rows are the core's view of the answers.
The pieces come from tests/integration/test_satellite_serve.py (its 2,000-result ingest kill)
and tests/support/serve_proc.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from poller import testhooks, wire
from satellite.client import Client
from satellite.config import CoreSettings
from tests.faults.checker import (
    Answer,
    Observation,
    PublishedJob,
    Report,
    assert_invariants,
    check,
)
from tests.faults.device import CountingAgent, oid_for
from tests.faults.harness import LONG, Collector, Fleet, Publisher, counting_job, scale
from tests.integration.test_satellite_serve import count_rows, reset_schema
from tests.support.poller_proc import PollerFactory, PollerProcess
from tests.support.rabbitmq import AmqpVhost
from tests.support.serve_proc import ServeFactory, ServeProcess
from tests.support.slow_snmp import SlowSnmpAgents

pytestmark = pytest.mark.timeout(420 if not LONG else 900)

POLLER: dict[str, str | int | float] = {
    "concurrency": 64,
    "per_device_concurrency": 64,
    "shutdown_grace": 5,
}


@pytest.fixture
def serve(amqp_vhost: AmqpVhost, tmp_path: Path) -> Iterator[ServeFactory]:
    factory = ServeFactory(amqp_vhost, tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture
def core_db(pg_database: str) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    asyncio.run(reset_schema(pg_database))
    return pg_database


async def _rows(url: str, sid: str) -> dict[str, tuple[int, bool, str]]:
    """{job id: (answers, redelivered, status)} of the satellite's history rows."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT id, answers, coalesce(redelivered, false) AS r, status FROM jobs "
            "WHERE satellite_id = $1",
            sid,
            timeout=30,
        )
    finally:
        await conn.close(timeout=10)
    return {str(r["id"]): (int(r["answers"]), bool(r["r"]), str(r["status"])) for r in rows}


def history_answers(rows: dict[str, tuple[int, bool, str]], at: float) -> list[Answer]:
    """The history as the checker's answers: a row answered k times is k answers; the copies
    after the first carry the row's (last copy's) redelivered flag."""
    answers: list[Answer] = []
    for job_id, (count, redelivered, status) in rows.items():
        answers.extend(
            Answer(job_id, at, status=status, redelivered=n > 0 and redelivered)
            for n in range(count)
        )
    return answers


def doubled(rows: dict[str, tuple[int, bool, str]], polled: Observation) -> dict[str, str]:
    """Rows whose `answers` differ from the results the pollers published for the job."""
    published: dict[str, int] = {}
    for answer in polled.answers:
        published[answer.job_id] = published.get(answer.job_id, 0) + 1
    return {
        job_id: f"{rows[job_id][0]} in the history, {n} published"
        for job_id, n in published.items()
        if job_id in rows and rows[job_id][0] != n
    }


def _kill(process: ServeProcess) -> None:
    process.proc.send_signal(signal.SIGKILL)
    process.proc.wait(timeout=10)


def test_a_core_replica_killed_while_it_ingests_leaves_one_row_per_answer(  # noqa: PLR0917
    serve: ServeFactory,
    core_db: str,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    fault_report: Callable[[Report], None],
) -> None:
    jobs = scale(1000, 10_000)
    env = {
        "USM_CORE_DB": core_db,
        # Small commits (prefetch = 2 x batch): slow enough to kill a replica in the middle.
        "USM_CORE_INGEST_BATCH": "2",
        "USM_CORE_INGEST_LINGER_MS": "0",
    }
    first = serve(env=env)  # declares usm_poller.history; the results wait in it
    deadline = time.monotonic() + 60
    while not any(
        line.get("event") == "broker_connected" and line.get("queue") == wire.history_queue()
        for line in first.log_lines()
    ):
        assert time.monotonic() < deadline, first.log_text()[-2000:]
        time.sleep(0.1)
    assert first.terminate() == 0
    agent.delay = 0.02
    polled = Observation()
    fleet = Fleet(start_poller, sid, 1, POLLER)
    fleet.start()
    publisher = Publisher(amqp_vhost.dsn, sid, polled)
    try:
        with Collector(amqp_vhost.dsn, sid, polled) as collector:
            for n in range(jobs):
                publisher.publish_job(counting_job(sid, n, agent.port))
            confirmed = [p.job_id for p in polled.published if p.confirmed]
            assert not collector.wait_for(confirmed, timeout=120, settle=1.0)
    finally:
        publisher.close()
    assert fleet.stop() == [0]

    # The victim alone first: once its rows come, it is ingesting for sure.
    victim = serve(env=env, wait=False)
    rows = 0
    deadline = time.monotonic() + 180
    while rows < jobs // 5 and time.monotonic() < deadline:
        rows, _answers = asyncio.run(count_rows(core_db, sid))
        time.sleep(0.02)
    assert 0 < rows < jobs, "the kill must land while results are still coming"
    killed_at, before_kill = time.monotonic(), rows
    _kill(victim)
    survivor = serve(env=env, wait=False)
    restarted = serve(env=env, wait=False)  # its supervisor starts it again
    deadline = time.monotonic() + 120
    while rows < jobs and time.monotonic() < deadline:
        rows, _answers = asyncio.run(count_rows(core_db, sid))
        time.sleep(0.1)
    time.sleep(2.0)  # late copies
    done_at = time.monotonic()
    history = asyncio.run(_rows(core_db, sid))
    for process in (survivor, restarted):
        with contextlib.suppress(AssertionError):
            process.wait_listening(30)
        assert process.terminate() == 0

    seen = Observation(published=polled.published, faults=[killed_at])
    seen.answers = history_answers(history, done_at)
    report = check("14 core SIGKILL while ingesting", seen)
    fault_report(report)
    twice = doubled(history, polled)
    print(
        f"scenario 14 ingest: {len(history)} rows for {jobs} answered jobs, rows seen before the "
        f"kill {before_kill}, answers doubled {len(twice)}, "
        f"all rows {done_at - killed_at:.1f} s after"
    )
    assert_invariants(report)
    assert len(history) == jobs
    assert not twice, dict(list(twice.items())[:5])


def _schedule(path: Path, sid: str, hosts: list[str], port: int, every: int) -> Path:
    targets = ", ".join(f'{{host: "{host}", port: {port}}}' for host in hosts)
    path.write_text(
        "schedules:\n"
        "  - name: fleet\n"
        f"    satellite: {sid}\n"
        f"    every: {every}\n"
        "    spread: false\n"
        "    kind: snmp.get\n"
        f'    params: {{oids: ["{oid_for(1)}"]}}\n'
        '    auth: {version: "2c", community: "public"}\n'
        "    timeout: 5\n"
        f"    targets: [{targets}]\n"
    )
    return path


def _taken_over(replica: ServeProcess) -> list[int]:
    """`publishing` of each `schedule_outbox_taken_over` line of the replica's log."""
    return [
        int(line.get("publishing") or 0)
        for line in replica.log_lines()
        if line.get("event") == "schedule_outbox_taken_over"
    ]


def _finished(poller: PollerProcess, slot: int | None = None) -> int:
    """The poller's `job_finished` lines (of one slot's jobs): one per copy it took."""
    return sum(
        1
        for line in poller.events("job_finished")
        if slot is None or str(line.get("job_id", "")).split(":")[1:2] == [str(slot)]
    )


def _wait(what: str, done: Callable[[], bool], timeout: float, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} after {timeout:g} s:\n{log()[-3000:]}"
        time.sleep(0.1)


def test_a_core_replica_killed_while_it_publishes_scheduled_jobs_sends_each_slot_once(  # noqa: PLR0917
    serve: ServeFactory,
    core_db: str,
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    sid: str,
    tmp_path: Path,
    fault_report: Callable[[Report], None],
) -> None:
    """A replica dies in the confirm window: the test hook `USM_TEST_SERVE_CRASH_AFTER_CONFIRM`
    (1: always) makes it exit right after the broker confirmed its first batch, a whole slot of
    a `spread: false` schedule, before it deletes the slot's outbox rows. It runs alone, so the
    slot is its for sure. Its supervisor starts it again without the hook; the restarted replica
    takes the rows over once their lease (5 s) expires and publishes them again, marked
    `x-usm-resent`, since it cannot know that they went out. No poller runs until then, so
    both copies of every job of the slot are queued: each is answered twice, and the second
    answer is flagged `redelivered` (or, taken while the first runs, is answered by that run:
    the poller joins a flagged copy to a run of the same job). Long: four such crashes, each
    followed by the restarted replica's own slot, published and answered once."""
    every = 20  # a job's TTL: both copies still queued when the poller starts
    crashes = scale(1, 4)
    hosts = [f"127.0.0.{n}" for n in range(1, 31)]
    polled = Observation()
    crashed_slots: list[int] = []
    slots: list[int] = []
    pollers: list[PollerProcess] = []
    with SlowSnmpAgents(hosts, delay=0.02) as devices:
        path = _schedule(tmp_path / "schedules.yaml", sid, hosts, devices.port, every)
        env = {"USM_CORE_DB": core_db, "USM_CORE_SCHEDULES_FILE": str(path)}
        # The satellite's queues, as the core declares them: the jobs wait there for a poller.
        with Client(CoreSettings.from_dsn(amqp_vhost.dsn)) as core:
            core.declare([sid])
        with Collector(amqp_vhost.dsn, sid, polled) as collector:

            def answers(slot: int) -> int:
                return sum(1 for a in polled.answers if a.job_id.split(":")[1] == str(slot))

            for _ in range(crashes):
                victim = serve(env=env | {"USM_TEST_SERVE_CRASH_AFTER_CONFIRM": "1"}, wait=False)
                code = victim.proc.wait(timeout=every + 90)
                assert code == testhooks.CRASH_EXIT, victim.log_text()[-3000:]
                crash = [e for e in victim.log_lines() if e.get("event") == "test_crash"]
                assert crash, victim.log_text()[-3000:]
                slot = int(str(crash[0]["job_id"]).split(":")[1])
                crashed_slots.append(slot)
                slots.append(slot)
                polled.faults.append(time.monotonic())
                survivor = serve(env=env, wait=False)
                _wait(
                    "the slot was not taken over",
                    lambda: sum(_taken_over(survivor)) > 0,  # noqa: B023 - called in the loop
                    60,
                    survivor.log_text,
                )
                fleet = Fleet(start_poller, sid, 1, POLLER)
                fleet.start()
                poller = fleet.slots[0]
                _wait(
                    "the poller did not finish the slot's two copies",
                    lambda: _finished(poller, slot) >= 2 * len(hosts),  # noqa: B023 - in the loop
                    60,
                    poller.log_text,
                )
                pollers.append(poller)
                if LONG:  # and the restarted replica's own slot, once
                    slots.append(slot + every)
                    _wait(
                        "the next slot was not answered",
                        lambda: answers(slot + every) >= len(hosts),  # noqa: B023 - in the loop
                        every + 60,
                        survivor.log_text,
                    )
                collector.wait_for((), timeout=0, settle=1.5)  # late copies
                assert survivor.terminate() == 0
                assert _taken_over(survivor) == [len(hosts)], _taken_over(survivor)
                assert fleet.stop() == [0]
    history = asyncio.run(_rows(core_db, sid))
    wanted = [f"fleet:{slot}:{host}:{devices.port}" for slot in slots for host in hosts]
    resent = {f"fleet:{slot}:{host}:{devices.port}" for slot in crashed_slots for host in hosts}
    # The core "published" every job of the checked slots: the checker wants each answered.
    t0 = time.monotonic() - time.time()
    polled.published = [
        PublishedJob(job_id, True, t0 + int(job_id.split(":")[1])) for job_id in wanted
    ]
    extra = {a.job_id for a in polled.answers} - set(wanted)
    polled.answers = [a for a in polled.answers if a.job_id in set(wanted)]
    report = check("14 core SIGKILL while publishing a schedule", polled)
    fault_report(report)
    seen = Observation(published=polled.published)
    seen.answers = history_answers({k: v for k, v in history.items() if k in wanted}, 0.0)
    in_history = check("14 history of the schedule", seen)
    twice = doubled(history, polled)
    # Each copy of a job the poller took: a run (an answer), or a copy of a job running at
    # that moment, answered by that run (`answered_by_earlier_run`, no second answer).
    finished: dict[str, list[str]] = {}
    for poller in pollers:
        for line in poller.events("job_finished"):
            finished.setdefault(str(line.get("job_id")), []).append(str(line.get("outcome")))
    joined = sum(outcomes.count("answered_by_earlier_run") for outcomes in finished.values())
    print(
        f"scenario 14 schedule: {len(slots)} slots x {len(hosts)} targets, {crashes} crash(es) "
        f"after a confirm, {len(resent)} jobs sent twice: answered {report.answered}, answered "
        f"twice {report.answered_twice} (flagged {report.flagged}), copies answered by the run "
        f"of the other {joined}; rows {len([k for k in wanted if k in history])}, doubled "
        f"{len(twice)}, other slots answered {len(extra)}"
    )
    assert_invariants(report)
    assert_invariants(in_history)
    assert report.answered == len(wanted)
    # Every job of a crashed slot reached the poller twice (the replica's copy and the resent
    # one), every job of a restarted replica's own slot once. A second answer is flagged (the
    # invariants above), in the results and in the history.
    assert {job_id: len(finished.get(job_id, [])) for job_id in wanted} == {
        job_id: 2 if job_id in resent else 1 for job_id in wanted
    }
    assert report.answered_twice + joined == len(resent)
    assert report.flagged == report.answered_twice
    assert in_history.answered_twice == in_history.flagged == report.answered_twice
    assert not twice
