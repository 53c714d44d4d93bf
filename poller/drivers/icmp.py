"""ICMP driver: `icmp.ping` over icmplib's asyncio API. The only module that imports icmplib.

Socket mode, chosen once per address family when the driver is built:

- unprivileged ICMP datagram sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`) when the process's group is
  inside the sysctl `net.ipv4.ping_group_range` (it covers IPv6 too) — the default, and what a
  container with `cap_drop: [ALL]` gets;
- raw sockets otherwise, when the process has `CAP_NET_RAW`;
- neither: one warning at start-up naming the sysctl, and every ping job is answered with
  `ping_not_permitted` (a configuration problem of the poller host, not a device problem).

A host that answers no echo request is a normal result: `status: ok`, `packet_loss: 1.0` and
null round-trip times (see docs/drivers/icmp.md). Names are resolved here, through the event
loop's executor, so icmplib only ever sees address literals and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from icmplib import ICMPLibError, SocketPermissionError, async_ping

from poller.drivers.base import Auth, Data, JobContext, resolve_host
from poller.errors import DeviceTimeoutError, DeviceUnreachableError, PingNotPermittedError
from poller.logging import get_logger
from poller.wire import JobKind, JobRequest, PingJob

if TYPE_CHECKING:
    from poller.config import PollerSettings

__all__ = ["IcmpDriver", "PingMode", "probe_mode"]

log = get_logger("poller.drivers.icmp")

SYSCTL = "net.ipv4.ping_group_range"
_SYSCTL_PATH = Path("/proc/sys/net/ipv4/ping_group_range")
#: Longest wait for one echo reply; shrunk so that every packet fits in the job deadline.
DEFAULT_REPLY_TIMEOUT = 2.0
#: Stop this much before the job deadline, so that the driver (not the runner) reports it.
_MARGIN = 0.02
_PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}


class PingMode(Enum):
    UNPRIVILEGED = "unprivileged"  # ICMP datagram sockets, allowed by ping_group_range
    RAW = "raw"  # raw sockets, needs CAP_NET_RAW
    NOT_PERMITTED = "not_permitted"
    UNAVAILABLE = "unavailable"  # the address family is not supported on this host


def probe_mode(family: socket.AddressFamily) -> PingMode:
    """Which kind of ICMP socket this process may open for `family` (datagram first)."""
    proto = _PROTO[family]
    for kind, mode in ((socket.SOCK_DGRAM, PingMode.UNPRIVILEGED), (socket.SOCK_RAW, PingMode.RAW)):
        try:
            socket.socket(family, kind, proto).close()
        except PermissionError:
            continue
        except OSError:
            return PingMode.UNAVAILABLE
        return mode
    return PingMode.NOT_PERMITTED


def _permission_hint() -> str:
    try:
        current = " ".join(_SYSCTL_PATH.read_text(encoding="ascii").split())
    except OSError:
        current = "unknown"
    return (
        f"this process (gid {os.getgid()}) may open neither unprivileged ICMP sockets "
        f"({SYSCTL} is {current!r} and does not cover its group) nor raw sockets (no "
        f"CAP_NET_RAW); set {SYSCTL}='0 2147483647' (compose: sysctls) or grant CAP_NET_RAW"
    )


class IcmpDriver:
    """Runs `icmp.ping`. Stateless apart from the socket mode per address family."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.ICMP_PING})

    def __init__(
        self,
        modes: dict[socket.AddressFamily, PingMode] | None = None,
        *,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> None:
        if modes is None:
            modes = {family: probe_mode(family) for family in _PROTO}
        self.modes = modes
        self.reply_timeout = reply_timeout
        self._hint = _permission_hint() if PingMode.NOT_PERMITTED in modes.values() else ""

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> IcmpDriver:
        """Probe the socket modes once and warn, once, when pinging is not permitted."""
        del settings
        driver = cls()
        if driver._hint:
            log.warning(
                "ping_not_permitted",
                sysctl=SYSCTL,
                modes={f.name: m.value for f, m in driver.modes.items()},
                hint=driver._hint,
            )
        return driver

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        del auth
        if not isinstance(job, PingJob):
            raise TypeError(f"IcmpDriver cannot run {job.kind}")
        deadline = ctx.deadline - _MARGIN
        family, address = await resolve_host(job.target.host, deadline)
        mode = self.modes.get(family, PingMode.UNAVAILABLE)
        if mode is PingMode.NOT_PERMITTED:
            raise PingNotPermittedError(f"cannot ping: {self._hint}")
        if mode is PingMode.UNAVAILABLE:
            raise DeviceUnreachableError(f"this poller host cannot send {family.name} ICMP")
        params = job.params
        loop = asyncio.get_running_loop()
        # Each packet waits up to `reply` for its answer, then `interval` before the next; a
        # tenth of the time is left over for the scheduling slack of every wait.
        budget = (deadline - loop.time() - (params.count - 1) * params.interval) * 0.9
        reply = min(self.reply_timeout, budget / params.count)
        if reply < 0.001:
            raise DeviceTimeoutError(
                f"{params.count} packets {params.interval:g} s apart do not fit in the job's "
                "timeout; raise the timeout or lower count/interval"
            )
        try:
            async with asyncio.timeout_at(deadline):
                host = await async_ping(
                    address,
                    count=params.count,
                    interval=params.interval,
                    timeout=reply,
                    privileged=mode is PingMode.RAW,
                    payload_size=params.size,
                )
        except TimeoutError:
            raise DeviceTimeoutError(f"ping of {address} did not finish in time") from None
        except SocketPermissionError:
            raise PingNotPermittedError(f"cannot ping: {_permission_hint()}") from None
        except ICMPLibError as exc:
            raise DeviceUnreachableError(f"cannot ping {address}: {exc}") from None
        return _data(job.target.host, host.packets_sent, list(host.rtts))

    async def aclose(self) -> None:
        return None


def _data(target: str, sent: int, rtts: list[float]) -> Data:
    if sent == 0:
        raise DeviceUnreachableError(
            f"no echo request could be sent to {target} (no route?)",
            data={"sent": 0, "received": 0},
        )
    received = len(rtts)
    return {
        "sent": sent,
        "received": received,
        "packet_loss": round((sent - received) / sent, 4),
        "rtt_min_ms": round(min(rtts), 3) if rtts else None,
        "rtt_avg_ms": round(sum(rtts) / received, 3) if rtts else None,
        "rtt_max_ms": round(max(rtts), 3) if rtts else None,
    }
