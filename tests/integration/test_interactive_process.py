"""The interactive lane in a process of its own (`USM_POLLER_INTERACTIVE_PROCESS=true`, the
default; poller/laneproc.py), with the real poller, the real broker and slow devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from poller import wire
from tests.support.lane import (
    LANE_HOST,
    ReplyQueue,
    ask_the_lane,
    publish_bulk,
    wait_for,
)
from tests.support.poller_proc import JobClient, PollerFactory, PollerProcess, snmp_job
from tests.support.procs import has_ended
from tests.support.rabbitmq import AmqpVhost
from tests.support.slow_snmp import SlowSnmpAgents

pytestmark = pytest.mark.integration

#: Dead devices: one made dead by lane jobs, one by bulk jobs.
LANE_DEAD, BULK_DEAD = "127.0.0.51", "127.0.0.52"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port where nothing ever answers, on the two dead devices' addresses."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.bind((LANE_DEAD, 0))
    port = first.getsockname()[1]
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second.bind((BULK_DEAD, port))
    yield port
    first.close()
    second.close()


def lane_pids(poller: PollerProcess) -> list[int]:
    return [int(e["pid"]) for e in poller.events("interactive_process_started")]


@pytest.mark.timeout(90)
def test_the_lane_process_overtakes_a_saturating_bulk_backlog(
    *,
    amqp_vhost: AmqpVhost,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    replies: ReplyQueue,
    slow_devices: SlowSnmpAgents,
) -> None:
    poller = start_poller(sid, concurrency=8, interactive_process="true")
    wait_for("the lane process started", lambda: bool(lane_pids(poller)), 20)
    publish_bulk(amqp_vhost.dsn, sid, slow_devices.port, 5000)
    wait_for("the poller saturated", lambda: slow_devices.answered >= 50, 20)
    answers = ask_the_lane(poller, replies, sid, slow_devices.port)
    latencies = [seconds for seconds, _ in answers]
    workers = {result.worker for _, result in answers}
    backlog = client.queue_depth(wire.jobs_queue(sid))
    assert backlog > 4000, f"the bulk backlog drained too fast to prove anything: {backlog}"
    assert max(latencies) < 1.0, sorted(latencies)
    # The lane process answered them; the replica the bulk jobs.
    assert workers == {f"poller-{sid}-0-lane"}
    bulk = client.collect(1, timeout=10)
    assert bulk[0].result.worker == f"poller-{sid}-0"
    assert bulk[0].props.headers[wire.LANE_HEADER] == "bulk"
    client._ch.queue_purge(wire.jobs_queue(sid))
    assert client.queue_depth(wire.interactive_queue(sid)) == 0
    [pid] = lane_pids(poller)

    def health_says_lane_pid() -> bool:
        return bool(json.loads(poller.health_path.read_text(encoding="utf-8"))["lane_pid"] == pid)

    wait_for("the health file names the lane process", health_says_lane_pid, 15)
    assert poller.terminate() == 0
    assert has_ended(pid), "the lane process outlived its replica's stop"
    assert not poller.events("broker_channel_closed")
    assert not poller.events("interactive_process_exited")


@pytest.mark.timeout(90)
def test_the_quarantine_is_shared_both_ways(
    *,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    silent_port: int,
) -> None:
    poller = start_poller(
        sid, interactive_process="true", quarantine_after=2, quarantine_seconds=60
    )
    wait_for("the lane process started", lambda: bool(lane_pids(poller)), 20)
    # Two lane jobs time out in the lane process, two bulk jobs in the replica.
    for n in range(2):
        client.publish(
            snmp_job(LANE_DEAD, silent_port, job_id=f"lane-dead-{n}", timeout=1.5),
            interactive=True,
        )
        client.publish(snmp_job(BULK_DEAD, silent_port, job_id=f"bulk-dead-{n}", timeout=1.5))
    client.collect(4, timeout=20)

    def quarantined() -> set[str]:
        return {str(e["device"]) for e in poller.events("device_quarantined")}

    # The replica quarantined both: the lane's timeouts count there too...
    wait_for("the replica quarantined both", lambda: quarantined() >= {LANE_DEAD, BULK_DEAD}, 10)
    assert {e["worker"] for e in poller.events("device_quarantined")} >= {f"poller-{sid}-0"}
    # ...so a bulk job for the lane's dead device is answered at once, without contacting it,
    # and a lane job for the bulk jobs' dead device too (the replica told the lane process).
    client.publish(snmp_job(LANE_DEAD, silent_port, job_id="bulk-refused", timeout=5))
    client.publish(
        snmp_job(BULK_DEAD, silent_port, job_id="lane-refused", timeout=5), interactive=True
    )
    got = {
        r.result.job_id: r.result
        for r in client.collect_ids(["bulk-refused", "lane-refused"], timeout=10)
    }
    for job_id, worker in (
        ("bulk-refused", f"poller-{sid}-0"),
        ("lane-refused", f"poller-{sid}-0-lane"),
    ):
        result = got[job_id]
        assert result.error is not None, result
        assert result.error.code == "device_unreachable", result.error
        assert result.worker == worker
        assert result.duration_ms < 1000, result.duration_ms
    assert poller.terminate() == 0


@pytest.mark.timeout(90)
def test_a_lane_process_that_dies_is_started_again_and_dies_with_its_replica(
    *,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    slow_devices: SlowSnmpAgents,
) -> None:
    poller = start_poller(sid, interactive_process="true")
    wait_for("the lane process started", lambda: bool(lane_pids(poller)), 20)
    [first] = lane_pids(poller)
    os.kill(first, signal.SIGKILL)
    wait_for("a new lane process", lambda: len(lane_pids(poller)) == 2, 20)
    [exited] = poller.events("interactive_process_exited")
    assert exited["exit_code"] == -signal.SIGKILL
    client.publish(snmp_job(LANE_HOST, slow_devices.port, job_id="after"), interactive=True)
    [got] = client.collect(1, timeout=30)
    assert got.result.status == "ok", got.result.error
    assert got.result.worker == f"poller-{sid}-0-lane"
    # The replica killed outright: its lane process stops too (it drains and exits).
    second = lane_pids(poller)[-1]
    poller.kill()
    wait_for("the lane process gone", lambda: has_ended(second), 20)


MIB = 2**20


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}


@pytest.mark.timeout(120)
def test_the_replica_counts_its_lane_process_memory(
    *, sid: str, start_poller: PollerFactory, client: JobClient
) -> None:
    """Heartbeats' `rss_bytes` (what recycling compares with USM_POLLER_MAX_RSS_MB) are the
    replica's RSS plus its lane process's private memory, and `max_rss_below_start` comes
    when only the sum is above the limit."""
    beats = client.bind_heartbeats()
    poller = start_poller(sid, max_rss_mb=100_000)  # on, never reached
    wait_for("the lane process started", lambda: bool(poller.lane_events("poller_started")), 30)
    [lane] = lane_pids(poller)
    replica, lane_memory = _memory(poller.pid), _memory(lane)
    assert lane_memory["RssAnon"] > 10 * MIB, lane_memory
    counted: list[int] = []

    def counted_with_the_lane() -> bool:
        body = client.get(beats)
        if body is not None:
            counted.append(wire.Heartbeat.model_validate_json(body).rss_bytes)
        return bool(counted) and counted[-1] > replica["VmRSS"] + lane_memory["RssAnon"] // 2

    wait_for("a heartbeat counting the lane process", counted_with_the_lane, 20)
    assert counted[-1] < replica["VmRSS"] + lane_memory["VmRSS"], "its files counted twice"
    assert not poller.events("max_rss_below_start")
    assert poller.terminate() == 0

    # A limit between an idle replica alone and an idle replica with its lane process (the
    # lane's private memory halved on each side): the warning comes once the lane has started.
    limit_mb = (replica["VmRSS"] + lane_memory["RssAnon"] // 2) // MIB
    second = start_poller(sid, max_rss_mb=limit_mb)
    wait_for("the warning", lambda: bool(second.events("max_rss_below_start")), 30)
    [warning] = second.events("max_rss_below_start")
    assert warning["max_rss_mb"] == limit_mb
    assert warning["rss_mb"] > limit_mb
    assert warning["lane_private_mb"] > 0
    assert warning["rss_mb"] == pytest.approx(
        warning["replica_rss_mb"] + warning["lane_private_mb"], abs=0.2
    )
    assert second.terminate() == 0


def test_poller_lane_started_by_hand_says_what_it_is_for() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "poller", "lane", "--control-fd", "99"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--control-fd 99 is not an open socket" in done.stderr
    assert "USM_POLLER_INTERACTIVE_PROCESS" in done.stderr
