"""SSH and CLI drivers: registered, built from settings alone, one host-key policy shared."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from poller.config import PollerSettings
from poller.drivers import build_drivers
from poller.drivers.cli import CliDriver
from poller.drivers.ssh import SshExecDriver


def settings(tmp_path: Path) -> PollerSettings:
    return PollerSettings(
        amqp_dsn=SecretStr("amqp://guest:guest@127.0.0.1:5672/%2f"),
        satellite_id="sat-7",
        state_dir=tmp_path,
        ssh_idle_timeout=5,
        ssh_max_connections=3,
        ssh_sessions_per_device=2,
    )


def test_kinds_are_registered_and_share_the_host_key_policy(tmp_path: Path) -> None:
    drivers = build_drivers(settings(tmp_path))
    exec_driver = drivers["ssh.exec"]
    cli_driver = drivers["ssh.cli"]
    assert isinstance(exec_driver, SshExecDriver)
    assert isinstance(cli_driver, CliDriver)
    assert drivers["telnet.cli"] is cli_driver
    assert exec_driver.host_keys is cli_driver.host_keys
    assert exec_driver.host_keys.tofu.path == tmp_path / "known_hosts.tofu.sat-7"


def test_ssh_settings_have_the_documented_defaults_and_env_names() -> None:
    fields = PollerSettings.model_fields
    assert fields["ssh_idle_timeout"].default == 60.0
    assert fields["ssh_max_connections"].default == 256
    assert fields["ssh_sessions_per_device"].default == 4
