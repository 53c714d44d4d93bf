"""Run slots and device slots: caps, arrival order, the untrusted share, cancel and close."""

from __future__ import annotations

import asyncio

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
