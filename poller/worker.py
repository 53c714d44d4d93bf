"""Composition root of `poller run`: builds everything from the settings and runs the loop.

For each delivery: decode → run the job under its deadline → publish the result and wait for
its confirm → ack (DESIGN §5). A job that cannot be decoded gets an error result when its id is
readable and is rejected to the dead-letter queue. A bug requeues the job; on its last delivery
it is answered with `internal_error` and dead-lettered instead. SIGTERM stops consuming, lets
running jobs finish within the grace period and returns the rest to the queue.

The prefetch window bounds the jobs this process holds. Jobs parked behind their device (its
per-device limit, or the share of run slots for devices that have not answered yet) hold part
of it while run slots are free; when they fill half of it, a spare consumer opens with a
window of `SPARE_WINDOWS` times the prefetch, so that jobs for live devices keep arriving past
a burst of jobs for dead ones; it closes once few jobs wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial

import structlog

from poller import __version__, stopsignal, testhooks, wire
from poller.broker import (
    Broker,
    BrokerOptions,
    Delivery,
    QueueSpec,
    Refusal,
    Topology,
    UnroutableError,
)
from poller.broker import properties as amqp_properties
from poller.config import PollerSettings
from poller.credentials import CredentialStore
from poller.drivers import build_drivers
from poller.drivers.base import Driver
from poller.errors import BrokerError, BrokerUnavailableError, WireError, WorkerCrashedError
from poller.health import WRITE_INTERVAL, HealthState, write_state
from poller.identity import default_worker_name
from poller.laneproc import LaneLink, LaneProcess
from poller.logging import ContextBinder, get_logger
from poller.pacing import Headroom, LaneFirst, first_in_line
from poller.quarantine import MirroredQuarantine, Outcome, Quarantine
from poller.recycle import (
    MIB,
    MemoryUse,
    Recycler,
    RecycleRecord,
    private_bytes,
    read_record,
    rss_bytes,
    write_record,
)
from poller.runner import Attempt, NotStarted, Runner, error_result
from poller.sandbox import Forked, Sandbox

__all__ = ["Worker", "build_topology", "run_worker", "stopped_while_starting"]

log = get_logger("poller.worker")

_SAFE_KIND = frozenset(k.value for k in wire.JobKind)
#: The log context of a job, bound in its task: `job_id`, `kind`, `device`, `attempt`.
_bind_job = ContextBinder("job_id", "kind", "device", "attempt")

#: The spare consumer's window, in prefetch windows (docs/operations.md, "Dead devices").
SPARE_WINDOWS = 3
#: How often the spare window is looked at besides on every delivery, in seconds.
WINDOW_CHECK_INTERVAL = 0.5
#: The spare stays open at least this long (seconds): a burst that comes and goes around the
#: thresholds does not open and close it on every delivery.
SPARE_MIN_OPEN = 5.0
#: Seconds between looks at this process's RSS against `USM_POLLER_MAX_RSS_MB`.
RECYCLE_CHECK_INTERVAL = 1.0


def build_topology(satellite_id: str, queue_type: str) -> Topology:
    """Everything this satellite's poller declares at start-up (DESIGN §3).

    Every queue is a quorum queue unless `queue_type` is `classic` (then the job queue and the
    dead-letter queue are classic; the core's result queue stays quorum).
    """
    classic = queue_type == "classic"
    return Topology(
        exchanges=(
            (wire.jobs_exchange(), "direct"),
            (wire.dead_letter_exchange(), "direct"),
            (wire.results_exchange(), "topic"),
            (wire.events_exchange(), "topic"),
        ),
        queues=(
            QueueSpec(
                wire.jobs_queue(satellite_id),
                wire.jobs_queue_arguments(satellite_id, "classic" if classic else "quorum"),
                ((wire.jobs_exchange(), wire.jobs_routing_key(satellite_id)),),
            ),
            QueueSpec(
                wire.interactive_queue(satellite_id),
                wire.jobs_queue_arguments(
                    satellite_id, "classic" if queue_type == "classic" else "quorum"
                ),
                ((wire.jobs_exchange(), wire.interactive_routing_key(satellite_id)),),
            ),
            QueueSpec(
                wire.dead_letter_queue(satellite_id),
                wire.dead_letter_queue_arguments("classic" if classic else "quorum"),
                ((wire.dead_letter_exchange(), wire.jobs_routing_key(satellite_id)),),
            ),
            QueueSpec(
                wire.results_queue(),
                wire.results_queue_arguments(),
                ((wire.results_exchange(), wire.results_binding_key()),),
            ),
        ),
    )


#: Seconds between two `health_file_not_written` warnings while writes keep failing.
HEALTH_WARN_INTERVAL = 60.0
#: Exit code of a test-only crash (poller/testhooks.py).
TEST_CRASH_EXIT = testhooks.CRASH_EXIT


def _worker_name(settings: PollerSettings) -> str:
    """`USM_POLLER_WORKER_NAME`, else a name unique to this process start (poller/identity.py)."""
    return settings.worker_name or default_worker_name()


class Worker:
    """One poller process: a broker connection, a runner, heartbeats, health and signals."""

    def __init__(
        self,
        settings: PollerSettings,
        *,
        drivers: Mapping[str, Driver],
        credentials: CredentialStore,
        health_interval: float = WRITE_INTERVAL,
        forked: Forked | None = None,
        lane_link: LaneLink | None = None,
    ) -> None:
        """`health_interval`: seconds between health-file rewrites besides those on every
        change of the broker state (a test seam; `poller check` allows `health.MAX_AGE`);
        `forked`: the sandbox process forked at start-up for suspect jobs (else the first
        one starts it); `lane_link`: this is a replica's lane process (`poller lane`,
        `poller.laneproc`), consuming only the interactive lane."""
        self._settings = settings
        self.name = _worker_name(settings)
        self._sid = settings.satellite_id
        self._drivers = drivers
        #: While an interactive job is in flight, bulk work waits (for a bounded while).
        self._lane_first = LaneFirst(settings.interactive_pause_ms / 1000)
        #: While the loop is saturated, bulk jobs start at a capped rate (never below one run
        #: slot's worth per second per slot: `concurrency` a second). Not in a replica whose
        #: lane runs in a process of its own: its loop reads no lane delivery to make room for.
        headroom_ms = 0.0 if settings.interactive_process else settings.bulk_headroom_ms
        self._headroom = Headroom(headroom_ms / 1000, floor=float(settings.concurrency))
        self._lane_link = lane_link
        self._lane_process: LaneProcess | None = None
        quarantine = self._quarantine(settings)
        self._runner = Runner(
            drivers=drivers,
            credentials=credentials,
            satellite_id=self._sid,
            worker=self.name,
            concurrency=settings.concurrency,
            per_device_concurrency=settings.per_device_concurrency,
            max_output_bytes=settings.max_output_bytes,
            # With a lane process, no lane job runs here: bulk jobs may take every slot.
            interactive_slots=0 if self._lane_process else settings.effective_interactive_slots,
            quarantine=quarantine,
            # Suspect jobs (delivered this often before) run in a child process each.
            sandbox=Sandbox(settings, slots=settings.sandbox_slots, forked=forked)
            if settings.sandbox_slots
            else None,
            sandbox_after=settings.sandbox_after,
            lane_first=self._lane_first,
            on_settle=lane_link.outcome if lane_link is not None else None,
            on_change=self._lane_process.quarantine_changed if self._lane_process else None,
        )
        urls = settings.amqp_urls
        queue = wire.jobs_queue(self._sid)
        lane_queue: str | None = wire.interactive_queue(self._sid)
        connection_name = f"poller {self._sid} {self.name}"
        prefetch = settings.effective_prefetch
        if lane_link is not None:  # the lane is this process's one queue
            queue, lane_queue = wire.interactive_queue(self._sid), None
            connection_name += " (interactive lane)"
            prefetch = settings.effective_interactive_prefetch
        elif self._lane_process is not None:  # the lane process consumes the lane
            lane_queue = None
        self._broker = Broker(
            urls,
            BrokerOptions(
                connection_name=connection_name,
                heartbeat=settings.heartbeat,
                prefetch=prefetch,
                declare=settings.declare,
                ssl_contexts=settings.ssl_contexts(),
                lane_prefetch=settings.effective_interactive_prefetch,
                lane_connection=settings.interactive_connection,
                publish_timeout=settings.publish_timeout,
                lane_only=lane_link is not None,
                refused_hint=partial(refused_hint, self._sid, declare=settings.declare),
            ),
            queue=queue,
            lane_queue=lane_queue,
            topology=build_topology(self._sid, settings.queue_type),
            on_delivery=self._on_delivery,
            on_state=self._health_changed,
        )
        self._health_interval = health_interval
        #: Health-file writes failed in a row, and when that was last logged (monotonic).
        self._health_failures = 0
        self._health_warned = 0.0
        #: Set when the health file is out of date; the health loop writes it (one write at a
        #: time: changes during a write make one more write, not a pile of them).
        self._health_dirty = asyncio.Event()
        #: Its own thread: a write never waits behind the default executor's calls (name
        #: lookups of devices, which a slow DNS server can hold for seconds each).
        self._health_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-file")
        self._tasks: set[asyncio.Task[None]] = set()
        #: Jobs running in this process by id: whether their result was confirmed, once known.
        #: A redelivered copy of a job still running here (the broker closed the channel it
        #: came on: a `consumer_timeout`, docs/reliability.md scenario 9) waits for that run.
        self._running_ids: dict[str, asyncio.Future[bool]] = {}
        self._stop = asyncio.Event()
        self._draining = False
        self._started_at = wire.now()
        self.in_flight = 0
        self.jobs_ok = 0
        self.jobs_error = 0
        self._loop_lag_ms = 0.0
        prefetch = settings.effective_prefetch
        #: Jobs waiting for a slot (with run slots free) that open the spare consumer, and
        #: those few enough to close it again.
        self._widen_at = max(1, prefetch // 2)
        self._narrow_at = prefetch // 8
        self._spare_prefetch = min(65_535, prefetch * SPARE_WINDOWS)
        self._window_task: asyncio.Task[None] | None = None
        self._spare_since = 0.0
        max_rss_mb = settings.effective_max_rss_mb
        self._recycler = Recycler(
            max_rss_mb * MIB if max_rss_mb else None, settings.max_jobs or None
        )
        #: What the state dir remembers of this replica's earlier recycles (docs/operations.md,
        #: "Memory and recycling"), and this process's own once it decides to recycle.
        self._recycled_before = read_record(settings.state_dir)
        self._recycle: RecycleRecord | None = None
        #: What the memory was when this process decided to recycle (for its log line).
        self._recycle_memory: MemoryUse | None = None
        #: `max_rss_below_start` was logged (once per process).
        self._memory_warned = False

    def _quarantine(self, settings: PollerSettings) -> Quarantine:
        """This process's quarantine; the lane process beside it, when it runs the lane in one
        (`USM_POLLER_INTERACTIVE_PROCESS`), or the replica's mirror when it is that process."""
        after, cooldown = settings.quarantine_after, settings.quarantine_seconds
        longest = settings.quarantine_max_seconds
        if self._lane_link is not None:
            mirrored = MirroredQuarantine(after=after, cooldown=cooldown, max_cooldown=longest)
            self._lane_link.quarantine = mirrored
            return mirrored
        quarantine = Quarantine(after=after, cooldown=cooldown, max_cooldown=longest)
        if settings.interactive_process:
            self._lane_process = LaneProcess(
                settings,
                worker_name=self.name,
                quarantine=quarantine,
                on_outcome=self._lane_outcome,
                on_started=self._warn_if_memory_above_limit,
            )
        return quarantine

    @property
    def broker(self) -> Broker:
        return self._broker

    def request_stop(self, signal_name: str | None = None) -> None:
        """Stop consuming and drain (`signal_name`: the signal that asked, if one did)."""
        if not self._stop.is_set():
            # `starting`: never connected yet; the broker task stops trying at once.
            connected_once = self._broker.connected or self._broker.reconnects > 0
            log.info(
                "shutdown_requested",
                grace_s=self._settings.shutdown_grace,
                phase="running" if connected_once else "starting",
                **({"signal": signal_name} if signal_name else {}),
            )
        self._stop.set()

    async def run(self) -> int:
        """Consume until SIGTERM/SIGINT, then drain; the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        structlog.contextvars.bind_contextvars(satellite_id=self._sid, worker=self.name)
        early = stopsignal.requested()
        if early:
            # Received while the process was starting (poller/stopsignal.py): the same drain.
            self.request_stop(early)
        log.info(
            "poller_started",
            version=__version__,
            queue=self._broker.queue,
            concurrency=self._settings.concurrency,
            prefetch=self._broker.prefetch,
            interactive_queue=self._broker.lane_queue,
            interactive_slots=self._runner.admission.reserved,
            interactive_prefetch=self._settings.effective_interactive_prefetch,
            bulk_headroom_ms=round(self._headroom.target * 1000, 3) or None,
            drivers=sorted(self._drivers),
            max_rss_mb=(self._recycler.max_rss_bytes or 0) // MIB or None,
            max_jobs=self._recycler.max_jobs,
            recycles=self._recycled_before.recycles if self._recycled_before else 0,
            sandbox_pid=self._runner.sandbox.pid if self._runner.sandbox else None,
            interactive_process=self._lane_process is not None or None,
            lane_process=self._lane_link is not None or None,
        )
        # Again once the lane process has started (`on_started`): the limit covers both.
        self._warn_if_memory_above_limit()
        self._headroom.start()
        if self._lane_link is not None:
            await self._lane_link.start(on_gone=partial(self.request_stop, "replica_gone"))
        if self._lane_process is not None:
            self._lane_process.start()
        broker_task = asyncio.create_task(self._broker.run(), name="broker")
        helpers = [
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self._lag_loop(), name="loop-lag"),
        ]
        if self._lane_link is None:  # a lane process is part of its replica, not one more
            helpers.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
            helpers.append(asyncio.create_task(self._window_loop(), name="window"))
        if self._recycler.max_rss_bytes is not None:
            helpers.append(asyncio.create_task(self._recycle_loop(), name="recycle"))
        stop_task = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({broker_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if broker_task in done:
            exc = broker_task.exception()
            log.error("broker_task_died", error=repr(exc))
            code = 1
        if self._recycle is not None:
            await self._recycling(self._recycle)
        await self._shutdown(helpers)
        stop_task.cancel()
        broker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrokerError):
            await broker_task
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stopsignal.install()  # a second SIGTERM until the exit is not fatal either
        log.info("poller_stopped", jobs_ok=self.jobs_ok, jobs_error=self.jobs_error)
        return code

    async def _shutdown(self, helpers: list[asyncio.Task[None]]) -> None:
        self._draining = True
        self._health_changed()
        # The lane process drains beside this one.
        lane_stopped = (
            asyncio.create_task(self._lane_process.stop(), name="lane-process-stop")
            if self._lane_process is not None
            else None
        )
        await self._broker.stop_consuming()
        waiting = self._runner.close()
        self._headroom.stop()  # bulk jobs waiting for their turn go back to the queue now
        if waiting:
            log.info("returning_unstarted_jobs", count=waiting)
        running = set(self._tasks)
        if running:
            log.info("draining", in_flight=len(running), grace_s=self._settings.shutdown_grace)
            _, pending = await asyncio.wait(running, timeout=self._settings.shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("drain_timed_out", returned_to_queue=len(pending))
                await asyncio.wait(pending, timeout=5)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if lane_stopped is not None:
            await lane_stopped
        if self._lane_link is not None:
            await self._lane_link.close()
        await self._broker.close()
        if self._runner.sandbox is not None:
            await self._runner.sandbox.aclose()
        for driver in {id(d): d for d in self._drivers.values()}.values():
            try:
                await asyncio.wait_for(driver.aclose(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway; say what failed
                log.warning("driver_close_failed", error=repr(exc))
        await self._write_health()
        self._health_writer.shutdown(wait=False)

    def _lane_outcome(
        self, device: str, outcome: Outcome, error: str, silent_for: float, timeout: float
    ) -> None:
        """The lane process reported how a job ended for its device."""
        self._runner.settle_reported(device, outcome, error, silent_for, timeout)

    # ------------------------------------------------------------------ deliveries

    def _on_delivery(self, delivery: Delivery) -> None:
        if self._draining:
            self._broker.reject(delivery, requeue=True)
            return
        # An interactive job pauses bulk work from its delivery until it is answered.
        release = self._lane_first.hold() if delivery.interactive else None
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._handle(delivery, release))
        if delivery.interactive:
            first_in_line(loop)  # it starts before the bulk work already scheduled
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._check_window()

    # ------------------------------------------------------------------ the spare window

    def _check_window(self) -> None:
        """Open or close the spare consumer when the jobs waiting for a slot say so."""
        if self._window_task is not None or self._draining or self._lane_link is not None:
            return
        admission = self._runner.admission
        if self._broker.spare_open:
            if (
                admission.waiting <= self._narrow_at
                and time.monotonic() - self._spare_since >= SPARE_MIN_OPEN
            ):
                self._window_task = asyncio.create_task(self._narrow(), name="window-narrow")
        elif admission.waiting >= self._widen_at and admission.bulk_slots_free:
            # Run slots are free, so these jobs wait for their devices, not for capacity (the
            # slots kept for the interactive lane are no capacity for them).
            self._window_task = asyncio.create_task(self._widen(), name="window-widen")

    async def _widen(self) -> None:
        admission = self._runner.admission
        waiting, running = admission.waiting, admission.running
        try:
            opened = await self._broker.open_spare(self._spare_prefetch)
        except (BrokerError, TimeoutError) as exc:
            log.warning("window_change_failed", change="widen", error=str(exc))
            return
        finally:
            self._window_task = None
        if opened:
            self._spare_since = time.monotonic()
            log.info(
                "window_widened",
                waiting=waiting,
                running=running,
                prefetch=self._settings.effective_prefetch,
                spare_prefetch=self._spare_prefetch,
            )

    async def _narrow(self) -> None:
        try:
            await self._broker.close_spare()
        except (BrokerError, TimeoutError) as exc:
            log.warning("window_change_failed", change="narrow", error=str(exc))
            return
        finally:
            self._window_task = None
        log.info("window_narrowed", waiting=self._runner.admission.waiting)

    async def _window_loop(self) -> None:
        while True:
            await asyncio.sleep(WINDOW_CHECK_INTERVAL)
            self._check_window()

    async def _handle(self, delivery: Delivery, release: Callable[[], None] | None) -> None:
        started = time.monotonic()
        started_at = wire.now()
        self.in_flight += 1
        try:
            await self._process(delivery, started, started_at)
        except NotStarted:
            self._broker.reject(delivery, requeue=True)
            log.info("job_returned_to_queue", job_id=delivery.message_id, reason="shutdown")
        except asyncio.CancelledError:
            self._broker.reject(delivery, requeue=True)
            log.warning("job_returned_to_queue", job_id=delivery.message_id, reason="shutdown")
            raise
        finally:
            if release is not None:
                release()
            self.in_flight -= 1
            if self._recycler.jobs_reached(self.jobs_ok + self.jobs_error):
                self._begin_recycle("jobs")

    async def _process(self, delivery: Delivery, started: float, started_at: datetime) -> None:
        if not delivery.interactive:
            if self._headroom.target:  # off: no coroutine per job
                await self._headroom.bulk_turn()
            if self._lane_first.paused:
                await self._lane_first.bulk_turn()
        try:
            job = wire.decode_job(delivery.body, max_bytes=self._settings.max_job_bytes)
        except WireError as exc:
            await self._dead_letter(delivery, exc, started, started_at)
            return
        count = delivery.delivery_count
        attempt = Attempt(count + 1, delivery.redelivered or count > 0 or delivery.resent)
        # Each delivery runs in its own task, whose context copy dies with it: bind, no reset.
        _bind_job(job.id, job.kind, job.target.host, attempt.number)
        if attempt.redelivered and await self._joined(delivery, job.id):
            return
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._running_ids.setdefault(job.id, outcome)
        confirmed = False
        try:
            try:
                result = await self._runner.run(job, attempt, interactive=delivery.interactive)
            except NotStarted:
                raise
            except WorkerCrashedError as exc:
                # A suspect job killed its sandbox child: only this job is blamed.
                await self._on_bug(delivery, job, attempt, started, started_at, crashed=str(exc))
                return
            except Exception:
                log.exception("job_crashed")
                await self._on_bug(delivery, job, attempt, started, started_at)
                return
            confirmed = await self._deliver(delivery, result)
        finally:
            if self._running_ids.get(job.id) is outcome:
                del self._running_ids[job.id]
            outcome.set_result(confirmed)

    async def _joined(self, delivery: Delivery, job_id: str) -> bool:
        """Whether this redelivered job was answered by a run of it still going on here when it
        came back: then it is acked once that run's result is confirmed, and not run again."""
        running = self._running_ids.get(job_id)
        if running is None:
            return False
        if not await asyncio.shield(running):
            return False  # that run's result was not confirmed: run it again
        self._broker.ack(delivery)
        self.jobs_ok += 1
        log.info("job_finished", job_id=job_id, outcome="answered_by_earlier_run")
        return True

    async def _on_bug(
        self,
        delivery: Delivery,
        job: wire.JobRequest,
        attempt: Attempt,
        started: float,
        started_at: datetime,
        *,
        crashed: str | None = None,
    ) -> None:
        """Requeue; on the last delivery the queue allows, answer and dead-letter instead.

        `crashed`: the job killed the sandbox child that ran it (how, in words): the code is
        `worker_crashed` instead of `internal_error`."""
        counted = "x-delivery-count" in delivery.headers
        last = attempt.number >= wire.DEFAULT_DELIVERY_LIMIT if counted else attempt.redelivered
        code = "internal_error" if crashed is None else WorkerCrashedError.code
        if not last:
            self._broker.reject(delivery, requeue=True)
            log.info(
                "job_finished",
                outcome="requeued",
                error_code=code,
                duration_ms=_ms(started),
            )
            return
        if crashed is None:
            message = "the poller failed on this job on every attempt; see its logs"
        else:
            message = (
                "the process running this job died on every attempt (the last time: "
                f"{crashed}); see the poller's logs"
            )
        result = error_result(
            job_id=job.id,
            kind=job.kind,
            satellite_id=self._sid,
            worker=self.name,
            code=code,
            message=message,
            attempt=attempt,
            started_at=started_at,
            started_monotonic=started,
            meta=job.meta,
        )
        await self._deliver(delivery, result, dead_letter=True)

    async def _dead_letter(
        self, delivery: Delivery, exc: WireError, started: float, started_at: datetime
    ) -> None:
        job_id = exc.job_id or delivery.message_id
        attempt = Attempt(delivery.delivery_count + 1, delivery.redelivered or delivery.resent)
        if job_id:
            result = error_result(
                job_id=job_id[: wire.MAX_JOB_ID_CHARS],
                kind=exc.kind or "unknown",
                satellite_id=self._sid,
                worker=self.name,
                code=exc.error_code,
                message=exc.message,
                attempt=attempt,
                started_at=started_at,
                started_monotonic=started,
            )
            await self._deliver(delivery, result, dead_letter=True)
            return
        self._broker.reject(delivery, requeue=False)
        self.jobs_error += 1
        log.warning(
            "job_finished",
            outcome="dead_lettered",
            error_code=exc.error_code,
            reason=exc.message,
            bytes=len(delivery.body),
            duration_ms=_ms(started),
        )

    async def _deliver(
        self, delivery: Delivery, result: wire.JobResult, *, dead_letter: bool = False
    ) -> bool:
        """Publish the result, wait for its confirm, then ack (or dead-letter) the job; whether
        the result was confirmed. A bulk result waits while the lane goes first."""
        if self._lane_first.paused and not delivery.interactive:
            await self._lane_first.bulk_turn()
        try:
            try:
                await self._publish_result(result, delivery)
            except BrokerUnavailableError:
                # The channel or connection went before the confirm (a `consumer_timeout`
                # closes it): the answer is in hand, so it is published again on the next
                # channel instead of running the job again. The broker may have kept the first
                # copy: this one is flagged `redelivered`.
                if not await self._channel_back():
                    raise
                result = result.model_copy(update={"redelivered": True})
                log.info("result_published_again", job_id=result.job_id)
                await self._publish_result(result, delivery)
        except UnroutableError:
            if delivery.reply_to:
                # The caller's reply queue is gone: nobody is waiting for this answer.
                log.warning("result_unroutable", job_id=result.job_id, reply_to=delivery.reply_to)
            else:
                log.error(
                    "result_unroutable",
                    job_id=result.job_id,
                    hint="no queue is bound to usm_poller.results for this routing key",
                )
                self._broker.reject(delivery, requeue=True)
                return False
        except BrokerError as exc:
            log.warning("result_not_confirmed", job_id=result.job_id, error=str(exc))
            self._broker.reject(delivery, requeue=True)
            return False
        crash_p = testhooks.CRASH_AFTER_CONFIRM
        if crash_p and random.random() < crash_p:  # noqa: S311
            testhooks.crash("crash_after_confirm", result.job_id)  # test-only hook
        if dead_letter:
            self._broker.reject(delivery, requeue=False)
        else:
            self._broker.ack(delivery)
        error = result.error
        if error is None:
            self.jobs_ok += 1
        else:
            self.jobs_error += 1
        log.info(
            "job_finished",
            job_id=result.job_id,
            kind=result.kind,
            outcome="dead_lettered" if dead_letter else result.status,
            error_code=error.code if error else None,
            duration_ms=result.duration_ms,
            **({"error": error.message} if error else {}),
        )
        return True

    async def _channel_back(self) -> bool:
        """Wait (at most `publish_timeout`) until the broker consumes on a new channel."""
        deadline = time.monotonic() + self._settings.publish_timeout
        await asyncio.sleep(0.05)  # let the broker task see the channel go
        while not self._broker.consuming:
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            await asyncio.sleep(0.1)
        return True

    def _publish_result(self, result: wire.JobResult, delivery: Delivery) -> asyncio.Future[None]:
        """Publish the result now; the future resolves on its confirm."""
        kind = result.kind if result.kind in _SAFE_KIND else "unknown"
        if delivery.reply_to:
            key = wire.reply_routing_key(self._sid, delivery.reply_to)
        else:
            key = wire.result_routing_key(self._sid, kind)
        props = amqp_properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=result.job_id,
            correlation_id=delivery.correlation_id,
            type=result.kind,
            user_id=self._broker.username,
            timestamp=int(time.time()),
            headers={
                "x-satellite-id": self._sid,
                wire.LANE_HEADER: "interactive" if delivery.interactive else "bulk",
            },
        )
        return self._broker.publish(
            wire.results_exchange(),
            key,
            wire.encode(result),
            props,
            interactive=delivery.interactive,
        )

    # ------------------------------------------------------------------ background loops

    async def _heartbeat_loop(self) -> None:
        interval = self._settings.heartbeat_interval
        last_jobs, last_t = 0, time.monotonic()
        while True:
            await self._broker.wait_ready(timeout=interval)
            jobs = self.jobs_ok + self.jobs_error
            t = time.monotonic()
            rate = (jobs - last_jobs) / max(t - last_t, 1e-6)
            last_jobs, last_t = jobs, t
            if self._broker.connected:
                self._send_heartbeat(rate)
            await asyncio.sleep(interval)

    def _send_heartbeat(self, jobs_per_s: float) -> None:
        beat = wire.Heartbeat(
            satellite_id=self._sid,
            worker=self.name,
            version=__version__,
            hostname=socket.gethostname(),
            started_at=self._started_at,
            sent_at=wire.now(),
            concurrency=self._settings.concurrency,
            # Running jobs (holding a run slot), not the ones waiting for a slot: the core's
            # replica advice divides this by jobs/s to get the service time.
            in_flight=self._runner.admission.running,
            jobs_ok=self.jobs_ok,
            jobs_error=self.jobs_error,
            jobs_per_s=round(jobs_per_s, 2),
            loop_lag_ms=round(self._loop_lag_ms, 2),
            rss_bytes=self._memory().total,
            quarantine=self._runner.quarantine.entries(),
            recycles=self._recycled_before.recycles if self._recycled_before else 0,
            last_recycle=self._recycled_before.reason if self._recycled_before else None,
        )
        props = amqp_properties(
            content_type="application/json",
            delivery_mode=1,
            type="heartbeat",
            user_id=self._broker.username,
            timestamp=int(time.time()),
            headers={"x-satellite-id": self._sid},
        )
        try:
            future = self._broker.publish_nowait(
                wire.events_exchange(),
                wire.heartbeat_routing_key(self._sid),
                wire.encode(beat),
                props,
                mandatory=False,
            )
        except BrokerError:
            return
        future.add_done_callback(_ignore_outcome)

    async def _recycle_loop(self) -> None:
        """Recycle once the RSS passes `USM_POLLER_MAX_RSS_MB` (looked at every second)."""
        while not self._stop.is_set():
            await asyncio.sleep(RECYCLE_CHECK_INTERVAL)
            reason = self._recycler.reason(
                rss_bytes=self._memory().total, jobs=self.jobs_ok + self.jobs_error
            )
            if reason is not None:
                self._begin_recycle(reason)

    def _begin_recycle(self, reason: str) -> None:
        """Stop as on SIGTERM: `run` says why, drains and returns 0."""
        if self._stop.is_set():
            return
        memory, jobs = self._memory(), self.jobs_ok + self.jobs_error
        self._recycle = RecycleRecord.next(self._recycled_before, reason, memory.total, jobs)
        self._recycle_memory = memory
        self._stop.set()

    def _memory(self) -> MemoryUse:
        """What recycling counts: this process's RSS and what its lane process (when this
        replica runs one) holds for itself; both are charged to the container's limit."""
        lane = self._lane_process
        return MemoryUse(rss_bytes(), private_bytes(lane.pid) if lane is not None else 0)

    def _warn_if_memory_above_limit(self) -> None:
        """`max_rss_below_start`, once: this replica would recycle right after its first job,
        every time. Looked at when it starts, and when its lane process has started."""
        max_rss = self._recycler.max_rss_bytes
        if max_rss is None or self._memory_warned:
            return
        memory = self._memory()
        if memory.total > max_rss:
            self._memory_warned = True
            log.warning(
                "max_rss_below_start",
                max_rss_mb=max_rss // MIB,
                **memory.log_fields(lane=self._lane_process is not None),
            )

    async def _recycling(self, record: RecycleRecord) -> None:
        """The one line that says why, and the record for this replica's next process."""
        max_rss = self._recycler.max_rss_bytes
        memory = self._recycle_memory or MemoryUse(record.rss_bytes)
        log.info(
            "recycling",
            reason=record.reason,
            **memory.log_fields(lane=self._lane_process is not None),
            max_rss_mb=max_rss // MIB if max_rss else None,
            jobs=record.jobs,
            max_jobs=self._recycler.max_jobs,
            recycles=record.recycles,
            grace_s=self._settings.shutdown_grace,
        )
        state_dir = self._settings.state_dir
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._health_writer, write_record, state_dir, record
            )
        except OSError as exc:
            log.warning("recycle_record_not_written", path=str(state_dir), error=exc.strerror)

    def _health_changed(self) -> None:
        """The broker state (or draining) changed: have the health loop write the file now."""
        self._health_dirty.set()

    async def _health_loop(self) -> None:
        """Write the health file on every state change, and every `health_interval` seconds."""
        while True:
            self._health_dirty.clear()
            await self._write_health()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval):
                    await self._health_dirty.wait()

    async def _write_health(self) -> None:
        state = HealthState(
            pid=os.getpid(),
            connected=self._broker.connected,
            consuming=self._broker.consuming and not self._draining,
            updated=time.time(),
            in_flight=self.in_flight,
            tasks=len(asyncio.all_tasks()),
            lane_pid=self._lane_process.pid if self._lane_process is not None else None,
            broker_error=None if self._broker.connected else self._broker.last_error,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._health_writer, write_state, self._settings.health_path, state
            )
        except OSError as exc:
            self._health_failed(exc)
        else:
            if self._health_failures:
                log.info(
                    "health_file_written_again",
                    path=str(self._settings.health_path),
                    failures=self._health_failures,
                )
                self._health_failures = 0

    def _health_failed(self, exc: OSError) -> None:
        """`health_file_not_written` at the first failure, then once a minute while it lasts
        (the file is rewritten every 2 s: a full disk would be a warning every 2 s)."""
        self._health_failures += 1
        now = time.monotonic()
        if self._health_failures > 1 and now - self._health_warned < HEALTH_WARN_INTERVAL:
            return
        self._health_warned = now
        log.warning(
            "health_file_not_written",
            path=str(self._settings.health_path),
            error=exc.strerror,
            failures=self._health_failures,
        )

    async def _lag_loop(self) -> None:
        """Event-loop lag: how late a short sleep wakes up (reported in heartbeats)."""
        period = 0.5
        while True:
            t = time.monotonic()
            await asyncio.sleep(period)
            lag = (time.monotonic() - t - period) * 1000
            self._loop_lag_ms = max(lag, 0.0) * 0.3 + self._loop_lag_ms * 0.7


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not warn about it


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


async def run_worker(
    settings: PollerSettings, *, forked: Forked | None = None, lane_fd: int | None = None
) -> int:
    """Build the worker from the settings and run it to completion; `forked`: the sandbox
    process forked at start-up (poller/sandbox.py); `lane_fd`: this is a replica's lane
    process, talking with it on that socket (poller/laneproc.py)."""
    credentials = CredentialStore.load(settings.credentials_file)
    drivers = build_drivers(settings)
    worker = Worker(
        settings,
        drivers=drivers,
        credentials=credentials,
        forked=forked,
        lane_link=LaneLink(lane_fd) if lane_fd is not None else None,
    )
    return await worker.run()


def stopped_while_starting(settings: PollerSettings, phase: str) -> int:
    """A SIGTERM/SIGINT arrived before the event loop (`phase`: the last step done): one
    line, nothing taken from the broker, exit 0 (poller/stopsignal.py)."""
    structlog.contextvars.bind_contextvars(
        satellite_id=settings.satellite_id, worker=_worker_name(settings)
    )
    log.info(
        "shutdown_requested",
        grace_s=settings.shutdown_grace,
        phase="starting",
        signal=stopsignal.requested(),
        step=phase,
    )
    return 0


def refused_hint(satellite_id: str, refusal: Refusal, *, declare: bool) -> str:
    """What an operator checks when the broker refuses this poller (`broker_refused`)."""
    sid = f"USM_POLLER_SATELLITE_ID={satellite_id} (its queue is {refusal.queue})"
    if refusal.login:
        return (
            f"the user name ({refusal.user!r}) and password in US_AMQP_DSN: the broker refused "
            "the login (its log says why)"
        )
    if refusal.vhost_refused:
        return (
            f"the vhost in US_AMQP_DSN ({refusal.vhost!r}: the path after the port, %2F for "
            f"'/'): it must exist, and user {refusal.user!r} needs permissions on it "
            f"(satellite provision {satellite_id} on the core)"
        )
    if refusal.code == 404:
        fix = (
            "declare it from the core (satellite declare "
            f"{satellite_id}) or let the poller declare it (USM_POLLER_DECLARE=true)"
            if not declare
            else f"declare it from the core (satellite declare {satellite_id})"
        )
        return f"{sid}: is this the satellite id the core declared? The queue is missing: {fix}"
    owner = refusal.user.removeprefix("sat-") if refusal.user.startswith("sat-") else None
    if owner and owner != satellite_id:
        # `satellite provision ID` names the user sat-ID: this one belongs to another satellite.
        return (
            f"{sid}: user {refusal.user!r} is the user `satellite provision` made for satellite "
            f"{owner!r}: is USM_POLLER_SATELLITE_ID mistyped (={owner}?), or is US_AMQP_DSN "
            "another satellite's?"
        )
    return (
        f"{sid}: is this the satellite id this broker user was provisioned for? And may user "
        f"{refusal.user!r} read that queue (satellite provision {satellite_id} on the core gives "
        "a satellite's user its permissions)"
    )
