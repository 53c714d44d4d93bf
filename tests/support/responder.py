"""A stand-in poller for `satellite` tests: consumes a satellite's queues, answers each job.

It consumes the job queue and, with `lane=True` (the default), the interactive lane too
(DESIGN §13; both must exist: `satellite declare`); `lanes` records where each job came from.

Only a test seam for the core side (the real worker is `poller`). It publishes a `JobResult`
the way DESIGN §4 says a poller does: to `usm_poller.results`, routing key
`reply.<id>.<reply_to>` (or `result.<id>.<kind>`), correlation id echoed, `user_id` set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import kombu as _kombu

from poller.wire import (
    JobRequest,
    JobResult,
    decode_job,
    encode,
    interactive_queue,
    jobs_queue,
    reply_routing_key,
    result_routing_key,
    results_exchange,
)

kombu: Any = _kombu  # only partly annotated

#: Builds the result for a job; the default answers `ok` with one varbind.
Answer = Callable[[JobRequest, str], JobResult]


def ok_result(job: JobRequest, satellite_id: str) -> JobResult:
    now = datetime.now(UTC)
    return JobResult(
        job_id=job.id,
        kind=job.kind,
        satellite_id=satellite_id,
        worker="test-responder",
        status="ok",
        data={"varbinds": [{"oid": "1.3.6.1.2.1.1.5.0", "type": "OctetString", "value": "sw"}]},
        attempt=1,
        redelivered=False,
        started_at=now,
        finished_at=now,
        duration_ms=0.1,
        meta=job.meta,
    )


def bare_result(job_id: str, satellite_id: str) -> JobResult:
    """An `ok` snmp.get result with no data, for a job that was never published."""
    now = datetime.now(UTC)
    return JobResult(
        job_id=job_id,
        kind="snmp.get",
        satellite_id=satellite_id,
        worker="w",
        status="ok",
        attempt=1,
        redelivered=False,
        started_at=now,
        finished_at=now,
        duration_ms=1.0,
    )


def error_result(job: JobRequest, satellite_id: str) -> JobResult:
    now = datetime.now(UTC)
    return JobResult.model_validate(
        {
            **ok_result(job, satellite_id).model_dump(),
            "status": "error",
            "data": None,
            "error": {"code": "device_timeout", "message": "no answer", "retryable": True},
            "finished_at": now,
        }
    )


@dataclass
class Responder:
    """Answers jobs of one satellite in a thread until stopped (at most `max_seconds`)."""

    dsn: str
    satellite_id: str
    answer: Answer = ok_result
    user_id: str | None = "guest"
    correlation_id: Callable[[str | None], str | None] = lambda cid: cid
    max_seconds: float = 60.0
    lane: bool = True
    jobs: list[tuple[JobRequest, dict[str, Any]]] = field(default_factory=list)
    lanes: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"responder did not start: {self.errors}")
        if self.errors:
            raise self.errors[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            with kombu.Connection(self.dsn, connect_timeout=5) as conn:
                channel = conn.channel()
                producer = kombu.Producer(conn.channel(), auto_declare=False)
                names = [jobs_queue(self.satellite_id)]
                if self.lane:
                    names.append(interactive_queue(self.satellite_id))
                consumer = kombu.Consumer(
                    channel,
                    queues=[kombu.Queue(name, no_declare=True) for name in names],
                    on_message=lambda message: self._answer(producer, message),
                    prefetch_count=10,
                )
                consumer.consume()
                self._ready.set()
                deadline = time.monotonic() + self.max_seconds
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        continue
        except Exception as exc:  # noqa: BLE001 - surfaced to the test through `errors`
            self.errors.append(exc)
        finally:
            self._ready.set()

    def _answer(self, producer: Any, message: Any) -> None:
        job = decode_job(message.body)
        properties = dict(message.properties)
        self.jobs.append((job, properties))
        key = str(message.delivery_info.get("routing_key", ""))
        self.lanes.append("interactive" if key.endswith(".interactive") else "bulk")
        result = self.answer(job, self.satellite_id)
        reply_to = properties.get("reply_to")
        key = (
            reply_routing_key(self.satellite_id, reply_to)
            if reply_to
            else result_routing_key(self.satellite_id, job.kind)
        )
        extra: dict[str, Any] = {}
        correlation_id = self.correlation_id(properties.get("correlation_id"))
        if correlation_id is not None:
            extra["correlation_id"] = correlation_id
        if self.user_id is not None:
            extra["user_id"] = self.user_id
        producer.publish(
            encode(result),
            exchange=results_exchange(),
            routing_key=key,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            message_id=job.id,
            type=job.kind,
            headers={"x-satellite-id": self.satellite_id},
            **extra,
        )
        message.ack()
