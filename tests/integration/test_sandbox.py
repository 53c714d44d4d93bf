"""The real `poller run` with its sandbox (poller/sandbox.py) against the real RabbitMQ and a real
Net-SNMP agent: a job that kills the process running it costs its sandbox child, not the poller.

`USM_POLLER_SANDBOX_AFTER=0` sends every job to the sandbox, so that one poller and one batch show
the whole rule without the two poller crashes of docs/reliability.md, scenario 11 (which
tests/faults/test_crashes.py runs with the default). The crash is the test-only hook
`USM_TEST_CRASH_ON_JOB` (poller/testhooks.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from poller import wire
from poller.config import PollerSettings
from poller.drivers.base import JobContext
from poller.sandbox import Sandbox
from tests.support import fake_devices
from tests.support.poller_proc import IN_PROCESS_LANE, JobClient, PollerFactory, data, snmp_job
from tests.support.snmpd import Snmpd
from tests.support.sshd import SshdServer

SYS_NAME = "1.3.6.1.2.1.1.5.0"

#: The replica's sandbox process (its lane process would fork one more, and log again).
pytestmark = [pytest.mark.timeout(180), IN_PROCESS_LANE]


def test_a_job_that_kills_its_sandbox_child_is_answered_worker_crashed_and_the_poller_lives(
    monkeypatch: pytest.MonkeyPatch,
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
) -> None:
    monkeypatch.setenv("USM_TEST_CRASH_ON_JOB", "poison")
    poller = start_poller(sid, sandbox_after=0, concurrency=4)
    innocents = [f"innocent-{n}" for n in range(3)]
    for job_id in [innocents[0], "poison", *innocents[1:]]:
        client.publish(snmp_job(snmpd.host, snmpd.port, oids=[SYS_NAME], job_id=job_id))

    results = client.by_id(4, timeout=120)

    assert sorted(results) == sorted([*innocents, "poison"])
    for job_id in innocents:
        assert results[job_id].status == "ok", results[job_id].error
        assert data(results[job_id])["varbinds"][0]["oid"] == SYS_NAME
    poison = results["poison"]
    assert poison.error is not None
    assert poison.error.code == "worker_crashed"
    assert not poison.error.retryable
    assert "exited with code 86 without an answer" in poison.error.message
    # Requeued after each crash of its child, answered on the last delivery the queue allows.
    assert poison.attempt == wire.DEFAULT_DELIVERY_LIMIT
    assert poison.redelivered
    dead = client.drain_dlq()
    assert [props.message_id for props, _body in dead] == ["poison"]

    assert poller.proc.poll() is None, "the poller itself never crashed"
    assert len(poller.events("test_crash")) == wire.DEFAULT_DELIVERY_LIMIT
    assert len(poller.events("sandbox_child_died")) == wire.DEFAULT_DELIVERY_LIMIT
    [started] = poller.events("poller_started")
    sandbox_pid = started["sandbox_pid"]
    assert [e["pid"] for e in poller.events("sandbox_started")] == [sandbox_pid]
    assert sandbox_pid != poller.pid
    assert poller.terminate(30) == 0
    assert gone(sandbox_pid), "the sandbox process ends with the poller"


def test_the_sandbox_process_goes_with_a_poller_that_is_killed(
    start_poller: PollerFactory, sid: str
) -> None:
    poller = start_poller(sid)
    [started] = poller.events("poller_started")
    sandbox_pid = started["sandbox_pid"]
    assert isinstance(sandbox_pid, int)
    assert not gone(sandbox_pid, wait=0)
    poller.kill()
    assert gone(sandbox_pid), "it read EOF on its pipe and exited"


def gone(pid: int, wait: float = 10.0) -> bool:
    """Whether process `pid` has exited (a zombie counts), waiting up to `wait` s for it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


async def test_every_driver_runs_in_a_sandbox_child(
    snmpd: Snmpd, sshd_server: SshdServer, tmp_path: Path
) -> None:
    """Each kind's driver, built in a child of the sandbox process (spawned here: this test
    process does not fork its event loop), against a real device of the test. The SNMP
    backend is the default one (Net-SNMP where ezsnmp imports); the pysnmp backend passed the
    same test by hand (`snmp_backend="pysnmp"`), left out of CI for its time."""
    settings = PollerSettings(
        amqp_dsn="amqp://guest:guest@127.0.0.1/", satellite_id="sandbox-kinds", state_dir=tmp_path
    )
    sandbox = Sandbox(settings, slots=2)
    ssh_auth = {
        "username": sshd_server.user,
        "private_key": sshd_server.client_key,
        "host_key": sshd_server.host_key,
    }
    cli_auth = {"username": fake_devices.USERNAME, "password": fake_devices.PASSWORD}

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        request = wire.decode_job(json.dumps({"v": 1, "timeout": 20, **job}).encode())
        ctx = JobContext(asyncio.get_running_loop().time() + 20, 1 << 20)
        async with sandbox.slot():
            data = await sandbox.run(request, request.auth, ctx)
        answer: dict[str, Any] = json.loads(json.dumps(data))
        return answer

    try:
        snmp = await run(snmp_job(snmpd.host, snmpd.port, oids=[SYS_NAME], job_id="s"))
        assert snmp["varbinds"][0]["oid"] == SYS_NAME
        local = {"host": "127.0.0.1"}
        ping = await run({"id": "p", "kind": "icmp.ping", "target": local, "params": {}})
        assert ping["received"] == ping["sent"] == 3
        ssh = await run(
            {
                "id": "x",
                "kind": "ssh.exec",
                "target": {**local, "port": sshd_server.port},
                "params": {"commands": ["echo sandboxed"]},
                "auth": ssh_auth,
            }
        )
        assert ssh["results"][0]["stdout"] == "sandboxed\n"
        for kind, device in (
            ("ssh.cli", fake_devices.fake_ssh_device("cisco_ios")),
            ("telnet.cli", fake_devices.fake_telnet_device("cisco_ios")),
        ):
            async with device as fake:
                cli = await run(
                    {
                        "id": kind,
                        "kind": kind,
                        "target": {**local, "port": fake.port},
                        "params": {"platform": "cisco_ios", "commands": ["show version"]},
                        "auth": cli_auth,
                    }
                )
            expected = fake_devices.expected_output("cisco_ios", "show version")
            assert cli["results"][0]["output"] == expected, kind
        assert sandbox.crashed == 0
        assert sandbox.started == 5
    finally:
        await sandbox.aclose()
