"""Shared cases for `ssh.cli` and `telnet.cli` against the fake devices (one suite, two kinds).

`test_ssh_cli.py` and `test_telnet_cli.py` subclass `CliContract` with their kind and fake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from pydantic import SecretStr

from poller.drivers.base import JobContext
from poller.drivers.cli import CliDriver
from poller.drivers.ssh import SshHostKeys
from poller.errors import JobError
from poller.wire import CliAuth, CliJob
from tests.support import fake_devices
from tests.support.fake_devices import (
    Behaviour,
    closed_port,
    expected_output,
    silent_server,
)

PLATFORMS = sorted(fake_devices.PROFILES)
FakeDevice = fake_devices.FakeSshDevice | fake_devices.FakeTelnetDevice
DEFAULT = Behaviour()


def auth(
    password: str = fake_devices.PASSWORD, enable: str | None = fake_devices.ENABLE_SECRET
) -> CliAuth:
    return CliAuth(
        username=fake_devices.USERNAME,
        password=SecretStr(password),
        enable_password=SecretStr(enable) if enable is not None else None,
    )


def plain(data: object) -> Any:
    assert data is not None
    return json.loads(json.dumps(data))


class CliContract:
    """Behaviours every CLI kind must show against a real (fake) peer."""

    kind: ClassVar[str]

    def device(
        self, platform: str, behaviour: Behaviour = DEFAULT
    ) -> AbstractAsyncContextManager[FakeDevice]:
        raise NotImplementedError

    @pytest.fixture
    async def driver(self, tmp_path: Path) -> AsyncIterator[CliDriver]:
        drv = CliDriver(SshHostKeys(known_hosts_file=None, tofu_path=tmp_path / "tofu"))
        yield drv
        await drv.aclose()

    def job(
        self, port: int, platform: str, commands: list[str], creds: CliAuth, *, enable: bool = True
    ) -> CliJob:
        return CliJob(
            v=1,
            id="cli-1",
            kind=self.kind,
            target={"host": "127.0.0.1", "port": port},
            auth=creds,
            params={"platform": platform, "commands": commands, "enable": enable},
        )

    async def run(
        self,
        drv: CliDriver,
        port: int,
        platform: str,
        commands: list[str],
        creds: CliAuth | None = None,
        *,
        timeout: float = 10.0,
        max_output: int = 4 * 1024 * 1024,
        enable: bool = True,
    ) -> Any:
        """The job's data as plain JSON (Any: tests index into it freely)."""
        creds = creds or auth()
        ctx = JobContext(asyncio.get_running_loop().time() + timeout, max_output)
        data = await drv.run(self.job(port, platform, commands, creds, enable=enable), creds, ctx)
        return json.loads(json.dumps(data))

    async def failure(self, *args: Any, **kwargs: Any) -> JobError:
        with pytest.raises(JobError) as info:
            await self.run(*args, **kwargs)
        return info.value

    # -- outputs

    @pytest.mark.parametrize("platform", PLATFORMS)
    async def test_outputs_are_complete_and_clean(self, platform: str, driver: CliDriver) -> None:
        commands = ["show version", "show long", "show running-config", "show empty"]
        async with self.device(platform) as device:
            data = await self.run(driver, device.port, platform, commands)
        assert data["results"] == [
            {"command": c, "output": expected_output(platform, c)} for c in commands
        ]
        assert (
            data["prompt"]
            == (
                fake_devices.PROFILES[platform].privileged_prompt
                or fake_devices.PROFILES[platform].prompt
            ).rstrip()
        )

    @pytest.mark.parametrize("platform", PLATFORMS)
    async def test_pagers_that_cannot_be_disabled_are_answered(
        self, platform: str, driver: CliDriver
    ) -> None:
        async with self.device(platform, Behaviour(pager_can_be_disabled=False)) as device:
            data = await self.run(driver, device.port, platform, ["show long", "show version"])
        for result in data["results"]:
            assert result["output"] == expected_output(platform, result["command"])

    async def test_slow_output_is_collected(self, driver: CliDriver) -> None:
        async with self.device("cisco_ios") as device:
            data = await self.run(driver, device.port, "cisco_ios", ["show slow"])
        assert data["results"][0]["output"] == expected_output("cisco_ios", "show slow")

    async def test_without_enable_privileged_commands_fail(self, driver: CliDriver) -> None:
        async with self.device("cisco_ios") as device:
            error = await self.failure(
                driver, device.port, "cisco_ios", ["show running-config"], enable=False
            )
            assert device.stats.enable_attempts == 0
        assert error.code == "command_error"

    # -- errors

    async def test_an_error_marker_is_command_error_with_the_output_kept(
        self, driver: CliDriver
    ) -> None:
        async with self.device("huawei_vrp") as device:
            error = await self.failure(
                driver, device.port, "huawei_vrp", ["show version", "display nonsense", "show long"]
            )
            assert "show long" not in device.stats.commands  # stops at the failing command
        assert error.code == "command_error"
        results = plain(error.data)["results"]
        assert len(results) == 2
        assert "Unrecognized command" in results[1]["output"]

    async def test_wrong_password_is_auth_failed(self, driver: CliDriver) -> None:
        async with self.device("cisco_ios") as device:
            error = await self.failure(
                driver, device.port, "cisco_ios", ["show version"], auth("wrong")
            )
            assert device.stats.auth_attempts == 1
        assert error.code == "auth_failed"
        assert not error.retryable

    @pytest.mark.parametrize("platform", ["cisco_ios", "huawei_vrp", "dlink", "eltex", "zte"])
    async def test_wrong_enable_secret_is_auth_failed_after_one_try(
        self, platform: str, driver: CliDriver
    ) -> None:
        async with self.device(platform) as device:
            error = await self.failure(
                driver, device.port, platform, ["show version"], auth(enable="wrong-enable")
            )
            assert device.stats.enable_attempts == 1
        assert error.code == "auth_failed"

    async def test_missing_enable_secret_is_auth_failed(self, driver: CliDriver) -> None:
        async with self.device("cisco_ios") as device:
            error = await self.failure(
                driver, device.port, "cisco_ios", ["show version"], auth(enable=None)
            )
        assert error.code == "auth_failed"
        assert "enable_password" in error.message

    async def test_stalled_output_is_a_timeout_at_the_deadline_with_partial_output(
        self, driver: CliDriver
    ) -> None:
        async with self.device("cisco_ios") as device:
            started = time.monotonic()
            error = await self.failure(
                driver, device.port, "cisco_ios", ["show version", "show stall"], timeout=1.5
            )
            elapsed = time.monotonic() - started
        assert error.code == "device_timeout"
        assert 1.2 <= elapsed <= 2.0
        results = plain(error.data)["results"]
        assert results[0] == {
            "command": "show version",
            "output": expected_output("cisco_ios", "show version"),
        }
        partial = expected_output("cisco_ios", "show stall").splitlines()[:5]
        assert results[1] == {"command": "show stall", "output": "\n".join(partial)}

    async def test_disconnect_mid_page_is_unreachable_with_partial_output(
        self, driver: CliDriver
    ) -> None:
        async with self.device("cisco_ios", Behaviour(pager_can_be_disabled=False)) as device:
            error = await self.failure(driver, device.port, "cisco_ios", ["show drop"])
        assert error.code == "device_unreachable"
        results = plain(error.data)["results"]
        first_page = expected_output("cisco_ios", "show drop").splitlines()[: fake_devices.PAGE - 1]
        assert results[0]["output"] == "\n".join(first_page).rstrip()

    async def test_output_over_the_cap_keeps_partial_output(self, driver: CliDriver) -> None:
        async with self.device("cisco_ios") as device:
            error = await self.failure(
                driver, device.port, "cisco_ios", ["show version", "show big"], max_output=64 * 1024
            )
        assert error.code == "output_too_large"
        results = plain(error.data)["results"]
        assert results[0]["output"] == expected_output("cisco_ios", "show version")
        partial = results[1]["output"]
        assert isinstance(partial, str)
        assert len(partial) > 30_000
        assert expected_output("cisco_ios", "show big").startswith(partial)

    async def test_silent_device_is_a_timeout_at_the_deadline_not_an_auth_failure(
        self, driver: CliDriver
    ) -> None:
        async with silent_server() as server:
            started = time.monotonic()
            error = await self.failure(
                driver, server.port, "cisco_ios", ["show version"], timeout=1.0
            )
            elapsed = time.monotonic() - started
        assert error.code == "device_timeout"
        assert error.retryable
        assert 0.8 <= elapsed <= 1.6

    async def test_refused_is_unreachable(self, driver: CliDriver) -> None:
        error = await self.failure(driver, closed_port(), "cisco_ios", ["show version"])
        assert error.code == "device_unreachable"
        assert error.retryable

    async def test_unknown_platform_is_refused(self, driver: CliDriver) -> None:
        error = await self.failure(driver, closed_port(), "nokia_sros_classic", ["show version"])
        assert error.code == "command_error"
        assert "cisco_ios" in error.message

    # -- secrets

    async def test_secrets_never_reach_logs_results_or_errors(
        self, driver: CliDriver, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        seen: list[str] = []
        with structlog.testing.capture_logs() as captured:
            async with self.device("cisco_ios") as device:
                data = await self.run(driver, device.port, "cisco_ios", ["show version"])
                seen.append(json.dumps(data))
                for creds in (auth("wrong-password"), auth(enable="wrong-enable")):
                    error = await self.failure(
                        driver, device.port, "cisco_ios", ["show version"], creds
                    )
                    seen += [error.message, repr(error), json.dumps(error.data)]
        seen += [json.dumps(captured, default=str), caplog.text]
        seen += [str(record.args) for record in caplog.records]
        text = "\n".join(seen)
        for secret in (
            fake_devices.PASSWORD,
            fake_devices.ENABLE_SECRET,
            "wrong-password",
            "wrong-enable",
        ):
            assert secret not in text
