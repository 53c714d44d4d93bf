"""Blocking calls on a bounded set of threads, with their results handed back in batches.

`asyncio.run_in_executor` costs, per call, a `concurrent.futures.Future`, its chaining to an
asyncio future and one `call_soon_threadsafe` (a write to the loop's wake-up pipe). At a few
hundred SNMP requests per second that is a sizeable part of a job's CPU. `CallPool` queues the
call itself, and a finished call only wakes the loop when it is the first of a batch: the loop
then settles every call that finished since, in one pass.

Threads start on demand, up to `threads`, like `ThreadPoolExecutor`. A call whose future was
cancelled before a thread took it is skipped; one that is running when its future is cancelled
finishes on its thread (a blocking call cannot be interrupted) and its outcome is dropped.
Such abandoned calls do not count against `threads`: up to as many threads again may start for
them, so that calls somebody still waits for do not queue behind them. (A job that times out
against a dead device abandons its SNMP call until Net-SNMP's own timeout ends it; when a
whole burst of such jobs timed out at once, the healthy jobs' calls waited behind theirs for
tens of milliseconds.)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

__all__ = ["CallPool"]

T = TypeVar("T")

_Item = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class CallPool:
    """Runs blocking callables on up to `threads` threads for one event loop."""

    def __init__(
        self, threads: int, *, name: str = "pool", on_exit: Callable[[], None] | None = None
    ) -> None:
        """`on_exit`: called by each thread, on that thread, when it stops (`shutdown`)."""
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.max_threads = threads
        self._name = name
        self._on_exit = on_exit
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work (under _lock)
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._busy: set[asyncio.Future[Any]] = set()  # futures of calls running (under _lock)
        self._watched: set[asyncio.Future[Any]] = set()  # busy futures with `_on_busy_done`
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)`; a future of its outcome. Call it on the event loop's thread."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((future, fn, args))
        self._grow(watch=True)
        return future

    def _grow(self, *, watch: bool = False) -> None:
        """Start a thread if calls wait, none is idle and the cap allows one.

        With `watch`, when every thread is taken, a later cancel of a running call starts one
        for the calls queued by then (each busy future is watched once).
        """
        with self._lock:
            start = self._idle == 0 and len(self._threads) < self._cap()
            if start:
                self._idle += 1  # counted now, so that the next submit does not start another
            busy = list(self._busy) if watch and self._idle == 0 and not start else []
        if start:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        for running in busy:
            if not running.done() and running not in self._watched:
                self._watched.add(running)
                running.add_done_callback(self._on_busy_done)

    def _on_busy_done(self, future: asyncio.Future[Any]) -> None:
        self._watched.discard(future)
        if future.cancelled() and not self._closed and self._queue.qsize():
            self._grow()

    def _cap(self) -> int:
        """Threads allowed now (under `_lock`): `max_threads` plus the abandoned calls."""
        threads = len(self._threads)
        if threads < self.max_threads:
            return self.max_threads
        # Only looked at when every thread is taken; `cancelled()` is read on the loop's thread.
        abandoned = sum(1 for future in self._busy if future.cancelled())
        return self.max_threads + min(abandoned, self.max_threads)

    def shutdown(self) -> None:
        """Stop the threads once they are idle; calls not yet started are cancelled."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        # Counted idle by `submit` already when this thread was started.
        get, lock = self._queue.get, self._lock
        while True:
            item = get()
            with lock:
                self._idle -= 1
                if item is not None:
                    self._busy.add(item[0])
            if item is None:
                if self._on_exit is not None:
                    with suppress(Exception):
                        self._on_exit()
                return
            future, fn, args = item
            if future.cancelled():  # a plain attribute read: safe from this thread
                outcome: tuple[asyncio.Future[Any], Any, BaseException | None] = (
                    future,
                    None,
                    None,
                )
            else:
                try:
                    outcome = (future, fn(*args), None)
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                    outcome = (future, None, exc)
            with lock:
                self._busy.discard(future)
                self._done.append(outcome)
                first = len(self._done) == 1
                self._idle += 1
            if first:
                loop = self._loop
                if loop is not None:
                    # A closed loop raises RuntimeError: nobody is waiting any more.
                    with suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._settle)
            del item, future, outcome

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
