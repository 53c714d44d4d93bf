"""Dead devices never slow the healthy ones: the real poller, the real broker, real black holes.

The dead devices are real black holes on loopback, each on its own 127.0.0.x address (a device
is its host address): SNMP agents that never answer (a UDP socket bound by the test and never
read) and TCP services that never answer (a listener whose accept queue is full, so the kernel
drops new SYNs). The healthy device is the real Net-SNMP agent.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from poller import wire
from tests.support.poller_proc import IN_PROCESS_LANE, JobClient, PollerFactory, snmp_job
from tests.support.snmpd import Snmpd

#: The replica's bulk admission, window and quarantine: no interactive jobs, so a lane process
#: beside it would only cost time.
pytestmark = IN_PROCESS_LANE

DEAD_SNMP = [f"127.0.0.{n}" for n in range(11, 19)]
DEAD_TCP = [f"127.0.0.{n}" for n in range(21, 23)]
DEAD_TIMEOUT = 2.0


def silent_udp(stack: ExitStack, host: str) -> int:
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind((host, 0))
    port: int = sock.getsockname()[1]
    return port


def silent_tcp(stack: ExitStack, host: str) -> int:
    """A listener that never accepts, with a full accept queue: SYNs get no answer."""
    server = stack.enter_context(socket.socket())
    server.bind((host, 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    for _ in range(16):
        client = stack.enter_context(socket.socket())
        client.settimeout(0.3)
        try:
            client.connect((host, port))
        except TimeoutError:
            return port
    raise AssertionError("the accept queue never filled up")


@pytest.fixture
def dead_devices() -> Iterator[dict[str, tuple[str, int]]]:
    """{host: (kind, port)} of black-holed devices on loopback."""
    with ExitStack() as stack:
        devices = {host: ("snmp.get", silent_udp(stack, host)) for host in DEAD_SNMP}
        devices |= {host: ("tcp.connect", silent_tcp(stack, host)) for host in DEAD_TCP}
        yield devices


def dead_job(host: str, kind: str, port: int, n: int) -> dict[str, Any]:
    job_id = f"dead-{host}-{n}"
    if kind == "snmp.get":
        return snmp_job(host, port, job_id=job_id, timeout=DEAD_TIMEOUT)
    return {
        "v": 1,
        "id": job_id,
        "kind": "tcp.connect",
        "target": {"host": host},
        "params": {"port": port},
        "timeout": DEAD_TIMEOUT,
    }


def read_heartbeats(client: JobClient, queue: str, *, until: float) -> Iterator[wire.Heartbeat]:
    while time.monotonic() < until:
        body = client.get(queue)
        if body is None:
            time.sleep(0.1)
            continue
        yield wire.Heartbeat.model_validate_json(body)


def test_dead_devices_are_quarantined_and_healthy_jobs_all_succeed(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    dead_devices: dict[str, tuple[str, int]],
) -> None:
    poller = start_poller(sid)
    heartbeats = client.bind_heartbeats()
    dead_ids, healthy_ids = [], []
    hosts = list(dead_devices)
    for n in range(300):
        host = hosts[n % len(hosts)]
        kind, port = dead_devices[host]
        job = dead_job(host, kind, port, n)
        dead_ids.append(job["id"])
        client.publish(job)
        healthy = snmp_job(snmpd.host, snmpd.port, job_id=f"ok-{n}", timeout=10)
        healthy_ids.append(healthy["id"])
        client.publish(healthy)
    started = time.monotonic()
    results = {r.result.job_id: r.result for r in client.collect_ids(dead_ids + healthy_ids, 40)}
    elapsed = time.monotonic() - started
    assert set(results) == set(dead_ids + healthy_ids), f"{len(results)} of 600 results"

    for job_id in healthy_ids:
        assert results[job_id].status == "ok", (job_id, results[job_id].error)
    codes: dict[str, int] = {}
    for job_id in dead_ids:
        result = results[job_id]
        assert result.error is not None
        assert result.error.retryable
        assert result.duration_ms <= DEAD_TIMEOUT * 1.2 * 1000, (job_id, result.duration_ms)
        codes[result.error.code] = codes.get(result.error.code, 0) + 1
    # Only jobs that reached a device before its quarantine time out: at most the 4 running at
    # once (USM_POLLER_PER_DEVICE_CONCURRENCY) plus the 2 that take the slots freed by the first
    # 2 timeouts. Every other job is answered at once.
    assert set(codes) == {"device_timeout", "device_unreachable"}, codes
    assert codes["device_timeout"] <= (4 + 2) * len(dead_devices), codes
    quarantined = [i for i in dead_ids if "quarantined" in str(results[i].error)]
    assert len(quarantined) == codes["device_unreachable"]
    print(f"600 results in {elapsed:.1f} s; dead jobs: {codes}")
    assert elapsed < 3 * DEAD_TIMEOUT + 10  # not 300 jobs x 2 s spread over 64 slots

    seen: set[str] = set()
    for beat in read_heartbeats(client, heartbeats, until=time.monotonic() + 10):
        seen = {entry.device for entry in beat.quarantine}
        if seen >= set(dead_devices):
            entry = beat.quarantine[0]
            assert 29 <= (entry.until - entry.since).total_seconds() <= 31  # default cool-down
            assert entry.last_error
            break
    assert seen == set(dead_devices)

    # "Which device is slow" is one grep: every job_finished line names its device and time.
    finished = poller.events("job_finished")
    assert len(finished) >= 600
    by_id = {line["job_id"]: line for line in finished}
    for job_id in dead_ids + healthy_ids:
        assert isinstance(by_id[job_id]["duration_ms"], float)
    assert {by_id[i]["device"] for i in dead_ids} == set(dead_devices)
    assert {by_id[i]["device"] for i in healthy_ids} == {snmpd.host}
    warnings = [line for line in poller.events("device_quarantined") if line["level"] == "warning"]
    assert {line["device"] for line in warnings} == set(dead_devices)


def healthy_behind_dead(
    client: JobClient, snmpd: Snmpd, *, subnet: str, tag: str, healthy: int
) -> None:
    """60 jobs for 12 unknown silent devices (4 s deadline), then `healthy` jobs for snmpd.

    The healthy device answers once first (it is trusted from then on). Every healthy job must
    be answered ok within 2 s of its publish (not after the dead ones' 4 s), and every dead one
    answered within its deadline x 1.2.
    """
    warm = snmp_job(snmpd.host, snmpd.port, job_id="warm")
    client.publish(warm)
    assert client.collect_ids([warm["id"]], timeout=20)[0].result.status == "ok"
    with ExitStack() as stack:
        hosts = [f"{subnet}.{n}" for n in range(1, 13)]
        ports = {host: silent_udp(stack, host) for host in hosts}
        dead_ids = []
        for n in range(60):
            host = hosts[n % len(hosts)]
            job = snmp_job(host, ports[host], job_id=f"{tag}-dead-{n}", timeout=4)
            dead_ids.append(job["id"])
            client.publish(job)
        sent: dict[str, float] = {}
        for n in range(healthy):
            job = snmp_job(snmpd.host, snmpd.port, job_id=f"{tag}-ok-{n}", timeout=10)
            sent[job["id"]] = time.time()
            client.publish(job)
        received = client.collect_ids(list(sent), 20)
        results = {r.result.job_id: r.result for r in received if r.result.job_id in sent}
        assert set(results) == set(sent)
        assert all(r.status == "ok" for r in results.values())
        waited = [results[i].finished_at.timestamp() - sent[i] for i in sent]
        # Not the 4 s the dead jobs ahead of them take: they were never behind them.
        assert max(waited) < 2.0, sorted(waited)[-3:]
        received = client.collect_ids(dead_ids, 30)
        dead = {r.result.job_id: r.result for r in received if r.result.job_id in dead_ids}
    assert set(dead) == set(dead_ids)
    for result in dead.values():
        assert result.error is not None
        assert result.error.code in {"device_timeout", "device_unreachable"}
        assert result.duration_ms <= 4 * 1.2 * 1000


def test_a_wave_of_jobs_for_unknown_silent_devices_does_not_hold_up_healthy_ones(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    """The cold case: dead devices the poller has never seen, queued ahead of healthy jobs.

    With 8 run slots, 60 jobs for 12 silent devices (5 each, 4 s deadline) would hold every
    slot for 4 s if they could; they may hold half (untrusted devices), and the prefetch window
    is larger than the concurrency, so the healthy jobs queued behind them are delivered and run
    at once instead of waiting for the dead ones' deadlines.
    """
    start_poller(sid, concurrency=8)
    healthy_behind_dead(client, snmpd, subnet="127.0.2", tag="cold", healthy=20)


def test_a_burst_of_dead_jobs_larger_than_the_window_does_not_hold_up_healthy_ones(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    """More jobs for unknown silent devices than the prefetch window holds, queued first.

    With 8 run slots and a window of 16, the first 16 of the 60 dead jobs would fill the window
    (4 running, the rest waiting for their devices) and the healthy jobs behind them would not
    be delivered before those time out. Once half the window waits with run slots free, a
    spare consumer widens it, so the healthy jobs arrive and run at once.
    """
    poller = start_poller(sid, concurrency=8, prefetch=16)
    healthy_behind_dead(client, snmpd, subnet="127.0.3", tag="burst", healthy=10)
    (widened,) = poller.events("window_widened")
    assert (widened["prefetch"], widened["spare_prefetch"]) == (16, 48)
    deadline = time.monotonic() + 10
    while not poller.events("window_narrowed") and time.monotonic() < deadline:
        time.sleep(0.1)  # nothing waits any more: the spare closes within a check interval
    assert poller.events("window_narrowed")


def test_sigterm_returns_the_jobs_still_waiting_for_a_slot_at_once(
    start_poller: PollerFactory, client: JobClient, sid: str, silent_udp_port: int
) -> None:
    """Draining finishes running jobs only; jobs that never started go back to the queue."""
    poller = start_poller(sid, concurrency=2, shutdown_grace=20)
    ids = [f"wait-{n}" for n in range(10)]
    for job_id in ids:
        client.publish(snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=6))
    queue = wire.jobs_queue(sid)
    deadline = time.monotonic() + 10
    while client.queue_depth(queue) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.queue_depth(queue) == 0  # all 10 delivered: 1 running (untrusted), 9 waiting
    poller.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while client.queue_depth(queue) < 9 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.queue_depth(queue) == 9
    assert poller.proc.poll() is None  # still finishing the one job it started
    assert poller.terminate(timeout=30) == 0
    (returned,) = poller.events("returning_unstarted_jobs")
    assert returned["count"] == 9
    (result,) = client.collect(1, timeout=10)
    assert result.result.error is not None
    assert result.result.error.code == "device_timeout"
    assert client.queue_depth(queue) == 9
