"""A network namespace made by a test, with a real black hole inside it.

`blackhole_netns` creates a namespace of its own with `lo` up and a veth pair `bh0`/`bh1`, both
ends inside it. `bh0` owns 198.51.100.1/24 and 2001:db8:51::1/64 (documentation prefixes); the
target addresses `BlackHoleNetns.v4` and `.v6` have permanent neighbour entries pointing at a MAC
address that no interface has, so their frames leave `bh0`, arrive on `bh1` and are dropped there
as addressed to another host. A TCP SYN or an ICMP echo request sent to them gets no answer at
all — no RST, no ICMP error, no failed ARP — like a device that is switched off, for real,
without iptables (not installed everywhere) or the `dummy` module (absent on some kernels).
Nothing is added to the machine's own namespace; the namespace is deleted afterwards, even when
the test fails.

Code runs inside it through `ns.run_jobs(...)` (`ip netns exec` + `tests/support/run_job.py`),
optionally with `CAP_NET_RAW` dropped. Needs root and iproute2: without them the tests are
skipped with the reason, except in CI (`CI` set), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.procs import stop_process

__all__ = [
    "BlackHoleNetns",
    "BrokerLink",
    "blackhole_netns",
    "broker_link",
    "has_ipv6_loopback",
    "netns_unavailable_reason",
]

_ROOT = Path(__file__).resolve().parents[2]
#: A locally administered MAC address that no interface has: frames for it are dropped.
_NOBODY_MAC = "02:00:5e:00:53:07"


def has_ipv6_loopback() -> bool:
    """Whether ::1 is configured here (it is not in every container)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot run the namespace tests, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass(frozen=True, slots=True)
class BlackHoleNetns:
    name: str
    #: Addresses routed into the black hole: nothing ever answers them.
    v4: str = "198.51.100.7"
    v6: str = "2001:db8:51::7"

    def sysctl(self, key: str, value: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.name, "sysctl", "-qw", f"{key}={value}"],
            check=True,
            capture_output=True,
            timeout=20,
        )

    def run_jobs(
        self, *jobs: dict[str, Any], drop_net_raw: bool = False, timeout: float = 30
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run jobs in the namespace: (stdout object, stderr log lines)."""
        cmd = ["ip", "netns", "exec", self.name]
        if drop_net_raw:
            cmd += ["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw"]
        cmd += [sys.executable, "-m", "tests.support.run_job"]
        cmd += [json.dumps(job) for job in jobs]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
        done = subprocess.run(
            cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"run_job failed ({done.returncode}):\n{done.stderr}")
        logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        out: dict[str, Any] = json.loads(done.stdout)
        return out, logs


@pytest.fixture
def blackhole_netns() -> Iterator[BlackHoleNetns]:
    reason = netns_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the network-namespace tests must run in CI: {reason}")
        pytest.skip(reason)
    name = f"usm-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
        for dev in ("bh0", "bh1"):
            _ip("-n", name, "link", "set", dev, "up")
        _ip("-n", name, "addr", "add", "198.51.100.1/24", "dev", "bh0")
        _ip("-n", name, "addr", "add", "2001:db8:51::1/64", "dev", "bh0", "nodad")
        ns = BlackHoleNetns(name)
        for addr in (ns.v4, ns.v6):
            _ip("-n", name, "neigh", "add", addr, "lladdr", _NOBODY_MAC, "dev", "bh0")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20, check=False)


# ---------------------------------------------------------------- a poller's link to its broker


def iptables_unavailable_reason() -> str | None:
    """Why this machine cannot filter packets in a namespace, or None when it can."""
    reason = netns_unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("iptables") is None:
        return "`iptables` is not installed (scripts/setup.sh --tests installs it)"
    return None


@dataclass
class BrokerLink:
    """Two namespaces of a test: `poller` (the poller under test) and `net` (the network between
    it and the broker), joined by a veth pair (`pl0` in `poller`, `pl1` in `net`) addressed
    with TEST-NET-1. In `net`, a forwarder (tests/support/nsforward.py) listens on
    `net_ip:5672` and connects to the machine's broker on 127.0.0.1; nothing is added to the
    machine's own namespace.

    Faults are iptables rules on the link, each dropping packets where they arrive (the sender
    sees silence, never an error): poller -> broker in `net`'s INPUT, broker -> poller in
    `poller`'s INPUT. Only the broker's TCP port is filtered: a device in `net` stays reachable.
    """

    poller_ns: str
    net_ns: str
    broker_host: str
    broker_port: int
    poller_ip: str = "192.0.2.1"
    net_ip: str = "192.0.2.2"
    port: int = 5672
    forwarder: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def dsn(self, dsn: str) -> str:
        """`dsn` (a URL of the machine's broker) as seen from the namespaces: via the forwarder."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{userinfo}@{self.net_ip}:{self.port}" if userinfo else f"{self.net_ip}:{self.port}"
        )
        return urlunsplit(parts._replace(netloc=netloc))

    def wrap(self, side: str = "poller") -> list[str]:
        """A command prefix that runs a process in the `poller` or `net` namespace."""
        return ["ip", "netns", "exec", self.poller_ns if side == "poller" else self.net_ns]

    @contextlib.contextmanager
    def inside(self, side: str = "net") -> Iterator[None]:
        """Sockets made in the block (by this thread) belong to the `net` or `poller` side."""
        from tests.support.nsforward import inside  # noqa: PLC0415 - Linux only

        with inside(self.net_ns if side == "net" else self.poller_ns):
            yield

    def _iptables(self, ns: str, *args: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "iptables", "-w", "5", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout

    def partition(self, *, inbound_only: bool = False) -> None:
        """Drop the broker's traffic to the poller and, unless `inbound_only`, the poller's to
        the broker."""
        port = str(self.port)
        self._iptables(self.poller_ns, "-A", "INPUT", "-i", "pl0", "-p", "tcp", "--sport", port,
                       "-j", "DROP")  # fmt: skip
        if not inbound_only:
            self._iptables(self.net_ns, "-A", "INPUT", "-i", "pl1", "-p", "tcp", "--dport", port,
                           "-j", "DROP")  # fmt: skip

    def uplink_loss(self, probability: float) -> None:
        """Drop the given share of the poller's packets to the broker, at random (replaces any
        earlier loss)."""
        self.heal()
        self._iptables(self.net_ns, "-A", "INPUT", "-i", "pl1", "-p", "tcp", "--dport",
                       str(self.port), "-m", "statistic", "--mode", "random", "--probability",
                       f"{probability:.4f}", "-j", "DROP")  # fmt: skip

    def heal(self) -> None:
        """Remove every rule: the link carries everything again."""
        for ns in (self.poller_ns, self.net_ns):
            self._iptables(ns, "-F", "INPUT")

    def dropped(self) -> int:
        """Packets dropped so far by the rules in place (both sides)."""
        total = 0
        for ns in (self.poller_ns, self.net_ns):
            for line in self._iptables(ns, "-L", "INPUT", "-v", "-x", "-n").splitlines()[2:]:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "DROP":
                    total += int(fields[0])
        return total


def _start_forwarder(link: BrokerLink) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.nsforward",
            "--netns",
            link.net_ns,
            "--listen",
            f"{link.net_ip}:{link.port}",
            "--connect",
            f"{link.broker_host}:{link.broker_port}",
        ],
        cwd=_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready", or an error and EOF
    if line.strip() != b"ready":
        proc.kill()
        proc.wait(10)
        rest = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        raise AssertionError(f"the forwarder did not start: {line.decode(errors='replace')}{rest}")
    return proc


@pytest.fixture
def broker_link() -> Iterator[BrokerLink]:
    """A `BrokerLink` to the machine's broker (`TEST_RABBITMQ_HOST`/`_PORT`); deleted after the
    test, even when it fails. Without root, iproute2 or iptables: skipped with the reason (a
    failure in CI)."""
    reason = iptables_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the network-namespace tests must run in CI: {reason}")
        pytest.skip(reason)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    link = BrokerLink(
        poller_ns=f"usm-p-{tag}",
        net_ns=f"usm-n-{tag}",
        broker_host=os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1"),
        broker_port=int(os.environ.get("TEST_RABBITMQ_PORT", "5672")),
    )
    made: list[str] = []
    try:
        for ns in (link.poller_ns, link.net_ns):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", link.poller_ns, "link", "add", "pl0", "type", "veth",
            "peer", "name", "pl1", "netns", link.net_ns)  # fmt: skip
        _ip("-n", link.poller_ns, "addr", "add", f"{link.poller_ip}/30", "dev", "pl0")
        _ip("-n", link.net_ns, "addr", "add", f"{link.net_ip}/30", "dev", "pl1")
        _ip("-n", link.poller_ns, "link", "set", "pl0", "up")
        _ip("-n", link.net_ns, "link", "set", "pl1", "up")
        link.forwarder = _start_forwarder(link)
        yield link
    finally:
        if link.forwarder is not None:
            stop_process(link.forwarder, grace=10)
            if link.forwarder.stdout is not None:
                link.forwarder.stdout.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)
