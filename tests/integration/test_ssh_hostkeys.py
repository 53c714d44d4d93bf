"""Host keys for ssh.exec and ssh.cli: pinned, known_hosts, TOFU; a changed key sends nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from pydantic import SecretStr

from poller.drivers.base import JobContext
from poller.drivers.cli import CliDriver
from poller.drivers.ssh import SshExecDriver, SshHostKeys
from poller.errors import JobError
from poller.wire import CliAuth, CliJob, SshExecJob
from tests.support import fake_devices
from tests.support.fake_devices import fake_ssh_device
from tests.support.sshd import SshdServer

pytestmark = pytest.mark.integration


def host_key(data: object) -> Any:
    """The result's host_key object, as plain JSON."""
    return json.loads(json.dumps(data))["host_key"]


def ctx() -> JobContext:
    return JobContext(asyncio.get_running_loop().time() + 10, 1 << 20)


def exec_job(port: int, auth: CliAuth) -> SshExecJob:
    return SshExecJob(
        v=1,
        id="hk",
        kind="ssh.exec",
        target={"host": "127.0.0.1", "port": port},
        auth=auth,
        params={"commands": ["true"]},
    )


def cli_job(port: int, auth: CliAuth) -> CliJob:
    return CliJob(
        v=1,
        id="hk",
        kind="ssh.cli",
        target={"host": "127.0.0.1", "port": port},
        auth=auth,
        params={"platform": "cisco_ios", "commands": ["show version"]},
    )


def fake_auth(host_key: str | None = None) -> CliAuth:
    return CliAuth(
        username=fake_devices.USERNAME,
        password=SecretStr(fake_devices.PASSWORD),
        host_key=host_key,
    )


def sshd_auth(server: SshdServer, host_key: str | None = None) -> CliAuth:
    return CliAuth(username="root", private_key=SecretStr(server.client_key), host_key=host_key)


async def test_pinned_key_is_accepted_and_a_wrong_pin_is_a_mismatch(
    sshd_server: SshdServer, tmp_path: Path
) -> None:
    drv = SshExecDriver(SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"))
    try:
        good = sshd_auth(sshd_server, sshd_server.host_key)
        data = await drv.run(exec_job(sshd_server.port, good), good, ctx())
        assert host_key(data)["source"] == "pinned"
        bad = sshd_auth(sshd_server, sshd_server.other_host_key)
        with pytest.raises(JobError) as info:
            await drv.run(exec_job(sshd_server.port, bad), bad, ctx())
        assert info.value.code == "host_key_mismatch"
        assert not info.value.retryable
    finally:
        await drv.aclose()
    assert not (tmp_path / "tofu").exists()  # pinned keys never go to the TOFU file


async def test_known_hosts_entry_is_used_and_enforced(
    sshd_server: SshdServer, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    spec = f"[127.0.0.1]:{sshd_server.port}"
    known.write_text(f"{spec} {sshd_server.host_key}\n")
    drv = SshExecDriver(SshHostKeys(known_hosts_file=known, tofu_path=tmp_path / "tofu"))
    try:
        auth = sshd_auth(sshd_server)
        data = await drv.run(exec_job(sshd_server.port, auth), auth, ctx())
        assert host_key(data)["source"] == "known_hosts"
    finally:
        await drv.aclose()
    known.write_text(f"{spec} {sshd_server.other_host_key}\n")
    drv = SshExecDriver(SshHostKeys(known_hosts_file=known, tofu_path=tmp_path / "tofu"))
    try:
        with pytest.raises(JobError) as info:
            await drv.run(exec_job(sshd_server.port, auth), auth, ctx())
        assert info.value.code == "host_key_mismatch"
    finally:
        await drv.aclose()


async def test_tofu_records_the_first_key_and_reports_it_once(
    sshd_server: SshdServer, tmp_path: Path
) -> None:
    tofu = tmp_path / "state" / "tofu"
    auth = sshd_auth(sshd_server)
    drv = SshExecDriver(SshHostKeys(known_hosts_file=None, tofu_path=tofu), idle_timeout=0)
    try:
        first = await drv.run(exec_job(sshd_server.port, auth), auth, ctx())
        second = await drv.run(exec_job(sshd_server.port, auth), auth, ctx())
    finally:
        await drv.aclose()
    assert host_key(first)["first_seen"] is True
    assert host_key(first)["key"] == sshd_server.host_key
    assert host_key(second)["first_seen"] is False
    assert tofu.read_text() == f"[127.0.0.1]:{sshd_server.port} {sshd_server.host_key}\n"
    assert tofu.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("kind", ["ssh.exec", "ssh.cli"])
async def test_a_swapped_key_after_tofu_is_a_mismatch_with_zero_auth_attempts(
    kind: str, tmp_path: Path
) -> None:
    keys = SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu")
    drv: SshExecDriver | CliDriver = SshExecDriver(keys) if kind == "ssh.exec" else CliDriver(keys)
    build = exec_job if kind == "ssh.exec" else cli_job
    auth = fake_auth()
    try:
        async with fake_ssh_device("cisco_ios") as real:
            port = real.port
            await drv.run(build(port, auth), auth, ctx())
        await drv.aclose()  # no pooled connection to the old device any more
        impostor_key = asyncssh.generate_private_key("ssh-ed25519")
        async with fake_ssh_device("cisco_ios", host_key=impostor_key, port=port) as impostor:
            with pytest.raises(JobError) as info:
                await drv.run(build(port, auth), auth, ctx())
            assert info.value.code == "host_key_mismatch"
            assert impostor.stats.connections == 1
            assert impostor.stats.auth_attempts == 0
    finally:
        await drv.aclose()


@pytest.mark.parametrize("kind", ["ssh.exec", "ssh.cli"])
async def test_a_pinned_key_mismatch_sends_no_credentials(kind: str, tmp_path: Path) -> None:
    keys = SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu")
    drv: SshExecDriver | CliDriver = SshExecDriver(keys) if kind == "ssh.exec" else CliDriver(keys)
    build = exec_job if kind == "ssh.exec" else cli_job
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    try:
        async with fake_ssh_device("cisco_ios") as device:
            auth = fake_auth(other)
            with pytest.raises(JobError) as info:
                await drv.run(build(device.port, auth), auth, ctx())
            assert info.value.code == "host_key_mismatch"
            assert device.stats.auth_attempts == 0
            good = fake_auth(device.public_key)
            data = await drv.run(build(device.port, good), good, ctx())
            assert host_key(data)["source"] == "pinned"
    finally:
        await drv.aclose()


async def test_a_job_pinning_another_key_does_not_ride_on_a_pooled_connection(
    tmp_path: Path,
) -> None:
    drv = SshExecDriver(SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"))
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    try:
        async with fake_ssh_device("cisco_ios") as device:
            auth = fake_auth()
            await drv.run(exec_job(device.port, auth), auth, ctx())
            pinned = fake_auth(other)
            with pytest.raises(JobError) as info:
                await drv.run(exec_job(device.port, pinned), pinned, ctx())
            assert info.value.code == "host_key_mismatch"
    finally:
        await drv.aclose()


async def test_an_invalid_pinned_key_is_refused(tmp_path: Path) -> None:
    drv = SshExecDriver(SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"))
    auth = fake_auth("ssh-ed25519 not-base64")
    with pytest.raises(JobError) as info:
        await drv.run(exec_job(1, auth), auth, ctx())
    assert info.value.code == "host_key_mismatch"
    await drv.aclose()
