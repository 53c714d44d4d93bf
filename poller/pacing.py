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
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Trickle"]

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
