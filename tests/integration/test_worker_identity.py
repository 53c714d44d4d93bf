"""Replica names, the health file and start-up warnings of the real `poller run` (issue 13)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr

from poller import __version__, wire
from poller.config import PollerSettings
from poller.credentials import CredentialStore
from poller.health import HealthState, check
from poller.identity import container_id
from poller.worker import Worker
from satellite.status import FleetView, satellite_status
from tests.support.lane import wait_for
from tests.support.poller_proc import JobClient, PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
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
    started = {e["worker"] for p in (first, second) for e in p.replica_events("poller_started")}
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


def _close_connections_of(vhost: AmqpVhost, user: str) -> None:
    """Close every connection of `user` from the broker's side (`rabbitmqctl close_connection`)."""
    for _ in range(100):
        # Text, not JSON: the JSON formatter writes pids in a form close_connection refuses.
        rows = rabbitmqctl("list_connections", "-p", vhost.name, "user", "pid", "-q")
        rows_split = (row.partition("\t") for row in rows.splitlines())
        pids = [pid for name, _, pid in rows_split if name == user]
        if pids:
            for pid in pids:
                rabbitmqctl("close_connection", pid, "test: connection lost")
            return
        time.sleep(0.1)
    raise AssertionError(f"no connection of {user} to close")


def _read_health(path: Path) -> HealthState | None:
    try:
        return HealthState(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


async def _health_becomes(
    path: Path,
    wanted: Callable[[HealthState], bool],
    timeout: float,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        seen = await loop.run_in_executor(executor, _read_health, path)
        if seen is not None and wanted(seen):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the health file did not change as expected within {timeout} s: {seen}")


async def test_health_file_is_written_when_the_broker_state_changes(
    amqp_vhost: AmqpVhost, sid: str, tmp_path: Path
) -> None:
    """Not on the timer: with rewrites an hour apart, the file still follows the connection."""
    user, password = f"health-{sid}", f"pw-{uuid.uuid4().hex}"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, password)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", amqp_vhost.name, user, ".*", ".*", ".*"
        )
        health = tmp_path / "health.json"
        settings = PollerSettings(
            amqp_dsn=SecretStr(amqp_vhost.dsn_for(user, password)),
            satellite_id=sid,
            health_file=health,
            state_dir=tmp_path,
            heartbeat_interval=60,
            # The health file of this process; a lane process (started from this test's
            # environment, without the DSN) would only fail and be restarted beside it.
            interactive_process=False,
        )
        worker = Worker(
            settings, drivers={}, credentials=CredentialStore.load(None), health_interval=3600
        )
        run = asyncio.create_task(worker.run())
        dedicated = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test")
        try:
            await _health_becomes(health, lambda s: s.connected and s.consuming, timeout=20)
            healthy, reason = check(health)
            assert healthy, reason
            state = _read_health(health)
            # The worker's own tasks at least (run, the health writer, the broker's): a count a
            # soak watches for tasks that outlive their jobs.
            assert state is not None
            assert state.tasks >= 2, state
            # The broker drops the connection and (permissions gone) refuses it from now on.
            await asyncio.to_thread(rabbitmqctl, "clear_permissions", "-p", amqp_vhost.name, user)
            # Meanwhile every thread of the default executor is busy (as with name lookups
            # against a dead DNS server): the health file has a thread of its own.
            release = threading.Event()
            loop = asyncio.get_running_loop()
            held = [loop.run_in_executor(None, release.wait, 60) for _ in range(40)]
            try:
                await loop.run_in_executor(dedicated, _close_connections_of, amqp_vhost, user)
                await _health_becomes(
                    health, lambda s: not s.connected, timeout=20, executor=dedicated
                )
            finally:
                release.set()
                await asyncio.gather(*held)
            healthy, reason = check(health)
            assert not healthy
            assert "not connected to the broker" in reason
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(run, timeout=60) == 0
            dedicated.shutdown()
        healthy, reason = check(health)
        assert not healthy, "a stopped worker's file says so (written at shutdown)"
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)


def test_poller_run_warns_once_about_a_misspelt_variable_and_runs(
    start_poller: PollerFactory, sid: str
) -> None:
    poller = start_poller(sid, concurency="secret-looking-value")
    # Once per replica: its lane process (same environment) does not say it again.
    wait_for("the lane process", lambda: bool(poller.lane_events("poller_started")), 30)
    [warning] = poller.events("unknown_setting_ignored")
    assert warning["level"] == "warning"
    assert warning["variable"] == "USM_POLLER_CONCURENCY"
    assert warning["did_you_mean"] == "USM_POLLER_CONCURRENCY"
    assert "secret-looking-value" not in poller.log_text()
    [started] = poller.replica_events("poller_started")
    assert started["concurrency"] == 64
    assert poller.terminate() == 0
