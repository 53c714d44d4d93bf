"""CallPool: outcomes, the thread cap, batches, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

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


async def test_each_thread_calls_on_exit_on_itself_when_the_pool_stops() -> None:
    exited: list[str] = []
    done = threading.Event()

    def on_exit() -> None:
        exited.append(threading.current_thread().name)
        if len(exited) == 3:
            done.set()
        raise RuntimeError("ignored: the thread stops all the same")

    pool = CallPool(3, name="exits", on_exit=on_exit)
    barrier = threading.Barrier(3, timeout=5)
    names = await asyncio.gather(
        *(pool.submit(lambda: (barrier.wait(), threading.current_thread().name)[1]) for _ in "abc")
    )
    assert not exited
    pool.shutdown()
    assert await asyncio.to_thread(done.wait, 5)
    assert sorted(exited) == sorted(names)
