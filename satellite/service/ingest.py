"""Results → history rows: consume `usm_poller.history`, write group commits, ack after commit.

Every replica consumes the same quorum queue (competing consumers). Deliveries are gathered into
a group of at most `batch` results or `linger` seconds, written in one transaction, and only then
acked: a replica that dies before its commit leaves the results unacked and the broker hands them
to another replica (or to it again); the store counts the copy as a second answer of one row.
A committed group is acked with one `basic.ack` with `multiple=True` when its deliveries are the
oldest unacked ones of the channel (`Broker.ack_many`, which checks it: never an ack that would
also take a delivery not yet committed), one by one otherwise.
One group is committed while the next is gathered and decoded; the commits stay one at a time
and in order, so a later copy of a result is never written before an earlier one.

Bodies that are not a wire v1 result cannot be stored and there is no dead-letter queue for the
history (the core's own `usm_poller.results` keeps every result anyway): they are acked, counted
in `IngestStats.malformed` and logged as `result_malformed` without the body, rather than
redelivered forever. A row the database refuses (text PostgreSQL cannot hold, say) is isolated by
writing the group one row at a time; it is acked and counted in `unstorable`.

When the database is down nothing is acked: the group is retried with capped exponential
backoff, the prefetch window stops further deliveries, and ingest resumes where it stopped.

A result of a job the history does not know yet (published straight to the broker, not through
the service) is recorded with the source `result_source()` says: `cli` when the job's
correlation id (which the poller copies into the result) is the toolkit's mark, else `amqp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from poller import wire
from poller.broker import Broker, BrokerOptions, Delivery, QueueSpec, Topology
from poller.config import AmqpUrl
from poller.errors import WireError
from poller.logging import get_logger
from satellite.dispatch import published_by_toolkit
from satellite.service.store import Store

__all__ = [
    "PREFETCH_GROUPS",
    "Ingest",
    "IngestStats",
    "history_topology",
    "ingest_prefetch",
    "result_source",
]

log = get_logger("satellite.service.ingest")

#: Groups a replica may hold unacked (its prefetch window, in groups): one being committed and
#: the next one arriving and decoded meanwhile. A wider window (5 groups) kept the ingest from
#: ever waiting for the broker, and wrote no faster: docs/performance.md, *History ingest*.
PREFETCH_GROUPS = 2


def ingest_prefetch(batch: int) -> int:
    """The prefetch window of a replica's ingest for groups of `batch` results."""
    return min(65535, batch * PREFETCH_GROUPS)


class _RefusedError(Exception):
    """The database refused the data itself (SQLSTATE class 22 or 23): retrying cannot help."""


def _refused(exc: BaseException) -> bool:
    """A refusal of the data, as opposed to an outage (connection refused or lost, lock,
    timeout, a database that does not accept connections), which is retried.

    SQLAlchemy's asyncpg adapter reports most server errors as plain `DBAPIError`: the SQLSTATE
    decides (22 data exception, 23 integrity constraint violation).
    """
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23")


def result_source(delivery: Delivery) -> str:
    """The source the history gives a job it first learns of from this result."""
    return "cli" if published_by_toolkit(delivery.correlation_id) else "amqp"


def history_topology() -> Topology:
    """The results exchange and `usm_poller.history` bound with `result.#` and `reply.#`."""
    exchange = wire.results_exchange()
    return Topology(
        exchanges=((exchange, "topic"),),
        queues=(
            QueueSpec(
                wire.history_queue(),
                wire.history_queue_arguments(),
                tuple((exchange, key) for key in wire.history_binding_keys()),
            ),
        ),
    )


@dataclass(slots=True)
class IngestStats:
    """Counters of one replica's ingest (for logs and `/metrics`)."""

    results: int = 0
    """Results written (copies included)."""
    commits: int = 0
    acks: int = 0
    """`basic.ack` frames sent for committed groups (one per group when it is acked at once)."""
    malformed: int = 0
    unstorable: int = 0
    db_failures: int = 0
    last_commit_monotonic: float | None = None


class Ingest:
    """One replica's consumer of `usm_poller.history` and writer of group commits."""

    def __init__(
        self,
        store: Store,
        urls: list[AmqpUrl],
        options: BrokerOptions,
        *,
        batch: int = 200,
        linger: float = 0.05,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_committed: Callable[[list[wire.JobResult]], None] | None = None,
    ) -> None:
        self.store = store
        self.batch = batch
        self.linger = linger
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.on_committed = on_committed
        self.stats = IngestStats()
        # None wakes a gather that waits for a first delivery when `stop()` has stopped the
        # consumer (nothing more comes): the stop does not wait out the gather's timeout.
        self._inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._stopping = False
        self.broker = Broker(
            urls,
            dataclasses.replace(options, group_acks=True),
            queue=wire.history_queue(),
            topology=history_topology(),
            on_delivery=self._inbox.put_nowait,
        )

    @property
    def backlog(self) -> int:
        """Deliveries received and not yet committed."""
        return self._inbox.qsize()

    async def run(self) -> None:
        """Consume and write until `stop()`; the broker connection heals itself meanwhile."""
        connection = asyncio.create_task(self.broker.run(), name="ingest-broker")
        # One group is committed while the next one is gathered and decoded: the commits stay
        # one at a time and in order (a later copy of a result is written after an earlier one).
        writing: asyncio.Task[None] | None = None
        try:
            while not (self._stopping and self._inbox.empty()):
                group = await self._gather()
                if writing is not None and (group or writing.done()):
                    await writing
                    writing = None
                if group:
                    decoded = self._decode(group)
                    if decoded:
                        writing = asyncio.create_task(self._write(decoded), name="ingest-commit")
            if writing is not None:
                await writing
                writing = None
        finally:
            if writing is not None:  # cancelled: its deliveries stay unacked (redelivered)
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection

    async def stop(self, timeout: float = 20.0) -> None:
        """Stop consuming, let `run()` commit and ack what it holds, then close the connection."""
        self._stopping = True
        await self.broker.stop_consuming(timeout=min(timeout, 5.0))
        self._inbox.put_nowait(None)

    async def close(self, timeout: float = 5.0) -> None:
        await self.broker.close(timeout)

    async def _gather(self) -> list[Delivery]:
        """The next group: wait for a first delivery, then up to `linger` s for more."""
        group: list[Delivery] = []
        try:
            async with asyncio.timeout(0.25 if self._stopping else 1.0):
                first = await self._inbox.get()
        except TimeoutError:
            return group
        if first is None:
            return group
        group.append(first)
        deadline = asyncio.get_running_loop().time() + self.linger
        while len(group) < self.batch:
            try:
                more = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                pass
            else:
                if more is None:
                    break
                group.append(more)
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    more = await self._inbox.get()
            except TimeoutError:
                break
            if more is None:
                break
            group.append(more)
        return group

    def _decode(self, group: list[Delivery]) -> list[tuple[Delivery, wire.JobResult]]:
        decoded = []
        for delivery in group:
            try:
                result = _decode(delivery.body)
            except WireError as exc:
                self.stats.malformed += 1
                log.warning(
                    "result_malformed",
                    message_id=(delivery.message_id or "")[:128] or None,
                    reason=str(exc)[:300],
                    malformed_total=self.stats.malformed,
                )
                self.broker.ack(delivery)
                continue
            decoded.append((delivery, result))
        return decoded

    async def _write(self, decoded: list[tuple[Delivery, wire.JobResult]]) -> None:
        results = [result for _, result in decoded]
        sources = {result.job_id: result_source(delivery) for delivery, result in decoded}
        written = await self._commit_with_retry(results, sources)
        self.stats.commits += 1
        self.stats.results += len(written)
        self.stats.last_commit_monotonic = time.monotonic()
        self.stats.acks += self.broker.ack_many(delivery for delivery, _ in decoded)
        if self.on_committed is not None and written:
            self.on_committed(written)

    async def _commit_with_retry(
        self, results: list[wire.JobResult], sources: Mapping[str, str], *, isolate: bool = True
    ) -> list[wire.JobResult]:
        """Write the group; retry while the database is down; the results that were written.

        A refusal that is not about the connection (a row the database cannot hold) is isolated
        by writing the rows one by one (`isolate`), or raised for a single row.
        """
        attempt = 0
        while True:
            try:
                await self.store.apply_results(results, sources)
            except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as exc:
                if _refused(exc):
                    if not isolate:
                        raise _RefusedError(_describe(exc)) from None
                    return await self._one_by_one(results, sources)
                attempt += 1
                self.stats.db_failures += 1
                delay = self._backoff(attempt)
                log.warning(
                    "history_write_failed",
                    error=_describe(exc),
                    results=len(results),
                    retry_in_s=round(delay, 2),
                    attempt=attempt,
                )
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.info("history_write_resumed", after_attempts=attempt)
            return results

    async def _one_by_one(
        self, results: Iterable[wire.JobResult], sources: Mapping[str, str]
    ) -> list[wire.JobResult]:
        """Write a group the database refused row by row; drop (and count) the refused rows."""
        written = []
        for result in results:
            try:
                await self._commit_with_retry([result], sources, isolate=False)
            except _RefusedError as exc:
                self.stats.unstorable += 1
                log.error(
                    "result_unstorable",
                    job_id=result.job_id,
                    error=str(exc),
                    unstorable_total=self.stats.unstorable,
                )
                continue
            written.append(result)
        return written

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.retry_max, self.retry_initial * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


def _decode(body: bytes) -> wire.JobResult:
    """A wire v1 result with an id the history can key on; `WireError` otherwise."""
    result = wire.decode_result(body)
    if not 1 <= len(result.job_id) <= wire.MAX_JOB_ID_CHARS:
        raise WireError("the job id is empty or longer than 128 characters")
    return result


def _describe(exc: BaseException) -> str:
    """The error's class and first line (SQLAlchemy's text has no parameters: hide_parameters)."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).splitlines()[0] if str(original) else ""
    return f"{type(original).__name__}: {text}"[:300]
