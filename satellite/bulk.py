"""Bulk submission: many jobs with publisher confirms pipelined, and reading `jobs.jsonl` files.

`BulkPublisher` keeps up to `window` jobs unconfirmed on one channel in confirm mode and matches
the broker's acks (possibly `multiple`), nacks and returns (unroutable, `mandatory`) to jobs by
publish sequence number. A job counts as submitted only when its own confirm arrived and it was
not returned. `read_jobs_file` validates every line before anything is published.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import amqp  # type: ignore[import-untyped]
from pydantic import TypeAdapter, ValidationError

from poller.errors import PublishNotConfirmedError
from poller.wire import PROTOCOL_VERSION, JobRequest, jobs_exchange, jobs_routing_key
from satellite.dispatch import (
    CONTENT_TYPE,
    PERSISTENT,
    InvalidJobError,
    cli_correlation_id,
    describe_validation_error,
    new_job_id,
)

__all__ = ["DEFAULT_WINDOW", "BulkPublisher", "BulkReport", "read_jobs_file"]

DEFAULT_WINDOW = 2000
"""Unconfirmed jobs in flight at most; enough to hide the confirm round trip."""
_JOB_ADAPTER: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)

Progress = Callable[[int], None]
"""Called with the number of jobs newly confirmed (or failed) since the last call."""


@dataclass(slots=True)
class BulkReport:
    submitted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(job id, reason) of every job the broker did not take."""
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.submitted / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "submitted": self.submitted,
            "failed": [{"job_id": job_id, "reason": reason} for job_id, reason in self.failed],
            "seconds": round(self.seconds, 3),
            "jobs_per_s": round(self.rate, 1),
        }


def read_jobs_file(stream: TextIO, *, name: str = "jobs file") -> list[JobRequest]:
    """One job (the wire format's job object) per line; `v` and `id` may be left out.

    Blank lines and lines starting with `#` are skipped. Raises `InvalidJobError` naming the
    first bad line (field paths only, never values).
    """
    jobs: list[JobRequest] = []
    seen: set[str] = set()
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            body = json.loads(text)
        except ValueError:
            raise InvalidJobError(f"{name} line {number}: not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidJobError(f"{name} line {number}: not a JSON object")
        body.setdefault("v", PROTOCOL_VERSION)
        body.setdefault("id", new_job_id())
        try:
            job = _JOB_ADAPTER.validate_python(body)
        except ValidationError as exc:
            raise InvalidJobError(
                f"{name} line {number}: {describe_validation_error(exc)}"
            ) from None
        if job.id in seen:
            raise InvalidJobError(f"{name} line {number}: job id {job.id!r} is repeated")
        seen.add(job.id)
        jobs.append(job)
    return jobs


def open_jobs_file(path: str) -> list[JobRequest]:
    """`read_jobs_file` on a path (`-` for stdin); raise `InvalidJobError` when unreadable."""
    import sys  # noqa: PLC0415 - only the CLI path reads stdin

    if path == "-":
        return read_jobs_file(sys.stdin, name="stdin")
    try:
        with Path(path).open(encoding="utf-8") as stream:
            return read_jobs_file(stream, name=path)
    except OSError as exc:
        raise InvalidJobError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidJobError(f"{path}: not UTF-8 text") from None


class BulkPublisher:
    """Publishes jobs with up to `window` confirms outstanding on a channel of its own.

    `connection` is a py-amqp connection (kombu's `Connection.connection`) opened *without*
    `confirm_publish` (that mode waits for each confirm in turn).
    """

    def __init__(
        self,
        connection: Any,
        *,
        window: int = DEFAULT_WINDOW,
        confirm_timeout: float = 10.0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._connection = connection
        self._window = window
        self._confirm_timeout = confirm_timeout
        self._channel: Any = connection.channel()
        self._channel.confirm_select()
        self._channel.events["basic_ack"].add(self._on_ack)
        self._channel.events["basic_nack"].add(self._on_nack)
        self._channel.events["basic_return"].add(self._on_return)
        self._seq = 0
        # One correlation id for the jobs of one run: the toolkit's mark (satellite/dispatch.py).
        self._correlation_id = cli_correlation_id()
        self._pending: OrderedDict[int, str] = OrderedDict()
        self._returned: dict[str, str] = {}
        self._report = BulkReport()
        self._settled = 0

    def close(self) -> None:
        if self._channel.is_open:
            self._channel.close()

    def publish_all(
        self, satellite_id: str, jobs: Iterable[JobRequest], *, progress: Progress | None = None
    ) -> BulkReport:
        """Publish every job to the satellite's queue; return when each is confirmed or failed.

        Raises `PublishNotConfirmedError` when the broker stops confirming for
        `confirm_timeout` seconds (the report so far is on the exception's `report`).
        """
        started = time.perf_counter()
        routing_key = jobs_routing_key(satellite_id)
        for job in jobs:
            while len(self._pending) >= self._window:
                self._wait(progress)
            self._publish(routing_key, job)
        while self._pending:
            self._wait(progress)
        self._flush_progress(progress)
        self._report.seconds = time.perf_counter() - started
        return self._report

    def _publish(self, routing_key: str, job: JobRequest) -> None:
        message = amqp.Message(
            job.model_dump_json().encode(),
            content_type=CONTENT_TYPE,
            content_encoding="utf-8",
            delivery_mode=PERSISTENT,
            message_id=job.id,
            type=job.kind,
            correlation_id=self._correlation_id,
        )
        self._channel.basic_publish(
            message, exchange=jobs_exchange(), routing_key=routing_key, mandatory=True
        )
        self._seq += 1
        self._pending[self._seq] = job.id

    def _wait(self, progress: Progress | None) -> None:
        deadline = time.monotonic() + self._confirm_timeout
        before = len(self._pending)
        while len(self._pending) == before:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = PublishNotConfirmedError(
                    f"no publisher confirm for {len(self._pending)} job(s) within "
                    f"{self._confirm_timeout:g} s ({self._report.submitted} confirmed)"
                )
                error.report = self._report  # type: ignore[attr-defined]
                raise error
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
        self._flush_progress(progress)

    def _flush_progress(self, progress: Progress | None) -> None:
        done = self._report.submitted + len(self._report.failed)
        if progress is not None and done > self._settled:
            progress(done - self._settled)
        self._settled = done

    def _settle(self, tags: Sequence[int], reason: str | None) -> None:
        for tag in tags:
            job_id = self._pending.pop(tag)
            returned = self._returned.pop(job_id, None)
            why = reason or returned
            if why is None:
                self._report.submitted += 1
            else:
                self._report.failed.append((job_id, why))

    def _tags(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [delivery_tag] if delivery_tag in self._pending else []
        return list(_upto(self._pending, delivery_tag))

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(self._tags(delivery_tag, multiple), None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(self._tags(delivery_tag, multiple), "refused by the broker (queue full?)")

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        job_id = str(getattr(message, "properties", {}).get("message_id"))
        self._returned[job_id] = (
            f"unroutable: no queue bound to {exchange} with key {routing_key!r} "
            f"(run `satellite declare {routing_key}`)"
        )


def _upto(pending: OrderedDict[int, str], tag: int) -> Iterator[int]:
    for seq in pending:
        if seq > tag:
            break
        yield seq
