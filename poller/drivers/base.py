"""The driver seam: what every job-kind driver implements, and helpers they share."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

from pydantic import JsonValue

from poller.errors import DeviceTimeoutError, DeviceUnreachableError
from poller.wire import CliAuth, JobKind, JobRequest, SnmpAuth

if TYPE_CHECKING:
    from poller.config import PollerSettings

__all__ = ["Auth", "Data", "Driver", "DriverFactory", "JobContext", "resolve_host"]

#: What a driver returns: the result's `data` object.
Data = dict[str, JsonValue]
#: Resolved credentials for a job (inline `auth`, or looked up from `credential_ref`).
Auth = SnmpAuth | CliAuth


class JobContext(NamedTuple):
    """What the runner tells a driver about the job it is running (a named tuple: one is made
    per job, in a fraction of a frozen dataclass's time)."""

    #: Event-loop time (`loop.time()`) by which the whole job must be finished. The runner also
    #: enforces it with `asyncio.timeout_at` (`guarded`); drivers use it to size per-request
    #: timeouts.
    deadline: float
    #: Cap on collected output; past it a driver raises `OutputTooLargeError` with partial data.
    max_output_bytes: int
    #: True when the caller cancels the run at `deadline` itself (the runner's and the sandbox
    #: child's `asyncio.timeout_at`): a driver then needs no timer of its own for the deadline
    #: (one timer per job, not one per layer). False (a driver called on its own): it bounds
    #: its waits by `deadline` itself.
    guarded: bool = False

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


class Driver(Protocol):
    """Runs jobs of one or more kinds. One instance per process, shared by all jobs.

    `run` returns the result's `data` on success and raises a `JobError` subclass on a device
    failure (with partial data in `exc.data`). It must not catch `asyncio.CancelledError`, and
    it must bound every network wait by `ctx.deadline`.
    """

    kinds: ClassVar[frozenset[JobKind]]

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data: ...

    async def aclose(self) -> None: ...


class DriverFactory(Protocol):
    """A driver class: built once per process from the settings."""

    kinds: ClassVar[frozenset[JobKind]]

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> Driver: ...


async def resolve_host(
    host: str, deadline: float, *, data: Data | None = None
) -> tuple[socket.AddressFamily, str]:
    """The address family and first address of `host`: literals at once, names via the loop.

    `loop.getaddrinfo` runs in the default executor, so a slow DNS server never blocks the
    event loop, and the wait is bounded by `deadline` (event-loop time). A name that does not
    resolve is `DeviceUnreachableError` (with `data`), a resolver that does not answer in time
    is `DeviceTimeoutError`.
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (socket.AF_INET6 if literal.version == 6 else socket.AF_INET), host
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise DeviceTimeoutError(f"no answer from the resolver for {host!r}", data=data) from None
    except OSError as exc:
        raise DeviceUnreachableError(
            f"cannot resolve {host!r}: {exc.strerror or exc}", data=data
        ) from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return socket.AddressFamily(family), str(sockaddr[0])
