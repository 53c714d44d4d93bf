"""Replica names and the health file of the real `poller run` process (issue 13, part 2)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from poller import __version__, wire
from poller.identity import container_id
from satellite.status import FleetView, satellite_status
from tests.support.poller_proc import JobClient, PollerFactory, snmp_job
from tests.support.snmpd import Snmpd

HOSTNAME = "vm-7"


def _same_host_and_pid() -> list[str]:
    """A command line that runs the rest in new PID and UTS namespaces, as PID 1 of host `vm-7`.

    What `network_mode: host` replicas under one init look like: the same hostname, the same
    PID. `--kill-child`: the poller dies with the `unshare` process the test kills by PID.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--uts", "--", "sh", "-c", f"hostname {HOSTNAME} && echo $$"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot make PID and UTS namespaces here (needs root): {probe.stderr.strip()}")
    return [
        unshare,
        "--pid",
        "--fork",
        "--uts",
        "--kill-child",
        "--",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        HOSTNAME,
    ]


def test_replicas_with_one_hostname_and_pid_get_distinct_names(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    wrap = _same_host_and_pid()
    beats_queue = client.bind_heartbeats()
    first = start_poller(sid, named=False, wrap=wrap, concurrency=2)
    second = start_poller(sid, named=False, wrap=wrap, concurrency=2)
    fleet = FleetView()
    deadline = time.monotonic() + 20
    while len(fleet.replicas(sid)) < 2 and time.monotonic() < deadline:
        body = client.get(beats_queue)
        if body is None:
            time.sleep(0.1)
            continue
        fleet.add(wire.Heartbeat.model_validate_json(body))
    replicas = fleet.replicas(sid)
    names = sorted(r.heartbeat.worker for r in replicas)
    assert len(names) == 2, names
    # Same host name and PID (and container, if the tests run in one): only the random part
    # tells them apart.
    assert {r.heartbeat.hostname for r in replicas} == {HOSTNAME}
    cid = container_id()
    prefix = f"{HOSTNAME}-{cid[:12] if cid else 1}-"
    assert all(name.startswith(prefix) for name in names), names
    started = {e["worker"] for p in (first, second) for e in p.events("poller_started")}
    assert sorted(started) == names
    status = satellite_status(
        sid, queue={"name": wire.jobs_queue(sid)}, dlq=None, fleet=fleet, core_version=__version__
    )
    assert status.advice is not None
    assert status.advice.replicas == 2
    # Results name the replica that ran each job, one of the two.
    ids = [f"j{n}" for n in range(20)]
    for job_id in ids:
        client.publish(snmp_job(snmpd.host, snmpd.port, job_id=job_id))
    results = client.collect_ids(ids, timeout=60)
    assert {r.result.job_id for r in results} == set(ids)
    assert {r.result.worker for r in results} <= set(names)
