"""Jobs through the service: validate, record `queued`, publish with a confirm, wait for results.

The layer below the HTTP routers (no HTTP here) and above the store and the broker:

* `JobService.submit()` takes the API's `lane` out of the body (the wire has no such field: it
  picks the routing key, `<id>.interactive` or `<id>`), fills in `v` and `id` when missing,
  validates the job once with the wire's own rules (so the API refuses exactly what a poller
  would, with the wire's codes), records it `queued`, then publishes it to `usm_poller.jobs`
  and waits for the broker's confirm. A publish that is not confirmed (broker down, no queue
  for the satellite) turns the row into `error` with code `not_published`: a job is never
  left `queued` when no poller can ever answer it.
* A caller that waits (`Prefer: wait=N`) gets its result through this replica's reply queue:
  the job carries `reply_to`, the poller publishes the result as `reply.<sat>.<queue>`, which
  reaches this replica's exclusive-by-name queue and, through `reply.#`, the history.
* `get()` with a wait long-polls: woken by results this replica ingests or receives as replies,
  and re-reading the store meanwhile for results another replica ingested.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from poller import wire
from poller.broker import Broker, UnroutableError, properties
from poller.errors import BrokerError, WireError
from poller.logging import get_logger
from satellite.service.metrics import ServiceMetrics
from satellite.service.store import JobExistsError, JobFilter, JobRecord, Page, QueuedJob, Store

__all__ = [
    "LANES",
    "MAX_BATCH_JOBS",
    "MAX_WAIT_SECONDS",
    "BatchOutcome",
    "JobService",
    "JobSubmitError",
    "Submitted",
    "Waiters",
]

log = get_logger("satellite.service.jobs")

MAX_WAIT_SECONDS = 60.0
#: Most jobs in one batch request (larger batches: split them, or `satellite submit --file`).
MAX_BATCH_JOBS = 1000
#: How often a long poll re-reads the store (results another replica ingested).
POLL_INTERVAL = 0.5
#: The lanes a job submitted through the API may ask for (`"lane"` in its body).
LANES: tuple[wire.Lane, ...] = ("interactive", "bulk")


class JobSubmitError(Exception):
    """A submit the service refuses; `code` is stable, `status` the HTTP status it maps to."""

    def __init__(
        self, status: int, code: str, detail: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Submitted:
    record: JobRecord
    answered: bool
    """True when the result is in `record` (it arrived within the wait)."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of each job of a batch, in the order given."""

    published: list[str]
    not_published: list[str]


class WaitEndedError(Exception):
    """The replica is stopping: a waiting request answers now with what it has."""


class Waiters:
    """Futures of callers waiting for a job's result, woken by ingest commits and replies."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[wire.JobResult]]] = {}
        self._closed = False

    def watch(self, job_id: str) -> asyncio.Future[wire.JobResult]:
        future: asyncio.Future[wire.JobResult] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(WaitEndedError())
            return future
        self._waiting.setdefault(job_id, set()).add(future)
        return future

    def close(self) -> None:
        """End every wait now (SIGTERM): callers answer 202 / the record as it is."""
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(WaitEndedError())

    def forget(self, job_id: str, future: asyncio.Future[wire.JobResult]) -> None:
        futures = self._waiting.get(job_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[job_id]

    def notify(self, results: Iterable[wire.JobResult]) -> None:
        for result in results:
            for future in self._waiting.pop(result.job_id, ()):
                if not future.done():
                    future.set_result(result)

    def __len__(self) -> int:
        return sum(len(f) for f in self._waiting.values())


def job_object(body: bytes | dict[str, Any], *, max_bytes: int) -> dict[str, Any]:
    """The job of a request body as a JSON object (a dict given is used as it is)."""
    if isinstance(body, bytes):
        if len(body) > max_bytes:
            raise WireError(f"the job is {len(body)} bytes; the limit is {max_bytes} bytes")
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):
            raise WireError("the body is not valid UTF-8 JSON") from None
    else:
        raw = body
    if not isinstance(raw, dict):
        raise WireError("the body must be a JSON object (one job)")
    return raw


def take_lane(raw: dict[str, Any]) -> wire.Lane | None:
    """Remove the API's `lane` from a job object (the wire has no such field: the lane is the
    routing key); None when the job names none. `WireError` for one that is not a lane."""
    lane = raw.pop("lane", None)
    if lane is None:
        return None
    for known in LANES:
        if lane == known and isinstance(lane, str):
            return known
    raise WireError("lane: must be 'interactive' or 'bulk'")


def prepare_job(raw: dict[str, Any]) -> wire.JobRequest:
    """The job with `v` and `id` filled in when missing (in `raw` too), validated once, by the
    wire's own rules (`WireError` with the wire's codes when invalid)."""
    raw.setdefault("v", wire.PROTOCOL_VERSION)
    if raw.get("id") is None:
        raw["id"] = str(uuid.uuid4())
    return wire.validate_job(raw)


def split_batch(body: bytes, *, ndjson: bool) -> list[Any]:
    """The jobs of a batch body: a JSON array, or one JSON object per line (NDJSON)."""
    if not ndjson:
        try:
            items = json.loads(body)
        except (ValueError, RecursionError):
            raise WireError("the body is not a valid JSON array (or send NDJSON)") from None
        if not isinstance(items, list):
            raise WireError("the body must be a JSON array of jobs (or NDJSON, one per line)")
        return items
    out = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):
            raise WireError(f"line {n} is not valid JSON") from None
    return out


def kept_request(job: wire.JobRequest) -> dict[str, Any]:
    """What the history keeps of a job for a retry: everything but its inline credentials."""
    return job.model_dump(mode="json", exclude={"auth"}, exclude_none=True)


def merged(record: JobRecord, result: wire.JobResult) -> JobRecord:
    """The record as it will be once `result` is stored (for an answer the store has not yet)."""
    return record.model_copy(
        update={
            "status": result.status,
            "error_code": result.error.code if result.error else None,
            "started_at": result.started_at,
            "finished_at": result.finished_at,
            "attempt": result.attempt,
            "redelivered": result.redelivered,
            "worker": result.worker,
            "duration_ms": result.duration_ms,
            "answers": record.answers + 1,
            "result": result.model_dump(mode="json"),
        }
    )


class JobService:
    """Submit, look up and wait for jobs; one per replica."""

    def __init__(
        self,
        store: Store,
        publisher: Broker,
        waiters: Waiters,
        *,
        reply_queue: str,
        max_job_bytes: int = 262_144,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.waiters = waiters
        self.reply_queue = reply_queue
        self.max_job_bytes = max_job_bytes
        self.metrics = metrics

    async def submit(
        self,
        satellite_id: str,
        body: bytes | dict[str, Any],
        *,
        source: str = "api",
        wait: float | None = None,
        retry_of: str | None = None,
    ) -> Submitted:
        """Validate, record, publish; wait up to `wait` s for the result. `JobSubmitError`."""
        _check_satellite(satellite_id)
        try:
            raw = job_object(body, max_bytes=self.max_job_bytes)
            lane = take_lane(raw) or default_lane(wait)
            job = prepare_job(raw)
        except WireError as exc:
            raise JobSubmitError(422, exc.error_code, exc.message) from None
        now = self.store.clock()
        queued = _queued(job, satellite_id, source, now, lane=lane, retry_of=retry_of)
        try:
            record = await self.store.record_queued(queued)
        except JobExistsError:
            raise JobSubmitError(
                409, "job_exists", f"a job with id {job.id!r} was submitted already"
            ) from None
        waiting = self.waiters.watch(job.id) if wait else None
        try:
            await self._publish(satellite_id, job, lane, reply=wait is not None and wait > 0)
            if waiting is None or wait is None:
                return Submitted(record, answered=False)
            return await self._wait(record, waiting, min(wait, MAX_WAIT_SECONDS))
        finally:
            if waiting is not None:
                self.waiters.forget(job.id, waiting)

    async def submit_batch(
        self,
        satellite_id: str,
        body: bytes,
        *,
        ndjson: bool = False,
        source: str = "api",
        confirm_timeout: float = 30.0,
    ) -> BatchOutcome:
        """Validate every job (all or nothing), record them, publish them with confirms."""
        _check_satellite(satellite_id)
        try:
            items = split_batch(body, ndjson=ndjson)
        except WireError as exc:
            raise JobSubmitError(422, exc.error_code, exc.message) from None
        if not items:
            raise JobSubmitError(422, "invalid_job", "the batch holds no job")
        if len(items) > MAX_BATCH_JOBS:
            raise JobSubmitError(
                422,
                "batch_too_large",
                f"the batch holds {len(items)} jobs; the limit is {MAX_BATCH_JOBS} per request",
            )
        batch = self._validate_batch(items)
        now = self.store.clock()
        queued = [_queued(job, satellite_id, source, now, lane=lane) for job, lane in batch]
        try:
            await self.store.record_queued_many(queued)
        except JobExistsError as exc:
            taken = ", ".join(repr(i) for i in exc.args[:5])
            raise JobSubmitError(
                409, "job_exists", f"{len(exc.args)} job id(s) were submitted already: {taken}"
            ) from None
        return await self._publish_batch(satellite_id, batch, confirm_timeout)

    def _validate_batch(self, items: list[Any]) -> list[tuple[wire.JobRequest, wire.Lane]]:
        batch: list[tuple[wire.JobRequest, wire.Lane]] = []
        problems: list[str] = []
        codes: set[str] = set()
        seen: set[str] = set()
        for index, item in enumerate(items):
            try:
                job, lane = self._batch_item(item, seen)
            except WireError as exc:
                codes.add(exc.error_code)
                if len(problems) < 10:
                    problems.append(f"[{index}] {exc.message}")
                continue
            seen.add(job.id)
            batch.append((job, lane))
        if problems:
            code = codes.pop() if len(codes) == 1 else "invalid_job"
            raise JobSubmitError(422, code, "; ".join(problems))
        return batch

    def _batch_item(self, item: object, seen: set[str]) -> tuple[wire.JobRequest, wire.Lane]:
        if not isinstance(item, dict):
            raise WireError("must be a JSON object (one job)")
        lane = take_lane(item) or "bulk"
        job = prepare_job(item)
        if job.id in seen:
            raise WireError(f"the id {job.id!r} appears twice in the batch")
        return job, lane

    async def _publish_batch(
        self,
        satellite_id: str,
        batch: list[tuple[wire.JobRequest, wire.Lane]],
        confirm_timeout: float,
    ) -> BatchOutcome:
        futures: dict[str, asyncio.Future[None]] = {}
        failed: list[str] = []
        unroutable = False
        unroutable_lanes: set[wire.Lane] = set()
        lane_of = {job.id: lane for job, lane in batch}
        keys = {lane: wire.lane_routing_key(satellite_id, lane) for lane in LANES}
        for job, lane in batch:
            try:
                futures[job.id] = self.publisher.publish_nowait(
                    wire.jobs_exchange(),
                    keys[lane],
                    wire.encode(job),
                    self._properties(job, reply=False),
                )
            except BrokerError:
                failed.append(job.id)
        if futures:
            await asyncio.wait(futures.values(), timeout=confirm_timeout)
        published = []
        for job_id, future in futures.items():
            if not future.done():
                future.cancel()
                failed.append(job_id)
            elif future.cancelled() or future.exception() is not None:
                if isinstance(future.exception(), UnroutableError):
                    unroutable = True
                    unroutable_lanes.add(lane_of[job_id])
                failed.append(job_id)
            else:
                published.append(job_id)
        if failed:
            await self.store.mark_not_published_many(failed)
            log.warning(
                "jobs_not_published", satellite_id=satellite_id, count=len(failed), of=len(batch)
            )
        jobs = [job for job, _ in batch]
        self._count_batch(satellite_id, jobs, published, failed, unroutable=unroutable)
        if not published:
            raise _not_published(satellite_id, unroutable=unroutable, lanes=unroutable_lanes)
        return BatchOutcome(published, failed)

    def _count_batch(
        self,
        satellite_id: str,
        batch: list[wire.JobRequest],
        published: list[str],
        failed: list[str],
        *,
        unroutable: bool,
    ) -> None:
        if self.metrics is None:
            return
        kinds = {job.id: job.kind for job in batch}
        for job_id in published:
            self.metrics.submitted.labels(satellite_id, kinds[job_id]).inc()
        if failed:
            reason = "unroutable" if unroutable else "broker"
            self.metrics.not_published.labels(satellite_id, reason).inc(len(failed))

    def _properties(self, job: wire.JobRequest, *, reply: bool) -> Any:
        return properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=job.id,
            type=job.kind,
            reply_to=self.reply_queue if reply else None,
        )

    async def _publish(
        self, satellite_id: str, job: wire.JobRequest, lane: wire.Lane, *, reply: bool
    ) -> None:
        props = self._properties(job, reply=reply)
        key = wire.lane_routing_key(satellite_id, lane)
        try:
            await self.publisher.publish(wire.jobs_exchange(), key, wire.encode(job), props)
        except BrokerError as exc:
            await self.store.mark_not_published(job.id)
            if self.metrics is not None:
                reason = "unroutable" if isinstance(exc, UnroutableError) else "broker"
                self.metrics.not_published.labels(satellite_id, reason).inc()
            log.warning(
                "job_not_published",
                job_id=job.id,
                satellite_id=satellite_id,
                reason=str(exc)[:200],
            )
            raise _not_published(
                satellite_id,
                unroutable=isinstance(exc, UnroutableError),
                lanes=(lane,),
                reason=str(exc),
            ) from None
        if self.metrics is not None:
            self.metrics.submitted.labels(satellite_id, job.kind).inc()

    async def _wait(
        self, record: JobRecord, waiting: asyncio.Future[wire.JobResult], wait: float
    ) -> Submitted:
        try:
            # The future is this request's own (`Waiters.watch`): a timeout may cancel it, so
            # no shield, and the reply's `set_result` wakes this task in one loop turn, not two.
            async with asyncio.timeout(wait):
                result = await waiting
        except (TimeoutError, WaitEndedError):
            latest = await self.store.get_job(record.id)
            if latest is not None and latest.status not in ("queued", "overdue"):
                return Submitted(latest, answered=True)
            return Submitted(latest or record, answered=False)
        # The result as it arrived (the history's copy may not be committed yet: no read here).
        return Submitted(merged(record, result), answered=True)

    async def retry(self, job_id: str, *, wait: float | None = None) -> Submitted:
        """Submit a recorded job again under a new id; the new record points at the old one."""
        found = await self.store.get_request(job_id)
        if found is None:
            raise JobSubmitError(404, "job_not_found", f"no job {job_id!r} in the history")
        record, request = found
        if not isinstance(request, dict):
            raise JobSubmitError(
                409,
                "not_retryable",
                "the history has no request for this job (it was not submitted through the "
                "service)",
            )
        body = dict(request, id=str(uuid.uuid4()))
        try:
            prepare_job(dict(body))
        except WireError:
            raise JobSubmitError(
                409,
                "not_retryable",
                "the job carried its credentials inline and the history does not keep them: "
                "submit it again (or use credential_ref)",
            ) from None
        return await self.submit(record.satellite_id, body, wait=wait, retry_of=record.id)

    async def search(self, where: JobFilter, *, limit: int, cursor: str | None) -> Page:
        """A page of the history, newest first; `ValueError` for a cursor that is not ours."""
        return await self.store.search(where, limit=limit, cursor=cursor)

    async def get(self, job_id: str, *, wait: float = 0.0) -> JobRecord | None:
        """The job's record; with `wait`, up to that many seconds until it is no longer queued."""
        record = await self.store.get_job(job_id)
        if record is None or wait <= 0 or record.status != "queued":
            return record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, MAX_WAIT_SECONDS)
        waiting = self.waiters.watch(job_id)
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(left, POLL_INTERVAL)):
                        result = await asyncio.shield(waiting)
                except TimeoutError:
                    pass
                except WaitEndedError:
                    return await self.store.get_job(job_id) or record
                else:
                    latest = await self.store.get_job(job_id)
                    if latest is not None and latest.answers > 0:
                        return latest
                    return merged(latest or record, result)
                latest = await self.store.get_job(job_id)
                if latest is None or latest.status != "queued":
                    return latest
                record = latest
        finally:
            self.waiters.forget(job_id, waiting)
        return record


def _check_satellite(satellite_id: str) -> None:
    try:
        wire.validate_satellite_id(satellite_id)
    except ValueError as exc:
        raise JobSubmitError(404, "unknown_satellite", str(exc)) from None


def _queued(
    job: wire.JobRequest,
    satellite_id: str,
    source: str,
    now: datetime,
    *,
    lane: wire.Lane,
    retry_of: str | None = None,
) -> QueuedJob:
    """What the history records of a job as it is submitted."""
    return QueuedJob(
        id=job.id,
        satellite_id=satellite_id,
        kind=job.kind,
        host=job.target.host,
        port=job.target.port,
        source=source,
        submitted_at=now,
        timeout=job.timeout,
        lane=lane,
        retry_of=retry_of,
        request=kept_request(job),
    )


def default_lane(wait: float | None) -> wire.Lane:
    """A job that names no lane: interactive when someone waits for it (ahead of the bulk
    backlog, docs/design.md §13), bulk otherwise."""
    return "interactive" if wait is not None and wait > 0 else "bulk"


def _not_published(
    satellite_id: str, *, unroutable: bool, lanes: Iterable[wire.Lane] = (), reason: str = ""
) -> JobSubmitError:
    if unroutable:
        if set(lanes) == {"interactive"}:
            where = (
                f"no queue is bound for the interactive lane of satellite {satellite_id!r} "
                f"({wire.interactive_queue(satellite_id)})"
            )
        else:
            where = (
                f"no queue is bound for satellite {satellite_id!r} "
                f"({wire.jobs_queue(satellite_id)})"
            )
        return JobSubmitError(
            404,
            "unknown_satellite",
            f"{where}: declare it with `satellite declare`, or start its pollers",
        )
    detail = f"the broker did not take the job: {reason}" if reason else "the broker is down"
    return JobSubmitError(503, "broker_unavailable", detail, retry_after=5)
