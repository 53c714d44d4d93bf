"""Who runs next: the run slots of one process, shared so dead devices cannot take them all.

Before a job touches its device it needs two things at once: a slot of its device (at most
`per_device` jobs at once against one host address) and a run slot (at most `concurrency` jobs
at once in the process). Jobs for *untrusted* devices, those that have not answered this
process yet (never seen, or their last job timed out), may hold at most `untrusted` of the run
slots together. However many dead devices the queue holds, the other run slots stay free for
devices that answer, and a waiting job costs nothing but its unacked message: the worker's
prefetch window is larger than its concurrency so that jobs for live devices keep arriving
while the jobs of dead ones wait (docs/operations.md, "Dead devices").

Waiters are served in arrival order among those allowed to run, except that a job delivered
more times before goes first (`priority`, its attempt number): a process that dies returns every
job it held, started or not, and the quorum queue counts each return against its delivery limit
(20), so in a crash storm the jobs returned most often are the ones about to be dead-lettered
without ever having run. `close()` turns every
returnable waiter, and every later returnable `acquire`, into `NotStarted`: on shutdown, jobs
that never started go back to the queue at once instead of being started during the drain.
A job that is not idempotent is not returnable: the broker would mark it redelivered, and a
redelivered job that is not idempotent is never run (DESIGN §5), so it runs during the drain.

Jobs of the interactive lane (DESIGN §13; `interactive=True`) come first: a freed run slot
goes to the oldest interactive job whose device has a free slot before any bulk job, and
`reserved` run slots are kept for them: bulk jobs together hold at most `concurrency -
reserved` run slots. Interactive jobs together hold at most half the run slots (or the
reserved ones, when more), so that a flood of them cannot starve the bulk jobs either. An
interactive job also goes ahead of its device's waiting bulk jobs; the
per-device limit applies to both, and so does the quarantine (the runner checks it first).
Interactive jobs are not held to the share of untrusted devices (an operator asks about a
device this process may never have seen), but they count in it while they run. They wait in
one list in arrival order, scanned on each grant: the lane's own small prefetch keeps it short,
and without interactive jobs the bulk path costs one more comparison.

A waiter may have a deadline (loop time): when it comes, the waiter leaves the queue and its
future goes to the caller's `expire` (`poller.pacing.Trickle.fail`: a `TimeoutError` a few
loop iterations later). Jobs delivered together have the same deadline; cancelling hundreds of
waiting tasks in one loop iteration stalled the jobs of live devices for tens of
milliseconds. A waiter that is cancelled leaves the queue too. No I/O; no clock but the loop's
timers for those deadlines.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Admission", "Lease", "NotStarted"]

#: A waiter's `seq` is its arrival number less this for each unit of priority: arrival numbers
#: never reach it, so priority orders first and arrival second, in one integer (heap keys).
_PRIORITY_STEP = 1 << 48


class NotStarted(Exception):  # noqa: N818 - a state, not a failure of the job
    """The job was not started because the process is shutting down: return it to the queue."""


_Expire = Callable[[asyncio.Future[bool]], None]


def _time_out(future: asyncio.Future[bool]) -> None:
    future.set_exception(TimeoutError())


@dataclass(slots=True, eq=False)
class _Waiter:
    seq: int  # arrival order
    future: asyncio.Future[bool]  # result: whether the grant counts as untrusted
    returnable: bool
    expiry: asyncio.TimerHandle | None = None  # its deadline's timer

    def leave(self) -> None:
        """Out of the queue (granted, refused, cancelled): its deadline no longer applies."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None


@dataclass(slots=True, eq=False)
class _Device:
    """One host address with jobs running or waiting."""

    name: str
    running: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)
    lane: bool | None = None  # the lane (untrusted?) of its valid entry; None: in no lane
    gen: int = 0  # bumped whenever it is filed again: older entries are stale
    urgent: int = 0  # its interactive jobs waiting (in `Admission._urgent`)


class Admission:
    """Run slots and per-device slots of one process (see the module docstring).

    Waiting jobs are kept per device; a device with waiting jobs and a free device slot has one
    entry in one of two lanes, trusted and untrusted, ordered by its oldest waiting job. A
    release looks at the heads of the lanes only, so it costs O(log n) however many jobs of
    dead devices wait behind a full untrusted share (a scan of every waiter was measurable on a
    loaded replica). Entries go stale instead of being removed; a lane is compacted when stale
    entries outnumber the devices.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        per_device: int,
        untrusted: int | None = None,
        trusted: Callable[[str], bool] = lambda _device: True,
        reserved: int = 0,
    ) -> None:
        if concurrency < 1 or per_device < 1:
            raise ValueError("need concurrency >= 1 and per_device >= 1")
        self.concurrency = concurrency
        self.per_device = per_device
        #: Run slots that jobs of untrusted devices may hold together (default: half).
        self.untrusted = max(1, min(concurrency, untrusted or concurrency // 2))
        self._trusted = trusted
        #: Run slots bulk jobs never take (at most concurrency - 1: bulk jobs need one).
        self.reserved = max(0, min(reserved, concurrency - 1))
        self._bulk_slots = concurrency - self.reserved
        #: Run slots interactive jobs may hold together.
        self.interactive_cap = max(1, self.reserved, concurrency // 2)
        self._running = 0
        self._interactive_running = 0
        #: Interactive jobs waiting, in arrival order (few: the lane's prefetch bounds them).
        self._urgent: deque[tuple[_Device, _Waiter]] = deque()
        self._untrusted_running = 0
        self._waiting = 0
        self._devices: dict[str, _Device] = {}
        # Lanes by "untrusted?": heaps of (oldest waiter's seq, gen, device).
        self._lanes: dict[bool, list[tuple[int, int, _Device]]] = {False: [], True: []}
        self._seq = itertools.count()
        self._closed = False

    @property
    def running(self) -> int:
        """Jobs holding a run slot."""
        return self._running

    @property
    def interactive_running(self) -> int:
        """Interactive jobs holding a run slot."""
        return self._interactive_running

    @property
    def bulk_slots_free(self) -> bool:
        """Whether a bulk job could take a run slot now (the reserved ones do not count)."""
        return (
            self._running < self.concurrency
            and self._running - self._interactive_running < self._bulk_slots
        )

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot (both lanes)."""
        return self._waiting + len(self._urgent)

    @property
    def devices(self) -> int:
        """Devices with at least one job running."""
        return sum(1 for d in self._devices.values() if d.running)

    def lease(
        self,
        device: str,
        *,
        returnable: bool = True,
        deadline: float | None = None,
        expire: _Expire = _time_out,
        interactive: bool = False,
    ) -> Lease:
        """`async with admission.lease(host):` holds a run slot and a slot of `host`."""
        return Lease(self, device, returnable, deadline, expire, interactive=interactive)

    def take(self, device: str, *, returnable: bool = True) -> bool | None:
        """A bulk job's slots if it may have them at once, as `acquire` would give them
        (whether they count as untrusted); None when it would have to wait (then `acquire`).
        Raises `NotStarted` as `acquire` does. No coroutine: most jobs start at once."""
        if self._closed and returnable:
            raise NotStarted
        dev = self._devices.get(device)
        if dev is None:
            dev = self._devices[device] = _Device(device)
        if dev.waiters or dev.urgent:
            return None
        untrusted = not self._trusted(device)
        if not self._may_run(dev, untrusted):
            return None
        self._take(dev, untrusted)
        return untrusted

    async def acquire(
        self,
        device: str,
        *,
        returnable: bool = True,
        deadline: float | None = None,
        expire: _Expire = _time_out,
        interactive: bool = False,
        priority: int = 0,
    ) -> bool:
        """Wait for both slots; whether they count as untrusted. Give them back with
        `release(device, untrusted, interactive)`. Bulk waiters with a higher `priority` (the
        job's attempt number) are served before those with a lower one, then by arrival.

        Raises `NotStarted` once closed, unless the job is not `returnable`, whatever `refuse`
        set for the device's waiting jobs, and, still waiting at `deadline` (loop time), what
        `expire` sets on its future (by default `TimeoutError` at once).
        """
        if not interactive:
            taken = self.take(device, returnable=returnable)
            if taken is not None:
                return taken
        elif self._closed and returnable:
            raise NotStarted
        dev = self._devices.get(device)
        if dev is None:
            dev = self._devices[device] = _Device(device)
        if interactive:
            return await self._acquire_urgent(dev, returnable, deadline, expire)
        loop = asyncio.get_running_loop()
        seq = next(self._seq) - max(0, priority) * _PRIORITY_STEP
        waiter = _Waiter(seq, loop.create_future(), returnable)
        if deadline is not None:
            waiter.expiry = loop.call_at(deadline, self._expire, dev, waiter, expire)
        self._enqueue(dev, waiter)
        self._waiting += 1
        if dev.lane is None:
            self._file(dev)
        try:
            return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted, but cancelled before it could resume: hand the slots on.
                self.release(device, future.result())
            elif future.cancelled() and waiter in dev.waiters:
                # Still queued (refused waiters, and cancelled ones a grant skipped, are not).
                self._remove(dev, waiter)
            raise

    async def _acquire_urgent(
        self, dev: _Device, returnable: bool, deadline: float | None, expire: _Expire
    ) -> bool:
        untrusted = not self._trusted(dev.name)
        if (
            not dev.urgent
            and self._running < self.concurrency
            and self._interactive_running < self.interactive_cap
            and dev.running < self.per_device
        ):
            self._take_urgent(dev, untrusted)
            return untrusted
        loop = asyncio.get_running_loop()
        waiter = _Waiter(next(self._seq), loop.create_future(), returnable)
        if deadline is not None:
            waiter.expiry = loop.call_at(deadline, self._expire_urgent, dev, waiter, expire)
        self._urgent.append((dev, waiter))
        dev.urgent += 1
        try:
            return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(dev.name, future.result(), interactive=True)
            elif future.cancelled():
                self._remove_urgent(dev, waiter)
            raise

    def _take_urgent(self, dev: _Device, untrusted: bool) -> None:
        self._take(dev, untrusted)
        self._interactive_running += 1
        if dev.running >= self.per_device and dev.lane is not None:
            dev.lane = None  # full: its bulk entry is stale; filed again when a job ends

    def _remove_urgent(self, dev: _Device, waiter: _Waiter) -> bool:
        """Take one interactive waiter out of the list; whether it was in it."""
        try:
            self._urgent.remove((dev, waiter))
        except ValueError:
            return False
        waiter.leave()
        dev.urgent -= 1
        if not dev.urgent and not dev.waiters:
            self._emptied(dev)
        return True

    def _expire_urgent(self, dev: _Device, waiter: _Waiter, expire: _Expire) -> None:
        waiter.expiry = None
        if not waiter.future.done() and self._remove_urgent(dev, waiter):
            expire(waiter.future)

    def _grant_urgent(self) -> bool:
        """Give a run slot to the oldest interactive job whose device has a free slot."""
        if self._interactive_running >= self.interactive_cap:
            return False
        for i, (dev, waiter) in enumerate(self._urgent):
            if dev.running >= self.per_device:
                continue
            del self._urgent[i]
            waiter.leave()
            dev.urgent -= 1
            if waiter.future.done():  # cancelled; its task has not resumed to leave the list
                if not dev.urgent and not dev.waiters:
                    self._emptied(dev)
                return True
            untrusted = not self._trusted(dev.name)
            self._take_urgent(dev, untrusted)
            waiter.future.set_result(untrusted)
            return True
        return False

    def _enqueue(self, dev: _Device, waiter: _Waiter) -> None:
        """Into its device's queue, which stays ordered by `seq` (a plain append unless the
        job came with a higher priority than some waiting; then its device is filed again
        when it now leads)."""
        waiters = dev.waiters
        if not waiters or waiters[-1].seq < waiter.seq:
            waiters.append(waiter)
            return
        at = next(i for i, w in enumerate(waiters) if w.seq > waiter.seq)
        waiters.insert(at, waiter)
        if at == 0 and dev.lane is not None:
            self._file(dev)

    def _remove(self, dev: _Device, waiter: _Waiter) -> None:
        """Take one waiter out of its device's queue (its lane entry goes stale if it led)."""
        waiter.leave()
        dev.waiters.remove(waiter)
        self._waiting -= 1
        if not dev.waiters:
            self._emptied(dev)

    def _expire(self, dev: _Device, waiter: _Waiter, expire: _Expire) -> None:
        """Its deadline came while it waited: out of the queue, its future to `expire`."""
        waiter.expiry = None
        if waiter.future.done() or waiter not in dev.waiters:
            return
        self._remove(dev, waiter)
        expire(waiter.future)

    def release(self, device: str, untrusted: bool, interactive: bool = False) -> None:
        """Give back the slots of one `acquire`; wakes the waiters that may now run."""
        self._running -= 1
        if interactive:
            self._interactive_running -= 1
        if untrusted:
            self._untrusted_running -= 1
        dev = self._devices[device]
        dev.running -= 1
        if not dev.waiters:
            self._emptied(dev)
        elif dev.lane is None:
            self._file(dev)
        if self._waiting or self._urgent:
            self._wake()

    def refile(self, device: str) -> None:
        """The device's trust changed: its waiting jobs move to the lane that now applies."""
        dev = self._devices.get(device)
        if dev is not None and dev.lane is not None and dev.lane != (not self._trusted(device)):
            self._file(dev)
            self._wake()

    def refuse(self, device: str, fail: Callable[[asyncio.Future[bool]], None]) -> int:
        """Take every job waiting for `device` out of the queue; how many there were.

        Each one's future goes to `fail`, which resolves it with an exception, now or on a
        later iteration (`poller.pacing.Trickle.fail`); its job then raises that from
        `acquire`. For a device just quarantined: its queued jobs are answered at once instead
        of each taking a slot in turn only to be refused. Its interactive jobs go to `fail`
        first.
        """
        dev = self._devices.get(device)
        if dev is None or not (dev.waiters or dev.urgent):
            return 0
        urgent = [w for d, w in self._urgent if d is dev]
        for waiter in urgent:
            self._remove_urgent(dev, waiter)
        urgent = [w for w in urgent if not w.future.done()]
        for waiter in urgent:
            fail(waiter.future)
        if not dev.waiters:
            return len(urgent)
        waiters = [w for w in dev.waiters if not w.future.done()]
        for waiter in dev.waiters:
            waiter.leave()
        self._waiting -= len(dev.waiters)
        dev.waiters.clear()
        self._emptied(dev)
        for waiter in waiters:
            fail(waiter.future)
        return len(urgent) + len(waiters)

    def close(self) -> int:
        """Refuse returnable waiters and later `acquire`s with `NotStarted`; how many waited."""
        self._closed = True
        refused = 0
        for dev, waiter in list(self._urgent):
            if waiter.future.done() or waiter.returnable:
                self._remove_urgent(dev, waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(NotStarted())
                    refused += 1
        for dev in list(self._devices.values()):
            kept: deque[_Waiter] = deque()
            for waiter in dev.waiters:
                if waiter.future.done():
                    waiter.leave()
                    continue
                if waiter.returnable:
                    waiter.leave()
                    waiter.future.set_exception(NotStarted())
                    refused += 1
                else:
                    kept.append(waiter)
            self._waiting -= len(dev.waiters) - len(kept)
            dev.waiters = kept
            if not kept:
                self._emptied(dev)
            elif dev.lane is not None:
                self._file(dev)  # its oldest waiter may have changed
        return refused

    def _may_run(self, dev: _Device, untrusted: bool) -> bool:
        """Whether a bulk job may take both slots now."""
        if self._running >= self.concurrency:
            return False
        if self._running - self._interactive_running >= self._bulk_slots:
            return False
        if untrusted and self._untrusted_running >= self.untrusted:
            return False
        return dev.running < self.per_device

    def _take(self, dev: _Device, untrusted: bool) -> None:
        self._running += 1
        if untrusted:
            self._untrusted_running += 1
        dev.running += 1

    def _emptied(self, dev: _Device) -> None:
        """The device has no waiting job (left): out of the lanes, forgotten once idle too."""
        dev.lane = None
        if not dev.running and not dev.urgent and self._devices.get(dev.name) is dev:
            del self._devices[dev.name]

    def _file(self, dev: _Device) -> None:
        """(Re)file a device with waiting jobs and a free device slot in its lane."""
        if dev.running >= self.per_device:
            dev.lane = None  # filed again when one of its jobs ends
            return
        dev.gen += 1
        dev.lane = not self._trusted(dev.name)
        lane = self._lanes[dev.lane]
        heapq.heappush(lane, (dev.waiters[0].seq, dev.gen, dev))
        if len(lane) > 2 * len(self._devices) + 64:
            self._compact(lane)

    def _compact(self, lane: list[tuple[int, int, _Device]]) -> None:
        lane[:] = [e for e in lane if self._valid(e)]
        heapq.heapify(lane)

    def _valid(self, entry: tuple[int, int, _Device]) -> bool:
        _seq, gen, dev = entry
        return gen == dev.gen and dev.lane is not None and self._devices.get(dev.name) is dev

    def _head(self, untrusted: bool) -> tuple[int, int, _Device] | None:
        """The lane's oldest valid entry (stale ones are dropped), left in place."""
        lane = self._lanes[untrusted]
        while lane:
            entry = lane[0]
            dev = entry[2]
            if not self._valid(entry):  # a valid entry is always in its device's lane
                heapq.heappop(lane)
                continue
            if entry[0] != dev.waiters[0].seq or (not self._trusted(dev.name)) != untrusted:
                heapq.heappop(lane)
                self._file(dev)  # its oldest waiter left, or its trust changed
                continue
            return entry
        return None

    def _wake(self) -> None:
        """Grant slots to the oldest waiters that may run now, while run slots are free:
        interactive ones first, bulk ones within their share."""
        while self._running < self.concurrency:
            if self._urgent and self._grant_urgent():
                continue
            if not self._waiting or self._running - self._interactive_running >= self._bulk_slots:
                return
            best, untrusted = self._head(False), False
            if self._untrusted_running < self.untrusted:
                other = self._head(True)
                if other is not None and (best is None or other[0] < best[0]):
                    best, untrusted = other, True
            if best is None:
                return
            heapq.heappop(self._lanes[untrusted])
            dev = best[2]
            waiter = dev.waiters.popleft()
            waiter.leave()
            self._waiting -= 1
            if waiter.future.done():  # cancelled; its task has not resumed to leave the queue
                if dev.waiters:
                    self._file(dev)
                else:
                    self._emptied(dev)
                continue
            self._take(dev, untrusted)
            dev.lane = None
            if dev.waiters:
                self._file(dev)
            waiter.future.set_result(untrusted)


class Lease:
    """The slots of one job while it runs; see `Admission.lease`."""

    __slots__ = (
        "_admission",
        "_deadline",
        "_device",
        "_expire",
        "_interactive",
        "_returnable",
        "_untrusted",
    )

    def __init__(
        self,
        admission: Admission,
        device: str,
        returnable: bool,
        deadline: float | None,
        expire: _Expire,
        *,
        interactive: bool = False,
    ) -> None:
        self._admission = admission
        self._device = device
        self._returnable = returnable
        self._deadline = deadline
        self._expire = expire
        self._interactive = interactive
        self._untrusted = False

    async def __aenter__(self) -> None:
        self._untrusted = await self._admission.acquire(
            self._device,
            returnable=self._returnable,
            deadline=self._deadline,
            expire=self._expire,
            interactive=self._interactive,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._admission.release(self._device, self._untrusted, self._interactive)
