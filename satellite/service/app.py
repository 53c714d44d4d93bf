"""Composition root of `satellite serve`: settings → store (migrated) → broker → ingest → HTTP.

The only place that builds objects from settings. `Core.start()` opens the history store (and
migrates it), starts the ingest of `usm_poller.history`, this replica's reply queue (which also
publishes jobs) and the housekeeping loop (overdue sweep, retention); `create_app()` builds the
FastAPI application over them; `run()` serves it on `USM_CORE_LISTEN` until SIGTERM or SIGINT
and then stops in order: stop listening and finish the requests in flight, commit and ack what
was ingested, close the broker connections and the store; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI

from poller import __version__, stopsignal
from poller.broker import BrokerOptions
from poller.errors import ConfigError
from poller.logging import configure_logging, get_logger
from poller.wire import JobResult
from satellite.service.alerts import AlertEngine, AlertsConfig, fleet_facts, load_alerts_file
from satellite.service.api import alerts as alerts_api
from satellite.service.api import health, jobs, satellites
from satellite.service.api import metrics as metrics_api
from satellite.service.api import schedules as schedules_api
from satellite.service.api.access import AccessLog
from satellite.service.api.problems import install_problem_handlers
from satellite.service.deadletters import DeadLetters
from satellite.service.fleet import FleetWatch
from satellite.service.ingest import Ingest, ingest_prefetch
from satellite.service.jobs import JobService, Waiters
from satellite.service.listen import ApiServer, bind_all, close_all, parse_listen
from satellite.service.metrics import ServiceMetrics
from satellite.service.notify import Sender, SenderCollector
from satellite.service.replies import Replies
from satellite.service.scheduler import ScheduleFile, Scheduler
from satellite.service.settings import CoreSettings, unknown_variables
from satellite.service.store import Store
from satellite.service.tokens import TokensFile
from satellite.service.web import pages as web_pages

__all__ = ["Core", "create_app", "replica_name", "run"]

log = get_logger("satellite.service")

#: Seconds between overdue sweeps, and between retention passes.
OVERDUE_EVERY = 15.0
RETENTION_EVERY = 3600.0
#: The SIGTERM budget (DESIGN §10: exit within 30 s): requests in flight, then the ingest.
HTTP_DRAIN_SECONDS = 18.0
INGEST_DRAIN_SECONDS = 5.0
#: How long after the stop request a notification attempt under way may take to end and be
#: archived (the sender's HTTP timeout is 10 s); it is cancelled after that.
SENDER_DRAIN_SECONDS = 10.0
#: On SIGTERM while the store is being opened and migrated: how long that may go on before it
#: is cancelled (as `migrate`'s own timeout would: the migration's transaction is rolled back).
START_STOP_SECONDS = 2.0
#: The `declare_refused` advice for the service's own broker user (the poller's says
#: USM_POLLER_DECLARE, which means nothing here): without its queues it can neither ingest
#: nor answer `Prefer: wait`, and it declares nothing more until it is restarted.
DECLARE_REFUSED_HINT = (
    "the core's broker user may not declare (403): satellite serve declares its own queues "
    "(usm_poller.history, usm_poller.core-reply.<replica>) and binds them to the exchanges; "
    "give this user the core's permissions on the vhost (configure, write and read: "
    "rabbitmqctl set_permissions -p <vhost> <user> '.*' '.*' '.*'), then restart the service"
)


def replica_name() -> str:
    """This process's name among the replicas: host, pid and a random part (one word)."""
    host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())[:32]
    return f"{host or 'core'}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Core:
    """Everything one replica runs besides HTTP."""

    settings: CoreSettings
    store: Store
    ingest: Ingest
    replies: Replies
    jobs: JobService
    waiters: Waiters
    replica: str
    metrics: ServiceMetrics
    fleet: FleetWatch
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    # Schedules (docs/design.md §11): None without USM_CORE_SCHEDULES_FILE.
    scheduler: Scheduler | None = None
    scheduler_task: asyncio.Task[None] | None = None
    alerts_config: AlertsConfig = field(default_factory=AlertsConfig)
    sender: Sender | None = None
    #: When the sender must have ended (the event loop's clock), once a stop was requested.
    sender_stop_by: float | None = None

    @classmethod
    async def start(cls, settings: CoreSettings, *, replica: str | None = None) -> Core:
        """Open the store (migrating it) and start ingest, replies and housekeeping."""
        replica = replica or replica_name()
        schedules = None
        if settings.schedules_file is not None:
            schedules = ScheduleFile(settings.schedules_file)
            if not await asyncio.to_thread(schedules.load):
                first = schedules.problems[0] if schedules.problems else ""
                raise ConfigError(f"USM_CORE_SCHEDULES_FILE: refused: {first}")
        alerts_config = await asyncio.to_thread(load_alerts_file, settings.alerts_file)
        store = await Store.open(settings.database)
        broker = settings.broker()
        urls = list(broker.urls)
        context = broker.ssl_context()
        contexts = {n: context for n, url in enumerate(urls) if url.tls and context is not None}
        waiters = Waiters()
        stats_holder: list[ServiceMetrics] = []

        def committed(results: list[JobResult]) -> None:
            waiters.notify(results)
            for metrics in stats_holder:
                metrics.on_committed(results)

        ingest = Ingest(
            store,
            urls,
            BrokerOptions(
                connection_name=f"satellite-serve {replica} ingest",
                prefetch=ingest_prefetch(settings.ingest_batch),
                declare_refused_hint=DECLARE_REFUSED_HINT,
                ssl_contexts=contexts,
            ),
            batch=settings.ingest_batch,
            linger=settings.ingest_linger_ms / 1000,
            on_committed=committed,
        )
        metrics = ServiceMetrics(
            ingest.stats, backlog=lambda: ingest.backlog, waiting=waiters.__len__
        )
        stats_holder.append(metrics)
        replies = Replies(
            urls,
            BrokerOptions(
                connection_name=f"satellite-serve {replica} api",
                prefetch=256,
                declare_refused_hint=DECLARE_REFUSED_HINT,
                ssl_contexts=contexts,
            ),
            replica=replica,
            waiters=waiters,
        )
        service = JobService(
            store, replies.broker, waiters, reply_queue=replies.queue, metrics=metrics
        )
        fleet = FleetWatch(broker, settings.management())
        fleet.start()
        core = cls(settings, store, ingest, replies, service, waiters, replica, metrics, fleet)
        core.tasks = [
            asyncio.create_task(ingest.run(), name="ingest"),
            asyncio.create_task(replies.broker.run(), name="replies"),
            asyncio.create_task(core._housekeeping(), name="housekeeping"),
        ]
        if schedules is not None:
            core.scheduler = Scheduler(store.engine, replies.broker, schedules, replica=replica)
            core.scheduler_task = asyncio.create_task(core.scheduler.run(), name="scheduler")
        # Alerts (issue 18): rules evaluated by every replica, one per slot; the outbox sender.
        core.alerts_config = alerts_config
        # The sender sleeps until this replica queues a notification (or a row falls due, or
        # its fallback poll: another replica's notifications), rather than polling each second.
        queued = asyncio.Event()
        alerts = AlertEngine(
            store.engine,
            alerts_config,
            fleet_facts(fleet, store.engine, alerts_config.rules),
            replica=replica,
            interval=settings.alert_interval,
            on_queued=queued.set,
        )
        sender = Sender(
            store.engine,
            alerts_config,
            replica=replica,
            retry_base=settings.alert_retry_base,
            retention_days=settings.retention_days,
            wakeup=queued,
        )
        metrics.registry.register(SenderCollector(sender))
        core.sender = sender
        core.tasks += [
            asyncio.create_task(alerts.run(), name="alerts"),
            asyncio.create_task(sender.run(), name="notify"),
        ]
        return core

    async def readiness(self) -> dict[str, bool]:
        store_ok = await self.store.ping(timeout=3.0)
        return {
            "store": store_ok,
            "broker": self.replies.broker.connected and self.ingest.broker.consuming,
        }

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time() + 60.0
        while True:
            await asyncio.sleep(OVERDUE_EVERY)
            try:
                overdue = await self.store.mark_overdue(self.settings.overdue_grace)
                if overdue:
                    log.info("jobs_overdue", count=overdue)
                self.metrics.overdue = await self.store.count_status("overdue")
                if loop.time() >= next_purge:
                    purged = await self.store.purge(self.settings.retention_days)
                    log.info("history_purged", rows=purged, days=self.settings.retention_days)
                    # A pass that ran out of time goes on at the next sweep, not in an hour.
                    pending = self.store.purge_pending
                    next_purge = loop.time() + (0.0 if pending else RETENTION_EVERY)
            except Exception as exc:  # noqa: BLE001 - housekeeping must outlive a bad moment
                log.warning("housekeeping_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def finish_notifying(self) -> None:
        """Let the notification attempt under way end and be archived, start no other (called
        on SIGTERM, before the requests in flight are drained, and by `stop()`)."""
        if self.sender is not None and self.sender_stop_by is None:
            self.sender_stop_by = asyncio.get_running_loop().time() + SENDER_DRAIN_SECONDS
            self.sender.stop()

    async def stop(self) -> None:
        """Commit and ack what was ingested, let the notification under way be archived, close
        both connections and the store."""
        ingest_task, _replies, housekeeping, *alerting = self.tasks
        self.finish_notifying()
        housekeeping.cancel()
        if self.scheduler_task is not None:
            self.scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.scheduler_task
        evaluator, *sending = alerting
        evaluator.cancel()
        await self.ingest.stop(timeout=INGEST_DRAIN_SECONDS)
        try:
            async with asyncio.timeout(INGEST_DRAIN_SECONDS):
                await asyncio.shield(ingest_task)
        except TimeoutError:
            log.warning("ingest_drain_timed_out", left=self.ingest.backlog)
            ingest_task.cancel()
        if sending and self.sender_stop_by is not None:
            left = self.sender_stop_by - asyncio.get_running_loop().time()
            _, late = await asyncio.wait(sending, timeout=max(0.0, left))
            if late:
                log.warning("notification_cancelled_at_stop", waited_s=SENDER_DRAIN_SECONDS)
        await self.ingest.close(timeout=2.0)
        await self.replies.broker.close(timeout=2.0)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.fleet.stop, 2.0)
        await self.store.close()
        log.info("core_stopped", results_ingested=self.ingest.stats.results)


def create_app(core: Core, *, tokens: TokensFile | None = None) -> FastAPI:
    """The HTTP API v1 over a started `Core`; `tokens` authenticates TCP (and unix on `token`)."""
    app = jobs.LeanSubmitApp(
        title="satellite serve",
        summary="Jobs for the satellite pollers over HTTP, and their history",
        version=__version__,
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    install_problem_handlers(app)
    app.add_middleware(AccessLog)
    app.include_router(health.router)
    app.include_router(jobs.router)
    jobs.install_lean_submit(app)  # the hot endpoint in front of FastAPI's stack
    app.include_router(satellites.router)
    app.include_router(metrics_api.router)
    app.include_router(alerts_api.router)
    app.state.store = core.store
    app.state.alerts_config = core.alerts_config
    web_pages.install(app)  # the fleet page at / (DESIGN §12)
    app.state.jobs = core.jobs
    app.state.metrics = core.metrics
    app.state.dead_letters = DeadLetters(core.settings.broker())
    app.state.fleet = core.fleet
    app.state.readiness = core.readiness
    app.state.tokens = tokens
    app.state.unix_auth = core.settings.unix_auth
    app.include_router(schedules_api.router)
    app.state.scheduler = core.scheduler
    return app


class _StopRequest:
    """SIGTERM/SIGINT for `run`: recorded from the first line of `satellite serve`
    (poller/stopsignal.py), then by the event loop; `on_stop` once the server is up."""

    def __init__(self) -> None:
        self.signal = stopsignal.requested()
        self.event = asyncio.Event()
        if self.signal:
            self.event.set()
        self.on_stop: Callable[[], None] | None = None

    def __call__(self, signal_name: str) -> None:
        if self.signal is None:
            self.signal = signal_name
        self.event.set()
        if self.on_stop is not None:
            self.on_stop()

    def stopped_while_starting(self, step: str) -> int:
        """One line (`phase: starting`, `step`: the last one done), then exit 0."""
        log.info("shutdown_requested", phase="starting", signal=self.signal, step=step)
        return 0


async def run(settings: CoreSettings) -> int:
    """Serve until SIGTERM/SIGINT; the exit code (0 after a clean stop, also when the signal
    arrives while it is still starting).

    Raises `ConfigError` (exit 2) for an address that cannot be listened on or a tokens file
    that cannot be read, before anything connects.
    """
    configure_logging(settings.log_format, settings.log_level)
    for name, nearest in unknown_variables():
        log.warning("unknown_setting_ignored", variable=name, did_you_mean=nearest)
    loop = asyncio.get_running_loop()
    request = _StopRequest()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request, sig.name)
    try:
        return await _run(settings, request)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stopsignal.install()  # a second SIGTERM until the exit is not fatal either


async def _start_core(settings: CoreSettings, request: _StopRequest) -> Core | None:
    """`Core.start`, or None when a stop is requested first: a start-up already under way
    (migrations) gets `START_STOP_SECONDS` to end, then is cancelled."""
    starting = asyncio.create_task(Core.start(settings), name="core-start")
    stopping = asyncio.create_task(request.event.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        await asyncio.wait({starting}, timeout=START_STOP_SECONDS)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return None
    core = starting.result()
    if request.signal is not None:
        await core.stop()
        return None
    return core


async def _run(settings: CoreSettings, request: _StopRequest) -> int:
    if request.signal:
        return request.stopped_while_starting("settings")
    tokens = TokensFile(settings.tokens_path)
    await asyncio.to_thread(tokens.load)
    sockets = await asyncio.to_thread(bind_all, parse_listen(settings.listen))
    try:
        core = await _start_core(settings, request)
    except (OSError, TimeoutError, sa.exc.SQLAlchemyError) as exc:
        close_all(sockets)
        # The store could not be opened or migrated: one line, no URL (it may hold a password).
        cause = getattr(exc, "orig", None) or exc
        log.error(
            "core_start_failed",
            db=settings.database.masked,
            error=f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[
                :300
            ],
        )
        return 1
    except BaseException:
        close_all(sockets)
        raise
    if core is None:
        close_all(sockets)
        return request.stopped_while_starting("store")
    log.info(
        "core_started",
        replica=core.replica,
        db=settings.database.masked,
        listen=settings.listen,
        version=__version__,
    )
    server = ApiServer(
        create_app(core, tokens=tokens), sockets, shutdown_timeout=HTTP_DRAIN_SECONDS
    )

    def stop() -> None:
        server.stop()
        core.waiters.close()  # waiting requests answer now (202), not cancelled at the drain
        core.finish_notifying()  # alongside the drain: an attempt under way gets archived

    request.on_stop = stop
    if request.signal is not None:  # between the start and now
        stop()
    try:
        await server.serve()
    finally:
        await core.stop()
    return 0
