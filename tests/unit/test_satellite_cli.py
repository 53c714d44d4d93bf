"""`satellite` argument and setting errors: exit code 2, one line, before any connection."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from satellite.cli import EXIT_BROKER, EXIT_STDOUT_CLOSED, EXIT_USAGE, main

SECRET = "pw-never-printed-7f3a"
OID = "1.3.6.1.2.1.1.5.0"


@pytest.fixture(autouse=True)
def _no_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("US_AMQP_DSN", "USM_POLLER_AMQP_DSN", "USM_SNMP_COMMUNITY"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_arguments_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "call", "7", "snmp.gett", "--host", "h", OID)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("satellite call: error: argument KIND: invalid choice: 'snmp.gett'")


@pytest.mark.parametrize("command", ["call", "submit"])
def test_a_forgotten_satellite_id_is_named(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = run(capsys, command, "snmp.get", "--host", "127.0.0.1", "-c", "p", OID)
    assert code == EXIT_USAGE
    assert out == ""
    assert err == (
        f"satellite {command}: error: argument ID: 'snmp.get' is a job kind, but the first "
        f"argument is the satellite ID: satellite {command} ID snmp.get ...\n"
    )


def test_missing_required_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "call", "7", "snmp.get", OID)
    assert code == EXIT_USAGE
    assert err.strip() == (
        "satellite call ID snmp.get: error: the following arguments are required: --host"
    )


def test_missing_dsn_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "declare", "7")
    assert code == EXIT_USAGE
    assert err == "satellite: US_AMQP_DSN: is required but not set (or pass --dsn)\n"


def test_json_errors_are_also_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "declare", "7", "--json")
    assert code == EXIT_USAGE
    assert '"ok": false' in out
    assert '"code": "usage"' in out


def test_bad_satellite_id_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = f"amqp://u:{SECRET}@127.0.0.1:1/"
    code, _, err = run(capsys, "declare", "ok", "not.ok", "--dsn", dsn)
    assert code == EXIT_USAGE
    assert "'not.ok': a satellite id is 1-64 characters" in err
    code, _, err = run(capsys, "submit", "a b", "icmp.ping", "--host", "h", "--dsn", dsn)
    assert code == EXIT_USAGE
    assert SECRET not in err


def test_invalid_job_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "submit", "7", "snmp.get", "--host", "h", "--community", SECRET,
        "--job-timeout", "9999", OID, "--dsn", "amqp://u:p@127.0.0.1:1/",
    )  # fmt: skip
    assert code == EXIT_USAGE
    assert err.startswith("satellite: invalid snmp.get job: timeout: ")
    assert SECRET not in err


def test_password_option_for_ssh_does_not_exist(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "call", "7", "ssh.exec", "--host", "h", "--username", "u",
        "--password", SECRET, "--command", "id",
    )  # fmt: skip
    assert code == EXIT_USAGE
    assert "unrecognized arguments" in err


def test_unreachable_broker_exits_4_without_the_password(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    dsn = f"amqp://core:{SECRET}@127.0.0.1:1/%2F"
    code, out, err = run(capsys, "declare", "7", "--dsn", dsn, "--connect-timeout", "1")
    assert code == EXIT_BROKER
    assert "cannot connect to amqp://core:***@127.0.0.1:1/%2F" in err
    assert SECRET not in out + err + caplog.text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.startswith("satellite ")


@pytest.mark.parametrize("command", ["call", "submit"])
def test_the_help_of_call_and_submit_says_where_the_job_options_are(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """`satellite call --help` lists only the kinds: it points at the kind's own help, which
    has --host, --timeout, --priority (with a word on what it does) and the rest."""
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"satellite {command} ID KIND --help" in out
    code, out, _ = run(capsys, command, "7", "tcp.connect", "--help")
    assert code == 0
    assert "--host HOST" in out
    assert "AMQP priority" in out


@pytest.mark.parametrize("command", [["status", "7"], ["provision", "7"], ["revoke", "7"]])
def test_a_bad_management_url_is_a_usage_error_before_connecting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """Not after `status` has listened for heartbeats for 12 s: the broker here is unreachable,
    so a command that connected first would exit 4."""
    monkeypatch.setenv("USM_MANAGEMENT_URL", "rabbit:15672")
    code, _, err = run(capsys, *command, "--dsn", "amqp://core:x@127.0.0.1:1/%2f")
    assert code == EXIT_USAGE
    assert err.strip().splitlines() == [
        "satellite: USM_MANAGEMENT_URL: must be an http:// or https:// URL with a host"
    ]


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no file descriptor here")


def test_a_closed_stdout_is_exit_141_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`satellite results --json | head -1`: the reader went away; no traceback."""
    tokens = tmp_path / "tokens.yaml"
    assert main(["token", "create", "ops", "--scope", "read", "--tokens-file", str(tokens)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["token", "list", "--tokens-file", str(tokens), "--json"]) == EXIT_STDOUT_CLOSED
    assert "Traceback" not in capsys.readouterr().err
