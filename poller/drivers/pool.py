"""Blocking calls on a bounded set of threads, with their results handed back in batches.

`asyncio.run_in_executor` costs, per call, a `concurrent.futures.Future`, its chaining to an
asyncio future and one `call_soon_threadsafe` (a write to the loop's wake-up pipe). At a few
hundred SNMP requests per second that is a sizeable part of a job's CPU. `CallPool` queues the
call itself, and a finished call only wakes the loop when it is the first of a batch: the loop
then settles every call that finished since, in one pass.

Threads start on demand, up to `threads`, like `ThreadPoolExecutor`. A call whose future was
cancelled before a thread took it is skipped; one that is running when its future is cancelled
finishes on its thread (a blocking call cannot be interrupted) and its outcome is dropped.
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

    def __init__(self, threads: int, *, name: str = "pool") -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.max_threads = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work (under _lock)
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
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
        with self._lock:
            start = self._idle == 0 and len(self._threads) < self.max_threads
            if start:
                self._idle += 1  # counted now, so that the next submit does not start another
        if start:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return future

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
            if item is None:
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
