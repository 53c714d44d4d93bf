"""Recycling under load: the real `poller run`, restarted by a supervisor loop like compose's
`restart: unless-stopped`, answers every job exactly once across its recycles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from poller import wire
from poller.health import check
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
    feed: Callable[[], None],
) -> tuple[list[PollerProcess], list[Received]]:
    """Start the poller (`start(wait_ready)`), then call `feed()` (which publishes the jobs due
    by now) and collect results, starting the poller again each time it exits, until a result
    for every job in `ids` has arrived; then SIGTERM the one still running. Returns every
    process started and every result received (collected for a second more at the end, to
    catch duplicates)."""
    wanted = set(ids)
    runs = [start(True)]  # ready: its queue is declared before the first job is published
    received: list[Received] = []

    def answered() -> bool:
        return wanted <= {r.result.job_id for r in received}

    deadline = time.monotonic() + SUPERVISE_SECONDS
    while True:
        poller = runs[-1]
        while poller.proc.poll() is None and time.monotonic() < deadline and not answered():
            feed()
            received = client.collect(len(received) + 1, timeout=0.1)
        # Its last results may still be on their way.
        received = client.collect(len(received) + 1, timeout=0.3)
        if answered():
            break
        assert poller.proc.poll() is not None, f"jobs unanswered in time:\n{poller.log_text()}"
        assert len(runs) < MAX_STARTS, f"{len(runs)} starts and jobs still unanswered"
        runs.append(start(False))
    last = runs[-1]
    # A SIGTERM before its handler is installed (while it starts) would kill it: wait until
    # it is ready, unless it is on its way out by itself.
    until = time.monotonic() + 30
    while last.proc.poll() is None and not last.events("recycling") and time.monotonic() < until:
        if check(last.health_path)[0]:
            assert last.terminate(timeout=30) == 0, last.log_text()
            break
        time.sleep(0.1)
    assert last.proc.wait(timeout=30) == 0, last.log_text()
    time.sleep(1.0)  # duplicates, if any, would be on their way
    received = client.collect(len(received) + 1, timeout=0.5)
    return runs, received


def assert_answered_once(ids: list[str], received: list[Received]) -> None:
    counts = Counter(r.result.job_id for r in received)
    assert set(counts) == set(ids)
    twice = {job_id: n for job_id, n in counts.items() if n > 1}
    copies = [
        (r.result.job_id, r.result.worker, r.result.attempt, r.result.redelivered, r.result.status)
        for r in received
        if r.result.job_id in twice
    ]
    assert not twice, (
        f"answered more than once: {twice}: (id, worker, attempt, redelivered, status): {copies}"
    )
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

    unpublished = list(ids)

    def feed() -> None:  # all at once
        while unpublished:
            client.publish(snmp_job(snmpd.host, snmpd.port, job_id=unpublished.pop(0)))

    def start(wait: bool) -> PollerProcess:
        # No lane jobs: a lane process per restart would only cost time (the RSS test below
        # keeps it, to recycle on the memory of both).
        return start_poller(
            sid,
            wait=wait,
            concurrency=4,
            prefetch=16,
            max_jobs=25,
            max_rss_mb=0,
            interactive_process="false",
        )

    runs, received = supervise(start, client, ids, feed)

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
        assert not poller.events("max_rss_below_start")  # MAX_RSS_MB=0: off
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


def test_rss_limit_recycles_a_replica_under_load_and_every_job_is_answered_once(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    silent_udp_port: int,
) -> None:
    max_rss_mb = 1  # any poller is bigger
    # Each process recycles at its first look at its RSS after its first answer. A steady
    # stream of jobs, half of them for a silent device: those hold run slots and wait for
    # them, so each process has jobs running (they finish) and jobs waiting (they go back to
    # the queue) when it recycles.
    ids = [f"rss-{n}" for n in range(100)]
    due = time.monotonic()
    unpublished = list(ids)

    def feed() -> None:  # two jobs every 0.1 s
        nonlocal due
        while unpublished and time.monotonic() >= due:
            for _ in range(2):
                job_id = unpublished.pop(0)
                if int(job_id.removeprefix("rss-")) % 2:
                    job = snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=1.0)
                else:
                    job = snmp_job(snmpd.host, snmpd.port, job_id=job_id)
                client.publish(job)
            due += 0.1

    def start(wait: bool) -> PollerProcess:
        return start_poller(
            sid,
            wait=wait,
            concurrency=8,
            max_rss_mb=max_rss_mb,
            quarantine_after=0,
            snmp_timeout=0.3,
            snmp_retries=2,
            shutdown_grace=10,
        )

    runs, received = supervise(start, client, ids, feed)

    assert_answered_once(ids, received)
    for r in received:
        silent = int(r.result.job_id.removeprefix("rss-")) % 2
        expected = "device_timeout" if silent else None
        assert (r.result.error.code if r.result.error else None) == expected, r.result
    assert any(r.result.redelivered for r in received), "no process returned a job it held"
    recycled = [p for p in runs if recycle_lines(p)]
    assert recycled[: len(runs) - 1] == runs[:-1], "every process but the last recycled"
    assert len(recycled) >= 2, [p.log_text() for p in runs]
    for poller in recycled:
        assert poller.proc.returncode == 0, poller.log_text()
        [line] = recycle_lines(poller)
        assert line["reason"] == "rss"
        assert line["max_rss_mb"] == max_rss_mb
        assert isinstance(line["rss_mb"], float)
        assert line["rss_mb"] > max_rss_mb
        # The replica and its lane process (the default; 0 until it has started).
        replica, lane = line["replica_rss_mb"], line["lane_private_mb"]
        assert isinstance(replica, float), line
        assert isinstance(lane, float), line
        assert line["rss_mb"] == pytest.approx(replica + lane, abs=0.2)
        assert isinstance(line["jobs"], int)
        assert line["jobs"] >= 1
        assert not poller.events("drain_timed_out")
        [warning] = poller.events("max_rss_below_start")  # once, not again for the lane
        assert warning["max_rss_mb"] == max_rss_mb
        assert poller.lane_events("poller_stopped") or not poller.lane_events("poller_started")


#: A process that abandons a Net-SNMP call (as a job that times out against a dead device does)
#: and ends while that call's thread is still blocked in it: the thread comes back while the
#: interpreter is torn down (kept busy here by an object whose finalizer sleeps).
ABANDONING_CHILD = r"""
import asyncio, json, socket, sys, time
from poller.cli import end_after_exit_handlers
from poller.drivers import snmp_netsnmp as netsnmp
from poller.drivers.snmp import SnmpTarget
from poller.wire import SnmpAuth

end = end_after_exit_handlers()
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
silent.bind(("127.0.0.1", 0))


async def main():
    loop = asyncio.get_running_loop()
    backend = netsnmp.NetsnmpBackend()
    auth = SnmpAuth(version="2c", community="public")
    port = silent.getsockname()[1]
    target = SnmpTarget("127.0.0.1", port, auth, loop.time() + 10, 0.5, 0, 1 << 20)
    try:
        await asyncio.wait_for(backend.get(target, ["1.3.6.1.2.1.1.5.0"]), 0.1)
    except TimeoutError:
        print(json.dumps({"private": netsnmp._Process.private}), flush=True)
    await backend.aclose()


class SlowTeardown:
    def __del__(self):
        time.sleep(1.5)


asyncio.run(main())
slow = SlowTeardown()
sys.exit(end(0))
"""


def test_poller_run_exits_with_its_code_while_a_net_snmp_call_is_abandoned(
    tmp_path: Path,
) -> None:
    # Without `end_after_exit_handlers` this child aborts (SIGABRT: "terminate called without
    # an active exception") as the abandoned call's thread comes back during the teardown.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", ABANDONING_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr
    private = Path(json.loads(proc.stdout)["private"])
    assert private.parent.is_dir()
    assert not private.exists(), "the exit handlers ran before the end (its directory removed)"
