"""`Client`: the Python API of the core side (declare satellites, submit jobs, call them).

One kombu connection per client, failing over between the DSN's URLs; every broker wait is
bounded (connect, each round trip, each publisher confirm, each result wait). A client is not
thread-safe: use one per thread.

```python
with Client(load_core_settings()) as client:
    client.declare(["7"])
    job = build_job("snmp.get", target={"host": "10.0.0.1"},
                    auth={"version": "2c", "community": "public"},
                    params={"oids": ["1.3.6.1.2.1.1.5.0"]})
    result = client.call("7", job, timeout=15)
```
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import kombu as _kombu
from kombu.exceptions import OperationalError

from poller.errors import BrokerError, BrokerUnavailableError
from poller.wire import JobRequest, JobResult, Lane, dead_letter_queue, results_queue
from satellite.bulk import DEFAULT_WINDOW, BulkPublisher, BulkReport, Progress
from satellite.config import CoreSettings, load_core_settings
from satellite.dispatch import (
    JobPublisher,
    NoResultError,
    ReplyQueue,
    SenderCheck,
    SenderPolicy,
    cli_correlation_id,
)
from satellite.dlq import (
    DeadLetter,
    ReplayReport,
    purge_dead_letters,
    read_dead_letters,
    replay_dead_letters,
)
from satellite.results import ResultReader
from satellite.status import FleetView, HeartbeatListener
from satellite.topology import (
    NOT_FOUND,
    DeclareReport,
    NotDeclaredError,
    QueueType,
    core_topology,
    declare_topology,
)

__all__ = ["CALL_MARGIN_SECONDS", "Client"]

log = logging.getLogger(__name__)
#: kombu is only partly annotated (untyped calls fail `mypy --strict`): used through `Any`.
kombu: Any = _kombu
T = TypeVar("T")

#: How much longer than the job's own deadline `call` waits by default.
CALL_MARGIN_SECONDS = 10.0
#: Seconds between connect attempts: doubling from the first up to the last.
CONNECT_RETRY_START = 0.5
CONNECT_RETRY_MAX = 4.0
#: A connection still not made after this many seconds is announced (once).
CONNECT_NOTICE_AFTER = 1.0


def _is_refused_login(exc: BaseException) -> bool:
    """A login or vhost the broker refused: trying again cannot help."""
    return getattr(exc, "reply_code", None) in (403, 530) or "ACCESS_REFUSED" in str(exc)


class _ConnectNotice:
    """Says once that connecting takes a while (or failed once and is retried), then quiet.

    A later failure is reported only when its reason differs from the last one reported.
    """

    def __init__(self, where: str, timeout: float) -> None:
        self._where = where
        self._timeout = timeout
        self._said = False
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(CONNECT_NOTICE_AFTER, self._slow)
        self._timer.daemon = True
        self._timer.start()

    def _slow(self) -> None:
        with self._lock:
            if not self._said:
                self._said = True
                log.warning(
                    "connecting to %s (giving up after %g s: --connect-timeout)...",
                    self._where,
                    self._timeout,
                )

    def failed(self, reason: str) -> None:
        with self._lock:
            if reason == self._reason:
                return
            first = not self._said
            self._said, self._reason = True, reason
        if first:
            log.warning(
                "cannot connect to %s yet: %s; retrying for up to %g s (--connect-timeout)",
                self._where,
                reason,
                self._timeout,
            )
        else:
            log.warning("still cannot connect to %s: %s; retrying", self._where, reason)

    def cancel(self) -> None:
        self._timer.cancel()


class Client:
    """A connection to the core's broker; use as a context manager (or call `close()`)."""

    def __init__(
        self,
        settings: CoreSettings | str | None = None,
        *,
        queue_type: QueueType = "quorum",
        sender_check: SenderCheck | None = None,
    ) -> None:
        """`settings` may be a DSN string; None reads `US_AMQP_DSN`. Nothing connects yet.

        `sender_check` decides which results and heartbeats are believed; the default is
        `SenderPolicy` trusting the satellite's own `sat-<id>` user and this client's own
        broker user.
        """
        if settings is None or isinstance(settings, str):
            settings = load_core_settings(settings)
        self.settings = settings
        self.queue_type: QueueType = queue_type
        self.sender_check: SenderCheck = sender_check or SenderPolicy.trusting(settings.username)
        self._conn: Any = None
        self._publisher: JobPublisher | None = None
        self._reply: ReplyQueue | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> Self:
        """Connect to the first node that answers; raise `BrokerUnavailableError`."""
        self._connection()
        return self

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._publisher = None
        self._reply = None
        if conn is not None:
            self._close_quietly(conn)

    @property
    def connected_to(self) -> str | None:
        """The node in use, password masked; None when not connected."""
        if self._conn is None or not self._conn.connected:
            return None
        return str(self._conn.as_uri())

    # ----------------------------------------------------------------------------- operations

    def declare(
        self,
        satellite_ids: Iterable[str],
        *,
        queue_type: QueueType | None = None,
        include_results_queue: bool = True,
    ) -> DeclareReport:
        """Declare the DESIGN §3 topology for these satellites (and the core's result queue).

        Idempotent. Objects that exist with other arguments are reported as conflicts and
        left alone. Raises `ValueError` for a bad satellite id, `BrokerError` otherwise.
        """
        topology = core_topology(
            satellite_ids,
            queue_type=queue_type or self.queue_type,
            include_results_queue=include_results_queue,
        )

        def run() -> DeclareReport:
            conn = self._connection()
            opened: list[Any] = []

            def open_channel() -> Any:
                opened.append(conn.channel())
                return opened[-1]

            try:
                return declare_topology(
                    open_channel, topology, channel_errors=tuple(conn.channel_errors)
                )
            finally:
                for channel in opened:
                    self._close_quietly(channel)

        return self._with_reconnect(run, retry=True)

    def submit(
        self,
        satellite_id: str,
        job: JobRequest,
        *,
        priority: int | None = None,
        expiration: float | None = None,
        lane: Lane = "bulk",
    ) -> str:
        """Publish `job` to the satellite's queue (confirmed, mandatory); return its id.

        `lane="interactive"`: to its interactive lane, ahead of the bulk backlog (DESIGN §13).

        A publish cut by a lost connection is retried once on a new connection, but only for
        an idempotent job (the first attempt may have reached the queue): the retry carries
        the header `x-usm-resent`, so a copy run twice is answered `redelivered: true`.
        """
        sends = itertools.count()
        self._with_reconnect(
            lambda: self._publish(
                satellite_id,
                job,
                priority=priority,
                expiration=expiration,
                lane=lane,
                resent=next(sends) > 0,
            ),
            retry=job.idempotent,
        )
        return job.id

    def call(
        self,
        satellite_id: str,
        job: JobRequest,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        lane: Lane = "interactive",
    ) -> JobResult:
        """Publish `job` and wait for its result on this client's exclusive reply queue.

        Someone waits for it, so it goes to the interactive lane unless `lane="bulk"`
        (DESIGN §13; pollers older than the lane do not consume it: docs/core.md).

        `timeout` defaults to the job's deadline plus `CALL_MARGIN_SECONDS`. Raises
        `NoResultError` when nothing matching arrives in time (the job may still run).
        """
        wait = job.timeout + CALL_MARGIN_SECONDS if timeout is None else timeout
        reply = self._with_reconnect(self._reply_queue, retry=True)
        correlation_id = cli_correlation_id()
        reply.expect(correlation_id, satellite_id=satellite_id, job_id=job.id)
        try:
            self._with_reconnect(
                lambda: self._publish(
                    satellite_id,
                    job,
                    reply_to=reply.name,
                    correlation_id=correlation_id,
                    priority=priority,
                    lane=lane,
                ),
                retry=False,
            )
            result = self._with_reconnect(lambda: reply.wait(correlation_id, wait), retry=False)
        finally:
            reply.forget(correlation_id)
        if result is None:
            raise NoResultError(
                f"no result for job {job.id} from satellite {satellite_id} within {wait:g} s",
                job_id=job.id,
            )
        return result

    def submit_many(
        self,
        satellite_id: str,
        jobs: Iterable[JobRequest],
        *,
        window: int = DEFAULT_WINDOW,
        progress: Progress | None = None,
    ) -> BulkReport:
        """Publish many jobs with up to `window` publisher confirms outstanding.

        Uses a connection of its own (not retried: a lost connection raises
        `BrokerUnavailableError` and the report of what was confirmed is lost with it; jobs
        are identified by id, so resubmitting the file is safe for idempotent jobs).
        """
        conn = self._open(confirm_publish=False)
        try:
            publisher = BulkPublisher(
                conn, window=window, confirm_timeout=self.settings.operation_timeout
            )
            try:
                return publisher.publish_all(satellite_id, jobs, progress=progress)
            except (OperationalError, *conn.connection_errors) as exc:
                raise BrokerUnavailableError(
                    f"lost the connection to {self.settings.masked_dsn}: "
                    f"{self._scrub(str(exc)) or type(exc).__name__}"
                ) from None
        finally:
            self._close_quietly(conn)

    @contextlib.contextmanager
    def result_reader(self, satellites: Collection[str] | None = None) -> Iterator[ResultReader]:
        """A reader of the core's result queue (see `satellite.results`); closed on exit.

        Raises `NotDeclaredError` when the result queue does not exist.
        """
        queue = results_queue()
        with self._channel(
            queue,
            f"no result queue {queue}: run `satellite declare ID` (without --no-results-queue)",
        ) as channel:
            reader = ResultReader(channel, sender_check=self.sender_check, satellites=satellites)
            yield reader

    def dead_letters(self, satellite_id: str) -> list[DeadLetter]:
        """Every message of the satellite's DLQ (all stay in it).

        Raises `NotDeclaredError` when the satellite has no DLQ.
        """
        with self._dlq_channel(satellite_id) as channel:
            return list(read_dead_letters(channel, satellite_id))

    def dead_letter(self, satellite_id: str, job_id: str) -> DeadLetter | None:
        """The dead letter of `job_id` (it stays in the DLQ), or None."""
        with self._dlq_channel(satellite_id) as channel:
            for letter in read_dead_letters(channel, satellite_id):
                if letter.job_id == job_id:
                    return letter
            return None

    def replay(
        self,
        satellite_id: str,
        job_ids: Collection[str] | None = None,
        *,
        on_replayed: Callable[[DeadLetter], None] | None = None,
    ) -> ReplayReport:
        """Move dead letters (the chosen ids, or all) back to the job queue, confirm then ack."""
        with self._dlq_channel(satellite_id) as channel:
            return replay_dead_letters(
                channel,
                satellite_id,
                job_ids=job_ids,
                confirm_timeout=self.settings.operation_timeout,
                on_replayed=on_replayed,
            )

    def purge_dead_letters(self, satellite_id: str) -> int:
        with self._dlq_channel(satellite_id) as channel:
            return purge_dead_letters(channel, satellite_id)

    def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of `queue` from a passive declare; None when missing."""
        conn = self._connection()
        channel = conn.channel()
        try:
            ok = channel.queue_declare(queue=queue, passive=True)
        except tuple(conn.channel_errors) as exc:
            if getattr(exc, "reply_code", None) == 404:
                return None
            raise BrokerError(f"queue {queue}: {getattr(exc, 'reply_text', exc)}") from exc
        finally:
            self._close_quietly(channel)
        return int(ok.message_count), int(ok.consumer_count)

    def heartbeat_listener(
        self, fleet: FleetView, satellite_ids: Iterable[str] | None = None
    ) -> HeartbeatListener:
        """Start taking heartbeats into `fleet` (call `listen(seconds)` on it; close it)."""
        conn = self._connection()
        return HeartbeatListener(
            conn,
            conn.channel(),
            fleet=fleet,
            sender_check=self.sender_check,
            satellite_ids=satellite_ids,
            channel_errors=tuple(conn.channel_errors),
        )

    # ----------------------------------------------------------------------------- plumbing

    def _dlq_channel(self, satellite_id: str) -> contextlib.AbstractContextManager[Any]:
        queue = dead_letter_queue(satellite_id)
        return self._channel(
            queue,
            f"no dead-letter queue for satellite {satellite_id}: "
            f"run `satellite declare {satellite_id}`",
        )

    @contextlib.contextmanager
    def _channel(self, queue: str, missing: str) -> Iterator[Any]:
        """A channel, closed on exit; the broker's 404 for `queue` becomes `NotDeclaredError`.

        Any other refusal (another object missing, permissions) is a `BrokerError` naming it.
        """
        conn = self._connection()
        channel = conn.channel()
        try:
            yield channel
        except tuple(conn.channel_errors) as exc:
            text = self._scrub(str(getattr(exc, "reply_text", "") or exc))
            if getattr(exc, "reply_code", None) == NOT_FOUND and f"'{queue}'" in text:
                raise NotDeclaredError(missing, name=queue) from None
            raise BrokerError(f"the broker refused: {text}") from None
        finally:
            self._close_quietly(channel)

    def _connection(self) -> Any:
        if self._conn is not None and self._conn.connected:
            return self._conn
        self.close()
        self._conn = self._open(confirm_publish=True)
        return self._conn

    def _open(self, *, confirm_publish: bool) -> Any:
        """Connect, trying the nodes in turn until one answers or the connect timeout is over.

        The whole attempt (every node, every retry, each handshake) ends within
        `settings.connect_retry_timeout`. One warning says what is going on when it takes
        longer than a moment (`CONNECT_NOTICE_AFTER`) or the first attempt fails; another
        only when the reason changes; then `BrokerUnavailableError` with the last reason.
        """
        s = self.settings
        conn = kombu.Connection(
            s.kombu_urls(),
            ssl=s.ssl_context() or False,
            connect_timeout=s.connect_timeout,
            heartbeat=s.heartbeat,
            failover_strategy="round-robin",
            transport_options={
                "confirm_publish": confirm_publish,
                "read_timeout": s.operation_timeout,
                "write_timeout": s.operation_timeout,
                "client_properties": {"connection_name": s.connection_name},
            },
        )
        notice = _ConnectNotice(s.masked_dsn, s.connect_retry_timeout)
        started = time.monotonic()
        deadline = started + s.connect_retry_timeout
        errors = (OperationalError, *conn.connection_errors, *conn.channel_errors)
        interval, attempts = CONNECT_RETRY_START, 0
        try:
            while True:
                attempts += 1
                # One node's handshake gets what is left of the whole timeout, at most its own.
                conn.connect_timeout = max(0.1, min(s.connect_timeout, deadline - time.monotonic()))
                try:
                    conn.ensure_connection(max_retries=0)
                except errors as exc:
                    # A refused login (403) is one of py-amqp's channel errors.
                    reason = self._scrub(str(exc)) or type(exc).__name__
                    left = deadline - time.monotonic()
                    if left <= 0 or _is_refused_login(exc):
                        raise BrokerUnavailableError(
                            f"cannot connect to {s.masked_dsn}: {reason}"
                            + (
                                f" (gave up after {attempts} attempts in "
                                f"{time.monotonic() - started:.1f} s: --connect-timeout)"
                                if attempts > 1
                                else ""
                            )
                        ) from None
                    notice.failed(reason)
                    conn.maybe_switch_next()
                    time.sleep(min(interval, left))
                    interval = min(interval * 2, CONNECT_RETRY_MAX)
                    continue
                return conn
        except BaseException:
            self._close_quietly(conn)
            raise
        finally:
            notice.cancel()

    def _publish(
        self,
        satellite_id: str,
        job: JobRequest,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        expiration: float | None = None,
        lane: Lane = "bulk",
        resent: bool = False,
    ) -> None:
        if self._publisher is None:
            conn = self._connection()
            self._publisher = JobPublisher(
                conn.channel(),
                confirm_timeout=self.settings.operation_timeout,
                channel_errors=tuple(conn.channel_errors),
            )
        publisher = self._publisher
        try:
            publisher.publish(
                satellite_id,
                job,
                reply_to=reply_to,
                correlation_id=correlation_id,
                priority=priority,
                expiration=expiration,
                lane=lane,
                resent=resent,
            )
        finally:
            if publisher.broken:
                # A confirm may still arrive and would be taken for the next publish's.
                self.close()

    def _reply_queue(self) -> ReplyQueue:
        if self._reply is None:
            conn = self._connection()
            self._reply = ReplyQueue(
                conn,
                conn.channel(),
                channel_errors=tuple(conn.channel_errors),
                sender_check=self.sender_check,
            )
        return self._reply

    def _with_reconnect(self, run: Callable[[], T], *, retry: bool) -> T:
        """Run `run()`; on a lost connection, reconnect and run it once more if `retry`.

        A lost connection becomes `BrokerUnavailableError`.
        """
        for attempt in (1, 2):
            conn = self._connection()
            errors = (OperationalError, *conn.connection_errors)
            try:
                return run()
            except errors as exc:
                text = self._scrub(str(exc)) or type(exc).__name__
                log.warning("broker_connection_lost: %s", text)
                self.close()
                if not retry or attempt == 2:
                    raise BrokerUnavailableError(
                        f"lost the connection to {self.settings.masked_dsn}: {text}"
                    ) from None
        raise AssertionError("unreachable")

    def _close_quietly(self, resource: Any) -> None:
        try:
            resource.close()
        except Exception as exc:  # noqa: BLE001 - closing must never hide the real outcome
            log.debug("close_failed: %s", self._scrub(str(exc)))

    def _scrub(self, text: str) -> str:
        """Library messages with any password of the DSN masked, to be safe."""
        return self.settings.scrub(text)
