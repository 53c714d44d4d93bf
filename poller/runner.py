"""One job in, one `JobResult` out. No AMQP and no sockets here: drivers do the I/O.

The runner applies the delivery rules that do not need the broker (expired, outcome unknown),
resolves credentials, bounds the job by its deadline, waits for its run slot and device slot
(`poller.admission`: dead devices cannot take every slot), and turns every device failure into
an error result. An unexpected exception (a bug) is not turned into a
result here: it propagates, so that the worker can requeue the job (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from functools import partial
from typing import NamedTuple

from pydantic import JsonValue

from poller import testhooks
from poller.admission import Admission, NotStarted
from poller.credentials import CredentialStore
from poller.drivers import get_driver
from poller.drivers.base import Auth, Data, Driver, JobContext
from poller.errors import (
    DeviceQuarantinedError,
    DeviceTimeoutError,
    ExpiredError,
    JobError,
    OutcomeUnknownError,
)
from poller.logging import get_logger
from poller.pacing import LaneFirst, Trickle
from poller.quarantine import Change, Outcome, Quarantine, Ticket, classify
from poller.sandbox import Sandbox, SandboxUnavailableError
from poller.wire import ErrorInfo, JobRequest, JobResult, build_result, now

__all__ = ["Attempt", "NotStarted", "Runner", "error_result"]

log = get_logger("poller.runner")


class Attempt(NamedTuple):
    """How often this job has been delivered: from the broker's flags and headers.

    A named tuple: one is made per job, in a fraction of a frozen dataclass's time."""

    number: int = 1
    redelivered: bool = False


#: A job's first delivery.
FIRST_ATTEMPT = Attempt()


def _timeout_error(
    exc: TimeoutError, host: str, timeout: float, *, had: float | None
) -> DeviceTimeoutError:
    """`had`: seconds the job had its device (less when it waited for a slot; None: never)."""
    if had is None:
        return DeviceTimeoutError(
            f"not started within {timeout:g} s: no free slot (the poller was at its "
            f"concurrency, or {host} at its per-device limit); nothing was sent"
        )
    if isinstance(exc, DeviceTimeoutError):
        return exc
    if had < timeout * 0.9:
        return DeviceTimeoutError(
            f"no complete answer from {host} in the {had:.3g} s left of {timeout:g} s "
            "(the rest went waiting for a slot)"
        )
    return DeviceTimeoutError(f"no complete answer from {host} within {timeout:g} s")


def error_result(
    *,
    job_id: str,
    kind: str,
    satellite_id: str,
    worker: str,
    code: str,
    message: str,
    retryable: bool = False,
    attempt: Attempt,
    started_at: datetime,
    started_monotonic: float,
    data: dict[str, JsonValue] | None = None,
    meta: dict[str, JsonValue] | None = None,
) -> JobResult:
    """An error result; also used by the worker for jobs that could not be decoded."""
    return build_result(
        {
            "job_id": job_id,
            "kind": kind,
            "satellite_id": satellite_id,
            "worker": worker,
            "status": "error",
            "data": data,
            "error": ErrorInfo(code=code, message=message, retryable=retryable),
            "attempt": attempt.number,
            "redelivered": attempt.redelivered,
            "started_at": started_at,
            "finished_at": now(),
            "duration_ms": round((time.monotonic() - started_monotonic) * 1000, 3),
            "meta": meta,
        }
    )


class Runner:
    """Runs decoded jobs with the drivers of this process."""

    def __init__(
        self,
        *,
        drivers: Mapping[str, Driver],
        credentials: CredentialStore,
        satellite_id: str,
        worker: str,
        concurrency: int = 64,
        per_device_concurrency: int = 4,
        max_output_bytes: int = 4 * 1024 * 1024,
        quarantine: Quarantine | None = None,
        interactive_slots: int = 0,
        sandbox: Sandbox | None = None,
        sandbox_after: int = 2,
        lane_first: LaneFirst | None = None,
        on_settle: Callable[[str, Outcome, str, float, float], None] | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        """`sandbox`: where suspect jobs run, those delivered `sandbox_after` times before
        (`poller.sandbox`; None: every job runs in this process). `lane_first`: a bulk job
        that has its slots waits while it pauses bulk work, before it contacts its device
        (`LaneFirst.bulk_turn`: the interactive lane goes first). `on_settle(device, outcome,
        error, silent_for, timeout)`: every job's outcome for its device, as the quarantine got
        it; `on_change(device)`: the quarantine of `device` began, was extended or ended
        (`poller.laneproc`: the lane process and the replica tell each other)."""
        self._drivers = dict(drivers)
        self._credentials = credentials
        self.satellite_id = satellite_id
        self.worker = worker
        self._max_output_bytes = max_output_bytes
        #: Dead-device circuit breaker (DESIGN §5); its entries go into every heartbeat.
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        #: Run slots and device slots; untrusted devices get half the run slots at most;
        #: `interactive_slots` of them are kept for the interactive lane (DESIGN §13).
        self.admission = Admission(
            concurrency=concurrency,
            per_device=per_device_concurrency,
            trusted=self.quarantine.trusted,
            reserved=interactive_slots,
        )
        #: Answers that contact no device (quarantined, not started in time) come in bursts:
        #: one per event-loop iteration.
        self._refusals = Trickle(per_turn=1)
        self._not_started = partial(self._refusals.fail, error=TimeoutError)
        self.sandbox = sandbox
        self._sandbox_after = sandbox_after
        self._lane_first = lane_first
        self._on_settle = on_settle
        self._on_change = on_change

    def close(self) -> int:
        """Start no more idempotent jobs: waiting ones raise `NotStarted`; how many of them.

        Jobs that are not idempotent still run: returned, they would come back redelivered and
        could only be answered `outcome_unknown`.
        """
        return self.admission.close()

    async def run(
        self, job: JobRequest, attempt: Attempt = FIRST_ATTEMPT, *, interactive: bool = False
    ) -> JobResult:
        """Run one job to a result. Device failures become error results; bugs propagate, and
        so does `NotStarted` (shutting down: the job never started and goes back to the queue).
        `interactive`: a job of the interactive lane, admitted ahead of bulk ones.
        """
        started_at = now()
        started = time.monotonic()
        try:
            sandbox = self.sandbox
            if sandbox is not None and attempt.number > self._sandbox_after and job.idempotent:
                data = await self._execute_sandboxed(sandbox, job, attempt, started_at, interactive)
            else:
                data = await self._execute(job, attempt, started_at, interactive)
        except JobError as exc:
            return error_result(
                job_id=job.id,
                kind=job.kind,
                satellite_id=self.satellite_id,
                worker=self.worker,
                code=exc.code,
                message=exc.message,
                retryable=exc.retryable,
                attempt=attempt,
                started_at=started_at,
                started_monotonic=started,
                data=exc.data,
                meta=job.meta,
            )
        return build_result(
            {
                "job_id": job.id,
                "kind": job.kind,
                "satellite_id": self.satellite_id,
                "worker": self.worker,
                "status": "ok",
                "data": data,
                "error": None,
                "attempt": attempt.number,
                "redelivered": attempt.redelivered,
                "started_at": started_at,
                "finished_at": now(),
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "meta": job.meta,
            }
        )

    async def _execute_sandboxed(
        self,
        sandbox: Sandbox,
        job: JobRequest,
        attempt: Attempt,
        started_at: datetime,
        interactive: bool,
    ) -> Data:
        """A suspect job (delivered `sandbox_after` times before): it waits for a sandbox
        child before its run and device slots, so that suspects waiting for one hold no slot
        of the jobs that run here, and that wait says nothing about its device."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(job.timeout):
                await sandbox.acquire(priority=attempt.number)
        except TimeoutError:
            raise DeviceTimeoutError(
                f"not started within {job.timeout:g} s: it waited for a sandbox child (it was "
                "delivered before with a job that crashed the poller; USM_POLLER_SANDBOX_SLOTS "
                "at once); nothing was sent"
            ) from None
        try:
            waited = time.monotonic() - t0
            return await self._execute(
                job, attempt, started_at, interactive, sandbox=sandbox, waited=waited
            )
        finally:
            sandbox.release()

    async def _execute(
        self,
        job: JobRequest,
        attempt: Attempt,
        started_at: datetime,
        interactive: bool,
        *,
        sandbox: Sandbox | None = None,
        waited: float = 0.0,
    ) -> dict[str, JsonValue]:
        """Run the job here, or its driver in a child of `sandbox` (holding one of its slots
        after waiting `waited` s for it: counted against the job's timeout, and, like a wait
        for a run or device slot, not against its device)."""
        timeout = _time_allowed(job, attempt, started_at)
        driver = get_driver(self._drivers, job.kind)
        auth = self._credentials.resolve(job)
        loop = asyncio.get_running_loop()
        deadline = loop.time() - waited + timeout
        # Run under `asyncio.timeout_at(deadline)` below: drivers need no timer of their own.
        ctx = JobContext(deadline=deadline, max_output_bytes=self._max_output_bytes, guarded=True)
        try:
            ticket = self.quarantine.admit(job.target.host)
        except DeviceQuarantinedError:
            if not interactive:  # someone waits for an interactive one: answered at once
                await self._refusals.turn()  # no device contacted: a low-priority answer
            raise
        outcome, error = Outcome.NEUTRAL, ""
        contacted: float | None = None  # loop time the job went to its device
        admission, host = self.admission, job.target.host
        try:
            # Most jobs get their slots at once (`take`); the others wait for them.
            untrusted = None if interactive else admission.take(host, returnable=job.idempotent)
            if untrusted is None:
                untrusted = await self._wait_for_slots(job, deadline, interactive, attempt)
            try:
                async with asyncio.timeout_at(deadline):
                    lane_first = self._lane_first
                    if lane_first is not None and lane_first.paused and not interactive:
                        await lane_first.bulk_turn()
                    self.quarantine.check(ticket)
                    run = self._call_for(driver, job, sandbox)
                    contacted = loop.time()
                    data = await run(job, auth, ctx)
                    outcome = classify(None, job.kind, data)
                    return data
            finally:
                admission.release(host, untrusted, interactive)
        except TimeoutError as timeout_exc:
            had = None if contacted is None else loop.time() - contacted
            failure = _timeout_error(timeout_exc, job.target.host, timeout, had=had)
            # A job that timed out while queued for its slots says nothing about its device.
            outcome, error = (Outcome.NEUTRAL if had is None else Outcome.TIMEOUT), failure.message
            raise failure from None
        except DeviceQuarantinedError:
            raise
        except JobError as exc:
            outcome, error = classify(exc.code, job.kind, exc.data), exc.message
            raise
        finally:
            # A timeout after too short a time with the device may not count (read only then).
            silent_for = math.inf
            if outcome is Outcome.TIMEOUT and contacted is not None:
                silent_for = loop.time() - contacted
            self._settle(ticket, outcome, error, silent_for, timeout)

    async def _wait_for_slots(
        self, job: JobRequest, deadline: float, interactive: bool, attempt: Attempt
    ) -> bool:
        """`Admission.acquire` for a job that cannot have its slots at once: the jobs
        delivered most often first (they are the nearest to the queue's delivery limit)."""
        return await self.admission.acquire(
            job.target.host,
            returnable=job.idempotent,
            # Still waiting for its slots at the deadline: answered through the low-priority
            # lane (jobs delivered together expire together; no device was contacted).
            deadline=deadline,
            expire=self._not_started,
            interactive=interactive,
            priority=attempt.number,
        )

    @classmethod
    def _call_for(
        cls, driver: Driver, job: JobRequest, sandbox: Sandbox | None
    ) -> Callable[[JobRequest, Auth | None, JobContext], Awaitable[Data]]:
        """How the job's driver runs: in this process, or in a child of `sandbox`."""
        if sandbox is not None:
            return partial(cls._sandboxed, sandbox, driver)
        if testhooks.CRASH_ON_JOB:
            testhooks.crash_on_job(job.id)  # test-only hook (poller/testhooks.py)
        return driver.run

    @staticmethod
    async def _sandboxed(
        sandbox: Sandbox, driver: Driver, job: JobRequest, auth: Auth | None, ctx: JobContext
    ) -> Data:
        """A suspect job's driver in a sandbox child (its slot held by the caller), or in this
        process when the sandbox process cannot be started."""
        try:
            return await sandbox.run(job, auth, ctx)
        except SandboxUnavailableError:
            return await driver.run(job, auth, ctx)

    def _settle(
        self, ticket: Ticket, outcome: Outcome, error: str, silent_for: float, timeout: float
    ) -> None:
        device = ticket.device
        quarantine = self.quarantine
        was_trusted = quarantine.trusted(device)
        change = quarantine.settle(ticket, outcome, error, silent_for=silent_for, timeout=timeout)
        if self._on_settle is not None:
            self._on_settle(device, outcome, error, silent_for, timeout)
        if change is not None and self._on_change is not None:
            self._on_change(device)
        if quarantine.trusted(device) is not was_trusted:
            self.admission.refile(device)
        if change is Change.QUARANTINED or change is Change.EXTENDED:
            until = quarantine.until(device)
            # Its jobs already waiting for a slot are answered now, not each in its turn.
            refused = self.admission.refuse(
                device, partial(self._refusals.fail, error=partial(_refusal, quarantine, device))
            )
            log.warning(
                "device_quarantined",
                device=device,
                until=until.isoformat() if until else None,
                after_timeouts=quarantine.after,
                probe=ticket.probe,
                last_error=error,
                waiting_jobs_answered=refused,
            )
        elif change is Change.RELEASED:
            log.info("device_released", device=device, probe=ticket.probe)

    def settle_reported(
        self, device: str, outcome: Outcome, error: str, silent_for: float, timeout: float
    ) -> None:
        """A job that ran elsewhere (the lane process) ended so for `device`: the quarantine
        counts it as one of this process's own."""
        self._settle(Ticket(device), outcome, error, silent_for, timeout)


def _time_allowed(job: JobRequest, attempt: Attempt, started_at: datetime) -> float:
    """The job's timeout from the start of its run (`not_after` may shorten it); raises when
    it must not run (expired, or maybe run before and not idempotent)."""
    timeout = job.timeout  # from the start of the run, the wait for a sandbox child included
    if job.not_after is not None:
        left = (job.not_after - started_at).total_seconds()
        if left <= 0:
            raise ExpiredError(f"not_after {job.not_after.isoformat()} has passed; not run")
        timeout = min(timeout, left)
    if attempt.redelivered and not job.idempotent:
        raise OutcomeUnknownError(
            "delivered again after an earlier attempt may have run; not idempotent, not rerun"
        )
    return timeout


def _refusal(quarantine: Quarantine, device: str) -> BaseException:
    refusal = quarantine.refusal(device)
    return refusal if refusal is not None else DeviceQuarantinedError(f"{device} is quarantined")
