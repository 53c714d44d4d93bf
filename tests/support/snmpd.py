"""A real Net-SNMP `snmpd` on loopback for the SNMP integration tests.

The session fixture `snmpd` starts one agent as user `nobody` on a free 127.0.0.1 UDP port and
returns an `Snmpd` with the address and every credential it accepts:

- v1/v2c: community `public` read-only on everything; community `private` read-write, limited to
  the system group (1.3.6.1.2.1.1), where sysContact.0 and sysLocation.0 are writable because the
  configuration does not set them (sysName.0 is set in the configuration, so it is read-only).
- v3: one user per security level and protocol the installed Net-SNMP supports (see `V3_USERS`),
  read-only; `rwuser` (SHA256/AES) may also write the system group.

The agent answers with this machine's real MIB-II data. It is stopped by PID at session end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.procs import stop_process

__all__ = ["V3_USERS", "Snmpd", "V3User", "snmpd"]

#: Read-only community for v1 and v2c.
COMMUNITY = "public"
#: Read-write community for v1 and v2c, limited to the system group.
WRITE_COMMUNITY = "private"
WRITABLE_SUBTREE = "1.3.6.1.2.1.1"
AUTH_KEY = "authpass-0123"
PRIV_KEY = "privpass-4567"


@dataclass(frozen=True, slots=True)
class V3User:
    """One SNMPv3 user of the test agent; protocol names are the wire names (`SnmpAuth`)."""

    user: str
    security_level: str
    auth_protocol: str | None = None
    priv_protocol: str | None = None
    auth_key: str | None = None
    priv_key: str | None = None
    writable: bool = False


def _user(name: str, auth: str | None = None, priv: str | None = None, **kw: bool) -> V3User:
    level = "authPriv" if priv else "authNoPriv" if auth else "noAuthNoPriv"
    return V3User(
        user=name,
        security_level=level,
        auth_protocol=auth,
        priv_protocol=priv,
        auth_key=AUTH_KEY if auth else None,
        priv_key=PRIV_KEY if priv else None,
        **kw,
    )


#: Every v3 user the agent knows, keyed by a short label used in test ids.
V3_USERS: dict[str, V3User] = {
    "noauth": _user("noauthuser"),
    "md5": _user("md5user", "MD5"),
    "sha": _user("shauser", "SHA"),
    "sha224": _user("sha224user", "SHA224"),
    "sha256": _user("sha256user", "SHA256"),
    "sha384": _user("sha384user", "SHA384"),
    "sha512": _user("sha512user", "SHA512"),
    "md5-des": _user("md5desuser", "MD5", "DES"),
    "sha-des": _user("desuser", "SHA", "DES"),
    "sha-aes": _user("aesuser", "SHA", "AES"),
    "sha256-aes192": _user("aes192user", "SHA256", "AES192"),
    "sha512-aes256": _user("aes256user", "SHA512", "AES256"),
    "rw": _user("rwuser", "SHA256", "AES", writable=True),
}

# Our protocol names → Net-SNMP's createUser spelling.
_NETSNMP_AUTH = {
    "MD5": "MD5",
    "SHA": "SHA",
    "SHA224": "SHA-224",
    "SHA256": "SHA-256",
    "SHA384": "SHA-384",
    "SHA512": "SHA-512",
}
_NETSNMP_PRIV = {"DES": "DES", "AES": "AES", "AES192": "AES-192", "AES256": "AES-256"}
_NETSNMP_LEVEL = {"noAuthNoPriv": "noauth", "authNoPriv": "auth", "authPriv": "priv"}


@dataclass(frozen=True, slots=True)
class Snmpd:
    """Where the test agent listens and what it accepts."""

    host: str
    port: int
    community: str = COMMUNITY
    write_community: str = WRITE_COMMUNITY
    writable_subtree: str = WRITABLE_SUBTREE
    sys_name: str = "test-device-1"
    v3_users: dict[str, V3User] = field(default_factory=lambda: dict(V3_USERS))
    log_path: Path | None = None


def _config(port: int) -> str:
    lines = [
        f"agentAddress udp:127.0.0.1:{port}",
        f"rocommunity {COMMUNITY} 127.0.0.1",
        f"rwcommunity {WRITE_COMMUNITY} 127.0.0.1 .{WRITABLE_SUBTREE}",
        f"rocommunity6 {COMMUNITY} ::1",
        "sysName test-device-1",
        "sysServices 72",
        # sysContact and sysLocation are left unset on purpose: then they are writable.
    ]
    for u in V3_USERS.values():
        create = f"createUser {u.user}"
        if u.auth_protocol:
            create += f' {_NETSNMP_AUTH[u.auth_protocol]} "{u.auth_key}"'
        if u.priv_protocol:
            create += f' {_NETSNMP_PRIV[u.priv_protocol]} "{u.priv_key}"'
        lines.append(create)
        level = _NETSNMP_LEVEL[u.security_level]
        if u.writable:
            lines.append(f"rwuser {u.user} {level} .{WRITABLE_SUBTREE}")
        else:
            lines.append(f"rouser {u.user} {level}")
    return "\n".join(lines) + "\n"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ber(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x81, n])
    return bytes([tag]) + length + body


def _probe_packet() -> bytes:
    """A v2c GET of sysUpTime.0 with community `public`, BER-encoded by hand."""
    oid = bytes([0x2B, 6, 1, 2, 1, 1, 3, 0])
    varbind = _ber(0x30, _ber(0x06, oid) + b"\x05\x00")
    header = _ber(0x02, b"\x01") + _ber(0x02, b"\x00") + _ber(0x02, b"\x00")
    pdu = _ber(0xA0, header + _ber(0x30, varbind))
    return _ber(0x30, _ber(0x02, b"\x01") + _ber(0x04, COMMUNITY.encode()) + pdu)


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(_probe_packet(), ("127.0.0.1", port))
        try:
            sock.recvfrom(4096)
        except OSError:
            return False
        return True


def _start(binary: str, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    conf = workdir / "snmpd.conf"
    conf.write_text(_config(port))
    persist = workdir / "persist"
    persist.mkdir(exist_ok=True)
    log = workdir / "snmpd.log"
    cmd = [binary, "-f", "-Lf", str(log), "-I", "-smux", "-C", "-c", str(conf)]
    if os.geteuid() == 0:
        # snmpd drops to nobody right after reading its configuration and binding the port.
        shutil.chown(persist, "nobody", "nogroup")
        cmd += ["-u", "nobody", "-g", "nogroup"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MIBS": ":"}
    env["SNMP_PERSISTENT_DIR"] = str(persist)
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc)  # signals exactly the PID we started


@pytest.fixture(scope="session")
def snmpd() -> Iterator[Snmpd]:
    """A Net-SNMP agent on 127.0.0.1 for the whole test session."""
    binary = shutil.which("snmpd") or next(
        (p for p in ("/usr/sbin/snmpd", "/usr/local/sbin/snmpd") if Path(p).is_file()), None
    )
    if binary is None:
        pytest.fail("Net-SNMP snmpd is not installed (apt-get install snmpd snmp)", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="usm-snmpd-"))
    workdir.chmod(0o755)  # nobody must be able to read the configuration
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):  # a free port can be taken between probing and binding
            port = _free_udp_port()
            proc = _start(binary, workdir, port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if _answers(port):
                    break
                time.sleep(0.05)
            if proc.poll() is None and _answers(port):
                break
            _stop(proc)
            proc = None
        if proc is None:
            log = workdir / "snmpd.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            pytest.fail(f"snmpd did not start or does not answer on 127.0.0.1:\n{tail}")
        yield Snmpd(host="127.0.0.1", port=port, log_path=workdir / "snmpd.log")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
