"""OpenSSH `sshd` on a free loopback port with key login, for `ssh.exec` and host-key tests.

`sshd_server` is a session fixture. It runs `/usr/sbin/sshd -D` (foreground, so the fixture owns
the PID) as root with key login for root only, waits until the port answers with an SSH banner,
and stops that PID at the end. Without sshd or root it skips with the reason, or fails when `CI`
is set: CI must run these tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import stop_process

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
HOST = "127.0.0.1"

__all__ = ["SshdServer", "free_port", "keygen", "sshd_server", "start_sshd"]


@dataclass(frozen=True)
class SshdServer:
    host: str
    port: int
    user: str
    #: The client's private key (OpenSSH format), authorised for `user`.
    client_key: str
    #: The server's public host key, `type base64`, for pinning.
    host_key: str
    #: Another valid public key that the server does not have.
    other_host_key: str
    pid: int
    workdir: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def keygen(path: Path, kind: str = "ed25519") -> tuple[str, str]:
    """Make a key pair without a passphrase; return (private key text, `type base64` public)."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
        check=True,
        timeout=30,
    )
    public = " ".join(path.with_suffix(".pub").read_text().split()[:2])
    return path.read_text(), public


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"sshd is required in CI: {reason}")
    pytest.skip(reason)


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1.0) as sock:
            sock.settimeout(1.0)
            if sock.recv(64).startswith(b"SSH-"):
                return
        time.sleep(0.05)
    raise RuntimeError("sshd did not answer in time")


@contextlib.contextmanager
def start_sshd(max_sessions: int = 64) -> Iterator[SshdServer]:
    """Run sshd on a free port until the block ends (stopped by its PID)."""
    if not Path(SSHD).exists() or not Path(SSH_KEYGEN).exists():
        _unavailable("OpenSSH server not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        _unavailable("sshd needs root for privilege separation")
    workdir = Path(tempfile.mkdtemp(prefix="usm-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        _, host_key = keygen(workdir / "host_key")
        _, other_key = keygen(workdir / "other_host_key")
        client_key, client_pub = keygen(workdir / "client_key")
        (workdir / "authorized_keys").write_text(client_pub + "\n")
        port = free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress {HOST}:{port}\n"
            f"HostKey {workdir / 'host_key'}\n"
            f"PidFile {workdir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nPrintMotd no\n"
            "PrintLastLog no\nX11Forwarding no\nAllowTcpForwarding no\n"
            "AllowAgentForwarding no\nPermitTunnel no\n"
            f"MaxStartups 200:30:400\nMaxSessions {max_sessions}\n"
        )
        # sshd's privilege-separation directory. Never removed again: another test session's
        # sshd may be using it (without it, sshd resets every new connection).
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True, timeout=30)
        log = (workdir / "sshd.log").open("wb")
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait_for_banner(port, proc)
        yield SshdServer(
            host=HOST,
            port=port,
            user="root",
            client_key=client_key,
            host_key=host_key,
            other_host_key=other_key,
            pid=proc.pid,
            workdir=workdir,
        )
    finally:
        if proc is not None:
            stop_process(proc, grace=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshdServer]:
    """OpenSSH sshd on 127.0.0.1 with key login for root, for the whole test session."""
    with start_sshd() as server:
        yield server
