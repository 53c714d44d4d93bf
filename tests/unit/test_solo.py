"""poller.solo: suspects (jobs delivered again and again) run alone, in a changing order."""

from __future__ import annotations

import asyncio

import pytest

from poller.solo import Solo


class Trace:
    def __init__(self, solo: Solo) -> None:
        self.solo = solo
        self.events: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.overlaps: list[tuple[str, frozenset[str]]] = []

    async def job(self, name: str, *, suspect: int | None = None, seconds: float = 0.05) -> None:
        gate = self.solo.alone(name, suspect) if suspect is not None else self.solo.together()
        async with gate:
            self.events.append(("start", name))
            if suspect is not None and self.running:
                self.overlaps.append((name, frozenset(self.running)))
            if suspect is None and any(r.startswith("s") for r in self.running):
                self.overlaps.append((name, frozenset(self.running)))
            self.running.add(name)
            await asyncio.sleep(seconds)
            self.running.discard(name)
            self.events.append(("end", name))


async def test_ordinary_jobs_run_together_without_waiting() -> None:
    trace = Trace(Solo())
    jobs = [asyncio.create_task(trace.job(f"j{n}")) for n in range(5)]
    await asyncio.sleep(0.01)
    assert len(trace.running) == 5
    await asyncio.gather(*jobs)


async def test_a_suspect_waits_for_running_jobs_and_holds_later_ones() -> None:
    trace = Trace(Solo())
    early = asyncio.create_task(trace.job("early", seconds=0.1))
    await asyncio.sleep(0.01)
    suspect = asyncio.create_task(trace.job("s1", suspect=5, seconds=0.1))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(trace.job("late"))
    await asyncio.gather(early, suspect, late)
    assert trace.overlaps == []
    starts = [name for what, name in trace.events if what == "start"]
    assert starts == ["early", "s1", "late"]


async def test_suspects_delivered_together_take_turns_alone_in_hash_order() -> None:
    solo = Solo()
    trace = Trace(solo)
    names = [f"s{n}" for n in range(6)]
    tasks = [asyncio.create_task(trace.job(name, suspect=3, seconds=0.01)) for name in names]
    await asyncio.gather(*tasks)
    assert trace.overlaps == []
    starts = [name for what, name in trace.events if what == "start"]
    keys = {name: solo.alone(name, 3)._key for name in names}
    assert starts == sorted(names, key=keys.__getitem__)
    # Another delivery count, another order: the same job is not always first.
    firsts = set()
    for count in range(2, 12):
        order = {name: solo.alone(name, count)._key for name in names}
        firsts.add(min(names, key=order.__getitem__))
    assert len(firsts) > 1


async def test_a_cancelled_waiting_suspect_leaves_the_gate_usable() -> None:
    trace = Trace(Solo())
    running = asyncio.create_task(trace.job("j", seconds=0.1))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(trace.job("s1", suspect=2))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await running
    await asyncio.wait_for(trace.job("after"), timeout=1)
    assert trace.solo.waiting == 0
