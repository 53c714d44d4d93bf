"""Fleet status: queues from the management API, replicas from their heartbeats, and advice.

- `FleetView` keeps the latest heartbeat of each replica (`satellite_id`, `worker`) as they
  arrive on `usm_poller.events`; `HeartbeatListener` feeds it from a temporary exclusive queue.
- `QueueView.from_management` reads depth, rates and consumers of a job queue.
- `advise` turns the seed's rule ("add replicas when the queue grows") into a number: with the
  arrival rate λ (jobs/s published to the queue), the mean service time W measured from the
  heartbeats by Little's law (W = jobs in flight / jobs per second) and each replica's
  concurrency C, one replica serves at most C / W jobs/s; the replicas needed are
  ceil((λ + backlog / drain time) / (C / W * target utilisation)).
- `satellite_status` puts it together and lists the problems that make `satellite status`
  exit non-zero: no consumer, no heartbeat, a growing queue.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from poller.errors import WireError
from poller.wire import Heartbeat, events_exchange, heartbeat_routing_key
from satellite.dispatch import SenderCheck, satellite_of_key
from satellite.topology import NOT_FOUND

__all__ = [
    "Advice",
    "FleetView",
    "HeartbeatListener",
    "QueueView",
    "ReplicaView",
    "SatelliteStatus",
    "advise",
    "satellite_status",
]

TARGET_UTILISATION = 0.7
"""Plan for replicas busy 70 % of the time: the headroom absorbs bursts."""
DRAIN_SECONDS = 300.0
"""A backlog should be gone within this many seconds."""
GROWING_RATE = 0.1
"""A queue whose ready count rises faster than this many messages/s is growing..."""
GROWING_MIN_READY = 10
"""...once it holds at least this many ready messages."""
STALE_FACTOR = 3.0
"""A replica whose last heartbeat is older than this many intervals is listed as stale."""


def _rate(stats: Mapping[str, Any] | None, name: str) -> float:
    details = (stats or {}).get(f"{name}_details") or {}
    value = details.get("avg_rate", details.get("rate", 0.0))
    return float(value or 0.0)


@dataclass(frozen=True, slots=True)
class QueueView:
    name: str
    ready: int
    unacked: int
    consumers: int
    publish_rate: float
    deliver_rate: float
    ack_rate: float
    growth_rate: float
    """Change of the ready count, messages/s (averaged over the sample window)."""
    dead_letters: int = 0

    @classmethod
    def from_management(
        cls, queue: Mapping[str, Any], dlq: Mapping[str, Any] | None = None
    ) -> QueueView:
        stats = queue.get("message_stats") or {}
        return cls(
            name=str(queue.get("name") or ""),
            ready=int(queue.get("messages_ready") or 0),
            unacked=int(queue.get("messages_unacknowledged") or 0),
            consumers=int(queue.get("consumers") or 0),
            publish_rate=_rate(stats, "publish"),
            deliver_rate=_rate(stats, "deliver_get"),
            ack_rate=_rate(stats, "ack"),
            growth_rate=_rate(queue, "messages_ready"),
            dead_letters=int((dlq or {}).get("messages") or 0),
        )

    @property
    def growing(self) -> bool:
        return self.ready >= GROWING_MIN_READY and self.growth_rate > GROWING_RATE

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ready": self.ready,
            "unacked": self.unacked,
            "consumers": self.consumers,
            "publish_rate": round(self.publish_rate, 2),
            "deliver_rate": round(self.deliver_rate, 2),
            "ack_rate": round(self.ack_rate, 2),
            "growth_rate": round(self.growth_rate, 2),
            "growing": self.growing,
            "dead_letters": self.dead_letters,
        }


@dataclass(frozen=True, slots=True)
class ReplicaView:
    heartbeat: Heartbeat
    received_at: float
    """`time.monotonic()` when it arrived."""

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.received_at

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        beat = self.heartbeat
        uptime = (beat.sent_at - beat.started_at).total_seconds()
        return {
            "worker": beat.worker,
            "hostname": beat.hostname,
            "version": beat.version,
            "uptime_s": round(uptime, 1),
            "jobs_per_s": beat.jobs_per_s,
            "in_flight": beat.in_flight,
            "concurrency": beat.concurrency,
            "jobs_ok": beat.jobs_ok,
            "jobs_error": beat.jobs_error,
            "loop_lag_ms": beat.loop_lag_ms,
            "rss_bytes": beat.rss_bytes,
            "quarantine": [q.model_dump(mode="json") for q in beat.quarantine],
            "recycles": beat.recycles,
            "last_recycle": beat.last_recycle,
            "last_seen_s": round(self.age(now), 1),
        }


class FleetView:
    """The latest heartbeat of every replica seen, by satellite id and worker name."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, ReplicaView]] = {}

    def add(self, beat: Heartbeat, received_at: float | None = None) -> None:
        at = time.monotonic() if received_at is None else received_at
        self._replicas.setdefault(beat.satellite_id, {})[beat.worker] = ReplicaView(beat, at)

    def replicas(self, satellite_id: str, *, max_age: float | None = None) -> list[ReplicaView]:
        now = time.monotonic()
        views = self._replicas.get(satellite_id, {}).values()
        return sorted(
            (v for v in views if max_age is None or v.age(now) <= max_age),
            key=lambda v: v.heartbeat.worker,
        )

    def satellites(self) -> list[str]:
        return sorted(self._replicas)


class HeartbeatListener:
    """A temporary exclusive queue bound to `heartbeat.<id>` (or all) on `usm_poller.events`."""

    def __init__(
        self,
        connection: Any,
        channel: Any,
        *,
        fleet: FleetView,
        sender_check: SenderCheck,
        satellite_ids: Iterable[str] | None = None,
        channel_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._fleet = fleet
        self._check = sender_check
        self.rejected = 0
        self._tag: str | None = None
        self.missing: str | None = None
        """Why nothing can be heard (the events exchange does not exist), else None."""
        declared = channel.queue_declare(
            queue="",
            exclusive=True,
            auto_delete=True,
            arguments={"x-queue-type": "classic", "x-max-length": 10_000},
        )
        self.queue = str(declared.queue)
        keys = [heartbeat_routing_key(sid) for sid in satellite_ids or ()] or ["heartbeat.*"]
        try:
            for key in keys:
                channel.queue_bind(queue=self.queue, exchange=events_exchange(), routing_key=key)
        except channel_errors as exc:
            if getattr(exc, "reply_code", None) != NOT_FOUND:
                raise
            # No poller and no `satellite declare` ever made it: no heartbeat can come.
            self.missing = f"no exchange {events_exchange()}: no heartbeat can arrive"
            return
        self._tag = channel.basic_consume(queue=self.queue, no_ack=True, callback=self._on_message)

    def listen(self, seconds: float, progress: Callable[[float], None] | None = None) -> None:
        """Take heartbeats for `seconds` (none when `missing`); `progress(elapsed)` each second."""
        if self.missing is not None:
            return
        started = time.monotonic()
        deadline = started + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=min(remaining, 1.0))
            if progress is not None:
                progress(min(time.monotonic() - started, seconds))

    def close(self) -> None:
        if self._channel.is_open:
            if self._tag is not None:
                # Stop deliveries first: one arriving while the channel closes is logged by
                # py-amqp as a warning an operator would have to puzzle over.
                self._channel.basic_cancel(self._tag)
            self._channel.close()

    def _on_message(self, message: Any) -> None:
        try:
            beat = Heartbeat.model_validate_json(message.body)
        except (ValueError, WireError):
            self.rejected += 1
            return
        key = satellite_of_key(str(message.delivery_info.get("routing_key", "")))
        user_id = message.properties.get("user_id")
        if key != beat.satellite_id or not self._check(beat.satellite_id, user_id):
            self.rejected += 1
            return
        self._fleet.add(beat)


@dataclass(frozen=True, slots=True)
class Advice:
    replicas: int
    needed: int | None
    """None when nothing measured says what one replica can do."""
    verdict: str
    arrival_rate: float
    service_time_s: float | None
    capacity_per_replica: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "needed": self.needed,
            "verdict": self.verdict,
            "arrival_rate": round(self.arrival_rate, 2),
            "service_time_s": None
            if self.service_time_s is None
            else round(self.service_time_s, 4),
            "capacity_per_replica": (
                None if self.capacity_per_replica is None else round(self.capacity_per_replica, 2)
            ),
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def advise(
    queue: QueueView,
    replicas: list[Heartbeat],
    *,
    target_utilisation: float = TARGET_UTILISATION,
    drain_seconds: float = DRAIN_SECONDS,
    min_replicas: int = 1,
    lane: QueueView | None = None,
) -> Advice:
    """How many replicas keep the queue near empty, with headroom; a plain-language verdict.

    Jobs of the interactive `lane` are run by the same replicas: they count as arrivals and
    backlog as the job queue's do.
    """
    now = len(replicas)
    arrival = max(queue.publish_rate, 0.0)
    backlog = queue.ready
    if lane is not None:
        arrival += max(lane.publish_rate, 0.0)
        backlog += lane.ready
    throughput = sum(b.jobs_per_s for b in replicas)
    in_flight = sum(b.in_flight for b in replicas)
    # A snapshot of 0 in flight while jobs complete means fast jobs: count half a job.
    service = max(in_flight, 0.5) / throughput if throughput > 0 else None
    concurrency = (sum(b.concurrency for b in replicas) / now) if now else None
    capacity = concurrency / service if service and concurrency else None
    demand = arrival + backlog / drain_seconds
    if now == 0:
        verdict = "no replica is running: start one" if demand > 0 or backlog else "no replica"
        needed = None
        if capacity is None and (demand > 0 or backlog):
            needed = min_replicas
        return Advice(now, needed, verdict, arrival, service, capacity)
    if capacity is None:
        if backlog > 0 and throughput == 0:
            verdict = f"{_plural(backlog, 'job')} waiting but no replica is taking jobs"
        else:
            verdict = "ok (no load to measure)"
        return Advice(now, None, verdict, arrival, service, capacity)
    needed = max(min_replicas, math.ceil(demand / (capacity * target_utilisation)))
    if needed > now:
        verdict = f"add {_plural(needed - now, 'replica')}"
    elif needed < now:
        verdict = f"{_plural(now - needed, 'idle replica')}"
    else:
        verdict = "ok"
    return Advice(now, needed, verdict, arrival, service, capacity)


@dataclass(frozen=True, slots=True)
class SatelliteStatus:
    satellite_id: str
    queue: QueueView | None
    replicas: list[ReplicaView]
    advice: Advice | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lane: QueueView | None = None
    """The interactive lane `usm_poller-sat-<id>.interactive` (DESIGN §13); None: missing."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "satellite_id": self.satellite_id,
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "queue": self.queue.as_dict() if self.queue else None,
            "lane": self.lane.as_dict() if self.lane else None,
            "replicas": [r.as_dict(now) for r in self.replicas],
            "advice": self.advice.as_dict() if self.advice else None,
        }


def _version_warning(core_version: str, replicas: list[ReplicaView]) -> str | None:
    versions = sorted({r.heartbeat.version for r in replicas})
    if not versions or versions == [core_version]:
        return None
    return (
        f"version skew: pollers run {', '.join(versions)}, the core's satellite is {core_version}"
    )


def satellite_status(
    satellite_id: str,
    *,
    queue: Mapping[str, Any] | None,
    dlq: Mapping[str, Any] | None,
    fleet: FleetView,
    core_version: str,
    heartbeat_max_age: float | None = None,
    counts: tuple[int, int] | None = None,
    lane: Mapping[str, Any] | None = None,
    lane_counts: tuple[int, int] | None = None,
) -> SatelliteStatus:
    """The status of one satellite from its queues' management stats and the fleet view.

    `counts` (ready messages, consumers) from AMQP, when given, win over the management
    API's, which lag by up to its statistics interval (5 s by default); `lane` and
    `lane_counts` are the same for its interactive lane.
    """
    view = _queue_view(queue, dlq, counts)
    lane_view = _queue_view(lane, None, lane_counts)
    replicas = fleet.replicas(satellite_id, max_age=heartbeat_max_age)
    problems: list[str] = []
    warnings: list[str] = []
    if view is None:
        problems.append("no job queue (run `satellite declare`)")
    elif view.consumers == 0:
        problems.append("no consumer on the job queue")
    if not replicas:
        problems.append("no heartbeat")
    if view is not None and view.growing:
        problems.append(f"queue growing ({view.growth_rate:.1f}/s, {view.ready} ready)")
    if view is not None and view.dead_letters:
        warnings.append(f"{_plural(view.dead_letters, 'dead-lettered job')}")
    for replica in replicas:
        if replica.heartbeat.quarantine:
            count = len(replica.heartbeat.quarantine)
            warnings.append(f"{replica.heartbeat.worker}: {_plural(count, 'quarantined device')}")
    if view is not None and lane_view is None:
        warnings.append("no interactive lane queue (run `satellite declare`)")
    elif view is not None and lane_view is not None and view.consumers and not lane_view.consumers:
        warnings.append(
            "no consumer on the interactive lane: pollers older than the lane, or a user that "
            "may not read it (run `satellite provision`)"
        )
    skew = _version_warning(core_version, replicas)
    if skew:
        warnings.append(skew)
    beats = [r.heartbeat for r in replicas]
    advice = advise(view, beats, lane=lane_view) if view is not None else None
    return SatelliteStatus(satellite_id, view, replicas, advice, problems, warnings, lane_view)


def _queue_view(
    queue: Mapping[str, Any] | None,
    dlq: Mapping[str, Any] | None,
    counts: tuple[int, int] | None,
) -> QueueView | None:
    if counts is not None and queue is None:
        queue = {}
    view = QueueView.from_management(queue, dlq) if queue is not None else None
    if view is not None and counts is not None:
        view = replace(view, ready=counts[0], consumers=counts[1])
    return view


def uptime_text(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s"
