"""RabbitMQ for the worker, on pika's `AsyncioConnection`: the only importer of pika.

pika's asyncio adapter is callback based; this module turns it into a few awaitables, each with
a timeout, and owns everything that must survive a lost connection:

* `Broker.run()` keeps a connection up: it connects over the configured URLs in turn with
  exponential backoff and jitter, opens a channel with publisher confirms, declares the topology
  (optional; an object it cannot declare is a warning, never a reason not to consume), sets the
  prefetch and consumes; when the connection drops it does all of it again.
* A second, *spare* consumer on the same queue and channel (`open_spare`, `close_spare`) gives
  the worker a wider window for a while: RabbitMQ applies a prefetch to the consumers created
  after it and cannot change a consumer's window (nor, on quorum queues, the channel's), so the
  window grows by adding a consumer with a window of its own.
* The interactive lane (DESIGN §13; `lane_queue`) is consumed on a channel of its own with a
  small window of its own (`lane_prefetch`), so its jobs never wait behind the bulk window.
  When it cannot be consumed (a broker or user older than the lane: 404, 403), one warning is
  logged, the bulk queue is consumed as usual and the lane is tried again every `lane_retry`
  seconds.
* Deliveries reach the worker through the `on_delivery` callback as `Delivery` objects. Each
  remembers its lane and the channel generation it came from: acks go to the channel it came
  from, and acks for a channel that is gone are dropped (the broker has already put those jobs
  back in the queue). Results are published on the bulk channel whatever the lane.
* `auto_ack` consumes the queue without acks (the broker forgets a message once sent): for a
  queue whose messages only wake someone up and are kept elsewhere (`satellite serve`'s reply
  queue); `ack()` and `reject()` must not be called for such deliveries.
* A message goes out in one write: pika hands the transport its method, header and body frames
  one at a time and sends each in a syscall of its own (a TCP segment each, with TCP_NODELAY);
  `_Connection` joins them, so the broker wakes once per message, not three times. Messages
  issued in the same event-loop turn (a batch of publishes, a group's acks) go out together:
  pika queues every write until the socket is writable, and on a plaintext connection
  `_Connection` joins the queued buffers (up to `_JOIN_LIMIT` bytes a piece) before pika sends
  them, so a batch of 1,000 publishes is a few send()s, not 1,000. Confirms and returns stay per
  message (they are matched by sequence number and message id, not by write).
* `write_through` (plaintext only; `satellite serve`'s publishing connection): the first write
  of a loop turn, with nothing queued before it, is sent at once, in the call that issued it,
  rather than at the next loop turn that finds the socket writable (a loop turn and two
  `epoll_ctl` less before a job leaves); what it cannot send (a full socket, an error) is queued
  as pika queues it, and the writes that follow in the same turn are queued and joined as above.
  An error is never handled in the caller: pika meets it again at the writable socket and
  aborts there.
* `group_acks` keeps the delivery tags of the bulk channel that are not yet acked or rejected,
  in delivery order, and `ack_many()` acks a group of deliveries with one `basic.ack` with
  `multiple=True` up to the highest tag of the group's oldest run: only as far as *every*
  unsettled tag at or below it belongs to the group (an ack with `multiple` acks every earlier
  delivery of the channel; one that was not the caller's to ack would be lost on a crash). The
  rest of the group is acked one by one.
* `publish()` resolves when the broker confirms the message. Confirms are pipelined: sequence
  numbers map to futures and `multiple=True` acks resolve every future up to the tag. A nack, a
  return of a mandatory message, or a channel that closes first raise `PublishNotConfirmedError`;
  so does a confirm that takes longer than `publish_timeout`. One timer watches every pending
  publish (the oldest one's deadline), not one timer per publish: publishes are the hot path.
  While the broker blocks the connection (a memory or disk alarm) no confirm is overdue: the
  broker reads nothing until the alarm clears and then confirms what it was sent.

Everything here runs on the event loop's thread; nothing calls pika from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import pika
import pika.data
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorPhaseErrorBase,
)
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from poller import __version__
from poller.config import AmqpUrl
from poller.errors import BrokerUnavailableError, PublishNotConfirmedError
from poller.logging import get_logger
from poller.wire import RESENT_HEADER

__all__ = ["Broker", "BrokerOptions", "Delivery", "Topology", "UnroutableError"]

log = get_logger("poller.broker")


class UnroutableError(PublishNotConfirmedError):
    """A mandatory message matched no queue and came back (basic.return)."""


class ChannelClosedError(BrokerUnavailableError):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"channel closed by the broker: {code} {text}")
        self.reply_code = code
        self.reply_text = text


#: Publishes nacked in a row (no ack between) after which the connection is replaced.
NACKS_BEFORE_RECONNECT = 5
NOT_FOUND = 404
ACCESS_REFUSED = 403
#: A queue that is not there, or that this user may not read.
_REFUSED = frozenset({NOT_FOUND, ACCESS_REFUSED})
#: The connection's vhost does not exist, or this user may not use it.
NOT_ALLOWED = 530
#: Seconds between two `broker_refused` warnings while the broker keeps refusing the same thing.
REFUSED_WARN_INTERVAL = 60.0
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
#: Why a declaration failed, by the reply code the broker closed the channel with (0: no answer).
_DECLARE_FAILURES = {
    PRECONDITION_FAILED: "exists with other arguments: kept as it is",
    NOT_FOUND: "not found (a classic queue whose node is down, or a missing exchange)",
    RESOURCE_LOCKED: "locked (exclusive to another connection)",
    0: "no answer in time",
}


#: The headers of a delivery that has none (shared: nobody may change it).
_NO_HEADERS: Mapping[str, Any] = MappingProxyType({})
_BASIC_ACK = pika.spec.Basic.Ack


class Delivery(NamedTuple):
    """One job message as received (immutable; a named tuple because one is made per job)."""

    body: bytes
    delivery_tag: int
    generation: int
    redelivered: bool
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    headers: Mapping[str, Any]
    interactive: bool = False  # from the interactive lane (DESIGN §13)

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message, from the quorum queue's header or the flag."""
        count = self.headers.get("x-delivery-count")
        if isinstance(count, int) and count >= 0:
            return count
        return 1 if self.redelivered else 0

    @property
    def resent(self) -> bool:
        """Whether the core published this job again after a lost connection (the first copy
        may be in the queue too: `wire.RESENT_HEADER`)."""
        return self.headers.get(RESENT_HEADER) is True


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, Any]
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)


@dataclass(frozen=True, slots=True)
class Topology:
    """What to declare after every (re)connect. Names come from `poller.wire`."""

    exchanges: tuple[tuple[str, str], ...] = ()  # (name, type)
    queues: tuple[QueueSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    connection_name: str
    heartbeat: int = 30
    prefetch: int = 64
    declare: bool = True
    connect_timeout: float = 15.0
    operation_timeout: float = 15.0
    publish_timeout: float = 30.0
    #: A TCP connect without an answer gives up after this long (SYNs go at 0, 1, 3 and 7 s).
    tcp_connect_timeout: float = 8.0
    backoff_initial: float = 0.5
    #: At most this long between the starts of two connection attempts (see `_retry_delay`). A
    #: broker that comes back is used within about this long plus a handshake: at 30 s, pollers
    #: came back up to 28 s after a restarted node did (tests/faults/test_broker.py, scenario 4).
    backoff_max: float = 8.0
    blocked_timeout: float = 300.0
    lane_prefetch: int = 4
    #: Consume the queue without acks (see the module docstring); never for jobs or history.
    auto_ack: bool = False
    #: Track the bulk channel's unsettled deliveries so that `ack_many()` can ack a group with
    #: one `multiple` ack (see the module docstring); off: `ack_many()` acks one by one.
    group_acks: bool = False
    lane_retry: float = 60.0  # seconds between attempts to consume a lane that failed
    #: Consume the lane on a connection of its own (to the same node): its deliveries never
    #: wait behind the bulk channel's in one TCP stream. Off: a channel of the bulk connection.
    lane_connection: bool = False
    #: Send a write at once when nothing is queued before it (see the module docstring).
    write_through: bool = False
    #: The queue consumed is itself an interactive lane (`poller lane`, the lane's own
    #: process): its deliveries are flagged `interactive`, and acked on the one channel.
    lane_only: bool = False
    #: What a `declare_refused` warning tells the operator to do (the poller's advice by default).
    declare_refused_hint: str = (
        "this broker user may not declare (403): the poller consumes without declaring and "
        "does not try again; set USM_POLLER_DECLARE=false to skip the attempt, and declare "
        "from the core (satellite declare)"
    )
    ssl_contexts: Mapping[int, Any] = field(default_factory=dict)  # URL index → SSLContext
    #: What a `broker_refused` warning tells the operator to check, from the refusal (reply
    #: code and text, the URL's user and vhost, the queue); None: `refusal_check`'s advice.
    refused_hint: Callable[[Refusal], str] | None = None
    refused_warn_interval: float = REFUSED_WARN_INTERVAL


class Refusal(NamedTuple):
    """Something the broker refused this connection's user: not a network failure."""

    code: int
    text: str
    user: str
    vhost: str
    queue: str
    #: The login itself was refused (user name or password), not something after it.
    login: bool = False

    @property
    def vhost_refused(self) -> bool:
        return self.code == NOT_ALLOWED


def refusal_check(refusal: Refusal) -> str:
    """What to check about a refusal, without naming any one program's settings."""
    if refusal.login:
        return (
            f"the user name ({refusal.user!r}) and password in the broker URL; the broker's log "
            "says why it refused the login"
        )
    if refusal.vhost_refused:
        return (
            f"the vhost in the broker URL ({refusal.vhost!r}: the path after the port, %2F for "
            f"'/'), and that user {refusal.user!r} has permissions on it"
        )
    if refusal.code == NOT_FOUND:
        return f"that queue {refusal.queue!r} is declared on this vhost ({refusal.vhost!r})"
    return f"that user {refusal.user!r} may read queue {refusal.queue!r} on vhost {refusal.vhost!r}"


def find_refusal(exc: BaseException, url: AmqpUrl, queue: str) -> Refusal | None:
    """The refusal behind a failed connection attempt, if the broker refused something."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for cause in _causes(current):
            code = getattr(cause, "reply_code", None)
            # pika turns a close during the handshake into these, with the broker's
            # close (code and text) only as text.
            login = isinstance(cause, pika.exceptions.ProbableAuthenticationError)
            if login:
                code = ACCESS_REFUSED
            elif isinstance(cause, pika.exceptions.ProbableAccessDeniedError):
                code = NOT_ALLOWED
            if code in (ACCESS_REFUSED, NOT_FOUND, NOT_ALLOWED):
                text = str(getattr(cause, "reply_text", "") or cause)[:300]
                return Refusal(int(code), text, url.username, url.vhost, queue, login=login)
            if cause.__cause__ is not None:
                todo.append(cause.__cause__)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
    return None


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[None]
    message_id: str | None
    #: Loop time after which `publish()` gives up on the confirm; None: `publish_nowait`, no limit.
    deadline: float | None = None
    returned: bool = False


class Broker:
    """A self-healing connection that consumes one queue and publishes with confirms."""

    def __init__(
        self,
        urls: list[AmqpUrl],
        options: BrokerOptions,
        *,
        queue: str,
        topology: Topology,
        on_delivery: Callable[[Delivery], None],
        on_state: Callable[[], None] | None = None,
        lane_queue: str | None = None,
    ) -> None:
        """`on_state` is called (on the loop, without arguments) whenever `connected` or
        `consuming` changes; it must not block (the worker schedules a health-file write).
        `lane_queue`: the interactive lane to consume besides `queue` (None: none)."""
        if not urls:
            raise ValueError("at least one broker URL is needed")
        self._urls = urls
        self._opts = options
        self._queue = queue
        self._topology = topology
        self._on_delivery = on_delivery
        self._on_state = on_state
        self._connected = False
        self._consuming = False
        self._conn: Any = None
        self._channel: Any = None
        self._url: AmqpUrl = urls[0]
        self._url_index = 0
        self.generation = 0
        self._seq = 0
        #: Publishes awaiting their confirm by sequence number, oldest first (dict order).
        self._pending: dict[int, _Pending] = {}
        self._expiry: asyncio.TimerHandle | None = None
        #: The silent-link check of the current connection (`_watch_link`).
        self._watchdog: asyncio.TimerHandle | None = None
        self._waiters: set[asyncio.Future[Any]] = set()
        self._consumer_tag: str | None = None
        self._spare_tag: str | None = None
        #: The bulk channel's unsettled delivery tags (`group_acks`; None: not tracked).
        self._unacked: _Unacked | None = None
        self._spare_changing = False
        self._lane_queue = lane_queue
        self._lane_channel: Any = None  # consuming the lane (None: not consuming it)
        #: The lane's own connection (`lane_connection`; None: none open or opening).
        self._lane_conn: Any = None
        #: Futures waiting on the lane's connection (its handshake, its channel opening).
        self._lane_waiters: set[asyncio.Future[Any]] = set()
        #: Results published on the lane's own connection, awaiting their confirm, by sequence
        #: number (`lane_connection`: its channel is in confirm mode).
        self._lane_seq = 0
        self._lane_pending: dict[int, _Pending] = {}
        self._lane_generation = 0
        self._lane_generations = itertools.count(1)
        self._lane_task: asyncio.Task[None] | None = None
        self._lane_warned = False
        #: The refusal last warned about, and when (loop time): `broker_refused` repeats it
        #: every `refused_warn_interval` s while it lasts, and at once when it changes.
        self._refused: tuple[Refusal, float, int] | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._ready: asyncio.Event = asyncio.Event()
        self._closing = False
        self._close_waiter: asyncio.Future[None] | None = None
        #: While `_connect` waits for the handshake: its future, which `close()` ends.
        self._opening: asyncio.Future[None] | None = None
        self.blocked = False
        self.reconnects = 0
        #: False once the broker refused a declaration for permissions (403): not tried again.
        self.may_declare = True
        #: Whether the job queue's existence was asked before declaring it (once per process).
        self._queue_checked = False
        #: Why the last connection attempt failed (secret-free); None once connected.
        self.last_error: str | None = None
        self._nacked_in_row = 0
        #: Reconnects for nacked publishes since the last ack (each waits longer).
        self.nack_rebuilds = 0

    # ---------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        """Whether a connection to a node is open (channel and consumer may still be missing)."""
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        if value != self._connected:
            self._connected = value
            self._state_changed()

    @property
    def consuming(self) -> bool:
        """Whether the job queue's consumer is confirmed on the current channel."""
        return self._consuming

    @consuming.setter
    def consuming(self, value: bool) -> None:
        if value != self._consuming:
            self._consuming = value
            self._state_changed()

    @property
    def queue(self) -> str:
        """The queue consumed (the bulk queue; a lane process's lane)."""
        return self._queue

    @property
    def lane_queue(self) -> str | None:
        """The interactive lane consumed besides `queue` (None: none)."""
        return self._lane_queue

    @property
    def prefetch(self) -> int:
        return self._opts.prefetch

    @property
    def lane_consuming(self) -> bool:
        """Whether the interactive lane's consumer is confirmed on the current connection."""
        return self._lane_channel is not None

    def _state_changed(self) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state()
        except Exception as exc:  # noqa: BLE001 - a hook's bug must not break the connection
            log.warning("state_hook_failed", error=repr(exc))

    # ---------------------------------------------------------------- lifecycle

    @property
    def username(self) -> str:
        """The user of the node we are connected to (results carry it as `user_id`)."""
        return self._url.username

    async def wait_ready(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Stay connected and consuming until `close()`; never returns before that."""
        attempts = 0
        url_cycle = self._url_cycle()
        while not self._closing:
            url_index, url = next(url_cycle)
            started = asyncio.get_running_loop().time()
            try:
                await self._connect(url_index, url)
                await self._setup()
            except (BrokerUnavailableError, OSError, pika.exceptions.AMQPError) as exc:
                attempts += 1
                await self._drop_connection()
                if self._closing:
                    break  # `close()` gave this attempt up: no failure to report
                if self._opts.lane_only and _refused(exc):
                    # A lane process whose lane is missing or forbidden: as in a replica
                    # that consumes the lane itself, one warning and a try every `lane_retry`.
                    self._lane_unavailable(self._queue, exc)
                    attempts = 0
                    await self._sleep_unless_closing(self._opts.lane_retry)
                    continue
                delay = self._retry_delay(attempts, asyncio.get_running_loop().time() - started)
                log.warning(
                    "broker_connect_failed",
                    broker=url.masked(),
                    error=_describe(exc),
                    retry_in_s=round(delay, 2),
                    attempt=attempts,
                )
                refusal = find_refusal(exc, url, self._queue)
                self._warn_refused(refusal, url)
                self.last_error = (
                    f"the broker refused: {refusal.text}" if refusal else _describe(exc)
                )
                await self._sleep_unless_closing(delay)
                continue
            self._refused = None
            self.last_error = None
            if self._opts.lane_only and self._lane_warned:
                self._lane_warned = False
                log.info("interactive_lane_consuming", queue=self._queue)
            if attempts or self.reconnects:
                log.info("broker_reconnected", broker=url.masked(), after_attempts=attempts)
            else:
                log.info("broker_connected", broker=url.masked(), queue=self._queue)
            attempts = 0
            self._ready.set()
            await self._lost.wait()
            self._ready.clear()
            if self._closing:
                break
            self.reconnects += 1
            await self._sleep_unless_closing(self._backoff(1 + self.nack_rebuilds))

    def _warn_refused(self, refusal: Refusal | None, url: AmqpUrl) -> None:
        """`broker_refused`: what the broker refused and what to check, now and then.

        A refusal is not an outage: retrying never cures it, a person must change the
        settings or the broker's permissions. Said at the first refusal, again every
        `refused_warn_interval` s while it lasts (with how many attempts it refused since),
        and at once when the broker refuses something else.
        """
        if refusal is None:
            return
        now = asyncio.get_running_loop().time()
        last = self._refused
        if last is not None and last[0] == refusal:
            if now - last[1] < self._opts.refused_warn_interval:
                self._refused = (last[0], last[1], last[2] + 1)
                return
            refused_times = last[2] + 1
        else:
            refused_times = 1
        self._refused = (refusal, now, 0)
        hint = self._opts.refused_hint or refusal_check
        log.warning(
            "broker_refused",
            broker=url.masked(),
            code=refusal.code,
            refused=refusal.text,
            check=hint(refusal),
            refused_attempts=refused_times,
        )

    def _url_cycle(self) -> Iterator[tuple[int, AmqpUrl]]:
        return itertools.cycle(enumerate(self._urls))

    def _retry_delay(self, attempt: int, took: float) -> float:
        """How long to wait before the next attempt, after attempt `attempt` took `took` s.

        The backoff runs from the start of the failed attempt: one that waited for an answer
        until its timeout (a partition, a host that is gone) has waited already, and the next
        one starts at once. So a link that heals is used again within a few seconds (the gap
        between two SYNs of one attempt, at most 4 s), not after a sleep of up to a whole
        backoff period on top of the timeout; a broker that refuses at once is tried again
        after the jittered backoff, up to `backoff_max` s.
        """
        return max(0.0, self._backoff(attempt) - took)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, capped: replicas must not reconnect in step."""
        ceiling = min(self._opts.backoff_max, self._opts.backoff_initial * 2 ** (attempt - 1))
        return random.uniform(self._opts.backoff_initial / 2, max(ceiling, 0.01))  # noqa: S311

    async def _sleep_unless_closing(self, delay: float) -> None:
        if self._closing:
            return
        self._lost.clear()
        try:
            async with asyncio.timeout(delay):
                await self._lost.wait()
        except TimeoutError:
            pass

    async def stop_consuming(self, timeout: float = 5.0) -> None:
        """Cancel the consumers: no new deliveries; running jobs can still be acked."""
        channel, tags = self._channel, (self._consumer_tag, self._spare_tag)
        self.consuming = False
        self._consumer_tag = self._spare_tag = None
        self._stop_lane_retry()
        lane, lane_tag = self._lane_channel, getattr(self._lane_channel, "_usm_tag", None)
        if lane is not None and lane.is_open and lane_tag is not None:
            lane._usm_tag = None
            try:
                await self._rpc(lane, lane.basic_cancel, timeout, consumer_tag=lane_tag)
            except (BrokerUnavailableError, TimeoutError) as exc:
                log.warning("broker_cancel_failed", queue=self._lane_queue, error=_describe(exc))
        if channel is None or not channel.is_open:
            return
        for tag in tags:
            if tag is None:
                continue
            try:
                await self._rpc(channel, channel.basic_cancel, timeout, consumer_tag=tag)
            except (BrokerUnavailableError, TimeoutError) as exc:
                log.warning("broker_cancel_failed", error=_describe(exc))

    @property
    def spare_open(self) -> bool:
        """Whether the spare consumer is consuming (on the current channel)."""
        return self._spare_tag is not None

    async def open_spare(self, prefetch: int) -> bool:
        """Start the spare consumer with a window of `prefetch` jobs; whether it started.

        Its deliveries go to `on_delivery` like the others and are acked on the same channel.
        Nothing happens while not consuming, while the spare is open or while it is changing.
        """
        channel = self._channel
        if not self.consuming or channel is None or self._spare_tag or self._spare_changing:
            return False
        self._spare_changing = True
        try:
            # Applies to consumers started from now on: the spare, not the main consumer.
            await self._rpc(channel, channel.basic_qos, prefetch_count=prefetch)
            if not self.consuming or channel is not self._channel:
                return False
            tag = await self._consume(channel, self.generation)
            if not self.consuming or channel is not self._channel:
                # Stopped meanwhile (the channel is still ours): cancel what was started.
                if channel.is_open:
                    await self._rpc(channel, channel.basic_cancel, consumer_tag=tag)
                return False
            self._spare_tag = tag
            return True
        finally:
            self._spare_changing = False

    async def close_spare(self, timeout: float = 5.0) -> None:
        """Cancel the spare consumer; jobs it delivered are acked as usual."""
        channel, tag = self._channel, self._spare_tag
        if channel is None or tag is None or self._spare_changing or not channel.is_open:
            return
        self._spare_changing = True
        self._spare_tag = None
        try:
            await self._rpc(channel, channel.basic_cancel, timeout, consumer_tag=tag)
        finally:
            self._spare_changing = False

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection cleanly; unacked deliveries return to the queue."""
        self._closing = True
        self._stop_lane_retry()
        lane_conn = self._lane_conn
        self._close_lane_conn()
        self._lost.set()
        try:
            await self._close_main(timeout)
        finally:
            if lane_conn is not None:
                # Closed with the bulk connection's handshake, in parallel: a moment at most.
                for _ in range(100):
                    if lane_conn.is_closed:
                        break
                    await asyncio.sleep(0.01)

    async def _close_main(self, timeout: float) -> None:
        conn = self._conn
        if conn is None or conn.is_closed:
            return
        opening = self._opening
        if opening is not None and not opening.done():
            # Still in the handshake (a broker that does not answer, a stop while starting):
            # nothing to close gracefully, and pika's close of a half-open connection waits
            # for an answer that may never come, then logs its own assertion. `run()` gives
            # the attempt up at once; the socket goes with the process (or the loop).
            self._conn = None  # its late callbacks are ignored
            opening.set_exception(BrokerUnavailableError("closing before the handshake ended"))
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._close_waiter = done
        if not conn.is_closing:
            conn.close(reply_code=200, reply_text="poller shutting down")
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            log.warning("broker_close_timed_out")

    # ---------------------------------------------------------------- connecting

    def _parameters(
        self, url_index: int, url: AmqpUrl, name: str | None = None
    ) -> pika.ConnectionParameters:
        ssl_options = None
        context = self._opts.ssl_contexts.get(url_index)
        if context is not None:
            ssl_options = pika.SSLOptions(context, url.server_hostname or url.host)
        return pika.ConnectionParameters(
            host=url.host,
            port=url.port,
            virtual_host=url.vhost,
            credentials=pika.PlainCredentials(url.username, url.password.get_secret_value()),
            heartbeat=self._opts.heartbeat,
            blocked_connection_timeout=self._opts.blocked_timeout,
            connection_attempts=1,
            socket_timeout=min(self._opts.tcp_connect_timeout, self._opts.connect_timeout),
            stack_timeout=self._opts.connect_timeout,
            ssl_options=ssl_options,
            client_properties={
                "connection_name": name or self._opts.connection_name,
                "product": "satellite-poller",
                "version": __version__,
            },
        )

    async def _connect(self, url_index: int, url: AmqpUrl) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._url, self._url_index = url, url_index
        self._lost.clear()

        def on_open(_conn: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_conn: Any, exc: BaseException) -> None:
            if not opened.done():
                error = BrokerUnavailableError(_describe(exc))
                error.__cause__ = exc  # a refusal (login, vhost) is found in it
                opened.set_exception(error)

        self._conn = _Connection(
            self._parameters(url_index, url),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
            write_through=self._opts.write_through,
        )
        self._opening = opened
        try:
            async with asyncio.timeout(self._opts.connect_timeout + 1):
                await opened
        except TimeoutError:
            raise BrokerUnavailableError(
                f"no connection within {self._opts.connect_timeout:g} s"
            ) from None
        finally:
            self._opening = None
        self.connected = True
        self._watch_link(self._conn)
        self.blocked = False  # a new connection: blocked again only when the broker says so
        self._conn.add_on_connection_blocked_callback(self._on_blocked)
        self._conn.add_on_connection_unblocked_callback(self._on_unblocked)

    def _watch_link(self, conn: Any) -> None:
        """Give up a connection on which nothing arrived for two heartbeat intervals.

        The broker sends a heartbeat every half interval when it has nothing else to send, so
        two intervals of silence are four missed heartbeats: the link is gone (a partition, a
        dead NAT entry, a broker host that vanished). pika's own check runs only every
        heartbeat + 5 s and needs a whole check interval of silence, so it notices after
        (heartbeat + 5) to 2 x (heartbeat + 5) s: 7-14 s at a 2 s heartbeat, 35-70 s at 30 s.
        This check looks every quarter interval and notices within 2.25 intervals; the
        connection is then aborted like pika's own check does (no close handshake: nothing
        would answer it), the broker returns its unacked jobs, and `run()` reconnects.
        """
        self._stop_watchdog()
        heartbeat = getattr(conn.params, "heartbeat", 0)  # as negotiated
        if not isinstance(heartbeat, int) or heartbeat <= 0:
            return
        loop = asyncio.get_running_loop()
        interval = max(0.1, heartbeat / 4)
        last = [conn.bytes_received, loop.time()]

        def tick() -> None:
            self._watchdog = None
            if conn is not self._conn or not conn.is_open:
                return
            now, received = loop.time(), conn.bytes_received
            if received != last[0]:
                last[0], last[1] = received, now
            elif now - last[1] > 2 * heartbeat:
                silent = now - last[1]
                log.warning("broker_link_silent", silent_s=round(silent, 1), heartbeat_s=heartbeat)
                self._abort(conn, f"nothing received for {silent:.1f} s (heartbeat {heartbeat} s)")
                return
            self._watchdog = loop.call_later(interval, tick)

        self._watchdog = loop.call_later(interval, tick)

    def _stop_watchdog(self) -> None:
        handle, self._watchdog = self._watchdog, None
        if handle is not None:
            handle.cancel()

    @staticmethod
    def _abort(conn: Any, reason: str) -> None:
        """Drop a connection without the close handshake (its peer cannot answer)."""
        error = pika.exceptions.AMQPHeartbeatTimeout(reason)
        terminate = getattr(conn, "_terminate_stream", None)
        if callable(terminate):
            terminate(error)  # what pika's own heartbeat check does
        else:  # pragma: no cover - a pika without it
            conn.close(reply_code=200, reply_text=reason)

    async def _setup(self) -> None:
        if self._opts.declare and self.may_declare:
            await self._declare()
        channel = await self._open_channel()
        self._seq = self._nacked_in_row = 0
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        await self._rpc(channel, channel.confirm_delivery, ack_nack_callback=self._on_confirm)
        await self._rpc(channel, channel.basic_qos, prefetch_count=self._opts.prefetch)
        self.generation += 1
        self._channel = channel
        self._spare_tag = None
        self._unacked = _Unacked(self.generation) if self._opts.group_acks else None
        self._consumer_tag = await self._consume(channel, self.generation)
        self.consuming = True
        if self._lane_queue is not None:
            await self._open_lane()

    async def _open_lane(self) -> None:
        """Consume the interactive lane on a channel of its own; on failure, warn and retry
        later (the bulk queue is consumed either way)."""
        conn, queue = self._conn, self._lane_queue
        if conn is None or queue is None or self._lane_channel is not None or self._closing:
            return
        channel = None
        try:
            lane_conn = await self._connect_lane() if self._opts.lane_connection else None
            channel = await self._open_channel(lane_conn)
            if lane_conn is not None:
                # Its jobs' results go out on it too (`publish(interactive=True)`).
                channel.add_on_return_callback(self._on_lane_return)
                await self._rpc(
                    channel, channel.confirm_delivery, ack_nack_callback=self._on_lane_confirm
                )
            await self._rpc(channel, channel.basic_qos, prefetch_count=self._opts.lane_prefetch)
            generation = next(self._lane_generations)
            tag = await self._consume(channel, generation, queue=queue, interactive=True)
        except (BrokerUnavailableError, TimeoutError, pika.exceptions.AMQPError) as exc:
            if conn is not self._conn or not conn.is_open or self._closing:
                self._close_lane_conn()
                return  # the connection went: the next one tries again
            if channel is not None and channel.is_open:
                channel.close()
            self._close_lane_conn()
            self._lane_unavailable(queue, exc)
            self._retry_lane(conn)
            return
        if conn is not self._conn or not self.consuming:
            # Lost or stopped meanwhile: this channel is not ours any more.
            if channel.is_open:
                channel.close()
            self._close_lane_conn()
            return
        channel._usm_tag = tag
        channel.add_on_cancel_callback(functools.partial(self._on_lane_cancelled, channel))
        self._lane_generation = generation
        self._lane_seq = 0
        self._lane_pending = {}
        self._lane_channel = channel
        if self._lane_warned:
            self._lane_warned = False
            log.info("interactive_lane_consuming", queue=queue)

    def _lane_unavailable(self, queue: str, exc: BaseException) -> None:
        """Say once (a warning; later tries at debug) that the lane cannot be consumed."""
        event = "interactive_lane_unavailable"
        fields = {
            "queue": queue,
            "error": _describe(exc),
            "retry_in_s": self._opts.lane_retry,
            "hint": "only the bulk queue is consumed; run `satellite declare` and "
            "`satellite provision` for this satellite (docs/design.md §13)",
        }
        if self._lane_warned:
            log.debug(event, **fields)
        else:
            self._lane_warned = True
            log.warning(event, **fields)

    async def _connect_lane(self) -> Any:
        """Open the lane's own connection, to the node the bulk connection is on."""
        self._close_lane_conn()
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._lane_waiters.add(opened)

        def on_open(_conn: Any) -> None:
            _resolve(opened, None)

        def on_open_error(_conn: Any, exc: BaseException) -> None:
            if not opened.done():
                error = BrokerUnavailableError(_describe(exc))
                error.__cause__ = exc  # a refusal (login, vhost) is found in it
                opened.set_exception(error)

        conn = _Connection(
            self._parameters(
                self._url_index, self._url, f"{self._opts.connection_name} (interactive lane)"
            ),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_lane_connection_closed,
            custom_ioloop=loop,
        )
        self._lane_conn = conn
        try:
            async with asyncio.timeout(self._opts.connect_timeout + 1):
                await opened
        except TimeoutError:
            raise BrokerUnavailableError(
                f"no lane connection within {self._opts.connect_timeout:g} s"
            ) from None
        finally:
            self._lane_waiters.discard(opened)
        return conn

    def _close_lane_conn(self) -> None:
        """Close the lane's own connection, if one is open or opening (its unacked jobs go
        back to the lane's queue)."""
        conn, self._lane_conn = self._lane_conn, None  # its late callbacks are ignored
        self._fail_lane_pending(BrokerUnavailableError("the lane's connection closed"))
        if conn is None or conn.is_closed:
            return
        if not conn.is_open:
            self._abort(conn, "closing before the handshake ended")
        elif not conn.is_closing:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close(reply_code=200, reply_text="lane closed")

    def _fail_lane_pending(self, error: Exception) -> None:
        pending, self._lane_pending = self._lane_pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(error)

    def _on_lane_connection_closed(self, conn: Any, exc: BaseException) -> None:
        if conn is not self._lane_conn:
            return
        self._lane_conn = None
        error = BrokerUnavailableError(f"lane connection lost: {_describe(exc)}")
        for waiter in list(self._lane_waiters):
            if not waiter.done():
                waiter.set_exception(error)
        if self._lane_channel is not None:
            # The channel's close callback has run (and retries) unless it was not ours.
            self._lane_lost()

    def _retry_lane(self, conn: Any, delay: float | None = None) -> None:
        """Try the lane again in `delay` (`lane_retry`) seconds, if this connection is still up."""
        self._stop_lane_retry()
        wait = self._opts.lane_retry if delay is None else delay

        async def later() -> None:
            await asyncio.sleep(wait)
            if conn is self._conn and conn.is_open and self.consuming:
                self._lane_task = None
                await self._open_lane()

        self._lane_task = asyncio.get_running_loop().create_task(later(), name="lane-retry")

    def _stop_lane_retry(self) -> None:
        task, self._lane_task = self._lane_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _lane_lost(self, delay: float | None = None) -> None:
        """The lane's channel or consumer went while the connection stays: try again later."""
        channel, self._lane_channel = self._lane_channel, None
        if channel is not None and channel.is_open:
            channel.close()
        self._close_lane_conn()
        conn = self._conn
        if conn is not None and conn.is_open and not self._closing and self.consuming:
            self._retry_lane(conn, delay)

    def _on_lane_cancelled(self, channel: Any, _frame: Any) -> None:
        if channel is not self._lane_channel:
            return
        log.warning(
            "consumer_cancelled", queue=self._lane_queue, reason="queue deleted or failed over"
        )
        # Unacked lane jobs go back to the queue with the channel; consume again soon.
        self._lane_lost(self._backoff(1))

    async def _consume(
        self, channel: Any, generation: int, *, queue: str | None = None, interactive: bool = False
    ) -> str:
        """basic.consume on the jobs queue (or `queue`), confirmed; the consumer tag."""
        consumed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.add(consumed)
        self._channel_waiters(channel).add(consumed)
        try:
            tag: str = channel.basic_consume(
                queue or self._queue,
                functools.partial(self._on_message, generation, interactive),
                auto_ack=self._opts.auto_ack and not interactive,
                callback=lambda frame: _resolve(consumed, frame),
            )
            async with asyncio.timeout(self._opts.operation_timeout):
                await consumed
        except TimeoutError:
            raise BrokerUnavailableError("basic.consume was not confirmed in time") from None
        finally:
            self._waiters.discard(consumed)
            self._channel_waiters(channel).discard(consumed)
        return tag

    async def _open_channel(self, conn: Any = None) -> Any:
        """A new channel on `conn` (None: the bulk connection)."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        waiters = self._waiters if conn is None else self._lane_waiters
        waiters.add(opened)
        try:
            channel = (conn or self._conn).channel(on_open_callback=lambda ch: _resolve(opened, ch))
            channel.add_on_close_callback(self._on_channel_closed)
            async with asyncio.timeout(self._opts.operation_timeout):
                return await opened
        except TimeoutError:
            raise BrokerUnavailableError("channel did not open in time") from None
        finally:
            waiters.discard(opened)

    async def _rpc(
        self,
        channel: Any,
        method: Callable[..., Any],
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call a pika channel method that reports completion through a callback, and wait."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._channel_waiters(channel).add(future)
        try:
            method(**kwargs, callback=lambda frame=None: _resolve(future, frame))
            async with asyncio.timeout(timeout or self._opts.operation_timeout):
                return await future
        finally:
            self._channel_waiters(channel).discard(future)

    def _channel_waiters(self, channel: Any) -> set[asyncio.Future[Any]]:
        waiters: set[asyncio.Future[Any]] | None = getattr(channel, "_usm_waiters", None)
        if waiters is None:
            waiters = set()
            channel._usm_waiters = waiters
        return waiters

    async def _declare(self) -> None:
        """Declare exchanges, queues and bindings; nothing here stops the consumer.

        Each object is declared on its own. One the broker refuses (the channel is closed with
        a reply code: 406 exists with other arguments, 404 a classic queue whose node is down,
        405 locked...) or does not answer in time gives one warning naming it and the broker's
        reason, and the rest goes on, on a new channel; whether the poller can work is decided
        by `basic.consume` on its job queue alone. A 403 means this broker user may not
        declare: one warning, and this process declares nothing from then on.
        """
        channel = await self._open_channel()
        try:
            for name, kind in self._topology.exchanges:
                channel, code = await self._declare_one(
                    channel,
                    "exchange",
                    name,
                    "exchange_declare",
                    exchange=name,
                    exchange_type=kind,
                    durable=True,
                )
                if code == ACCESS_REFUSED:
                    return
            for spec in self._topology.queues:
                new = False
                # The replica asks about its job queue; a lane process (`lane_only`) does not
                # ask about the lane, which its replica declares beside it at the same start.
                if spec.name == self._queue and not (self._queue_checked or self._opts.lane_only):
                    channel, new = await self._queue_missing(channel, spec.name)
                channel, code = await self._declare_one(
                    channel,
                    "queue",
                    spec.name,
                    "queue_declare",
                    skipped=len(spec.bindings),
                    queue=spec.name,
                    durable=True,
                    arguments=dict(spec.arguments),
                )
                if code == ACCESS_REFUSED:
                    return
                if new and code is None:
                    log.warning(
                        "job_queue_created",
                        queue=spec.name,
                        hint="the queue did not exist: this poller made it, and it holds no "
                        "job yet. Right for a new satellite on a lab broker; otherwise the core "
                        "sends this satellite's jobs elsewhere: check the satellite id "
                        "(satellite status on the core lists the queues that have jobs)",
                    )
                if code not in (None, PRECONDITION_FAILED):
                    continue  # no queue to bind (the warning said so)
                for exchange, key in spec.bindings:
                    channel, code = await self._declare_one(
                        channel,
                        "binding",
                        f"{exchange} -> {spec.name} ({key})",
                        "queue_bind",
                        queue=spec.name,
                        exchange=exchange,
                        routing_key=key,
                    )
                    if code == ACCESS_REFUSED:
                        return
        finally:
            if channel.is_open:
                channel.close()

    async def _queue_missing(self, channel: Any, name: str) -> tuple[Any, bool]:
        """(the channel to go on with, whether queue `name` does not exist yet), once per process.

        A passive declaration: the first connect of a process asks whether its job queue is
        there before declaring it, so that a mistyped satellite id (which would make, and
        consume, an empty queue of its own) is told (`job_queue_created`).
        """
        self._queue_checked = True
        try:
            await self._rpc(channel, channel.queue_declare, queue=name, passive=True)
        except ChannelClosedError as exc:
            return await self._open_channel(), exc.reply_code == NOT_FOUND
        except TimeoutError:
            if channel.is_open:
                channel.close()
            return await self._open_channel(), False
        return channel, False

    async def _declare_one(
        self, channel: Any, what: str, name: str, method: str, *, skipped: int = 0, **kwargs: Any
    ) -> tuple[Any, int | None]:
        """Run one declaration: (the channel to go on with, None or the failure's reply code).

        A failure is logged (once) and answered with a new channel; the code of a declaration
        that was not answered in time is 0. `skipped`: bindings that depend on this object.
        """
        try:
            await self._rpc(channel, getattr(channel, method), **kwargs)
        except ChannelClosedError as exc:
            code, says = exc.reply_code, exc.reply_text
        except TimeoutError:
            code, says = 0, f"no answer within {self._opts.operation_timeout:g} s"
            if channel.is_open:  # its late answer must not be taken for the next one's
                channel.close()
        else:
            return channel, None
        if code == ACCESS_REFUSED:
            self.may_declare = False
            log.warning(
                "declare_refused",
                object=what,
                name=name,
                broker_says=says,
                reason=self._opts.declare_refused_hint,
            )
        else:
            extra = {"bindings_skipped": skipped} if skipped and code != PRECONDITION_FAILED else {}
            log.warning(
                "declare_skipped",
                object=what,
                name=name,
                reason=_DECLARE_FAILURES.get(code, "refused by the broker"),
                broker_says=says,
                **extra,
            )
        return await self._open_channel(), code

    async def _drop_connection(self) -> None:
        conn = self._conn
        self._conn = None  # late callbacks of this connection are ignored from now on
        self._stop_watchdog()
        self.connected = False
        self.consuming = False
        self._spare_tag = None
        self._lane_channel = None
        self._stop_lane_retry()
        self._close_lane_conn()
        if conn is not None and not conn.is_closed and not conn.is_closing:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()
        self._channel = None

    # ---------------------------------------------------------------- callbacks

    def _on_connection_closed(self, conn: Any, exc: BaseException) -> None:
        if conn is not self._conn:
            return
        was_connected = self.connected
        self._stop_watchdog()
        self.connected = False
        self.consuming = False
        self._spare_tag = None
        self._channel = None
        self._lane_channel = None
        self._stop_lane_retry()
        self._close_lane_conn()
        self._fail_pending(BrokerUnavailableError(f"connection lost: {_describe(exc)}"))
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(BrokerUnavailableError(f"connection lost: {_describe(exc)}"))
        if self._close_waiter is not None and not self._close_waiter.done():
            self._close_waiter.set_result(None)
        if was_connected and not self._closing:
            log.warning("broker_connection_lost", error=_describe(exc))
        self._lost.set()

    def _on_channel_closed(self, channel: Any, exc: BaseException) -> None:
        code = getattr(exc, "reply_code", 0)
        text = getattr(exc, "reply_text", str(exc))
        error = ChannelClosedError(code, text)
        for waiter in list(self._channel_waiters(channel)):
            if not waiter.done():
                waiter.set_exception(error)
        if channel is self._lane_channel and channel is not None:
            if not self._closing:
                log.warning(
                    "interactive_lane_channel_closed",
                    reply_code=code,
                    reply_text=text,
                    retry_in_s=self._opts.lane_retry,
                )
            self._lane_channel = None
            self._fail_lane_pending(error)
            self._lane_lost()
            return
        if channel is self._channel:
            self._channel = None
            self.consuming = False
            self._spare_tag = None
            self._fail_pending(error)
            if not self._closing and not (self._opts.lane_only and code in _REFUSED):
                log.warning("broker_channel_closed", reply_code=code, reply_text=text)
                # The consuming channel is gone: rebuild everything on a fresh connection.
                if self._conn is not None and self._conn.is_open:
                    self._conn.close(reply_code=200, reply_text="rebuilding channel")

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        log.warning("broker_blocked", reason="the broker refuses publishes (memory or disk alarm)")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        log.info("broker_unblocked")
        # The confirms held up by the alarm come now: each pending publish gets a whole
        # `publish_timeout` from here (deadlines stay in sequence order).
        loop = asyncio.get_running_loop()
        fresh = loop.time() + self._opts.publish_timeout
        for pending in self._pending.values():
            if pending.deadline is not None and pending.deadline < fresh:
                pending.deadline = fresh

    def _on_consumer_cancelled(self, _frame: Any) -> None:
        self.consuming = False
        self._spare_tag = None
        log.warning("consumer_cancelled", queue=self._queue, reason="queue deleted or failed over")
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._conn.close(reply_code=200, reply_text="consumer cancelled, re-consuming")

    def _on_message(
        self,
        generation: int,
        interactive: bool,
        _channel: Any,
        method: Any,
        props: Any,
        body: bytes,
    ) -> None:
        unacked = self._unacked
        if unacked is not None and not interactive and unacked.generation == generation:
            unacked.add(method.delivery_tag)
        interactive = interactive or self._opts.lane_only
        # Positional, in field order: this runs once per job.
        self._on_delivery(
            Delivery(
                body,
                method.delivery_tag,
                generation,
                bool(method.redelivered),
                props.message_id,
                props.correlation_id,
                props.reply_to,
                props.headers or _NO_HEADERS,
                interactive,
            )
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        ok = isinstance(method, _BASIC_ACK)
        if ok:
            self._nacked_in_row = self.nack_rebuilds = 0
        else:
            self._on_nack()
        pendings = self._pending
        if method.multiple:
            # Sequence numbers enter `_pending` in increasing order: stop at the first above.
            tags = []
            for t in pendings:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag]
        for t in tags:
            pending = pendings.pop(t, None)
            if pending is None or pending.future.done():
                continue
            if not ok:
                pending.future.set_exception(PublishNotConfirmedError("the broker nacked it"))
            elif pending.returned:
                pending.future.set_exception(UnroutableError("no queue is bound for it"))
            else:
                pending.future.set_result(None)

    def _on_nack(self) -> None:
        """Count nacks in a row; replace a connection whose channel the broker nacks for good.

        RabbitMQ 3.10 can nack every publish of a channel opened just after a quorum queue lost
        its leader, long after a new leader is elected (tests/integration/test_cluster.py); a
        channel opened later is fine. Without this, every job would go round (result nacked,
        job requeued) until the delivery limit dead-letters it. The reconnect waits longer each
        time this happens again before an ack.
        """
        self._nacked_in_row += 1
        conn = self._conn
        if self._nacked_in_row < NACKS_BEFORE_RECONNECT or conn is None or not conn.is_open:
            return
        self._nacked_in_row = 0
        self.nack_rebuilds += 1
        log.warning(
            "broker_publishes_nacked",
            nacks_in_row=NACKS_BEFORE_RECONNECT,
            action="reconnecting on a new connection",
            reason="the broker refuses this channel's publishes (a queue lost its leader?)",
        )
        conn.close(reply_code=200, reply_text="publishes nacked, reconnecting")

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        for pending in self._pending.values():
            if pending.message_id == props.message_id and not pending.returned:
                pending.returned = True
                return

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(error)

    def _expire(self) -> None:
        """Fail the publishes whose confirm is overdue; wait for the next deadline.

        Not while the broker blocks this connection (a memory or disk alarm): it reads nothing
        from us until the alarm clears, and then confirms what it was sent. Failing those
        publishes would return every job held in the alarm to the queue to run again, although
        its result reaches the queue. pika's `blocked_connection_timeout` bounds the wait.
        """
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.blocked and self._pending:
            self._expiry = loop.call_at(now + min(1.0, self._opts.publish_timeout), self._expire)
            return
        for pending in self._pending.values():
            deadline = pending.deadline
            if deadline is None or pending.future.done():
                continue
            if deadline > now:
                # Deadlines grow with the sequence numbers: the rest are later still.
                self._expiry = asyncio.get_running_loop().call_at(deadline, self._expire)
                return
            pending.future.set_exception(
                PublishNotConfirmedError(f"no confirm within {self._opts.publish_timeout:g} s")
            )

    # ---------------------------------------------------------------- publishing and acks

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        """Publish and return a future that resolves on the broker's confirm."""
        return self._publish(exchange, routing_key, body, properties, mandatory=mandatory)

    def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool,
        timeout: float | None = None,
    ) -> asyncio.Future[None]:
        channel = self._channel
        if channel is None or not channel.is_open:
            raise BrokerUnavailableError("not connected")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self._seq += 1
        if timeout is None:
            self._pending[self._seq] = _Pending(future, properties.message_id)
        else:
            deadline = loop.time() + timeout
            self._pending[self._seq] = _Pending(future, properties.message_id, deadline)
            if self._expiry is None:
                self._expiry = loop.call_at(deadline, self._expire)
        return future

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool = True,
        interactive: bool = False,
    ) -> asyncio.Future[None]:
        """Publish now; await the returned future for the confirm (it raises
        `PublishNotConfirmedError` otherwise). `BrokerUnavailableError` at once when there is
        no channel to publish on.

        No confirm within `publish_timeout` raises `PublishNotConfirmedError` as well; the
        shared timer of `_expire` enforces it. A future, not a coroutine: one per result.
        `interactive`: the result of a lane job, which goes out on the lane's own connection
        when it has one (`lane_connection`), else on the bulk channel like every other publish.
        """
        lane = self._lane_channel
        if interactive and self._opts.lane_connection and lane is not None and lane.is_open:
            return asyncio.ensure_future(
                self._publish_lane(
                    lane, exchange, routing_key, body, properties, mandatory=mandatory
                )
            )
        return self._publish(
            exchange,
            routing_key,
            body,
            properties,
            mandatory=mandatory,
            timeout=self._opts.publish_timeout,
        )

    async def _publish_lane(
        self,
        channel: Any,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool,
    ) -> None:
        """Publish on the lane's channel and wait for its confirm (a timer of its own: lane
        publishes are few)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self._lane_seq += 1
        seq = self._lane_seq
        self._lane_pending[seq] = _Pending(future, properties.message_id)
        try:
            async with asyncio.timeout(self._opts.publish_timeout):
                await future
        except TimeoutError:
            raise PublishNotConfirmedError(
                f"no confirm within {self._opts.publish_timeout:g} s"
            ) from None
        finally:
            if channel is self._lane_channel:
                self._lane_pending.pop(seq, None)

    def _on_lane_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        pendings = self._lane_pending
        tags = [t for t in pendings if t <= tag] if method.multiple else [tag]
        ok = isinstance(method, _BASIC_ACK)
        for t in tags:
            pending = pendings.pop(t, None)
            if pending is None or pending.future.done():
                continue
            if not ok:
                pending.future.set_exception(PublishNotConfirmedError("the broker nacked it"))
            elif pending.returned:
                pending.future.set_exception(UnroutableError("no queue is bound for it"))
            else:
                pending.future.set_result(None)

    def _on_lane_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        for pending in self._lane_pending.values():
            if pending.message_id == props.message_id and not pending.returned:
                pending.returned = True
                return

    def _usable(self, delivery: Delivery) -> Any:
        if delivery.interactive and not self._opts.lane_only:
            channel, generation = self._lane_channel, self._lane_generation
        else:
            channel, generation = self._channel, self.generation
        if channel is None or delivery.generation != generation or not channel.is_open:
            log.debug("ack_dropped", reason="channel gone; the broker redelivers it")
            return None
        return channel

    def ack(self, delivery: Delivery) -> None:
        channel = self._usable(delivery)
        if channel is not None:
            channel.basic_ack(delivery.delivery_tag)
            self._settled(delivery)

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """`requeue=False` dead-letters the job; `True` puts it back for another worker."""
        channel = self._usable(delivery)
        if channel is not None:
            channel.basic_reject(delivery.delivery_tag, requeue=requeue)
            self._settled(delivery)

    def _settled(self, delivery: Delivery) -> None:
        unacked = self._unacked
        if (
            unacked is not None
            and (not delivery.interactive or self._opts.lane_only)
            and unacked.generation == delivery.generation
        ):
            unacked.settle(delivery.delivery_tag)

    def ack_many(self, deliveries: Iterable[Delivery]) -> int:
        """Ack every delivery given (a group its caller is done with); the acks sent.

        With `group_acks`, the group's deliveries on the current bulk channel that are the
        oldest unsettled ones of that channel are acked with one `basic.ack` with
        `multiple=True` up to the highest of them: `_Unacked.settle_run` stops at the first
        unsettled tag that is not the group's, so no delivery outside the group is ever acked
        by it. The others (a later run, the interactive lane, an older channel's: dropped) are
        acked one by one.
        """
        unacked, channel = self._unacked, self._channel
        if unacked is None or channel is None or not channel.is_open:
            ones = list(deliveries)
            for delivery in ones:
                self.ack(delivery)
            return len(ones)
        mine: set[int] = set()
        others: list[Delivery] = []
        for delivery in deliveries:
            if (
                not delivery.interactive or self._opts.lane_only
            ) and delivery.generation == unacked.generation:
                mine.add(delivery.delivery_tag)
            else:
                others.append(delivery)
        sent = 0
        if mine:
            last, covered = unacked.settle_run(mine)
            if last is not None:
                channel.basic_ack(last, multiple=covered > 1)
                sent += 1
                mine = {tag for tag in mine if tag > last}
            for tag in sorted(mine):
                channel.basic_ack(tag)
                unacked.settle(tag)
                sent += 1
        for delivery in others:
            self.ack(delivery)
            sent += 1
        return sent


class _Unacked:
    """The delivery tags of one channel not yet acked or rejected, oldest first.

    A channel's delivery tags grow with each delivery, so the oldest unsettled tag is the head
    of `_tags`; a tag settled out of order is remembered in `_settled` until it reaches the head.
    """

    __slots__ = ("_settled", "_tags", "generation")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self._tags: deque[int] = deque()
        self._settled: set[int] = set()

    def __len__(self) -> int:
        return len(self._tags) - len(self._settled)

    def add(self, tag: int) -> None:
        self._tags.append(tag)

    def settle(self, tag: int) -> None:
        if self._tags and self._tags[0] == tag:
            self._tags.popleft()
            self._drop_settled()
        else:
            self._settled.add(tag)

    def settle_run(self, group: set[int]) -> tuple[int | None, int]:
        """Settle the oldest unsettled tags while they are in `group`: (the highest of them,
        how many of the group's tags it covers); (None, 0) when the oldest is not the group's.

        Every unsettled tag at or below the highest is the group's: what an ack with
        `multiple=True` up to it may settle.
        """
        tags, last, covered = self._tags, None, 0
        while tags and tags[0] in group:
            last = tags.popleft()
            covered += 1
            self._drop_settled()
        return last, covered

    def _drop_settled(self) -> None:
        tags, settled = self._tags, self._settled
        while settled and tags and tags[0] in settled:
            settled.discard(tags.popleft())


#: Most bytes of queued writes joined into one buffer (one send()).
_JOIN_LIMIT = 256 * 1024


class _Connection(AsyncioConnection):  # type: ignore[misc]
    """pika's connection, writing each message (method, header and body frames) in one piece,
    and the messages queued in one event-loop turn in one send() (plaintext connections);
    with `write_through`, a write with nothing queued before it at once."""

    def __init__(self, *args: Any, write_through: bool = False, **kwargs: Any) -> None:
        self._write_through = write_through
        super().__init__(*args, **kwargs)

    def _proto_connection_made(self, transport: Any) -> None:
        # pika's plaintext transport queues each write and, once the socket is writable, sends
        # the queued buffers one send() each; joined first, a burst goes out in one. Not over
        # TLS: a TLS write that must be retried has to be retried with the same buffer.
        if isinstance(transport, _AsyncPlaintextTransport):
            produce = transport._produce
            buffers: deque[bytes] = transport._tx_buffers

            def joined_produce() -> None:
                _join_buffers(buffers)
                produce()

            transport._produce = joined_produce
            if self._write_through:
                transport.write = _write_through(transport)
        super()._proto_connection_made(transport)

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        # pika (1.x) calls this once per message with its frames; the transport then sends each
        # buffer it was given in a send() of its own. One buffer: one send, one TCP segment.
        if len(marshaled_frames) > 1:
            marshaled_frames = [b"".join(marshaled_frames)]
        super()._output_marshaled_frames(marshaled_frames)


def _write_through(transport: Any) -> Callable[[bytes], None]:
    """The plaintext transport's `write`, sending the first write of a loop turn at once when
    nothing is queued (see the module docstring); the turn's later writes, and what a send
    leaves (all of it on an error), queued by pika's own `write`."""
    queue = transport.write
    sock = transport._sock
    loop = asyncio.get_running_loop()
    sent_this_turn = False

    def next_turn() -> None:
        nonlocal sent_this_turn
        sent_this_turn = False

    def write(data: bytes) -> None:
        nonlocal sent_this_turn
        if sent_this_turn or transport._tx_buffers or transport._state != transport._STATE_ACTIVE:
            queue(data)
            return
        sent_this_turn = True
        loop.call_soon(next_turn)
        try:
            sent = _send_through(sock, data)
        except OSError:  # a full socket, or a broken one: pika sends (or aborts) when writable
            sent = 0
        if sent < len(data):
            queue(data[sent:] if sent else data)

    return write


def _send_through(sock: Any, data: bytes) -> int:
    """One `send()` of a write-through (a function of its own for bench/trace/)."""
    sent: int = sock.send(data)
    return sent


def _join_buffers(buffers: deque[bytes]) -> None:
    """Join runs of queued buffers into buffers of at most `_JOIN_LIMIT` bytes (a larger one
    stays alone), in order: the same bytes in fewer sends."""
    if len(buffers) < 2:
        return
    out: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for buffer in buffers:
        if run and size + len(buffer) > _JOIN_LIMIT:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, size = [], 0
        run.append(buffer)
        size += len(buffer)
    out.append(run[0] if len(run) == 1 else b"".join(run))
    if len(out) < len(buffers):
        buffers.clear()
        buffers.extend(out)


def properties(**kwargs: Any) -> pika.BasicProperties:
    """AMQP message properties (kept here so that no other module imports pika)."""
    return _Properties(**kwargs)


_BP = pika.BasicProperties
_LENGTHS = [bytes((n,)) for n in range(256)]
_TABLE_CACHE_SIZE = 64


def _short(pieces: list[bytes], value: str | bytes, name: str) -> None:
    """pika's `encode_short_string`, with pika's assertion and error."""
    if isinstance(value, str):
        raw = value.encode()
    elif isinstance(value, bytes):
        raw = value
    else:
        raise AssertionError(f"A non-string value was supplied for self.{name}")  # noqa: TRY004
    if len(raw) > 255:  # a short string's limit
        raise pika.exceptions.ShortStringTooLong(raw)
    pieces.append(_LENGTHS[len(raw)])
    pieces.append(raw)


class _Properties(pika.BasicProperties):  # type: ignore[misc]
    """pika's `BasicProperties`, whose `encode` gives the same bytes faster: every result is
    published with them. Header tables of text values (the poller's own) are encoded once and
    kept. The properties in the order of the content header (AMQP 0-9-1, 4.2.6.1)."""

    _tables: dict[tuple[tuple[str, str], ...], bytes] = {}  # noqa: RUF012 - shared on purpose

    def encode(self) -> list[bytes]:  # noqa: C901, PLR0912 - one branch per property
        flags = 0
        pieces: list[bytes] = []
        if (v := self.content_type) is not None:
            flags |= _BP.FLAG_CONTENT_TYPE
            _short(pieces, v, "content_type")
        if (v := self.content_encoding) is not None:
            flags |= _BP.FLAG_CONTENT_ENCODING
            _short(pieces, v, "content_encoding")
        if (v := self.headers) is not None:
            flags |= _BP.FLAG_HEADERS
            pieces.append(self._table(v))
        if (v := self.delivery_mode) is not None:
            flags |= _BP.FLAG_DELIVERY_MODE
            pieces.append(struct.pack("B", v))
        if (v := self.priority) is not None:
            flags |= _BP.FLAG_PRIORITY
            pieces.append(struct.pack("B", v))
        if (v := self.correlation_id) is not None:
            flags |= _BP.FLAG_CORRELATION_ID
            _short(pieces, v, "correlation_id")
        if (v := self.reply_to) is not None:
            flags |= _BP.FLAG_REPLY_TO
            _short(pieces, v, "reply_to")
        if (v := self.expiration) is not None:
            flags |= _BP.FLAG_EXPIRATION
            _short(pieces, v, "expiration")
        if (v := self.message_id) is not None:
            flags |= _BP.FLAG_MESSAGE_ID
            _short(pieces, v, "message_id")
        if (v := self.timestamp) is not None:
            flags |= _BP.FLAG_TIMESTAMP
            pieces.append(struct.pack(">Q", v))
        if (v := self.type) is not None:
            flags |= _BP.FLAG_TYPE
            _short(pieces, v, "type")
        if (v := self.user_id) is not None:
            flags |= _BP.FLAG_USER_ID
            _short(pieces, v, "user_id")
        if (v := self.app_id) is not None:
            flags |= _BP.FLAG_APP_ID
            _short(pieces, v, "app_id")
        if (v := self.cluster_id) is not None:
            flags |= _BP.FLAG_CLUSTER_ID
            _short(pieces, v, "cluster_id")
        pieces.insert(0, struct.pack(">H", flags))  # every flag is in the first 16 bits
        return pieces

    @classmethod
    def _table(cls, table: Mapping[str, Any]) -> bytes:
        key = tuple(table.items())
        if not all(type(k) is str and type(v) is str for k, v in key):
            out: list[bytes] = []
            pika.data.encode_table(out, table)
            return b"".join(out)
        cached = cls._tables.get(key)
        if cached is None:
            out = []
            pika.data.encode_table(out, dict(key))
            cached = b"".join(out)
            if len(cls._tables) >= _TABLE_CACHE_SIZE:
                cls._tables.clear()
            cls._tables[key] = cached
        return cached


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _causes(exc: BaseException) -> list[BaseException]:
    """The underlying errors of pika's connection-workflow wrappers (they say nothing alone)."""
    if isinstance(exc, AMQPConnectionWorkflowFailed):
        return [cause for inner in exc.exceptions for cause in _causes(inner)]
    if isinstance(exc, AMQPConnectorPhaseErrorBase):
        return _causes(exc.exception)
    if (
        isinstance(exc, pika.exceptions.AMQPConnectionError)
        and len(exc.args) == 1
        and isinstance(exc.args[0], BaseException)
    ):
        return _causes(exc.args[0])
    return [exc]


def _refused(exc: BaseException) -> bool:
    """Whether the broker refused the queue itself (404, 403), in `exc` or its causes."""
    return any(getattr(c, "reply_code", None) in _REFUSED for c in _causes(exc))


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a connection error, naming its real cause."""
    parts = dict.fromkeys(f"{type(c).__name__}: {str(c) or repr(c)}" for c in _causes(exc))
    return "; ".join(parts)[:300]
