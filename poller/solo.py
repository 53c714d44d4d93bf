"""Suspect jobs run alone, so that a poison job cannot take innocent jobs to the DLQ with it.

A job that kills the process running it (a driver bug that aborts the interpreter, a payload
that exhausts memory) comes back from the broker again and again until the quorum queue's
`x-delivery-limit` dead-letters it. Every job the dying process held comes back too, and
RabbitMQ counts that return against each of them: a job that kept running next to the poison
job would reach the limit with it and be dead-lettered although nothing was wrong with it.

So a job delivered `SUSPECT_AFTER` times or more (a *suspect*) runs alone in this process: it
starts once no other job is running, and no other job starts until it ends. Suspects take turns
in an order that changes with every delivery (a hash of the job id and its delivery count), so
that the poison job does not always run first among the suspects a process received together;
the first suspect of a group waits `SETTLE` seconds, so that the others delivered with it (the
broker returns them together) take part in that order. Ordinary jobs pay one comparison when no
suspect is waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
from types import TracebackType

__all__ = ["SUSPECT_AFTER", "Solo"]

#: Earlier deliveries (x-delivery-count) from which a job runs alone. One return is any crash
#: or restart; a job held through three crashes is rare unless something kills the process.
SUSPECT_AFTER = 3
#: Seconds the first suspect of a group waits for the others delivered with it.
SETTLE = 0.25
#: Seconds between the end of a job and the start of a suspect: the ack of the job that ended
#: leaves for the broker before a suspect that kills the process starts (an ack still in the
#: connection's buffer dies with it, and the job would come back).
GAP = 0.05


class Solo:
    """Ordinary jobs run together; suspects one at a time, with nothing else running."""

    def __init__(self) -> None:
        self._running = 0  # ordinary jobs granted
        self._alone = False  # a suspect is running
        self._suspects: list[tuple[int, int, asyncio.Future[None]]] = []  # heap
        self._held: list[asyncio.Future[None]] = []  # ordinary jobs waiting behind suspects
        self._seq = itertools.count()
        self._settling = False

    @property
    def waiting(self) -> int:
        return len(self._suspects) + len(self._held)

    def together(self) -> _Together:
        return _Together(self)

    def alone(self, job_id: str, deliveries: int) -> _Alone:
        digest = hashlib.blake2b(f"{job_id}\0{deliveries}".encode(), digest_size=8).digest()
        return _Alone(self, int.from_bytes(digest, "big"))

    async def _enter_together(self) -> None:
        if not self._alone and not self._suspects:
            self._running += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(future)
        await self._wait(future, self._held)

    def _exit_together(self) -> None:
        self._running -= 1
        if self._suspects and not self._running:
            self._pause(GAP)
        self._next()

    async def _enter_alone(self, key: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (key, next(self._seq), future)
        if not self._suspects and not self._alone:
            self._pause(SETTLE)
        heapq.heappush(self._suspects, entry)
        self._next()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._exit_alone()  # granted, then cancelled before it could run
            elif entry in self._suspects:
                self._suspects.remove(entry)
                heapq.heapify(self._suspects)
                self._next()
            raise

    def _pause(self, seconds: float) -> None:
        """No suspect starts for `seconds`."""
        if not self._settling:
            self._settling = True
            asyncio.get_running_loop().call_later(seconds, self._settled)

    def _settled(self) -> None:
        self._settling = False
        self._next()

    def _exit_alone(self) -> None:
        self._alone = False
        if self._suspects:
            self._pause(GAP)
        self._next()

    async def _wait(self, future: asyncio.Future[None], queue: list[asyncio.Future[None]]) -> None:
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._exit_together()
            elif future in queue:
                queue.remove(future)
            raise

    def _next(self) -> None:
        """Grant what may run now: the next suspect once nothing runs, else the held jobs."""
        if self._alone:
            return
        if self._suspects:
            if self._running == 0 and not self._settling:
                _, _, future = heapq.heappop(self._suspects)
                self._alone = True
                future.set_result(None)
            return
        held, self._held = self._held, []
        for future in held:
            if not future.done():
                self._running += 1
                future.set_result(None)


class _Together:
    __slots__ = ("_solo",)

    def __init__(self, solo: Solo) -> None:
        self._solo = solo

    async def __aenter__(self) -> None:
        await self._solo._enter_together()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._solo._exit_together()


class _Alone:
    __slots__ = ("_key", "_solo")

    def __init__(self, solo: Solo, key: int) -> None:
        self._solo = solo
        self._key = key

    async def __aenter__(self) -> None:
        await self._solo._enter_alone(self._key)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._solo._exit_alone()
