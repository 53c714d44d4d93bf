"""A low-priority lane: a few of its tasks resume per event-loop iteration, the rest later.

When a device is quarantined, every job waiting for it is answered at once, and a delivery
batch can hold dozens of jobs for quarantined devices. Each answer is cheap (no device is
contacted) but not free: a result, a publish, a log line, a confirm. Woken together, a few
hundred of them would fill event-loop iterations for tens of milliseconds, and every job of a
live device whose answer arrived meanwhile would wait behind them. `Trickle` resumes
`per_turn` of its tasks per iteration, oldest first; each iteration also handles the I/O that
arrived since the previous one, so jobs that talk to devices keep their latency and the cheap
answers follow a little later. On an idle loop the lane drains at once.

`bench/dead_devices.py` (cold case, one answer per iteration vs no lane): healthy p99 12 ms
vs 47-62 ms; docs/performance.md has the figures.

No clocks and no I/O: waiting tasks are resumed by a callback that runs on the next iteration.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Headroom", "LaneFirst", "PrioritySlots", "Trickle", "first_in_line"]

_Entry = tuple[asyncio.Future[Any], Callable[[], BaseException] | None]


class Trickle:
    """Resumes at most `per_turn` of its waiting tasks per event-loop iteration, in order."""

    def __init__(self, per_turn: int = 1) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be >= 1")
        self.per_turn = per_turn
        self._passed = 0  # resumed in the current turn
        self._queue: deque[_Entry] = deque()
        self._turning = False  # a `_next_turn` is scheduled

    @property
    def waiting(self) -> int:
        """Futures waiting for a later iteration."""
        return len(self._queue)

    async def turn(self) -> None:
        """Return now if this iteration's turn has room, else on a later iteration."""
        if self._room():
            return
        future = asyncio.get_running_loop().create_future()
        self._queue.append((future, None))
        await future

    def fail(self, future: asyncio.Future[Any], error: Callable[[], BaseException]) -> None:
        """Set `error()` on `future` now if this turn has room, else on a later iteration.

        For futures other tasks are waiting on (`Admission.refuse`): they resume in the lane's
        order. A future that is done by then (cancelled) is skipped.
        """
        if self._room():
            if not future.done():
                future.set_exception(error())
            return
        self._queue.append((future, error))

    def _room(self) -> bool:
        if not self._turning:
            # The lane was idle: a turn starts on this iteration.
            self._turning = True
            self._passed = 0
            asyncio.get_running_loop().call_soon(self._next_turn)
        if self._passed < self.per_turn and not self._queue:
            self._passed += 1
            return True
        return False

    def _next_turn(self) -> None:
        """On the next iteration: resume the next `per_turn` waiters that are still pending."""
        self._passed = 0
        queue = self._queue
        while queue and self._passed < self.per_turn:
            future, error = queue.popleft()
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error())
            self._passed += 1
        if queue or self._passed:
            # Those resumed run on the next iteration: that is their turn; count it.
            asyncio.get_running_loop().call_soon(self._next_turn)
        else:
            self._turning = False


class LaneFirst:
    """While a job of the interactive lane is in flight, bulk work waits: for a while only.

    The lane's jobs have their own queue, channel, window and run slots, but they share the
    event loop, the process's CPU and the broker with the bulk jobs: behind a backlog that
    keeps the poller busy (about 1,100 bulk jobs/s on 2 cores) every step of an interactive
    job waited behind bulk deliveries, results, confirms and log lines. `hold()` (when an
    interactive job is delivered) starts a *pause*: bulk tasks that reach `bulk_turn()` (a bulk
    job about to start on its device, a bulk result about to be published) wait until every
    hold is released (the interactive job is answered) or the pause runs out of *credit*,
    whichever comes first; then they all resume, in order.

    Bulk jobs cannot starve. Pauses spend credit, one second per second paused; bulk work
    earns it back, one second per second it runs, up to `max_pause`. So no pause lasts longer
    than `max_pause`, and over any stretch of time the pauses add up to at most the time bulk
    work ran plus `max_pause`: bulk work runs at least half the time, however many interactive
    jobs come. A pause begins only with a new hold (an interactive job that runs long pauses
    bulk work once, not for as long as it runs), once at least a tenth of `max_pause` is
    there to spend (a hold that comes earlier begins its pause then, if it is still held).
    A bulk task that is cancelled while it waits just leaves. No I/O; the loop's clock only.
    """

    def __init__(self, max_pause: float = 0.1) -> None:
        """`max_pause` 0: bulk work never waits (`hold` does nothing)."""
        if max_pause < 0:
            raise ValueError("max_pause must be >= 0")
        self.max_pause = max_pause
        self._least = max_pause / 10  # the least credit a pause begins with
        self._holds = 0
        self._paused_at: float | None = None  # loop time the current pause began
        self._credit = max_pause  # seconds of pause to spend, as of `_credit_at`
        self._credit_at = -math.inf  # loop time `_credit` was worked out at
        self._timer: asyncio.TimerHandle | None = None
        self._due = False  # a hold came while no pause could begin: one begins when it may
        self._waiting: deque[asyncio.Future[None]] = deque()
        #: Pauses begun so far (for tests and logs).
        self.pauses = 0

    @property
    def paused(self) -> bool:
        """Whether bulk work waits now."""
        return self._paused_at is not None

    @property
    def waiting(self) -> int:
        """Bulk tasks waiting for the pause to end."""
        return len(self._waiting)

    def hold(self) -> Callable[[], None]:
        """An interactive job is in flight: pause bulk work (when allowed) until the returned
        callable is called (once is enough; later calls do nothing)."""
        if not self.max_pause:
            return _nothing
        self._holds += 1
        self._due = True
        self._begin()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._holds -= 1
            if not self._holds:
                self._due = False
                if self._paused_at is not None:
                    self._end()

        return release

    async def bulk_turn(self) -> None:
        """Return at once, or when the current pause ends."""
        if self._paused_at is None:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await future

    def _begin(self) -> None:
        """Begin the pause a new hold asked for, now or once there is credit for it."""
        if self._paused_at is not None:
            self._due = False  # this hold is covered by the pause going on
            return
        if not self._due or not self._holds or self._timer is not None:
            return  # nothing asked for, or a later look is scheduled already
        loop = asyncio.get_running_loop()
        now = loop.time()
        credit = min(self.max_pause, self._credit + (now - self._credit_at))
        if credit < self._least:
            self._timer = loop.call_at(now + self._least - credit, self._look_again)
            return
        self._due = False
        self._credit, self._credit_at = credit, now
        self._paused_at = now
        self.pauses += 1
        self._timer = loop.call_at(now + credit, self._end)

    def _look_again(self) -> None:
        """Bulk work has earned some credit: a hold that came meanwhile, still held, pauses."""
        self._timer = None
        self._begin()

    def _end(self) -> None:
        started = self._paused_at
        if started is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._paused_at = None
        now = asyncio.get_running_loop().time()
        self._credit = max(0.0, self._credit - (now - started))
        self._credit_at = now
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_result(None)


def _nothing() -> None:
    return None


def first_in_line(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callback scheduled last on `loop` (the first step of a task just created) before
    every callback scheduled earlier: next, instead of after them.

    An interactive job's task is created while the loop works through a turn full of bulk work
    (deliveries read in the same pass, device answers, confirms: up to a hundred callbacks and
    tens of milliseconds on a busy poller); at the end of the line it would wait for all of it,
    and for the next turn's. asyncio's own loops keep their ready callbacks in a deque
    (`_ready`, the same since Python 3.4; Python 3.12's eager tasks are the public way to do
    this): the newest goes to its head. Any other loop (uvloop) is left as it is. Nothing is
    dropped or run twice; only this callback's place changes.
    """
    ready = getattr(loop, "_ready", None)
    if isinstance(ready, deque) and len(ready) > 1:
        ready.appendleft(ready.pop())


class Headroom:
    """Bulk job starts slowed while the event loop is saturated, so that it reads a lane
    delivery promptly (`USM_POLLER_BULK_HEADROOM_MS`).

    Behind a backlog of fast devices (50 ms) the poller's loop is about 90 % busy with bulk
    work (about 1,100 jobs/s on 2 cores), every turn is long, and an interactive delivery waits
    a turn or more before the loop reads it. A ticker every `tick` seconds measures how late
    the loop runs it; every `window` seconds the mean lateness is compared with `target`:

    - above it, bulk starts are capped at 0.8 x the lower of the cap and the rate they started
      at in that window (never below `floor` per second: bulk work does not starve);
    - below half of it, the cap grows by a tenth (at least `floor / 10`), and goes once it is
      twice the rate bulk jobs start at (the cap does not bind: an idle or lightly loaded
      poller is not paced at all);
    - in between, it stays.

    `bulk_turn()` is a token bucket at the cap (a burst of one tick's worth); waiters go in
    order. Interactive jobs never call it. No I/O; the loop's clock only.
    """

    def __init__(
        self, target: float, *, floor: float, tick: float = 0.01, window: float = 0.1
    ) -> None:
        """`target` seconds of mean loop lag (0: off, `bulk_turn` returns at once); `floor`:
        the least bulk starts per second the cap allows."""
        if target < 0 or floor <= 0 or tick <= 0 or window < tick:
            raise ValueError("target >= 0, floor > 0, 0 < tick <= window")
        self.target = target
        self.floor = floor
        self.tick = tick
        self.window = window
        #: Bulk starts per second allowed (inf: no cap).
        self.rate = math.inf
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the ticker should run
        self._late_sum = 0.0
        self._ticks = 0
        self._window_at = 0.0
        self._started = 0  # bulk starts in this window
        #: Times the cap was lowered (for tests and logs).
        self.cuts = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Begin measuring the loop's lag (on the running loop)."""
        if not self.target or self._ticker is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._window_at = self._tokens_at = now
        self._due = now + self.tick
        self._ticker = loop.call_at(self._due, self._on_tick)

    def stop(self) -> None:
        for handle in (self._ticker, self._timer):
            if handle is not None:
                handle.cancel()
        self._ticker = self._timer = None
        self._uncap()

    async def bulk_turn(self) -> None:
        """Return at once, or when the cap lets one more bulk job start."""
        if math.isinf(self.rate) and not self._waiting:
            self._started += 1
            return
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        if not self._waiting and self._tokens >= 1:
            self._tokens -= 1
            self._started += 1
            return
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        self._schedule(loop)
        await future

    def adjust(self, mean_lag: float, started_per_s: float) -> None:
        """One window's verdict: `mean_lag` seconds late on average, `started_per_s` bulk
        starts per second in it. The seam of the unit tests."""
        if mean_lag > self.target:
            self.rate = max(self.floor, 0.8 * min(self.rate, started_per_s))
            self.cuts += 1
        elif mean_lag < self.target / 2 and not math.isinf(self.rate):
            grown = max(self.rate * 1.1, self.rate + self.floor / 10)
            if grown >= 2 * started_per_s:
                self._uncap()
            else:
                self.rate = grown

    def _on_tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._late_sum += max(0.0, now - self._due)
        self._ticks += 1
        elapsed = now - self._window_at
        if elapsed >= self.window:
            self.adjust(self._late_sum / self._ticks, self._started / elapsed)
            self._late_sum, self._ticks, self._started = 0.0, 0, 0
            self._window_at = now
            if self._waiting:
                self._release()
        self._due = now + self.tick
        self._ticker = loop.call_at(self._due, self._on_tick)

    def _uncap(self) -> None:
        self.rate = math.inf
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                self._started += 1
                future.set_result(None)

    def _refill(self, now: float) -> None:
        if math.isinf(self.rate):
            return
        burst = max(1.0, self.rate * self.tick)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None or not self._waiting or math.isinf(self.rate):
            return
        delay = max(0.0, (1 - self._tokens) / self.rate)
        self._timer = loop.call_at(loop.time() + delay, self._release)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if math.isinf(self.rate):
            self._uncap()
            return
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        while self._waiting and self._tokens >= 1:
            future = self._waiting.popleft()
            if future.done():
                continue  # cancelled while it waited
            self._tokens -= 1
            self._started += 1
            future.set_result(None)
        self._schedule(loop)


class PrioritySlots:
    """A semaphore whose waiters go highest `priority` first, then in arrival order.

    The sandbox's children (`poller.sandbox.Sandbox`): a job waiting for one with a higher
    attempt number goes first. A free slot goes to a newcomer only when nobody waits.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("need slots >= 1")
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        """Waiters still queued (cancelled ones leave at the next release)."""
        return sum(1 for _, _, future in self._waiters if not future.done())

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0:
            # A live waiter is only ever queued while no slot is free (`release` hands its
            # slot to one): what is left in the queue now was cancelled.
            self._waiters.clear()
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # granted, then cancelled before it resumed: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # skips the cancelled
                future.set_result(None)
                return
        self._free += 1
