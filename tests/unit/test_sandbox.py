"""Suspect jobs in sandbox children (poller/sandbox.py): real child processes, real drivers.

The jobs are `tcp.connect` to a socket of the test. The crash is the test-only hook
`USM_TEST_CRASH_ON_JOB` (poller/testhooks.py), which the sandbox process inherits from this
process's environment at its start; this process read it (empty) at import, so it never
crashes the test run itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from poller import wire
from poller.config import PollerSettings
from poller.credentials import CredentialStore
from poller.drivers.base import JobContext
from poller.drivers.tcp import TcpDriver
from poller.errors import JobError, WorkerCrashedError
from poller.quarantine import Quarantine
from poller.runner import Attempt, Runner
from poller.sandbox import Sandbox
from poller.wire import JobRequest

POISON = "poison-1"

pytestmark = pytest.mark.timeout(120)


def settings() -> PollerSettings:
    return PollerSettings(amqp_dsn="amqp://guest:guest@127.0.0.1/", satellite_id="sandbox-test")


def tcp_job(job_id: str, port: int, timeout: float = 10.0) -> JobRequest:
    job = {
        "v": 1,
        "id": job_id,
        "kind": "tcp.connect",
        "target": {"host": "127.0.0.1"},
        "params": {"port": port},
        "timeout": timeout,
    }
    return wire.decode_job(json.dumps(job).encode())


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv("USM_TEST_CRASH_ON_JOB", POISON)
    box = Sandbox(settings(), slots=2)
    try:
        yield box
    finally:
        await box.aclose()


def ctx(seconds: float = 10.0) -> JobContext:
    return JobContext(
        deadline=asyncio.get_running_loop().time() + seconds, max_output_bytes=1 << 20
    )


async def test_a_child_that_dies_blames_only_its_job(
    sandbox: Sandbox, listening: int, closed_port: int
) -> None:
    async with sandbox.slot():
        data = await sandbox.run(tcp_job("innocent-1", listening), None, ctx())
    assert data["connected"] is True
    zygote = sandbox.pid
    assert zygote is not None
    assert zygote != os.getpid()

    with pytest.raises(WorkerCrashedError, match="exited with code 86 without an answer"):
        async with sandbox.slot():
            await sandbox.run(tcp_job(POISON, listening), None, ctx())

    # The next jobs run in fresh children of the same sandbox process; a device failure in a
    # child comes back as the driver's own error, code and all.
    async with sandbox.slot():
        data = await sandbox.run(tcp_job("innocent-2", listening), None, ctx())
    assert data["connected"] is True
    with pytest.raises(JobError) as failure:
        async with sandbox.slot():
            await sandbox.run(tcp_job("refused", closed_port), None, ctx())
    assert failure.value.code == "device_unreachable"
    assert failure.value.retryable
    assert sandbox.pid == zygote
    assert (sandbox.started, sandbox.crashed) == (4, 1)


async def test_only_suspect_jobs_go_to_the_sandbox_and_a_crash_there_is_no_result(
    sandbox: Sandbox, listening: int
) -> None:
    """The runner: first and second deliveries run in this process; from the third on
    (`sandbox_after` 2) in a child, where the poison job's crash raises `WorkerCrashedError`
    for the worker (requeue, or `worker_crashed` on the last delivery) instead of killing
    this process."""
    tcp = TcpDriver.from_settings(settings())
    runner = Runner(
        drivers={"tcp.connect": tcp},
        credentials=CredentialStore({}),
        satellite_id="sandbox-test",
        worker="w",
        sandbox=sandbox,
        sandbox_after=2,
    )
    for number in (1, 2):
        result = await runner.run(tcp_job(f"early-{number}", listening), Attempt(number, True))
        assert result.status == "ok"
    assert sandbox.started == 0, "first deliveries never pay for a child"

    suspects = [tcp_job(f"suspect-{n}", listening) for n in range(4)]
    results = await asyncio.gather(*(runner.run(job, Attempt(3, True)) for job in suspects))
    assert [r.status for r in results] == ["ok"] * 4
    assert sandbox.started == 4

    with pytest.raises(WorkerCrashedError):
        await runner.run(tcp_job(POISON, listening), Attempt(3, True))
    # The crash says nothing about the device: it is not quarantined.
    assert runner.quarantine.entries() == []
    result = await runner.run(tcp_job("after", listening), Attempt(3, True))
    assert result.status == "ok"


async def test_a_suspect_waits_for_a_sandbox_child_without_a_run_slot_or_blame_on_its_device(
    listening: int,
) -> None:
    """With every sandbox child busy, a suspect job waits holding no run slot (first
    deliveries still run), and when its time is up it is answered `not started`, neutral for
    the device's quarantine."""
    sandbox = Sandbox(settings(), slots=1)
    runner = Runner(
        drivers={"tcp.connect": TcpDriver.from_settings(settings())},
        credentials=CredentialStore({}),
        satellite_id="sandbox-test",
        worker="w",
        concurrency=1,
        sandbox=sandbox,
        sandbox_after=2,
        quarantine=Quarantine(after=1),
    )
    await sandbox.acquire()  # the one child is busy
    try:
        waiting = asyncio.create_task(
            runner.run(tcp_job("suspect", listening, timeout=1.0), Attempt(3, True))
        )
        first = await runner.run(tcp_job("first", listening), Attempt(1, False))
        assert first.status == "ok", "the suspect held no run slot"
        result = await waiting
    finally:
        sandbox.release()
    assert result.error is not None
    assert result.error.code == "device_timeout"
    assert "waited for a sandbox child" in result.error.message
    assert runner.quarantine.entries() == []
    assert sandbox.started == 0
