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

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["BlackHoleNetns", "blackhole_netns", "has_ipv6_loopback", "netns_unavailable_reason"]

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
