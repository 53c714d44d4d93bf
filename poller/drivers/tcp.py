"""TCP driver: `tcp.connect`, a three-way handshake to the job's port and its time in ms.

The port is `params.port`, which the wire model fills from `target.port` when it is not given.

Data: `connected` and `rtt_ms` (the connect time, name resolution excluded). A refusal (RST) or
an ICMP unreachable is `device_unreachable` with `data = {"connected": false}`; silence until
the deadline is `device_timeout`. The connection is closed right after it is established;
nothing is sent on it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING, ClassVar

from poller.drivers.base import Auth, Data, JobContext, resolve_host
from poller.errors import DeviceTimeoutError, DeviceUnreachableError
from poller.wire import JobKind, JobRequest, TcpConnectJob

if TYPE_CHECKING:
    from poller.config import PollerSettings

__all__ = ["TcpDriver"]

#: Give up this much before the job deadline, so that the driver (not the runner's own
#: deadline) reports the timeout, with its data.
_MARGIN = 0.02


class TcpDriver:
    """Runs `tcp.connect`. Stateless: one socket per job, closed before the job ends."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TCP_CONNECT})

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> TcpDriver:
        del settings  # nothing to configure: every wait is bounded by the job deadline
        return cls()

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        del auth
        if not isinstance(job, TcpConnectJob):
            raise TypeError(f"TcpDriver cannot run {job.kind}")
        host, port = job.target.host, job.params.port
        deadline = ctx.deadline - _MARGIN
        family, ip = await resolve_host(host, deadline, data={"connected": False})
        address = (ip, port)
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            started = loop.time()
            try:
                async with asyncio.timeout_at(deadline):
                    await loop.sock_connect(sock, address)
            except TimeoutError:
                raise DeviceTimeoutError(
                    f"no answer from {host} port {port} within "
                    f"{max(0.0, deadline - started):.3g} s",
                    data={"connected": False},
                ) from None
            except OSError as exc:
                if exc.errno == errno.ETIMEDOUT:  # the kernel gave up first (deadline > ~2 min)
                    raise DeviceTimeoutError(
                        f"no answer from {host} port {port}", data={"connected": False}
                    ) from None
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise DeviceUnreachableError(
                    f"{host} port {port}: {reason}", data={"connected": False}
                ) from None
            rtt_ms = (loop.time() - started) * 1000
        finally:
            sock.close()
        return {"connected": True, "rtt_ms": round(rtt_ms, 3)}

    async def aclose(self) -> None:
        return None
