"""`poller exec KIND` and `satellite call ID KIND` take the same job options, meaning the same."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from poller import cli as poller_cli
from poller.errors import ConfigError
from poller.jobargs import KIND_OPTIONS, job_body
from poller.wire import JobKind, decode_job
from satellite.cli import build_parser
from satellite.jobargs import job_from_args

OID = "1.3.6.1.2.1.1.5.0"
#: Options of `satellite call` about the broker, the core API, the lane or waiting, not the job.
SATELLITE_ONLY = {
    "--dsn", "--connect-timeout", "--operation-timeout", "--management-url", "--trust-user",
    "--priority", "--timeout", "--bulk", "--api", "--token-file",
}  # fmt: skip


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(f"no sub-command {name}")


def _options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Visible option string → its destination."""
    return {
        flag: action.dest
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
    }


def exec_parser(kind: str) -> argparse.ArgumentParser:
    return _subparser(_subparser(poller_cli._parser(), "exec"), kind)


def call_parser(kind: str) -> argparse.ArgumentParser:
    return _subparser(_subparser(build_parser(), "call"), kind)


@pytest.mark.parametrize("kind", [kind.value for kind in KIND_OPTIONS])
def test_every_kind_has_the_same_options_with_the_same_meaning(kind: str) -> None:
    on_exec = _options(exec_parser(kind))
    on_call = {k: v for k, v in _options(call_parser(kind)).items() if k not in SATELLITE_ONLY}
    assert on_exec == on_call


@pytest.mark.parametrize(
    "argv",
    [
        ["snmp.get", "--host", "10.0.0.1", "-v", "2c", "-c", "public", "--job-timeout", "5", OID],
        [
            "snmp.walk",
            "--host",
            "h",
            "--port",
            "1161",
            "-v",
            "3",
            "-u",
            "ops",
            "-l",
            "authPriv",
            "-a",
            "SHA256",
            "-A",
            "auth-pass",
            "-x",
            "AES",
            "-X",
            "priv-pass",
            "-n",
            "ctx",
            "--max-varbinds",
            "8",
            "1.3.6.1.2.1.1",
        ],
        ["snmp.set", "--host", "h", "--community", "private", "1.3.6.1.2.1.1.5.0=s:sw-1"],
        [
            "ssh.cli",
            "--host",
            "h",
            "--username",
            "ops",
            "--platform",
            "cisco_ios",
            "--enable",
            "--command",
            "show version",
            "--meta",
            '{"device": 7}',
            "--not-after",
            "+1h",
        ],
        ["tcp.connect", "--host", "h", "--port", "443", "--no-idempotent"],
        ["icmp.ping", "--host", "h", "--count", "2", "--size", "100"],
    ],
    ids=lambda argv: argv[0],
)
def test_the_same_arguments_make_the_same_job(argv: list[str]) -> None:
    kind, rest = argv[0], [*argv[1:], "--id", "job-1", "--job-timeout", "7"]
    environ = {"USM_SSH_PASSWORD": "pw", "USM_SSH_ENABLE_PASSWORD": "en"}
    exec_ns = poller_cli._parser().parse_args(["exec", kind, *rest])
    from_exec = decode_job(json.dumps(_exec_body(exec_ns, environ)).encode())
    call_ns = build_parser().parse_args(["call", "7", kind, *rest])
    from_call = job_from_args(kind, call_ns, environ)
    assert _plain(from_exec) == _plain(from_call)


def _exec_body(ns: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    return job_body(ns.kind, ns, environ)


def _plain(job: Any) -> Any:
    data = job.model_dump(mode="json")
    data.pop("not_after", None)  # "+1h" is read twice, a few microseconds apart
    for key in ("password", "enable_password", "community", "auth_key", "priv_key"):
        if data.get("auth") and data["auth"].get(key) is not None:
            data["auth"][key] = job.auth.model_dump()[key].get_secret_value()
    return data


def test_exec_keeps_its_old_timeout_spelling_and_default() -> None:
    ns = poller_cli._parser().parse_args(["exec", "icmp.ping", "--host", "h", "--timeout", "3"])
    assert ns.job_timeout == 3.0
    ns = poller_cli._parser().parse_args(["exec", "icmp.ping", "--host", "h"])
    assert ns.job_timeout == poller_cli.EXEC_JOB_TIMEOUT
    assert "--timeout" not in exec_parser("icmp.ping").format_help()


def test_exec_secrets_come_from_files_and_the_environment_as_on_satellite(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("from-file\n")
    ns = poller_cli._parser().parse_args(
        ["exec", "snmp.get", "--host", "h", "--community-file", str(tmp_path / "c"), OID]
    )
    assert _exec_body(ns, {})["auth"]["community"] == "from-file"
    ns = poller_cli._parser().parse_args(["exec", "snmp.get", "--host", "h", OID])
    assert _exec_body(ns, {"USM_SNMP_COMMUNITY": "from-env"})["auth"]["community"] == "from-env"


def test_every_kind_is_offered() -> None:
    assert set(KIND_OPTIONS) == set(JobKind)


@pytest.mark.parametrize("kind", ["ssh.exec", "ssh.cli"])
def test_an_ssh_login_without_password_or_key_is_refused_on_both(kind: str) -> None:
    """As a missing community is: exit 2 before anything is sent, not `auth_failed` from the
    device. Telnet logins may have no password; a credential_ref brings its own."""
    rest = ["--host", "h", "--username", "ops", "--command", "show version"]
    exec_ns = poller_cli._parser().parse_args(["exec", kind, *rest])
    call_ns = build_parser().parse_args(["call", "7", kind, *rest])
    for build in (lambda: _exec_body(exec_ns, {}), lambda: job_from_args(kind, call_ns, {})):
        with pytest.raises(ConfigError, match=r"^--password-file: an SSH login needs a password"):
            build()
    assert _exec_body(exec_ns, {"USM_SSH_PRIVATE_KEY": "key"})["auth"]["private_key"] == "key"
    ref_ns = build_parser().parse_args(["call", "7", kind, *rest, "--credential-ref", "sw"])
    assert job_from_args(kind, ref_ns, {}).credential_ref == "sw"
    telnet_ns = build_parser().parse_args(["call", "7", "telnet.cli", *rest])
    assert job_from_args("telnet.cli", telnet_ns, {}).auth is not None
