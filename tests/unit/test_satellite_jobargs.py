"""Building jobs from `satellite call/submit` options: every kind, secrets, and bad input."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from poller.errors import ConfigError
from poller.wire import (
    CliJob,
    JobKind,
    JobRequest,
    PingJob,
    SnmpGetJob,
    SnmpSetJob,
    SnmpWalkJob,
    SshExecJob,
    TcpConnectJob,
    decode_job,
    encode,
)
from satellite.cli import build_parser
from satellite.dispatch import InvalidJobError, build_job
from satellite.jobargs import KIND_OPTIONS, job_from_args, parse_varbind

OID = "1.3.6.1.2.1.1.5.0"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", "7", *argv])


def job(*argv: str, environ: dict[str, str] | None = None) -> JobRequest:
    ns = parse(*argv)
    return job_from_args(ns.kind, ns, environ or {})


def community_of(got: JobRequest) -> str:
    assert isinstance(got, SnmpGetJob)
    assert got.auth is not None
    assert got.auth.community is not None
    return got.auth.community.get_secret_value()


def test_every_kind_has_options() -> None:
    assert set(KIND_OPTIONS) == set(JobKind)


def test_snmp_get_v2c() -> None:
    got = job("snmp.get", "--host", "127.0.0.1", "--port", "16100", "--community", "public", OID)
    assert isinstance(got, SnmpGetJob)
    assert got.target.host == "127.0.0.1"
    assert got.target.port == 16100
    assert got.auth is not None
    assert got.auth.version == "2c"
    assert got.auth.community is not None
    assert got.auth.community.get_secret_value() == "public"
    assert got.params.oids == [OID]
    assert decode_job(encode(got)) == got


def test_community_from_file_or_environment(tmp_path: Path) -> None:
    secret = tmp_path / "community"
    secret.write_text("from-file\n")
    got = job("snmp.get", "--host", "h", "--community-file", str(secret), OID)
    assert community_of(got) == "from-file"
    env = job("snmp.get", "--host", "h", OID, environ={"USM_SNMP_COMMUNITY": "from-env"})
    assert community_of(env) == "from-env"
    first = job("snmp.get", "--host", "h", "--community", "inline", OID,
                environ={"USM_SNMP_COMMUNITY": "from-env"})  # fmt: skip
    assert community_of(first) == "inline"


def test_missing_community_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^--community: SNMP v2c needs a community"):
        job("snmp.get", "--host", "h", OID)


def test_unreadable_secret_file_is_named_not_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--community-file: cannot read"):
        job("snmp.get", "--host", "h", "--community-file", str(tmp_path / "none"), OID)


def test_snmp_v3_auth_priv() -> None:
    got = job(
        "snmp.getnext",
        "--host", "h",
        "--snmp-version", "3",
        "--user", "ops",
        "--security-level", "authPriv",
        "--auth-protocol", "SHA256",
        "--auth-key", "authpass123",
        "--priv-protocol", "AES",
        "--context", "vlan-10",
        OID,
        environ={"USM_SNMP_PRIV_KEY": "privpass123"},
    )  # fmt: skip
    assert got.kind == "snmp.getnext"
    assert got.auth is not None
    assert (got.auth.user, got.auth.security_level, got.auth.context) == (
        "ops",
        "authPriv",
        "vlan-10",
    )
    assert got.auth.priv_key is not None
    assert got.auth.priv_key.get_secret_value() == "privpass123"


def test_invalid_v3_combination_names_fields_not_values() -> None:
    with pytest.raises(InvalidJobError) as info:
        job("snmp.get", "--host", "h", "--snmp-version", "3", "--user", "ops",
            "--auth-key", "short", OID)  # fmt: skip
    assert "auth_key must be at least 8 characters" in str(info.value)
    assert "short" not in str(info.value)


def test_snmp_walk_options() -> None:
    got = job("snmp.walk", "--host", "h", "--community", "c", "--max-repetitions", "50",
              "1.3.6.1.2.1.2")  # fmt: skip
    assert isinstance(got, SnmpWalkJob)
    assert got.params.max_repetitions == 50
    assert got.params.max_varbinds == 200_000


def test_snmp_set_varbinds() -> None:
    got = job(
        "snmp.set", "--host", "h", "--community", "private",
        f"{OID}=OctetString:sw-1", "1.3.6.1.2.1.1.6.0=s:lab", "1.3.6.1.4.1.9.1=i:-5",
        "1.3.6.1.4.1.9.2=x:0a:0b", "1.3.6.1.4.1.9.3=Gauge32:0x10",
    )  # fmt: skip
    assert isinstance(got, SnmpSetJob)
    assert got.idempotent is False
    assert [(v.type, v.value, v.hex) for v in got.params.varbinds] == [
        ("OctetString", "sw-1", False),
        ("OctetString", "lab", False),
        ("Integer", -5, False),
        ("OctetString", "0a0b", True),
        ("Gauge32", 16, False),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.3.6=7", "OID=TYPE:VALUE"),
        ("1.3.6=Float:1", "unknown type 'Float'"),
        ("1.3.6=Integer:one", "Integer needs an integer"),
    ],
)
def test_bad_varbinds(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_varbind(text)


def test_common_job_options() -> None:
    got = job(
        "icmp.ping", "--host", "10.0.0.1", "--count", "5", "--id", "job-1",
        "--job-timeout", "12.5", "--not-after", "2030-01-01T00:00:00Z",
        "--meta", '{"device_id": 1532}', "--no-idempotent",
    )  # fmt: skip
    assert isinstance(got, PingJob)
    assert got.id == "job-1"
    assert got.timeout == 12.5
    assert got.not_after == datetime(2030, 1, 1, tzinfo=UTC)
    assert got.meta == {"device_id": 1532}
    assert got.idempotent is False
    assert got.params.count == 5


def test_relative_not_after() -> None:
    got = job("tcp.connect", "--host", "h", "--port", "22", "--not-after", "+2m")
    assert got.not_after is not None
    assert 100 < (got.not_after - datetime.now(UTC)).total_seconds() <= 120


def test_tcp_connect_needs_a_port() -> None:
    assert isinstance(job("tcp.connect", "--host", "h", "--port", "443"), TcpConnectJob)
    with pytest.raises(ConfigError, match=r"^--port"):
        job("tcp.connect", "--host", "h")


def test_tcp_connect_is_written_in_the_shape_every_poller_reads() -> None:
    """`params.port` (all pollers) and `target.port` (pollers that read it), with no `auth`."""
    body = json.loads(encode(job("tcp.connect", "--host", "h", "--port", "443")))
    assert (body["params"], body["target"]["port"]) == ({"port": 443}, 443)
    assert "auth" not in body
    built = build_job("tcp.connect", target={"host": "h", "port": 22}, auth={})
    body = json.loads(encode(built))
    assert (body["params"], body["target"]["port"]) == ({"port": 22}, 22)
    assert "auth" not in body
    assert decode_job(encode(built)) == built


def test_ssh_password_only_from_file_or_environment(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("ssh.exec", "--host", "h", "--username", "u", "--password", "x", "--command", "id")
    password = tmp_path / "pw"
    password.write_text("hunter22\n")
    got = job("ssh.exec", "--host", "h", "--username", "admin", "--password-file", str(password),
              "--command", "uname -a", "--command", "uptime")  # fmt: skip
    assert isinstance(got, SshExecJob)
    assert got.params.commands == ["uname -a", "uptime"]
    assert got.auth is not None
    assert got.auth.password is not None
    assert got.auth.password.get_secret_value() == "hunter22"
    assert "hunter22" not in repr(got)


def test_cli_kinds() -> None:
    got = job(
        "telnet.cli", "--host", "h", "--username", "admin", "--platform", "cisco_iosxe",
        "--enable", "--command", "show version",
        environ={"USM_SSH_PASSWORD": "pw", "USM_SSH_ENABLE_PASSWORD": "en"},
    )  # fmt: skip
    assert isinstance(got, CliJob)
    assert got.kind == "telnet.cli"
    assert (got.params.platform, got.params.enable) == ("cisco_iosxe", True)
    assert got.auth is not None
    assert got.auth.enable_password is not None


def test_credential_ref_replaces_auth() -> None:
    got = job("ssh.cli", "--host", "h", "--credential-ref", "olt-admin", "--command", "show")
    assert isinstance(got, CliJob)
    assert (got.credential_ref, got.auth) == ("olt-admin", None)
    snmp = job("snmp.get", "--host", "h", "--credential-ref", "snmp-ro", OID,
               environ={"USM_SNMP_COMMUNITY": "ignored"})  # fmt: skip
    assert isinstance(snmp, SnmpGetJob)
    assert (snmp.credential_ref, snmp.auth) == ("snmp-ro", None)
    with pytest.raises(ConfigError, match="either credentials or --credential-ref"):
        job("snmp.get", "--host", "h", "--credential-ref", "r", "--community", "c", OID)
