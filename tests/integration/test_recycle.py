"""Recycling under load: the real `poller run`, restarted by a supervisor loop like compose's
`restart: unless-stopped`, answers every job exactly once across its recycles."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from poller import wire
from tests.support.poller_proc import JobClient, PollerFactory, PollerProcess, Received, snmp_job
from tests.support.snmpd import Snmpd

#: Bounds of the supervisor loop: starts, and seconds in all.
MAX_STARTS = 40
SUPERVISE_SECONDS = 150.0

pytestmark = pytest.mark.timeout(240)


def supervise(
    start: Callable[[bool], PollerProcess],
    client: JobClient,
    ids: list[str],
    publish: Callable[[], None],
) -> tuple[list[PollerProcess], list[Received]]:
    """Start the poller (`start(wait_ready)`), publish the jobs once it has declared its queue,
    and start it again each time it exits, until a result for every job in `ids` has arrived;
    then SIGTERM the one still running. Returns every process started and every result
    received (collected for a second more at the end, to catch duplicates)."""
    wanted = set(ids)
    runs = [start(True)]
    publish()
    received: list[Received] = []
    deadline = time.monotonic() + SUPERVISE_SECONDS
    while True:
        poller = runs[-1]
        while poller.proc.poll() is None and time.monotonic() < deadline:
            received = client.collect(len(received) + 1, timeout=0.2)
            if wanted <= {r.result.job_id for r in received}:
                break
        if wanted <= {r.result.job_id for r in received}:
            break
        assert poller.proc.poll() is not None, (
            f"no answer to every job in time:\n{poller.log_text()}"
        )
        assert len(runs) < MAX_STARTS, f"{len(runs)} starts and jobs still unanswered"
        runs.append(start(False))
    last = runs[-1]
    if last.events("recycling"):
        last.proc.wait(timeout=30)  # on its way out already: a SIGTERM now could come too late
    elif last.proc.poll() is None:
        assert last.terminate(timeout=30) == 0, last.log_text()
    time.sleep(1.0)  # duplicates, if any, would be on their way
    received = client.collect(len(received) + 1, timeout=0.5)
    return runs, received


def assert_answered_once(ids: list[str], received: list[Received]) -> None:
    counts = Counter(r.result.job_id for r in received)
    assert set(counts) == set(ids)
    twice = {job_id: n for job_id, n in counts.items() if n > 1}
    assert not twice, f"answered more than once: {twice}"
    for r in received:
        # A job that an earlier process held and returned says so.
        assert r.result.redelivered == (r.result.attempt > 1), r.result


def recycle_lines(poller: PollerProcess) -> list[dict[str, object]]:
    return poller.events("recycling")


def test_max_jobs_recycles_a_replica_under_load_and_every_job_is_answered_once(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    tmp_path: Path,
) -> None:
    heartbeats = client.bind_heartbeats()
    ids = [f"mj-{n}" for n in range(150)]

    def publish() -> None:
        for job_id in ids:
            client.publish(snmp_job(snmpd.host, snmpd.port, job_id=job_id))

    def start(wait: bool) -> PollerProcess:
        return start_poller(sid, wait=wait, concurrency=4, prefetch=16, max_jobs=25, max_rss_mb=0)

    runs, received = supervise(start, client, ids, publish)

    assert_answered_once(ids, received)
    assert all(r.result.status == "ok" for r in received)
    recycled = [p for p in runs if recycle_lines(p)]
    assert recycled[: len(runs) - 1] == runs[:-1], "every process but the last recycled"
    assert len(recycled) >= 2, [p.log_text() for p in runs]
    for n, poller in enumerate(recycled, 1):
        assert poller.proc.returncode == 0, poller.log_text()
        [line] = recycle_lines(poller)
        assert line["reason"] == "jobs"
        assert line["max_jobs"] == 25
        assert isinstance(line["jobs"], int)
        assert line["jobs"] >= 25
        assert line["recycles"] == n
        assert poller.events("poller_stopped")
        # It answered what it had taken before it stopped consuming, and stopped while
        # jobs were left for its successors.
        finished = [e for e in poller.events("job_finished") if e.get("outcome") == "ok"]
        assert 25 <= len(finished) < len(ids)
        assert "job_id" not in line
    assert runs[-1].proc.returncode == 0
    record = json.loads((tmp_path / "state" / "recycle.json").read_text())
    assert (record["recycles"], record["reason"]) == (len(recycled), "jobs")
    beats = []
    for _ in range(10_000):
        body = client.get(heartbeats)
        if body is None:
            break
        beats.append(wire.Heartbeat.model_validate_json(body))
    assert any(b.recycles >= 1 and b.last_recycle == "jobs" for b in beats)
    assert {b.recycles for b in beats if b.worker == f"poller-{sid}-0"} == {0}


@pytest.mark.parametrize("max_rss_mb", [1])
def test_rss_limit_recycles_a_replica_under_load_and_every_job_is_answered_once(
    start_poller: PollerFactory,
    client: JobClient,
    sid: str,
    silent_udp_port: int,
    max_rss_mb: int,
) -> None:
    # Any poller is bigger than 1 MB: each recycles at its first look at its RSS after its
    # first answer. The jobs wait on a silent device so that each process holds some when it
    # recycles (running ones finish, those waiting for a slot go back to the queue).
    ids = [f"rss-{n}" for n in range(60)]

    def publish() -> None:
        for job_id in ids:
            client.publish(snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=1.0))

    def start(wait: bool) -> PollerProcess:
        return start_poller(
            sid,
            wait=wait,
            concurrency=8,
            prefetch=12,
            max_rss_mb=max_rss_mb,
            quarantine_after=0,
            snmp_timeout=0.3,
            snmp_retries=2,
            shutdown_grace=10,
        )

    runs, received = supervise(start, client, ids, publish)

    assert_answered_once(ids, received)
    assert all(r.result.error and r.result.error.code == "device_timeout" for r in received)
    assert any(r.result.redelivered for r in received), "no process returned a job it held"
    recycled = [p for p in runs if recycle_lines(p)]
    assert recycled[: len(runs) - 1] == runs[:-1], "every process but the last recycled"
    assert len(recycled) >= 2, [p.log_text() for p in runs]
    assert runs[-1].proc.returncode == 0
    for poller in recycled:
        assert poller.proc.returncode == 0, poller.log_text()
        [line] = recycle_lines(poller)
        assert line["reason"] == "rss"
        assert line["max_rss_mb"] == max_rss_mb
        assert isinstance(line["rss_mb"], float)
        assert line["rss_mb"] > max_rss_mb
        assert isinstance(line["jobs"], int)
        assert line["jobs"] >= 1
        assert not poller.events("drain_timed_out")
