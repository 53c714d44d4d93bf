"""`ssh.cli` against asyncssh fake devices of every platform (the shared CLI contract, over SSH)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import pytest

from poller.drivers.cli import CliDriver
from tests.integration.cli_cases import DEFAULT, CliContract, FakeDevice, auth
from tests.support.fake_devices import Behaviour, expected_output, fake_ssh_device

pytestmark = pytest.mark.integration


class TestSshCli(CliContract):
    kind = "ssh.cli"

    def device(
        self, platform: str, behaviour: Behaviour = DEFAULT
    ) -> AbstractAsyncContextManager[FakeDevice]:
        return fake_ssh_device(platform, behaviour)

    async def test_a_login_asked_again_in_the_channel_is_answered(self, driver: CliDriver) -> None:
        async with fake_ssh_device("dlink", Behaviour(in_channel_login=True)) as device:
            data = await self.run(driver, device.port, "dlink", ["show version"])
            assert device.stats.auth_attempts == 2  # SSH, then the CLI's own login
        assert data["results"] == [
            {"command": "show version", "output": expected_output("dlink", "show version")}
        ]

    async def test_first_seen_host_key_is_reported(self, driver: CliDriver) -> None:
        async with fake_ssh_device("cisco_ios") as device:
            first = await self.run(driver, device.port, "cisco_ios", ["show empty"])
            second = await self.run(driver, device.port, "cisco_ios", ["show empty"])
        assert first["host_key"] == {
            "source": "tofu",
            "first_seen": True,
            "fingerprint": first["host_key"]["fingerprint"],
            "key": device.public_key,
        }
        assert second["host_key"]["first_seen"] is False

    async def test_a_mikrotik_login_carries_the_console_flags(self, driver: CliDriver) -> None:
        async with fake_ssh_device("mikrotik_routeros") as device:
            await self.run(driver, device.port, "mikrotik_routeros", ["show empty"], auth())
            assert device.stats.auth_attempts == 1
