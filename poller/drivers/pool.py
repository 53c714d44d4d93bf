"""Blocking calls on a bounded set of threads, with their results handed back in batches.

`asyncio.run_in_executor` costs, per call, a `concurrent.futures.Future`, its chaining to an
asyncio future and one `call_soon_threadsafe` (a write to the loop's wake-up pipe). At a few
hundred SNMP requests per second that is a sizeable part of a job's CPU. `CallPool` queues the
call itself, and a finished call only wakes the loop when it is the first of a batch: the loop
then settles every call that finished since, in one pass; a thread that finishes a call takes
the next waiting one itself.

How many calls run at once: at most `threads`, and of those at most `fast` quick ones. A call
is quick until it has run for `slow_after` seconds; calls with a `key` (the device) whose calls
take that long, or longer, are slow from the start (a moving average of their durations, so
that one late answer does not make a quick device's next calls slow). Calls to agents that
answer within a few milliseconds then run on `fast` threads, however many are queued: a few
threads keep the CPU busy, and dozens of them would only take turns at the GIL (in side-by-side
runs on a loaded 2-core host, 64 threads took between about as much and 20% more CPU per SNMP
GET than 4). Calls to slow or silent agents, whose threads only wait, all run at once, up to
`threads`. While calls wait, the loop looks for calls that have become slow every `slow_after`
(nothing runs when nothing waits); so the first calls to slow agents, before their keys are
known, start at `fast` per `slow_after` at least.

A call whose future was cancelled before a thread took it is skipped; one that is running when
its future is cancelled finishes on its thread (a blocking call cannot be interrupted) and its
outcome is dropped. Such abandoned calls count against neither `fast` nor `threads`: up to
`threads` more threads may start for them, so that calls somebody still waits for do not queue
behind them. (A job that times out against a dead device abandons its SNMP call until
Net-SNMP's own timeout ends it; when a whole burst of such jobs timed out at once, the healthy
jobs' calls waited behind theirs for tens of milliseconds.)
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from contextlib import suppress
from typing import Any, TypeVar

__all__ = ["CallPool"]

T = TypeVar("T")

_Item = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...], Hashable]
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]

#: Default `slow_after`: a loopback or LAN agent answers well within it, also on a busy host.
SLOW_AFTER = 0.01
#: Keys whose durations are remembered; past this many, the memory starts again (it is a hint).
MAX_KEYS = 65_536
#: Weight of a call's duration in its key's moving average.
_WEIGHT = 0.2


class CallPool:
    """Runs blocking callables on up to `threads` threads for one event loop."""

    def __init__(
        self,
        threads: int,
        *,
        name: str = "pool",
        fast: int | None = None,
        slow_after: float = SLOW_AFTER,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.max_threads = threads
        self.fast = threads if fast is None else max(1, min(fast, threads))
        self.slow_after = slow_after
        self._name = name
        self._lock = threading.Lock()
        # Under _lock:
        self._handoff: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # to idle threads
        self._idle = 0  # idle threads not yet promised an item of `_handoff`
        self._waiting: deque[_Item] = deque()  # quick calls not started yet
        self._waiting_slow: deque[_Item] = deque()  # calls of slow keys not started yet
        self._running: dict[asyncio.Future[Any], tuple[float, Hashable]] = {}  # start, key
        self._slow: set[asyncio.Future[Any]] = set()  # running calls not counted as quick
        self._abandoned: set[asyncio.Future[Any]] = set()  # running, future cancelled
        self._durations: dict[Hashable, float] = {}  # key -> moving average of its calls
        self._done: list[_Outcome] = []
        self._threads: list[threading.Thread] = []
        self._timer: asyncio.TimerHandle | None = None  # on the loop's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    @property
    def running(self) -> int:
        """Calls running now (abandoned ones included)."""
        return len(self._running)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)`; a future of its outcome. Call it on the event loop's thread."""
        return self.submit_keyed(None, fn, *args)

    def submit_keyed(self, key: Hashable, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`submit`, for a call whose duration is like that of the last call with `key`
        (None: no key)."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        item: _Item = (future, fn, args, key)
        start = None
        with self._lock:
            if key is not None and self._durations.get(key, 0.0) >= self.slow_after:
                if self._waiting_slow or not self._may_start(slow=True):
                    self._waiting_slow.append(item)
                else:
                    start = self._place(item, time.monotonic(), slow=True)
            elif self._waiting or not self._may_start(slow=False):
                self._waiting.append(item)
            else:
                start = self._place(item, time.monotonic(), slow=False)
            waiting = bool(self._waiting or self._waiting_slow)
        if start is not None:
            self._start_thread(start)
        if waiting and self._timer is None:
            self._timer = loop.call_later(self.slow_after, self._recheck)
        return future

    def _may_start(self, *, slow: bool) -> bool:
        """Whether one more (slow or quick) call may start now (under `_lock`)."""
        running = len(self._running)
        if not slow and running - len(self._slow) >= self.fast:
            return False
        return running - min(len(self._abandoned), self.max_threads) < self.max_threads

    def _next(self, now: float) -> _Item | None:
        """The next waiting call that may start now, counted as running (under `_lock`)."""
        for waiting, slow in ((self._waiting_slow, True), (self._waiting, False)):
            while waiting and self._may_start(slow=slow):
                item = waiting.popleft()
                if item[0].cancelled():
                    continue
                self._running[item[0]] = (now, item[3])
                if slow:
                    self._slow.add(item[0])
                return item
        return None

    def _place(self, item: _Item, now: float, *, slow: bool) -> _Item | None:
        """Start `item` (under `_lock`): hand it to an idle thread, or return it for a new one."""
        self._running[item[0]] = (now, item[3])
        if slow:
            self._slow.add(item[0])
        if self._idle:
            self._idle -= 1
            self._handoff.put(item)
            return None
        return item

    def _start_thread(self, item: _Item) -> None:
        thread = threading.Thread(
            target=self._work, args=(item,), name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _recheck(self) -> None:
        """On the loop, while calls wait: count long-running and abandoned calls out of `fast`,
        and start the waiting calls that may start now."""
        self._timer = None
        if self._closed:
            return
        now = time.monotonic()
        slow_since = now - self.slow_after
        new: list[_Item] = []
        with self._lock:
            for future, (started, _key) in self._running.items():
                if future.cancelled():
                    self._abandoned.add(future)
                    self._slow.add(future)
                elif started <= slow_since:
                    self._slow.add(future)
            while (item := self._next(now)) is not None:
                if self._idle:
                    self._idle -= 1
                    self._handoff.put(item)
                else:
                    new.append(item)
            waiting = bool(self._waiting or self._waiting_slow)
        for item in new:
            self._start_thread(item)
        if waiting and self._loop is not None:
            self._timer = self._loop.call_later(self.slow_after, self._recheck)

    def _remember(self, key: Hashable, duration: float) -> None:
        """Add a call's duration to its key's moving average (under `_lock`)."""
        durations = self._durations
        average = durations.get(key)
        if average is None:
            if len(durations) >= MAX_KEYS:
                durations.clear()
            durations[key] = duration
        else:
            durations[key] = average + (duration - average) * _WEIGHT

    def shutdown(self) -> None:
        """Stop the threads once they are idle; calls not yet started are cancelled."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            waiting = [*self._waiting, *self._waiting_slow]
            self._waiting.clear()
            self._waiting_slow.clear()
        for item in waiting:
            item[0].cancel()
        for _ in self._threads:
            self._handoff.put(None)

    def _work(self, item: _Item | None) -> None:
        get, lock, running = self._handoff.get, self._lock, self._running
        monotonic = time.monotonic
        while True:
            if item is None:
                item = get()
                if item is None:
                    return
            future, fn, args, key = item
            if future.cancelled():  # a plain attribute read: safe from this thread
                outcome: _Outcome | None = None
            else:
                try:
                    outcome = (future, fn(*args), None)
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                    outcome = (future, None, exc)
            with lock:
                now = monotonic()
                started, _ = running.pop(future)
                self._slow.discard(future)
                self._abandoned.discard(future)
                if key is not None and outcome is not None:
                    self._remember(key, now - started)
                first = False
                if outcome is not None:
                    self._done.append(outcome)
                    first = len(self._done) == 1
                item = None if self._closed else self._next(now)
                if item is None:
                    self._idle += 1
            if first:
                loop = self._loop
                if loop is not None:
                    # A closed loop raises RuntimeError: nobody is waiting any more.
                    with suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._settle)
            del future, outcome

    def _settle(self) -> None:
        """On the loop: resolve every future whose call has finished since the last pass."""
        with self._lock:
            done, self._done = self._done, []
        for future, result, exc in done:
            if future.done():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)
