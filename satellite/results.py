"""Reading the core's result queue `usm_poller.results`: each result once, from whom it claims.

`ResultReader.read()` takes messages one by one (`basic.get`) and yields each acceptable result
once; a result is acknowledged when the caller asks for the next one (so a crash while printing
leaves it in the queue). Messages are dropped (acknowledged, counted, warned about) when:

- the body is not a valid result (`invalid`);
- the satellite id of the routing key, of the body and of the `x-satellite-id` header disagree,
  or the AMQP `user_id` does not pass the sender check (`rejected`);
- the job id was already yielded by this reader (`duplicates`: a redelivered job's second
  result).

With a satellite filter, results of other satellites are left in the queue: they are held
unacknowledged until the reader closes (then the broker gives them to the next consumer).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from poller.errors import WireError
from poller.wire import LANE_HEADER, JobResult, decode_result, results_queue
from satellite.dispatch import SenderCheck, satellite_of_key

__all__ = ["ReadStats", "ReceivedResult", "ResultReader"]

log = logging.getLogger(__name__)

DEDUPE_MEMORY = 100_000
"""Job ids remembered for de-duplication (oldest forgotten first)."""
MAX_HELD = 10_000
"""Results of other satellites held unacknowledged at most while filtering."""


@dataclass(frozen=True, slots=True)
class ReceivedResult:
    result: JobResult
    routing_key: str
    user_id: str | None
    redelivered: bool
    lane: str | None = None
    """`interactive` or `bulk` (the `x-lane` header); None from pollers older than the lane."""

    def as_dict(self) -> dict[str, Any]:
        return self.result.model_dump(mode="json")


@dataclass(slots=True)
class ReadStats:
    delivered: int = 0
    duplicates: int = 0
    rejected: int = 0
    invalid: int = 0
    held: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "invalid": self.invalid,
            "left_in_queue": self.held,
        }


class ResultReader:
    """Reads `usm_poller.results` (or `queue`) on its own channel; close it when done."""

    def __init__(
        self,
        channel: Any,
        *,
        sender_check: SenderCheck,
        satellites: Collection[str] | None = None,
        queue: str | None = None,
    ) -> None:
        self._channel = channel
        self._check = sender_check
        self._satellites = frozenset(satellites) if satellites else None
        self._queue = queue or results_queue()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.stats = ReadStats()

    def close(self) -> None:
        """Close the channel: held results go back to the queue."""
        if self._channel.is_open:
            self._channel.close()

    def read(
        self, *, follow: bool = False, poll_interval: float = 0.2, until: float | None = None
    ) -> Iterator[ReceivedResult]:
        """Yield results until the queue is empty (or, with `follow`, until `until` or forever).

        `until` is a `time.monotonic()` deadline.
        """
        pending_ack: int | None = None
        while until is None or time.monotonic() < until:
            if pending_ack is not None:
                self._channel.basic_ack(pending_ack)
                pending_ack = None
            if self.stats.held >= MAX_HELD:
                if not follow:
                    log.warning(
                        "results_stopped: %d results of other satellites are in the way",
                        self.stats.held,
                    )
                    return
                self._channel.basic_recover(requeue=True)
                self.stats.held = 0
            message = self._channel.basic_get(queue=self._queue, no_ack=False)
            if message is None:
                if not follow:
                    return
                time.sleep(poll_interval)
                continue
            received = self._accept(message)
            if received is None:
                continue
            pending_ack = message.delivery_tag
            self.stats.delivered += 1
            yield received
        if pending_ack is not None:
            self._channel.basic_ack(pending_ack)

    def _accept(self, message: Any) -> ReceivedResult | None:
        """The result to yield, or None (then acked or held as the module docstring says)."""
        tag = message.delivery_tag
        routing_key = str(message.delivery_info.get("routing_key", ""))
        properties: Mapping[str, Any] = message.properties
        key_satellite = satellite_of_key(routing_key)
        if self._satellites is not None and key_satellite not in self._satellites:
            self.stats.held += 1
            return None
        try:
            result = decode_result(message.body)
        except WireError as exc:
            self._drop(tag, "invalid", "result_invalid: %s (routing key %r)", exc, routing_key)
            return None
        headers = properties.get("application_headers") or {}
        header = headers.get("x-satellite-id")
        user_id = properties.get("user_id")
        if key_satellite != result.satellite_id or header not in (None, result.satellite_id):
            self._drop(
                tag,
                "rejected",
                "result_rejected: job %s names satellite %r, routing key %r, header %r",
                result.job_id,
                result.satellite_id,
                routing_key,
                header,
            )
            return None
        if not self._check(result.satellite_id, user_id):
            self._drop(
                tag,
                "rejected",
                "result_rejected: job %s of satellite %r was sent by broker user %r",
                result.job_id,
                result.satellite_id,
                user_id,
            )
            return None
        if result.job_id in self._seen:
            self._drop(tag, "duplicates", "result_duplicate: job %s", result.job_id, level=10)
            return None
        self._seen[result.job_id] = None
        if len(self._seen) > DEDUPE_MEMORY:
            self._seen.popitem(last=False)
        return ReceivedResult(
            result=result,
            routing_key=routing_key,
            user_id=user_id,
            redelivered=bool(message.delivery_info.get("redelivered")),
            lane=_lane(headers.get(LANE_HEADER)),
        )

    def _drop(self, tag: int, counter: str, text: str, *args: Any, level: int = 30) -> None:
        log.log(level, text, *args)
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._channel.basic_ack(tag)


def _lane(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value in ("interactive", "bulk"):
        return value
    return None
