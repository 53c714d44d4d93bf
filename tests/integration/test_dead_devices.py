"""Dead devices never slow the healthy ones: the real poller, the real broker, real black holes.

The dead devices are real black holes on loopback, each on its own 127.0.0.x address (a device
is its host address): SNMP agents that never answer (a UDP socket bound by the test and never
read) and TCP services that never answer (a listener whose accept queue is full, so the kernel
drops new SYNs). The healthy device is the real Net-SNMP agent.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from poller import wire
from tests.support.poller_proc import JobClient, PollerFactory, snmp_job
from tests.support.snmpd import Snmpd

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
