"""Run slots and device slots: caps, arrival order, the untrusted share, cancel and close."""

from __future__ import annotations

import asyncio
import random

import pytest

from poller.admission import Admission, NotStarted


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def holder(
    admission: Admission, device: str, gate: asyncio.Event, log: list[str]
) -> asyncio.Task[None]:
    async def hold() -> None:
        async with admission.lease(device):
            log.append(device)
            await gate.wait()

    return asyncio.ensure_future(hold())


async def test_concurrency_and_per_device_caps_hold() -> None:
    admission = Admission(concurrency=3, per_device=2)
    gate, log = asyncio.Event(), list[str]()
    tasks = [holder(admission, d, gate, log) for d in ["a", "a", "a", "b", "c", "d"]]
    await settle()
    # "a" gets 2 slots (its cap), "b" the third; the third "a" waits for its device.
    assert log == ["a", "a", "b"]
    assert (admission.running, admission.waiting, admission.devices) == (3, 3, 2)
    gate.set()
    await asyncio.gather(*tasks)
    assert sorted(log) == ["a", "a", "a", "b", "c", "d"]
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_waiters_are_served_in_arrival_order_among_those_allowed() -> None:
    admission = Admission(concurrency=1, per_device=1)
    order: list[str] = []

    async def job(device: str) -> None:
        async with admission.lease(device):
            order.append(device)
            await asyncio.sleep(0)

    await asyncio.gather(*(job(d) for d in ["x", "y", "z", "x", "y"]))
    assert order == ["x", "y", "z", "x", "y"]


async def test_untrusted_devices_hold_at_most_their_share() -> None:
    trusted = {"healthy"}
    admission = Admission(concurrency=4, per_device=4, untrusted=2, trusted=trusted.__contains__)
    gate, log = asyncio.Event(), list[str]()
    dead = [holder(admission, f"dead-{n}", gate, log) for n in range(6)]
    await settle()
    assert log == ["dead-0", "dead-1"]  # the share is full; the other dead jobs wait
    healthy = [holder(admission, "healthy", gate, log) for _ in range(2)]
    await settle()
    assert log[2:] == ["healthy", "healthy"]  # not behind the waiting dead jobs
    assert (admission.running, admission.waiting) == (4, 4)
    gate.set()
    await asyncio.gather(*dead, *healthy)
    assert len(log) == 8


async def test_a_device_that_becomes_trusted_while_waiting_uses_the_free_slots() -> None:
    trusted: set[str] = set()
    admission = Admission(concurrency=3, per_device=3, untrusted=1, trusted=trusted.__contains__)
    gate, log = asyncio.Event(), list[str]()
    first = holder(admission, "new", gate, log)
    await settle()
    later = [holder(admission, "new", gate, log) for _ in range(2)]
    await settle()
    assert log == ["new"]
    trusted.add("new")
    release = asyncio.Event()
    other = holder(admission, "other", release, log)  # untrusted: the share is taken
    await settle()
    assert log == ["new"]
    release.set()
    gate.set()
    await asyncio.gather(first, *later, other)
    assert log.count("new") == 3


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    await settle()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01), admission.lease("b"):
            pass
    assert admission.waiting == 0
    gate.set()
    await running
    assert admission.running == 0


async def test_a_waiter_cancelled_as_it_is_granted_hands_the_slot_on() -> None:
    admission = Admission(concurrency=1, per_device=1)
    untrusted = await admission.acquire("a")
    doomed = asyncio.ensure_future(admission.acquire("b"))
    await settle()
    nxt = asyncio.ensure_future(admission.acquire("c"))
    await settle()
    admission.release("a", untrusted)  # grants "b" at once; its task has not resumed yet
    assert (admission.running, admission.waiting) == (1, 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await settle()
    assert nxt.done()  # the slot "b" never used went on to "c"
    admission.release("c", nxt.result())
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_close_refuses_waiters_and_later_jobs_but_not_running_ones() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    waiting = [holder(admission, d, gate, log) for d in ["b", "c"]]
    await settle()
    assert admission.close() == 2
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, NotStarted) for r in results)
    with pytest.raises(NotStarted):
        await admission.acquire("d")
    assert not running.done()
    gate.set()
    await running
    assert log == ["a"]
    assert admission.running == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Admission(concurrency=0, per_device=1)
    assert Admission(concurrency=1, per_device=1).untrusted == 1
    assert Admission(concurrency=64, per_device=4).untrusted == 32
    assert Admission(concurrency=8, per_device=4, untrusted=100).untrusted == 8


async def test_close_lets_jobs_that_must_not_be_returned_run() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    await settle()

    async def not_idempotent(device: str) -> None:
        async with admission.lease(device, returnable=False):
            log.append(device)

    kept = asyncio.ensure_future(not_idempotent("set"))
    returned = holder(admission, "get", gate, log)
    await settle()
    assert admission.close() == 1
    assert isinstance((await asyncio.gather(returned, return_exceptions=True))[0], NotStarted)
    gate.set()
    await asyncio.gather(running, kept)
    assert log == ["a", "set"]
    await not_idempotent("later")  # a non-idempotent job is never turned away
    assert log[-1] == "later"


def fail_now(future: asyncio.Future[bool]) -> None:
    future.set_exception(ConnectionRefusedError("quarantined"))


def time_out(future: asyncio.Future[bool]) -> None:
    future.set_exception(TimeoutError())


async def test_refuse_answers_a_devices_waiting_jobs_at_once() -> None:
    admission = Admission(concurrency=2, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "dead", gate, log)
    other = holder(admission, "live", gate, log)
    waiting = [holder(admission, "dead", gate, log) for _ in range(3)]
    await settle()
    assert admission.refuse("dead", fail_now) == 3
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert (admission.running, admission.waiting) == (2, 0)
    assert admission.refuse("nobody", fail_now) == 0
    gate.set()
    await asyncio.gather(running, other)
    assert log == ["dead", "live"]
    assert (admission.running, admission.devices) == (0, 0)


async def test_a_waiter_leaves_the_queue_at_its_deadline() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    await settle()
    loop = asyncio.get_running_loop()
    expired: list[asyncio.Future[bool]] = []

    def expire(future: asyncio.Future[bool]) -> None:
        expired.append(future)
        future.set_exception(TimeoutError())

    late = asyncio.ensure_future(admission.acquire("b", deadline=loop.time() + 0.05, expire=expire))
    patient = asyncio.ensure_future(admission.acquire("c", deadline=loop.time() + 5, expire=expire))
    await settle()
    assert admission.waiting == 2
    with pytest.raises(TimeoutError):
        await late
    assert len(expired) == 1
    assert admission.waiting == 1  # out of the queue when its time came
    gate.set()
    await running
    assert await patient is False  # the freed slot went to the one still waiting
    admission.release("c", False)
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)
    assert len(expired) == 1


async def test_the_default_expiry_is_a_timeout_error() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    await settle()
    deadline = asyncio.get_running_loop().time() + 0.01
    with pytest.raises(TimeoutError):
        await admission.acquire("b", deadline=deadline)
    gate.set()
    await running
    assert (admission.running, admission.waiting) == (0, 0)


async def test_refile_moves_a_device_that_became_trusted_ahead_at_once() -> None:
    trusted: set[str] = set()
    admission = Admission(concurrency=4, per_device=4, untrusted=1, trusted=trusted.__contains__)
    gate, log = asyncio.Event(), list[str]()
    blocker = holder(admission, "dead", gate, log)  # takes the untrusted share
    await settle()
    new = [holder(admission, "new", gate, log) for _ in range(2)]
    await settle()
    assert log == ["dead"]
    trusted.add("new")
    admission.refile("new")  # no slot was released: refile alone lets them run
    await settle()
    assert log == ["dead", "new", "new"]
    gate.set()
    await asyncio.gather(blocker, *new)


async def test_stale_entries_do_not_pile_up_behind_a_full_untrusted_share() -> None:
    admission = Admission(concurrency=2, per_device=1, untrusted=1, trusted=lambda d: False)
    gate, log = asyncio.Event(), list[str]()
    blocker = holder(admission, "dead-0", gate, log)
    await settle()
    for n in range(2000):  # jobs of other dead devices that wait, then time out
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0), admission.lease(f"dead-{n % 50 + 1}"):
                pass
    assert admission.waiting == 0
    assert sum(len(lane) for lane in admission._lanes.values()) <= 2 * 50 + 64
    gate.set()
    await blocker
    assert (admission.running, admission.devices) == (0, 0)


def sort_out(
    waiting: list[tuple[str, asyncio.Future[bool]]],
    held: list[tuple[str, bool]],
    granted: list[tuple[str, asyncio.Future[bool]]],
    expired: int,
) -> tuple[list[tuple[str, asyncio.Future[bool]]], int]:
    """Move the granted ones to `held`; those still waiting, and the count of expired ones."""
    still = []
    for device, future in waiting:
        if not future.done():
            still.append((device, future))
        elif not future.cancelled() and future.exception() is None:
            held.append((device, future.result()))
            granted.append((device, future))
        elif not future.cancelled() and isinstance(future.exception(), TimeoutError):
            expired += 1
    return still, expired


async def test_random_schedules_keep_every_rule() -> None:
    """Random arrivals, deadlines, cancels, releases, trust flips and refusals; after each step
    the caps hold, the counters agree, and no waiting job could run (none is left behind while
    allowed)."""
    rng = random.Random(20261123)
    loop = asyncio.get_running_loop()
    devices = [f"d{n}" for n in range(12)]
    trusted = set(devices[:6])
    admission = Admission(concurrency=6, per_device=2, untrusted=3, trusted=trusted.__contains__)
    granted: list[tuple[str, asyncio.Future[bool]]] = []
    waiting: list[tuple[str, asyncio.Future[bool]]] = []
    held: list[tuple[str, bool]] = []
    expired = 0
    for _step in range(3000):
        action = rng.random()
        if action < 0.45:
            device = rng.choice(devices)
            # Some with a deadline: passed already (it comes on the next loop iteration, within
            # this step) or an hour away (its timer must go when the waiter leaves otherwise).
            deadline = rng.choice([None, None, None, loop.time() - 1, loop.time() + 3600])
            acquire = admission.acquire(device, deadline=deadline, expire=time_out)
            waiting.append((device, asyncio.ensure_future(acquire)))
        elif action < 0.75 and held:
            device, untrusted = held.pop(rng.randrange(len(held)))
            admission.release(device, untrusted)
        elif action < 0.85 and waiting:
            waiting.pop(rng.randrange(len(waiting)))[1].cancel()
        elif action < 0.9:
            device = rng.choice(devices)
            trusted.symmetric_difference_update({device})
            admission.refile(device)
        elif action < 0.93:
            device = rng.choice(devices)
            admission.refuse(device, fail_now)
        await settle()
        waiting, expired = sort_out(waiting, held, granted, expired)
        per_device: dict[str, int] = {}
        for device, _ in held:
            per_device[device] = per_device.get(device, 0) + 1
        untrusted_held = sum(1 for _, u in held if u)
        assert admission.running == len(held) <= 6
        assert untrusted_held <= 3
        assert max(per_device.values(), default=0) <= 2
        assert admission.waiting == len(waiting)
        for device, _ in waiting:
            could = (
                len(held) < 6
                and per_device.get(device, 0) < 2
                and (device in trusted or untrusted_held < 3)
            )
            assert not could, f"{device} waits though it may run"
    assert len(granted) > 500
    assert expired > 50


# ------------------------------------------------------------------ the interactive lane


def lane_holder(
    admission: Admission, device: str, gate: asyncio.Event, log: list[str]
) -> asyncio.Task[None]:
    async def hold() -> None:
        async with admission.lease(device, interactive=True):
            log.append(f"!{device}")
            await gate.wait()

    return asyncio.ensure_future(hold())


async def test_reserved_slots_are_never_taken_by_bulk_jobs() -> None:
    admission = Admission(concurrency=4, per_device=4, reserved=1)
    assert admission.bulk_slots_free
    gate, log = asyncio.Event(), list[str]()
    bulk = [holder(admission, f"d{n}", gate, log) for n in range(10)]
    await settle()
    assert log == ["d0", "d1", "d2"]  # the fourth run slot is free, and stays free
    assert (admission.running, admission.waiting) == (3, 7)
    assert not admission.bulk_slots_free  # what the worker's spare window looks at
    lane = lane_holder(admission, "x", gate, log)
    await settle()
    assert log[-1] == "!x"  # at once, in the reserved slot
    assert (admission.running, admission.interactive_running) == (4, 1)
    gate.set()
    await asyncio.gather(*bulk, lane)
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_interactive_jobs_are_admitted_before_older_bulk_jobs() -> None:
    admission = Admission(concurrency=4, per_device=4, reserved=1)
    gate, log = asyncio.Event(), list[str]()
    first = [holder(admission, "bulk", gate, log) for _ in range(3)]
    first.append(lane_holder(admission, "lane", gate, log))
    await settle()
    assert log == ["bulk", "bulk", "bulk", "!lane"]
    order: list[str] = []

    async def job(device: str, interactive: bool) -> None:
        async with admission.lease(device, interactive=interactive):
            order.append(("!" if interactive else "") + device)
            await asyncio.sleep(0)

    queued = [asyncio.ensure_future(job(f"b{n}", False)) for n in range(3)]
    await settle()
    queued.append(asyncio.ensure_future(job("i0", True)))
    await settle()
    assert order == []
    gate.set()
    await asyncio.gather(*first, *queued)
    assert order[0] == "!i0"  # the bulk jobs queued before it wait for the next slots
    assert sorted(order[1:]) == ["b0", "b1", "b2"]


async def test_an_interactive_job_goes_ahead_of_its_devices_bulk_jobs_within_its_limit() -> None:
    admission = Admission(concurrency=8, per_device=1, reserved=2)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "sw", gate, log)
    waiting = [holder(admission, "sw", gate, log) for _ in range(3)]
    await settle()
    lane = lane_holder(admission, "sw", gate, log)
    await settle()
    assert log == ["sw"]  # the per-device limit holds for the interactive job too
    assert admission.waiting == 4
    # A new bulk job of the device queues behind the interactive one, not ahead of it.
    late = holder(admission, "sw", gate, log)
    await settle()
    gate.set()
    await asyncio.gather(running, *waiting, lane, late)
    assert log == ["sw", "!sw", "sw", "sw", "sw", "sw"]
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_interactive_jobs_hold_half_the_slots_and_ignore_the_untrusted_share() -> None:
    admission = Admission(
        concurrency=6, per_device=1, untrusted=1, reserved=1, trusted=lambda d: d[0] == "o"
    )
    assert admission.interactive_cap == 3
    gate, log = asyncio.Event(), list[str]()
    tasks = [lane_holder(admission, f"new{n}", gate, log) for n in range(5)]
    await settle()
    # Untrusted devices all, past the untrusted share of 1; but not past half the slots.
    assert log == ["!new0", "!new1", "!new2"]
    bulk = [holder(admission, f"old{n}", gate, log) for n in range(3)]
    await settle()
    assert log[3:] == ["old0", "old1", "old2"]  # two interactive jobs wait for the cap
    gate.set()
    await asyncio.gather(*tasks, *bulk)
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_refuse_and_close_cover_interactive_waiters() -> None:
    admission = Admission(concurrency=2, per_device=1, reserved=1)
    gate, log = asyncio.Event(), list[str]()
    running = [holder(admission, "dead", gate, log), lane_holder(admission, "busy", gate, log)]
    await settle()
    order: list[str] = []

    def fail_in_order(future: asyncio.Future[bool]) -> None:
        order.append("lane" if future in lane_futures else "bulk")
        fail_now(future)

    bulk_waiting = [holder(admission, "dead", gate, log) for _ in range(2)]
    await settle()
    lane_waiting = [lane_holder(admission, "dead", gate, log)]
    await settle()
    lane_futures = {w.future for _, w in admission._urgent}
    assert admission.refuse("dead", fail_in_order) == 3
    assert order == ["lane", "bulk", "bulk"]  # the interactive job is answered first
    results = await asyncio.gather(*bulk_waiting, *lane_waiting, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    returned = lane_holder(admission, "busy", gate, log)
    await settle()
    assert admission.close() == 1
    assert isinstance((await asyncio.gather(returned, return_exceptions=True))[0], NotStarted)
    gate.set()
    await asyncio.gather(*running)
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_an_interactive_waiter_leaves_at_its_deadline_or_when_cancelled() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, log = asyncio.Event(), list[str]()
    running = holder(admission, "a", gate, log)
    await settle()
    loop = asyncio.get_running_loop()
    expiring = asyncio.ensure_future(
        admission.acquire("b", deadline=loop.time(), expire=time_out, interactive=True)
    )
    cancelled = lane_holder(admission, "c", gate, log)
    await settle()
    with pytest.raises(TimeoutError):
        await expiring
    cancelled.cancel()
    await settle()
    assert (admission.waiting, admission.devices) == (0, 1)
    gate.set()
    await running
    assert (admission.running, admission.devices) == (0, 0)


def test_reserved_slots_leave_bulk_jobs_at_least_one() -> None:
    assert Admission(concurrency=1, per_device=1, reserved=1).reserved == 0
    assert Admission(concurrency=64, per_device=4, reserved=8).reserved == 8
    assert Admission(concurrency=4, per_device=4, reserved=9).reserved == 3


async def test_random_schedules_with_both_lanes_keep_every_rule() -> None:
    """As above with interactive jobs and reserved slots: bulk jobs never hold a reserved
    slot, and no job waits that may run (an interactive job: a run slot and a device slot)."""
    rng = random.Random(20261206)
    loop = asyncio.get_running_loop()
    devices = [f"d{n}" for n in range(10)]
    trusted = set(devices[:5])
    admission = Admission(
        concurrency=6, per_device=2, untrusted=3, reserved=2, trusted=trusted.__contains__
    )
    granted: list[tuple[str, asyncio.Future[bool]]] = []
    waiting: dict[bool, list[tuple[str, asyncio.Future[bool]]]] = {False: [], True: []}
    held: dict[bool, list[tuple[str, bool]]] = {False: [], True: []}
    expired = 0
    for _step in range(3000):
        action = rng.random()
        if action < 0.45:
            device = rng.choice(devices)
            lane = rng.random() < 0.3
            deadline = rng.choice([None, None, None, loop.time() - 1, loop.time() + 3600])
            acquire = admission.acquire(
                device, deadline=deadline, expire=time_out, interactive=lane
            )
            waiting[lane].append((device, asyncio.ensure_future(acquire)))
        elif action < 0.75 and (held[False] or held[True]):
            lane = bool(held[True]) and (not held[False] or rng.random() < 0.5)
            device, untrusted = held[lane].pop(rng.randrange(len(held[lane])))
            admission.release(device, untrusted, lane)
        elif action < 0.85 and (waiting[False] or waiting[True]):
            lane = bool(waiting[True]) and (not waiting[False] or rng.random() < 0.5)
            waiting[lane].pop(rng.randrange(len(waiting[lane])))[1].cancel()
        elif action < 0.9:
            device = rng.choice(devices)
            trusted.symmetric_difference_update({device})
            admission.refile(device)
        elif action < 0.93:
            admission.refuse(rng.choice(devices), fail_now)
        await settle()
        for lane in (False, True):
            waiting[lane], expired = sort_out(waiting[lane], held[lane], granted, expired)
        per_device: dict[str, int] = {}
        for device, _ in held[False] + held[True]:
            per_device[device] = per_device.get(device, 0) + 1
        total = len(held[False]) + len(held[True])
        untrusted_held = sum(1 for _, u in held[False] + held[True] if u)
        assert admission.running == total <= 6
        assert admission.interactive_running == len(held[True]) <= 3
        assert len(held[False]) <= 6 - 2
        assert max(per_device.values(), default=0) <= 2
        assert admission.waiting == len(waiting[False]) + len(waiting[True])
        for device, _ in waiting[True]:
            could = total < 6 and len(held[True]) < 3 and per_device.get(device, 0) < 2
            assert not could, f"!{device} waits though it may run"
        for device, _ in waiting[False]:
            could = (
                total < 6
                and len(held[False]) < 4
                and per_device.get(device, 0) < 2
                and (device in trusted or untrusted_held < 3)
            )
            assert not could, f"{device} waits though it may run"
    assert len(granted) > 500
    assert expired > 50


async def test_take_gives_free_slots_at_once_and_never_jumps_the_queue() -> None:
    """`take` is `acquire` without a coroutine for a job that would not wait; None otherwise."""
    admission = Admission(concurrency=3, per_device=1, trusted=lambda device: device != "new")
    assert admission.take("a") is False  # trusted: counted as trusted
    assert admission.take("a") is None  # its device slot is taken
    waiter = asyncio.ensure_future(admission.acquire("b"))
    await settle()
    assert waiter.done()
    assert admission.take("new") is True  # the last run slot; an untrusted device
    assert admission.running == 3
    queued = asyncio.ensure_future(admission.acquire("c"))  # waits for a run slot
    await settle()
    admission.release("a", untrusted=False)
    assert admission.take("d") is None  # the freed slot went to "c", which was waiting
    await settle()
    assert queued.done()
    assert admission.running == 3
    admission.close()
    with pytest.raises(NotStarted):
        admission.take("e")
    assert admission.take("e", returnable=False) is None  # no slot free: it would wait


async def test_jobs_delivered_more_often_are_served_first_then_by_arrival() -> None:
    """A crash storm returns every job a dead process held: the most returned go first,
    across devices and within one device's queue, before the queue's delivery limit."""
    admission = Admission(concurrency=1, per_device=1)
    gate, started = asyncio.Event(), list[str]()

    async def job(name: str, device: str, priority: int) -> None:
        await admission.acquire(device, priority=priority)
        started.append(name)
        admission.release(device, False)

    blocker = holder(admission, "busy", gate, [])
    await settle()
    tasks = []
    for name, device, priority in [
        ("a1", "a", 1),
        ("b1", "b", 1),
        ("a5", "a", 5),  # ahead of its device's waiting job and of every other device
        ("b3", "b", 3),
        ("c1", "c", 1),
        ("c3", "c", 3),
    ]:
        tasks.append(asyncio.ensure_future(job(name, device, priority)))
        await settle()
    assert started == []
    gate.set()
    await asyncio.gather(blocker, *tasks)
    assert started == ["a5", "b3", "c3", "a1", "b1", "c1"]
    assert (admission.running, admission.waiting, admission.devices) == (0, 0, 0)


async def test_a_cancelled_priority_waiter_leaves_its_device_queue_in_order() -> None:
    admission = Admission(concurrency=1, per_device=1)
    gate, started = asyncio.Event(), list[str]()
    blocker = holder(admission, "a", gate, [])
    await settle()

    async def job(name: str, priority: int) -> None:
        await admission.acquire("a", priority=priority)
        started.append(name)
        admission.release("a", False)

    first = asyncio.ensure_future(job("first", 1))
    await settle()
    urgent = asyncio.ensure_future(job("urgent", 9))
    await settle()
    late = asyncio.ensure_future(job("late", 4))
    await settle()
    urgent.cancel()
    await settle()
    gate.set()
    await asyncio.gather(blocker, first, late)
    assert started == ["late", "first"]
    assert admission.waiting == 0
