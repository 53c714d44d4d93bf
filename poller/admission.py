"""Who runs next: the run slots of one process, shared so dead devices cannot take them all.

Before a job touches its device it needs two things at once: a slot of its device (at most
`per_device` jobs at once against one host address) and a run slot (at most `concurrency` jobs
at once in the process). Jobs for *untrusted* devices, those that have not answered this
process yet (never seen, or their last job timed out), may hold at most `untrusted` of the run
slots together. However many dead devices the queue holds, the other run slots stay free for
devices that answer, and a waiting job costs nothing but its unacked message: the worker's
prefetch window is larger than its concurrency so that jobs for live devices keep arriving
while the jobs of dead ones wait (docs/operations.md, "Dead devices").

Waiters are served in arrival order among those allowed to run. `close()` turns every
returnable waiter, and every later returnable `acquire`, into `NotStarted`: on shutdown, jobs
that never started go back to the queue at once instead of being started during the drain.
A job that is not idempotent is not returnable: the broker would mark it redelivered, and a
redelivered job that is not idempotent is never run (DESIGN §5), so it runs during the drain.

Pure asyncio bookkeeping: no I/O, no clocks. Deadlines are the caller's (`asyncio.timeout`
around `lease`); a waiter that is cancelled leaves the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType

__all__ = ["Admission", "Lease", "NotStarted"]


class NotStarted(Exception):  # noqa: N818 - a state, not a failure of the job
    """The job was not started because the process is shutting down: return it to the queue."""


@dataclass(slots=True)
class _Waiter:
    device: str
    future: asyncio.Future[bool]  # result: whether the grant counts as untrusted
    returnable: bool


class Admission:
    """Run slots and per-device slots of one process (see the module docstring)."""

    def __init__(
        self,
        *,
        concurrency: int,
        per_device: int,
        untrusted: int | None = None,
        trusted: Callable[[str], bool] = lambda _device: True,
    ) -> None:
        if concurrency < 1 or per_device < 1:
            raise ValueError("need concurrency >= 1 and per_device >= 1")
        self.concurrency = concurrency
        self.per_device = per_device
        #: Run slots that jobs of untrusted devices may hold together (default: half).
        self.untrusted = max(1, min(concurrency, untrusted or concurrency // 2))
        self._trusted = trusted
        self._running = 0
        self._untrusted_running = 0
        self._devices: dict[str, int] = {}
        self._waiters: deque[_Waiter] = deque()
        self._closed = False

    @property
    def running(self) -> int:
        """Jobs holding a run slot."""
        return self._running

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot."""
        return len(self._waiters)

    @property
    def devices(self) -> int:
        """Devices with at least one job running."""
        return len(self._devices)

    def lease(self, device: str, *, returnable: bool = True) -> Lease:
        """`async with admission.lease(host):` holds a run slot and a slot of `host`."""
        return Lease(self, device, returnable)

    async def acquire(self, device: str, *, returnable: bool = True) -> bool:
        """Wait for both slots; whether they count as untrusted.

        Raises `NotStarted` once closed, unless the job is not `returnable`.
        """
        if self._closed and returnable:
            raise NotStarted
        untrusted = not self._trusted(device)
        if self._may_run(device, untrusted):
            self._take(device, untrusted)
            return untrusted
        waiter = _Waiter(device, asyncio.get_running_loop().create_future(), returnable)
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted, but cancelled before it could resume: hand the slots on.
                self.release(device, future.result())
            else:
                with suppress(ValueError):  # already handed out by close()
                    self._waiters.remove(waiter)
            raise

    def release(self, device: str, untrusted: bool) -> None:
        """Give back the slots of one `acquire`; wakes the waiters that may now run."""
        self._running -= 1
        if untrusted:
            self._untrusted_running -= 1
        left = self._devices[device] - 1
        if left:
            self._devices[device] = left
        else:
            del self._devices[device]
        if self._waiters:
            self._wake()

    def close(self) -> int:
        """Refuse returnable waiters and later `acquire`s with `NotStarted`; how many waited."""
        self._closed = True
        refused = 0
        kept: deque[_Waiter] = deque()
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            if waiter.returnable:
                waiter.future.set_exception(NotStarted())
                refused += 1
            else:
                kept.append(waiter)
        self._waiters = kept
        return refused

    def _may_run(self, device: str, untrusted: bool) -> bool:
        if self._running >= self.concurrency:
            return False
        if untrusted and self._untrusted_running >= self.untrusted:
            return False
        return self._devices.get(device, 0) < self.per_device

    def _take(self, device: str, untrusted: bool) -> None:
        self._running += 1
        if untrusted:
            self._untrusted_running += 1
        self._devices[device] = self._devices.get(device, 0) + 1

    def _wake(self) -> None:
        """Grant slots to the waiters that may run now, oldest first."""
        kept: deque[_Waiter] = deque()
        waiters = self._waiters
        while waiters and self._running < self.concurrency:
            waiter = waiters.popleft()
            if waiter.future.done():
                continue
            untrusted = not self._trusted(waiter.device)
            if self._may_run(waiter.device, untrusted):
                self._take(waiter.device, untrusted)
                waiter.future.set_result(untrusted)
            else:
                kept.append(waiter)
        kept.extend(waiters)
        self._waiters = kept


class Lease:
    """The slots of one job while it runs; see `Admission.lease`."""

    __slots__ = ("_admission", "_device", "_returnable", "_untrusted")

    def __init__(self, admission: Admission, device: str, returnable: bool) -> None:
        self._admission = admission
        self._device = device
        self._returnable = returnable
        self._untrusted = False

    async def __aenter__(self) -> None:
        self._untrusted = await self._admission.acquire(self._device, returnable=self._returnable)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._admission.release(self._device, self._untrusted)
