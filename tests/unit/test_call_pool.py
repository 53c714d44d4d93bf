"""CallPool: outcomes, the thread cap, batches, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from poller.drivers.pool import CallPool


async def test_results_and_exceptions_come_back() -> None:
    pool = CallPool(4)

    def boom() -> None:
        raise ValueError("no")

    assert await pool.submit(pow, 2, 10) == 1024
    with pytest.raises(ValueError, match="no"):
        await pool.submit(boom)
    pool.shutdown()


async def test_never_more_threads_than_the_cap_and_calls_run_in_parallel() -> None:
    pool = CallPool(3, name="capped")
    running, peak = 0, 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return n

    results = await asyncio.wait_for(
        asyncio.gather(*(pool.submit(work, n) for n in range(30))), timeout=10
    )
    assert results == list(range(30))
    assert pool.threads <= 3
    assert peak == 3
    pool.shutdown()


async def test_many_quick_calls_are_settled_in_fewer_loop_wakeups() -> None:
    pool = CallPool(2)
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(pool.submit(abs, -n) for n in range(500)))
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    assert results == list(range(500))
    assert wakeups < 500
    pool.shutdown()


async def test_a_call_cancelled_before_it_starts_is_skipped() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    ran: list[str] = []
    first = pool.submit(gate.wait, 5)
    second = pool.submit(ran.append, "second")
    second.cancel()
    gate.set()
    assert await first is True
    await pool.submit(ran.append, "third")
    assert ran == ["third"]
    pool.shutdown()


async def test_a_running_call_outlives_its_cancelled_future() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    future = pool.submit(gate.wait, 5)
    await asyncio.sleep(0.05)
    future.cancel()
    gate.set()
    assert await pool.submit(int, "7") == 7  # the thread is free again
    pool.shutdown()


async def test_calls_abandoned_while_running_do_not_hold_up_the_others() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    live = pool.submit(gate.wait, 5)
    await asyncio.sleep(0.05)
    queued = pool.submit(int, "1")
    await asyncio.sleep(0.05)
    assert not queued.done()  # the one thread is busy with a call somebody waits for
    assert pool.threads == 1
    live.cancel()  # abandoned: it still blocks its thread
    assert await asyncio.wait_for(queued, 2) == 1  # so a thread started past the cap for it
    assert pool.threads == 2
    second = pool.submit(gate.wait, 5)
    await asyncio.sleep(0.05)
    second.cancel()  # abandoned too, but the extra threads are capped at max_threads
    last = pool.submit(int, "2")
    await asyncio.sleep(0.1)
    assert not last.done()
    assert pool.threads == 2
    gate.set()
    assert await asyncio.wait_for(last, 2) == 2
    pool.shutdown()


async def test_shutdown_cancels_queued_calls_and_refuses_new_ones() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    running = pool.submit(gate.wait, 5)
    await asyncio.sleep(0.05)
    queued = pool.submit(int, "1")
    pool.shutdown()
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(int, "2")
    gate.set()
    assert await running is True
    for thread in threading.enumerate():
        if thread.name.startswith("pool-"):
            thread.join(timeout=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("pool-")]


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="threads"):
        CallPool(0)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):  # bounded: 5 s
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_quick_calls_run_on_the_fast_threads_only() -> None:
    # slow_after far away: no call ever counts as slow, however many are queued.
    pool = CallPool(16, fast=2, slow_after=3600)
    gate = threading.Event()
    futures = [pool.submit(gate.wait, 5) for _ in range(8)]
    await _until(lambda: pool.running == 2)
    await asyncio.sleep(0.05)
    assert pool.running == 2
    assert pool.threads == 2
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [True] * 8
    assert pool.threads == 2
    pool.shutdown()


async def test_slow_calls_all_run_at_once_up_to_the_thread_cap() -> None:
    # Each call waits until all 8 run together (a blocked call to a slow agent): with only the
    # 2 fast threads they never would, and the barrier would break.
    pool = CallPool(16, fast=2, slow_after=0.01)
    barrier = threading.Barrier(8, timeout=10)
    results = await asyncio.wait_for(
        asyncio.gather(*(pool.submit(barrier.wait) for _ in range(8))), 15
    )
    assert sorted(results) == list(range(8))
    assert pool.threads == 8
    pool.shutdown()


async def test_a_slow_call_does_not_hold_a_fast_slot_past_slow_after() -> None:
    pool = CallPool(4, fast=1, slow_after=0.01)
    gate = threading.Event()
    stuck = pool.submit(gate.wait, 5)
    assert await asyncio.wait_for(pool.submit(int, "3"), 5) == 3
    assert not stuck.done()
    gate.set()
    assert await stuck is True
    pool.shutdown()


async def test_calls_of_a_key_known_to_be_slow_start_at_once() -> None:
    pool = CallPool(8, fast=1, slow_after=0.2)
    await pool.submit_keyed("slow", time.sleep, 0.3)  # its moving average: 300 ms
    await pool.submit_keyed("quick", int, "1")
    gate = threading.Event()
    slow = [pool.submit_keyed("slow", gate.wait, 5) for _ in range(6)]
    assert pool.running == 6  # started on submit, without waiting to be seen as slow
    quick = [pool.submit_keyed("quick", gate.wait, 5) for _ in range(4)]
    assert pool.running == 7  # and one quick call besides them (fast=1)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*slow, *quick), 10) == [True] * 10
    pool.shutdown()
