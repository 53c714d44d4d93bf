"""`poller exec`: one job run locally against the real snmpd, no broker involved."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from structlog.testing import capture_logs

from poller.config import PollerSettings
from satellite.dispatch import build_job
from tests.support.fake_devices import fake_ssh_device
from tests.support.snmpd import Snmpd


def poller_exec(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
    return subprocess.run(
        [sys.executable, "-m", "poller", "exec", *args],
        env=env | {"USM_POLLER_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_exec_snmp_get_v2c_prints_the_result(snmpd: Snmpd) -> None:
    proc = poller_exec(
        "snmp.get",
        "--host",
        snmpd.host,
        "--port",
        str(snmpd.port),
        "--community",
        snmpd.community,
        "1.3.6.1.2.1.1.5.0",
    )
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    assert result["status"] == "ok"
    assert result["data"]["varbinds"][0]["value"] == snmpd.sys_name
    assert result["satellite_id"] == "local"


def test_exec_snmp_walk_v3_with_key_files(snmpd: Snmpd, tmp_path: Any) -> None:
    user = snmpd.v3_users["sha-aes"]
    assert user.auth_key
    assert user.priv_key
    (tmp_path / "auth").write_text(user.auth_key + "\n")
    (tmp_path / "priv").write_text(user.priv_key + "\n")
    proc = poller_exec(
        "snmp.walk",
        "--host",
        snmpd.host,
        "--port",
        str(snmpd.port),
        "-v",
        "3",
        "-u",
        user.user,
        "-a",
        "SHA",
        "--auth-key-file",
        str(tmp_path / "auth"),
        "-x",
        "AES",
        "--priv-key-file",
        str(tmp_path / "priv"),
        "--max-varbinds",
        "5",
        "1.3.6.1.2.1.1",
    )
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    assert len(result["data"]["varbinds"]) == 5
    assert user.auth_key not in proc.stdout + proc.stderr


def test_exec_device_failure_exits_1_with_an_error_result(snmpd: Snmpd) -> None:
    proc = poller_exec(
        "snmp.get",
        "--host",
        snmpd.host,
        "--port",
        str(snmpd.port),
        "--community",
        "not-the-community",
        "--timeout",
        "1",
        "1.3.6.1.2.1.1.5.0",
    )
    assert proc.returncode == 1
    result = result_of(proc)
    assert result["error"]["code"] == "device_timeout"
    assert "not-the-community" not in proc.stdout + proc.stderr


def test_exec_bad_arguments_exit_2_with_one_line() -> None:
    proc = poller_exec("snmp.get", "--host", "127.0.0.1", "--community", "c", "not-an-oid")
    assert proc.returncode == 2
    assert proc.stderr.startswith("poller: invalid job: params.oids")
    assert proc.stderr.count("\n") == 1
    proc = poller_exec("snmp.get", "--host", "127.0.0.1", "1.3.6.1.2.1.1.5.0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("poller: --community: SNMP v2c needs a community")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["snmp.set", "--host", "h", "-c", "c", "1.3.6.1=oops"],
            "argument OID=TYPE:VALUE: must be OID=TYPE:VALUE, e.g. 1.3.6.1.2.1.1.5.0=s:sw-1",
        ),
        (
            ["snmp.get", "--host", "h", "-c", "c", "--bogus", "1.3.6.1"],
            "unrecognized arguments: --bogus",
        ),
        (["snmp.get", "-c", "c", "1.3.6.1"], "the following arguments are required: --host"),
    ],
    ids=["bad-value", "unknown-option", "missing-option"],
)
def test_exec_argument_errors_print_that_kinds_usage(argv: list[str], error: str) -> None:
    proc = poller_exec(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"usage: poller exec {argv[0]} [-h] --host HOST")
    assert proc.stderr.endswith(f"poller exec {argv[0]}: error: {error}\n")


def test_exec_whose_reader_went_away_exits_141_without_a_traceback() -> None:
    """`poller exec snmp.walk ... | head -1`: stdout is a pipe nobody reads any more."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
    argv = ["tcp.connect", "--host", "127.0.0.1", "--port", "1"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the result is printed
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "poller", "exec", *argv],
            env=env | {"USM_POLLER_LOG_FORMAT": "json"},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr


async def test_exec_starts_only_the_driver_its_job_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a host where nothing may ping, `poller exec` of another kind says nothing about ping
    (it printed a `ping_not_permitted` warning before every result); an `icmp.ping` still does."""
    from poller import cli  # noqa: PLC0415 - the exec coroutine, in-process
    from poller.drivers import icmp  # noqa: PLC0415

    monkeypatch.setattr(icmp, "probe_mode", lambda _family: icmp.PingMode.NOT_PERMITTED)
    settings = PollerSettings(amqp_dsn="amqp://guest:guest@127.0.0.1/", satellite_id="local")
    tcp = build_job("tcp.connect", target={"host": "127.0.0.1"}, params={"port": 1}, timeout=5)
    with capture_logs() as logs:
        result = await cli._exec(settings, tcp)
    assert result.error is not None
    assert result.error.code == "device_unreachable"
    assert not [e for e in logs if e["event"] == "ping_not_permitted"]
    ping = build_job("icmp.ping", target={"host": "127.0.0.1"}, params={"count": 1}, timeout=5)
    with capture_logs() as logs:
        result = await cli._exec(settings, ping)
    assert result.error is not None
    assert result.error.code == "ping_not_permitted"
    assert [e["event"] for e in logs].count("ping_not_permitted") == 1


async def test_a_refused_cli_login_is_the_result_not_a_critical_log_line() -> None:
    """scrapli logs a refused login as `critical`; the job's result says `auth_failed`."""
    async with fake_ssh_device("cisco_ios") as device:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
        env |= {"USM_POLLER_LOG_FORMAT": "json", "USM_SSH_PASSWORD": "not-the-password"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "poller",
            "exec",
            "ssh.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(device.port),
            "--username",
            "admin",
            "--platform",
            "cisco_ios",
            "--command",
            "show version",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert json.loads(out)["error"]["code"] == "auth_failed"
    levels = [json.loads(line)["level"] for line in err.decode().splitlines() if line[:1] == "{"]
    assert not [level for level in levels if level in ("error", "critical")], err.decode()
