"""`ssh.exec` against OpenSSH sshd and asyncssh fake devices: results, pool, limits, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from poller.drivers.base import JobContext
from poller.drivers.ssh import SshExecDriver, SshHostKeys
from poller.errors import JobError
from poller.wire import CliAuth, SshExecJob
from tests.support import fake_devices
from tests.support.fake_devices import closed_port, fake_ssh_device, silent_server
from tests.support.sshd import SshdServer

pytestmark = pytest.mark.integration


def ctx(timeout: float = 10.0, max_output: int = 4 * 1024 * 1024) -> JobContext:
    return JobContext(asyncio.get_running_loop().time() + timeout, max_output)


def job(host: str, port: int, commands: list[str], auth: CliAuth) -> SshExecJob:
    return SshExecJob(
        v=1,
        id="exec-1",
        kind="ssh.exec",
        target={"host": host, "port": port},
        auth=auth,
        params={"commands": commands},
    )


def key_auth(server: SshdServer, **extra: str) -> CliAuth:
    return CliAuth(username=server.user, private_key=SecretStr(server.client_key), **extra)


FAKE_AUTH = CliAuth(username=fake_devices.USERNAME, password=SecretStr(fake_devices.PASSWORD))


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[SshExecDriver]:
    drv = SshExecDriver(SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"))
    yield drv
    await drv.aclose()


async def run(
    drv: SshExecDriver,
    host: str,
    port: int,
    commands: list[str],
    auth: CliAuth,
    *,
    timeout: float = 10.0,
    max_output: int = 4 * 1024 * 1024,
) -> Any:
    """The job's data, as plain JSON (Any: tests index into it freely)."""
    data = await drv.run(job(host, port, commands, auth), auth, ctx(timeout, max_output))
    return json.loads(json.dumps(data))


async def failure(
    drv: SshExecDriver,
    host: str,
    port: int,
    commands: list[str],
    auth: CliAuth,
    *,
    timeout: float = 10.0,
    max_output: int = 4 * 1024 * 1024,
) -> JobError:
    with pytest.raises(JobError) as info:
        await run(drv, host, port, commands, auth, timeout=timeout, max_output=max_output)
    return info.value


def partial(error: JobError) -> Any:
    assert error.data is not None
    return json.loads(json.dumps(error.data))


async def test_commands_run_each_on_a_channel_with_status_and_streams(
    sshd_server: SshdServer, driver: SshExecDriver
) -> None:
    data = await run(
        driver,
        sshd_server.host,
        sshd_server.port,
        ["echo hello", "echo oops >&2; exit 3", "printf 'a\\nb'"],
        key_auth(sshd_server),
    )
    assert data["results"] == [
        {"command": "echo hello", "exit_status": 0, "stdout": "hello\n", "stderr": ""},
        {"command": "echo oops >&2; exit 3", "exit_status": 3, "stdout": "", "stderr": "oops\n"},
        {"command": "printf 'a\\nb'", "exit_status": 0, "stdout": "a\nb", "stderr": ""},
    ]
    assert data["connection"] == {"reused": False}


async def test_connection_is_reused_across_jobs_and_concurrent_jobs_share_it(
    sshd_server: SshdServer, driver: SshExecDriver
) -> None:
    auth = key_auth(sshd_server)
    await run(driver, sshd_server.host, sshd_server.port, ["true"], auth)
    results = await asyncio.gather(
        *(run(driver, sshd_server.host, sshd_server.port, [f"echo {i}"], auth) for i in range(20))
    )
    assert [r["results"][0]["stdout"] for r in results] == [f"{i}\n" for i in range(20)]
    assert driver.pool.opened == 1
    assert driver.pool.open_connections == 1


async def test_200_commands_to_one_device_use_one_connection(driver: SshExecDriver) -> None:
    async with fake_ssh_device("cisco_ios") as device:
        jobs = [
            run(driver, "127.0.0.1", device.port, ["show version"], FAKE_AUTH) for _ in range(200)
        ]
        results = await asyncio.gather(*jobs)
    assert all(r["results"][0]["exit_status"] == 0 for r in results)
    assert device.stats.connections == 1
    assert device.stats.auth_attempts == 1
    assert len(device.stats.commands) == 200


async def test_a_job_with_another_secret_does_not_ride_on_the_pooled_connection(
    driver: SshExecDriver,
) -> None:
    async with fake_ssh_device("cisco_ios") as device:
        await run(driver, "127.0.0.1", device.port, ["show empty"], FAKE_AUTH)
        wrong = CliAuth(username=fake_devices.USERNAME, password=SecretStr("not-the-password"))
        error = await failure(driver, "127.0.0.1", device.port, ["show empty"], wrong)
        assert error.code == "auth_failed"
        assert device.stats.connections == 2


async def test_sessions_per_device_are_limited(sshd_server: SshdServer, tmp_path: Path) -> None:
    drv = SshExecDriver(
        SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"), sessions_per_device=2
    )
    auth = key_auth(sshd_server)
    try:
        await run(drv, sshd_server.host, sshd_server.port, ["true"], auth)
        started = time.monotonic()
        await asyncio.gather(
            *(run(drv, sshd_server.host, sshd_server.port, ["sleep 0.4"], auth) for _ in range(4))
        )
        elapsed = time.monotonic() - started
    finally:
        await drv.aclose()
    assert elapsed >= 0.8  # 4 sessions, 2 at a time
    assert drv.pool.opened == 1


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    drv = SshExecDriver(
        SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "t"), idle_timeout=0.2
    )
    try:
        async with fake_ssh_device("cisco_ios") as device:
            await run(drv, "127.0.0.1", device.port, ["show empty"], FAKE_AUTH)
            assert drv.pool.open_connections == 1
            await asyncio.sleep(0.5)
            assert drv.pool.open_connections == 0
            await run(drv, "127.0.0.1", device.port, ["show empty"], FAKE_AUTH)
            assert device.stats.connections == 2
    finally:
        await drv.aclose()


async def test_connection_cap_closes_idle_connections_first(tmp_path: Path) -> None:
    drv = SshExecDriver(
        SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "t"), max_connections=1
    )
    try:
        async with fake_ssh_device("cisco_ios") as one, fake_ssh_device("zte") as two:
            await run(drv, "127.0.0.1", one.port, ["show empty"], FAKE_AUTH)
            await run(drv, "127.0.0.1", two.port, ["show empty"], FAKE_AUTH)
            assert drv.pool.open_connections == 1
            await run(drv, "127.0.0.1", one.port, ["show empty"], FAKE_AUTH)
            assert one.stats.connections == 2
    finally:
        await drv.aclose()


async def test_a_dead_pooled_connection_is_replaced_transparently(driver: SshExecDriver) -> None:
    async with fake_ssh_device("cisco_ios") as device:
        await run(driver, "127.0.0.1", device.port, ["show version"], FAKE_AUTH)
        device.drop_connections()
        data = await run(driver, "127.0.0.1", device.port, ["show version"], FAKE_AUTH)
        assert data["results"][0]["exit_status"] == 0
        assert device.stats.connections == 2


async def test_refused_is_unreachable(driver: SshExecDriver) -> None:
    error = await failure(driver, "127.0.0.1", closed_port(), ["true"], FAKE_AUTH)
    assert error.code == "device_unreachable"
    assert error.retryable


async def test_no_banner_is_a_timeout_at_the_deadline_not_an_auth_failure(
    driver: SshExecDriver,
) -> None:
    async with silent_server() as server:
        started = time.monotonic()
        error = await failure(driver, "127.0.0.1", server.port, ["true"], FAKE_AUTH, timeout=1.0)
        elapsed = time.monotonic() - started
    assert error.code == "device_timeout"
    assert 0.8 <= elapsed <= 1.5


async def test_wrong_key_is_auth_failed(sshd_server: SshdServer, driver: SshExecDriver) -> None:
    other = (sshd_server.workdir / "other_host_key").read_text()  # a valid key, not authorised
    auth = CliAuth(username="root", private_key=SecretStr(other))
    error = await failure(driver, sshd_server.host, sshd_server.port, ["true"], auth)
    assert error.code == "auth_failed"


async def test_unreadable_private_key_is_auth_failed(driver: SshExecDriver) -> None:
    auth = CliAuth(username="root", private_key=SecretStr("-----BEGIN nonsense-----"))
    error = await failure(driver, "127.0.0.1", closed_port(), ["true"], auth)
    assert error.code == "auth_failed"


async def test_output_over_the_cap_keeps_partial_output(
    sshd_server: SshdServer, driver: SshExecDriver
) -> None:
    error = await failure(
        driver,
        sshd_server.host,
        sshd_server.port,
        ["echo first", "head -c 100000 /dev/zero | tr '\\0' x"],
        key_auth(sshd_server),
        max_output=4096,
    )
    assert error.code == "output_too_large"
    results = partial(error)["results"]
    assert results[0] == {
        "command": "echo first",
        "exit_status": 0,
        "stdout": "first\n",
        "stderr": "",
    }
    assert results[1]["stdout"] == "x" * (4096 - len("first\n"))


async def test_stalled_output_is_a_timeout_with_partial_output(
    sshd_server: SshdServer, driver: SshExecDriver
) -> None:
    started = time.monotonic()
    error = await failure(
        driver,
        sshd_server.host,
        sshd_server.port,
        ["echo before; sleep 30"],
        key_auth(sshd_server),
        timeout=1.0,
    )
    assert time.monotonic() - started < 1.5
    assert error.code == "device_timeout"
    assert partial(error)["results"][0]["stdout"] == "before\n"
    # The connection survives a stalled channel and serves the next job.
    data = await run(driver, sshd_server.host, sshd_server.port, ["echo ok"], key_auth(sshd_server))
    assert data["results"][0]["stdout"] == "ok\n"


async def test_the_password_never_reaches_logs_results_or_errors(
    driver: SshExecDriver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with structlog.testing.capture_logs() as captured:
        async with fake_ssh_device("cisco_ios") as device:
            seen.append(json.dumps(await run(driver, "127.0.0.1", device.port, ["x"], FAKE_AUTH)))
            wrong = CliAuth(username=fake_devices.USERNAME, password=SecretStr("wrong-password"))
            error = await failure(driver, "127.0.0.1", device.port, ["show version"], wrong)
            seen += [error.message, repr(error), json.dumps(error.data), repr(wrong)]
    seen += [json.dumps(captured, default=str), caplog.text]
    seen += [str(record.args) for record in caplog.records]
    text = "\n".join(seen)
    assert fake_devices.PASSWORD not in text
    assert "wrong-password" not in text
