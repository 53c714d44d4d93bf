"""The low-priority lane: a few callers per event-loop iteration, in order, none lost; and
bulk work that waits, for a bounded while, while an interactive job is in flight."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from functools import partial

import pytest

from poller.pacing import Headroom, LaneFirst, PrioritySlots, Trickle, first_in_line


async def test_a_burst_goes_through_a_few_per_iteration_in_order() -> None:
    lane = Trickle(per_turn=3)
    passed: list[tuple[int, int]] = []  # (caller, iteration it passed on)
    iteration = 0

    async def count_iterations() -> None:
        nonlocal iteration
        while len(passed) < 10:
            await asyncio.sleep(0)
            iteration += 1

    async def caller(n: int) -> None:
        await lane.turn()
        passed.append((n, iteration))

    counter = asyncio.ensure_future(count_iterations())
    await asyncio.wait_for(asyncio.gather(*(caller(n) for n in range(10))), timeout=5)
    await counter
    assert [n for n, _ in passed] == list(range(10))
    per_iteration: dict[int, int] = {}
    for _, it in passed:
        per_iteration[it] = per_iteration.get(it, 0) + 1
    assert max(per_iteration.values()) <= 3
    assert len(per_iteration) >= 4
    assert lane.waiting == 0


async def test_other_work_runs_between_the_turns() -> None:
    lane = Trickle(per_turn=2)
    log: list[str] = []

    async def answer(n: int) -> None:
        await lane.turn()
        log.append(f"answer-{n}")

    async def live_job() -> None:
        await asyncio.sleep(0)
        log.append("live")

    await asyncio.gather(*(answer(n) for n in range(8)), live_job())
    assert log.index("live") < log.index("answer-7")  # not behind the whole burst


async def test_a_cancelled_caller_gives_its_turn_on() -> None:
    lane = Trickle(per_turn=1)
    first = asyncio.ensure_future(lane.turn())
    doomed = asyncio.ensure_future(lane.turn())
    last = asyncio.ensure_future(lane.turn())
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.wait_for(asyncio.gather(first, last), timeout=2)
    assert doomed.cancelled()
    assert lane.waiting == 0


async def test_an_idle_lane_lets_a_caller_through_at_once() -> None:
    lane = Trickle(per_turn=1)
    for _ in range(3):
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert lane.waiting == 0
        turn = lane.turn().__await__()
        with pytest.raises(StopIteration):  # done without yielding to the loop
            turn.send(None)


async def test_fail_resolves_futures_in_the_lanes_order_and_skips_cancelled_ones() -> None:
    lane = Trickle(per_turn=1)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = [loop.create_future() for _ in range(4)]
    for n, future in enumerate(futures):
        lane.fail(future, partial(ConnectionRefusedError, f"refused {n}"))
    assert futures[0].done()  # the idle lane had room on this iteration
    assert not any(f.done() for f in futures[1:])
    futures[2].cancel()
    await asyncio.sleep(0)
    assert futures[1].done()
    assert not futures[3].done()
    await asyncio.sleep(0)
    assert futures[3].done()
    assert [str(f.exception()) for f in futures if not f.cancelled()] == [
        "refused 0",
        "refused 1",
        "refused 3",
    ]
    assert lane.waiting == 0


def test_per_turn_is_checked() -> None:
    with pytest.raises(ValueError, match="per_turn"):
        Trickle(per_turn=0)


# ---------------------------------------------------------------------- LaneFirst


async def _until(check: Callable[[], bool], limit: float = 5.0) -> None:
    """Let the loop run until `check()` holds (at most `limit` seconds: a bounded loop)."""
    async with asyncio.timeout(limit):
        while not check():  # noqa: ASYNC110 - no event tells when a timer has fired
            await asyncio.sleep(0.001)


async def test_bulk_work_waits_while_an_interactive_job_is_in_flight() -> None:
    first = LaneFirst(max_pause=30)
    assert not first.paused
    await first.bulk_turn()  # nothing in flight: at once
    release = first.hold()
    assert first.paused
    bulk = asyncio.ensure_future(first.bulk_turn())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not bulk.done()
    assert first.waiting == 1
    release()
    release()  # a second call does nothing
    await asyncio.wait_for(bulk, timeout=5)
    assert not first.paused
    assert first.waiting == 0


async def test_the_pause_ends_with_the_last_interactive_job() -> None:
    first = LaneFirst(max_pause=30)
    one, two = first.hold(), first.hold()
    bulk = asyncio.ensure_future(first.bulk_turn())
    one()
    await asyncio.sleep(0)
    assert first.paused
    assert not bulk.done()
    two()
    await asyncio.wait_for(bulk, timeout=5)
    assert first.pauses == 1


async def test_a_pause_is_bounded_and_an_interactive_job_that_runs_long_pauses_once() -> None:
    first = LaneFirst(max_pause=0.02)
    release = first.hold()
    bulk = asyncio.ensure_future(first.bulk_turn())
    await asyncio.wait_for(bulk, timeout=5)  # although the job is still in flight
    assert not first.paused
    await asyncio.sleep(0.1)  # longer than any turn bulk work is owed
    assert not first.paused
    await asyncio.wait_for(first.bulk_turn(), timeout=5)
    assert first.pauses == 1
    release()


async def test_bulk_work_gets_its_turn_before_the_next_pause() -> None:
    first = LaneFirst(max_pause=0.05)
    release = first.hold()
    await _until(lambda: not first.paused)  # ended by its bound
    again = first.hold()  # a new job at once: bulk work is owed as long as the pause was
    assert not first.paused
    await first.bulk_turn()  # goes through meanwhile
    await _until(lambda: first.paused)  # then the new job gets its pause
    assert first.pauses == 2
    again()
    release()
    assert not first.paused


async def test_a_job_answered_during_bulks_turn_asks_for_no_pause() -> None:
    first = LaneFirst(max_pause=0.05)
    release = first.hold()
    await _until(lambda: not first.paused)
    release()
    short = first.hold()
    short()  # answered before bulk work's turn ended
    await asyncio.sleep(0.15)
    assert not first.paused
    assert first.pauses == 1


async def test_a_cancelled_bulk_task_leaves_and_the_others_resume() -> None:
    first = LaneFirst(max_pause=30)
    release = first.hold()
    doomed = asyncio.ensure_future(first.bulk_turn())
    other = asyncio.ensure_future(first.bulk_turn())
    await asyncio.sleep(0)
    doomed.cancel()
    release()
    await asyncio.wait_for(other, timeout=5)
    assert doomed.cancelled()


async def test_a_max_pause_of_0_never_pauses() -> None:
    first = LaneFirst(max_pause=0)
    release = first.hold()
    assert not first.paused
    await asyncio.wait_for(first.bulk_turn(), timeout=5)
    release()
    with pytest.raises(ValueError, match="max_pause"):
        LaneFirst(max_pause=-1)


async def test_first_in_line_starts_the_newest_task_before_those_scheduled_earlier() -> None:
    ran: list[str] = []

    async def job(name: str) -> None:
        ran.append(name)
        await asyncio.sleep(0)
        ran.append(f"{name} again")

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(job(f"bulk-{n}")) for n in range(3)]
    tasks.append(loop.create_task(job("lane")))
    first_in_line(loop)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    # The lane's first step runs first; nothing else changes place, nothing runs twice.
    assert ran[:4] == ["lane", "bulk-0", "bulk-1", "bulk-2"]
    assert sorted(ran[4:]) == sorted(f"{n} again" for n in ("lane", "bulk-0", "bulk-1", "bulk-2"))


async def test_first_in_line_with_nothing_else_scheduled_changes_nothing() -> None:
    loop = asyncio.get_running_loop()
    task = loop.create_task(asyncio.sleep(0, result="done"))
    first_in_line(loop)
    assert await asyncio.wait_for(task, timeout=5) == "done"


# ---------------------------------------------------------------- Headroom


def test_a_saturated_window_caps_bulk_starts_below_their_rate_down_to_the_floor() -> None:
    headroom = Headroom(0.005, floor=50)
    assert math.isinf(headroom.rate)
    headroom.adjust(0.012, started_per_s=1000)  # 12 ms late on average: saturated
    assert headroom.rate == pytest.approx(800)
    headroom.adjust(0.012, started_per_s=800)
    assert headroom.rate == pytest.approx(640)
    for _ in range(50):
        headroom.adjust(0.02, started_per_s=headroom.rate)
    assert headroom.rate == 50  # the floor: bulk work never starves
    assert headroom.cuts == 52


def test_the_cap_holds_near_the_target_grows_below_it_and_goes_once_it_does_not_bind() -> None:
    headroom = Headroom(0.01, floor=50)
    headroom.adjust(0.05, started_per_s=500)
    assert headroom.rate == pytest.approx(400)
    headroom.adjust(0.007, started_per_s=400)  # between 5 and 10 ms: holds
    assert headroom.rate == pytest.approx(400)
    headroom.adjust(0.002, started_per_s=400)  # below half: grows by a tenth
    assert headroom.rate == pytest.approx(440)
    headroom.adjust(0.002, started_per_s=300)  # demand fell: the cap stays until 2x demand
    assert headroom.rate == pytest.approx(484)
    headroom.adjust(0.002, started_per_s=100)  # 532 >= 2 x 100: no cap any more
    assert math.isinf(headroom.rate)
    headroom.adjust(0.0, started_per_s=0)
    assert math.isinf(headroom.rate)


def test_a_light_load_is_never_paced() -> None:
    headroom = Headroom(0.005, floor=50)
    for _ in range(20):
        headroom.adjust(0.004, started_per_s=300)  # under the target: no cut
    assert math.isinf(headroom.rate)
    assert headroom.cuts == 0


def test_headroom_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="floor"):
        Headroom(0.005, floor=0)
    with pytest.raises(ValueError, match="target"):
        Headroom(-1, floor=10)


async def test_a_blocked_loop_slows_bulk_starts_to_the_floor_and_they_recover_after() -> None:
    headroom = Headroom(0.003, floor=40, tick=0.005, window=0.025)
    headroom.start()
    hogging = True
    loop = asyncio.get_running_loop()

    def hog() -> None:  # bulk work that keeps every turn of the loop 10 ms long
        if hogging:
            time.sleep(0.01)
            loop.call_soon(hog)

    loop.call_soon(hog)
    try:
        await _until(lambda: headroom.cuts >= 2)
        passed = 0

        async def bulk() -> None:
            nonlocal passed
            await headroom.bulk_turn()
            passed += 1

        tasks = [asyncio.ensure_future(bulk()) for _ in range(200)]
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        rate = passed / (time.monotonic() - t0)
        assert passed >= 5, "bulk work starved"
        assert rate < 40 * 2, f"{passed} bulk starts in 0.5 s: not paced"
        assert headroom.waiting > 100
        hogging = False
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        assert passed == 200
        await _until(lambda: math.isinf(headroom.rate))  # idle again: no cap
    finally:
        hogging = False
        headroom.stop()


async def test_an_unsaturated_loop_lets_bulk_work_through_at_once_and_off_means_off() -> None:
    for headroom in (Headroom(0.005, floor=10), Headroom(0, floor=10)):
        headroom.start()
        try:
            await asyncio.sleep(0.15)
            passed = 0

            async def bulk(h: Headroom = headroom) -> None:
                nonlocal passed
                await h.bulk_turn()
                passed += 1

            await asyncio.wait_for(asyncio.gather(*(bulk() for _ in range(500))), timeout=1)
            assert passed == 500
            assert headroom.cuts == 0
        finally:
            headroom.stop()


async def test_stop_lets_every_waiting_bulk_task_go_and_cancelled_ones_leave() -> None:
    headroom = Headroom(0.005, floor=1)
    headroom.adjust(1.0, started_per_s=0)  # capped at 1 a second
    assert headroom.rate == 1
    first = asyncio.ensure_future(headroom.bulk_turn())
    waiters = [asyncio.ensure_future(headroom.bulk_turn()) for _ in range(5)]
    await asyncio.sleep(0.05)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert sum(w.done() for w in waiters[1:]) == 0
    headroom.stop()
    await asyncio.wait_for(asyncio.gather(*waiters[1:], first), timeout=1)
    assert math.isinf(headroom.rate)


async def test_priority_slots_go_to_the_highest_priority_then_by_arrival() -> None:
    slots = PrioritySlots(2)
    order: list[str] = []
    await slots.acquire()
    await slots.acquire()  # both taken

    async def wait(name: str, priority: int) -> None:
        await slots.acquire(priority)
        order.append(name)

    tasks = []
    for name, priority in [("p1", 1), ("p3", 3), ("p1b", 1), ("p5", 5), ("p3b", 3)]:
        tasks.append(asyncio.ensure_future(wait(name, priority)))
        await asyncio.sleep(0)
    assert slots.waiting == 5
    for _ in range(5):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["p5", "p3", "p3b", "p1", "p1b"]
    assert slots.waiting == 0


async def test_priority_slots_survive_cancelled_waiters() -> None:
    slots = PrioritySlots(1)
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire(7))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    slots.release()  # nobody live waits: the slot is free again
    async with asyncio.timeout(1):
        await slots.acquire(0)  # not stuck behind the cancelled one
    granted = asyncio.ensure_future(slots.acquire(1))
    await asyncio.sleep(0)
    slots.release()  # handed to `granted`...
    granted.cancel()  # ...which is cancelled before it resumes: the slot is passed on
    await asyncio.sleep(0)
    async with asyncio.timeout(1):
        await slots.acquire(0)


def test_priority_slots_need_one() -> None:
    with pytest.raises(ValueError, match="slots >= 1"):
        PrioritySlots(0)
