"""`telnet.cli` against telnetlib3 fake devices of every platform (the shared CLI contract)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import pytest

from poller.drivers.cli import CliDriver
from tests.integration.cli_cases import DEFAULT, CliContract, FakeDevice
from tests.support.fake_devices import Behaviour, expected_output, fake_telnet_device

pytestmark = pytest.mark.integration


class TestTelnetCli(CliContract):
    kind = "telnet.cli"

    def device(
        self, platform: str, behaviour: Behaviour = DEFAULT
    ) -> AbstractAsyncContextManager[FakeDevice]:
        return fake_telnet_device(platform, behaviour)

    async def test_password_is_typed_only_at_the_password_prompt(self, driver: CliDriver) -> None:
        async with fake_telnet_device("cisco_ios") as device:
            data = await self.run(driver, device.port, "cisco_ios", ["show version"])
        assert data["results"][0]["output"] == expected_output("cisco_ios", "show version")
        assert device.stats.logins == 1
        assert device.stats.auth_attempts == 1
        assert "host_key" not in data
