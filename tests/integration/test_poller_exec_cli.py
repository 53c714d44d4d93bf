"""`poller exec` for the SSH and telnet kinds, against the fake vendor devices."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.support.fake_devices import (
    ENABLE_SECRET,
    PASSWORD,
    USERNAME,
    expected_output,
    fake_ssh_device,
    fake_telnet_device,
)


async def poller_exec(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "enable").write_text(ENABLE_SECRET + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
    env |= {"USM_POLLER_LOG_FORMAT": "json", "USM_POLLER_STATE_DIR": str(tmp_path / "state")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "poller",
        "exec",
        *args,
        "--username",
        USERNAME,
        "--password-file",
        str(tmp_path / "pw"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    text = out.decode() + err.decode()
    assert PASSWORD not in text
    assert ENABLE_SECRET not in text
    return proc.returncode, json.loads(out) if out else {}, err.decode()


async def test_exec_ssh_cli_with_enable(tmp_path: Path) -> None:
    async with fake_ssh_device("cisco_ios") as device:
        code, result, err = await poller_exec(
            tmp_path,
            "ssh.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(device.port),
            "--platform",
            "cisco_ios",
            "--enable",
            "--enable-password-file",
            str(tmp_path / "enable"),
            "--command",
            "show version",
        )
    assert code == 0, err
    assert result["data"]["results"] == [
        {"command": "show version", "output": expected_output("cisco_ios", "show version")}
    ]


async def test_exec_ssh_exec_with_a_pinned_host_key(tmp_path: Path) -> None:
    async with fake_ssh_device("generic") as device:
        code, result, err = await poller_exec(
            tmp_path,
            "ssh.exec",
            "--host",
            "127.0.0.1",
            "--port",
            str(device.port),
            "--host-key",
            device.public_key,
            "--command",
            "show version",
        )
    assert code == 0, err
    [one] = result["data"]["results"]
    assert (one["command"], one["exit_status"]) == ("show version", 0)


async def test_exec_telnet_cli(tmp_path: Path) -> None:
    async with fake_telnet_device("huawei_vrp") as device:
        code, result, err = await poller_exec(
            tmp_path,
            "telnet.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(device.port),
            "--platform",
            "huawei_vrp",
            "--command",
            "show long",
        )
    assert code == 0, (err, result)
    assert result["data"]["results"][0]["output"] == expected_output("huawei_vrp", "show long")
