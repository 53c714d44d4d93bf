"""Every metric of `satellite serve`, in one place (`GET /metrics`, Prometheus text format).

One registry per replica (no global state: tests build many). Counters are this replica's own
(sum them over replicas); the overdue gauge is read from the shared store at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from poller.wire import JobResult
from satellite.service.ingest import IngestStats

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live(Collector):
    """Values read when scraped: ingest counters, backlog, lag, waiters, overdue jobs."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        stats = self.owner.ingest_stats
        for name, help_text, value in (
            ("ingest_commits", "Group commits of results into the history", stats.commits),
            (
                "ingest_malformed",
                "Result messages acked unstored: not a wire v1 result",
                stats.malformed,
            ),
            ("ingest_unstorable", "Results the database refused, acked unstored", stats.unstorable),
            (
                "ingest_db_failures",
                "Failed attempts to write a group (retried, not acked)",
                stats.db_failures,
            ),
        ):
            yield CounterMetricFamily(f"satellite_core_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            "satellite_core_ingest_backlog",
            "Results received from the broker and not yet committed",
            value=self.owner.backlog(),
        )
        yield GaugeMetricFamily(
            "satellite_core_ingest_lag_seconds",
            "Age of the newest result in the last commit when it was committed",
            value=self.owner.ingest_lag,
        )
        yield GaugeMetricFamily(
            "satellite_core_waiting_requests",
            "Requests waiting for a job's result (Prefer: wait, ?wait=)",
            value=self.owner.waiting(),
        )
        yield GaugeMetricFamily(
            "satellite_core_jobs_overdue",
            "Jobs in the history marked overdue (queued past deadline + grace)",
            value=self.owner.overdue,
        )


class ServiceMetrics:
    """The registry of one replica and the hooks that update it."""

    def __init__(
        self,
        ingest_stats: IngestStats,
        *,
        backlog: Callable[[], int] = lambda: 0,
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ingest_stats = ingest_stats
        self.backlog = backlog
        self.waiting = waiting
        self.ingest_lag = 0.0
        self.overdue = 0
        self.submitted = Counter(
            "satellite_core_jobs_submitted",
            "Jobs submitted through the API and published",
            ["satellite", "kind"],
            registry=self.registry,
        )
        self.not_published = Counter(
            "satellite_core_jobs_not_published",
            "Jobs the broker did not take (recorded as error not_published)",
            ["satellite", "reason"],
            registry=self.registry,
        )
        self.answered = Counter(
            "satellite_core_results_ingested",
            "Results written to the history, by satellite, kind and status",
            ["satellite", "kind", "status"],
            registry=self.registry,
        )
        self.registry.register(_Live(self))
        self.started = time.monotonic()

    def on_committed(self, results: Iterable[JobResult]) -> None:
        newest: datetime | None = None
        for result in results:
            self.answered.labels(result.satellite_id, result.kind, result.status).inc()
            if newest is None or result.finished_at > newest:
                newest = result.finished_at
        if newest is not None:
            self.ingest_lag = max(0.0, (datetime.now(UTC) - newest).total_seconds())

    def render(self) -> bytes:
        return generate_latest(self.registry)
