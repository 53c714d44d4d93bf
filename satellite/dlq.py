"""Dead-lettered jobs: list, show (secrets masked), replay to the job queue, purge.

Reading a dead-letter queue takes its messages with `basic.get` and holds them unacknowledged;
closing the channel gives every message not replayed back to the queue (a quorum queue takes
them back a moment later, behind the messages that were not read). A replay
publishes a copy to `usm_poller.jobs` (same body, same `message_id`, `reply_to` and
`correlation_id`), waits for the publisher confirm, and only then acknowledges the dead letter:
a process that dies mid-replay leaves each job in the DLQ, or in both queues, never in neither.

Why a job was dead-lettered: the broker's `x-death` (last reason, how many times) and
`x-first-death-reason` headers, the delivery count (`x-delivery-count`, when the broker kept
it), and the error code the poller answered with. The poller cannot put headers on a reject, so
that code is found again the way the poller found it: by decoding the body with
`poller.wire.decode_job` (`invalid_job`, `unsupported_version`, `unknown_kind`); a body that
decodes was rejected after the poller failed on it on its last allowed delivery
(`internal_error`), or after its driver crashed the worker's process on each try (`worker_crashed`,
poller/sandbox.py): a reject carries no code to tell these apart, so both show as
`internal_error`, and the error result the poller published (when the job id was readable) says
which.

The copy drops the broker's bookkeeping headers (`x-death`, `x-first-death-*`,
`x-last-death-*`, `x-delivery-count`) and records the replay in `x-replay-count`,
`x-replayed-at` and `x-replay-reason` (the reason it was dead-lettered).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import amqp  # type: ignore[import-untyped]
from amqp.exceptions import MessageNacked  # type: ignore[import-untyped]

from poller.errors import PublishNotConfirmedError, WireError
from poller.wire import (
    dead_letter_queue,
    decode_job,
    format_timestamp,
    jobs_exchange,
    jobs_routing_key,
)

__all__ = [
    "DeadLetter",
    "ReplayReport",
    "mask_secrets",
    "purge_dead_letters",
    "read_dead_letters",
    "replay_dead_letters",
]

MASK = "***"
_SECRET_WORDS = ("password", "community", "secret", "token", "private_key", "auth_key", "priv_key")
_DROPPED_HEADERS = ("x-death", "x-delivery-count")
_DROPPED_PREFIXES = ("x-first-death-", "x-last-death-")
LIST_LIMIT = 100_000
#: The poller's default `USM_POLLER_MAX_JOB_BYTES`: bigger bodies are rejected unparsed.
POLLER_MAX_JOB_BYTES = 262_144
NOT_JSON = "(not JSON)"
"""Shown as the kind of a dead letter whose body is not a JSON object."""


def diagnose(reason: str | None, body: bytes) -> tuple[str | None, str]:
    """(the poller's error code or None, why in words) for a dead letter of `reason`."""
    if reason == "delivery_limit":
        return None, (
            "delivered as often as the queue allows without an answer: the poller crashed, "
            "was killed or failed on it each time (a poison job)"
        )
    if reason == "expired":
        return None, "its AMQP expiration passed before a poller took it"
    if reason == "maxlen":
        return None, "dropped from the head of a full queue"
    if len(body) > POLLER_MAX_JOB_BYTES:
        return "invalid_job", (
            f"job body of {len(body)} bytes exceeds the poller's default limit "
            f"(USM_POLLER_MAX_JOB_BYTES, {POLLER_MAX_JOB_BYTES})"
        )
    try:
        decode_job(body)
    except WireError as exc:
        return exc.error_code, exc.message.removeprefix("invalid job: ")
    return "internal_error", (
        "a valid job: the poller failed on it on its last allowed delivery (internal_error), "
        "or its driver crashed the worker process each time (worker_crashed); the error "
        "result published for it says which"
    )


def _is_secret(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask_secrets(value: Any) -> Any:
    """A copy of JSON `value` with every secret-looking field's value replaced by `***`."""
    if isinstance(value, Mapping):
        return {
            key: MASK if _is_secret(str(key)) and item is not None else mask_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """AMQP table values as JSON-friendly values (bytes as text, datetimes as RFC 3339)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return format_timestamp(value if value.tzinfo else value.replace(tzinfo=UTC))
    return value


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of a dead-letter queue."""

    job_id: str | None
    kind: str | None
    reason: str | None
    """Why it was dead-lettered last: `rejected`, `delivery_limit`, `expired`, `maxlen`."""
    count: int
    """How many times it was dead-lettered from its queue for that reason."""
    first_reason: str | None
    """`x-first-death-reason`: why it was dead-lettered the first time."""
    deliveries: int | None
    """`x-delivery-count` when the message carries it, else None. On a quorum DLQ this is the
    DLQ's own count: how often this dead letter was read and given back (`dlq list`, `show`,
    a replay that failed), not how often a poller got the job (RabbitMQ 3.10, measured)."""
    error_code: str | None
    """The error code the poller answered with (see `diagnose`), None when it did not."""
    why: str
    """Why it was dead-lettered, in words."""
    body_is_json: bool
    queue: str | None
    time: datetime | None
    size: int
    headers: Mapping[str, Any] = field(repr=False)
    properties: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    delivery_tag: int = field(repr=False, default=0)

    @classmethod
    def from_message(cls, message: Any) -> DeadLetter:
        properties: dict[str, Any] = dict(message.properties)
        headers: dict[str, Any] = dict(properties.get("application_headers") or {})
        deaths = headers.get("x-death") or []
        death: Mapping[str, Any] = deaths[0] if deaths and isinstance(deaths[0], Mapping) else {}
        body = _body_bytes(message.body)
        parsed = _json_object(body)
        when = death.get("time")
        reason = _str_or_none(_plain(death.get("reason") or headers.get("x-last-death-reason")))
        first = _str_or_none(_plain(headers.get("x-first-death-reason")))
        deliveries = headers.get("x-delivery-count")
        code, why = diagnose(reason, body)
        return cls(
            job_id=properties.get("message_id") or _str_or_none(parsed.get("id")),
            kind=properties.get("type") or _str_or_none(parsed.get("kind")),
            reason=reason,
            count=int(death.get("count") or 0),
            first_reason=first,
            deliveries=deliveries if isinstance(deliveries, int) else None,
            error_code=code,
            why=why,
            body_is_json=_is_json_object(body),
            queue=_str_or_none(_plain(death.get("queue"))),
            time=when if isinstance(when, datetime) else None,
            size=len(body),
            headers=headers,
            properties=properties,
            body=body,
            delivery_tag=message.delivery_tag,
        )

    @property
    def kind_text(self) -> str:
        """The kind for people: `(not JSON)` for a body that is not a JSON object."""
        if self.kind is not None:
            return self.kind
        return "(unknown)" if self.body_is_json else NOT_JSON

    def summary(self) -> dict[str, Any]:
        when = self.time.replace(tzinfo=self.time.tzinfo or UTC) if self.time else None
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "body_is_json": self.body_is_json,
            "reason": self.reason,
            "count": self.count,
            "first_reason": self.first_reason,
            "deliveries": self.deliveries,
            "error_code": self.error_code,
            "why": self.why,
            "queue": self.queue,
            "time": format_timestamp(when) if when else None,
            "size": self.size,
        }

    def details(self) -> dict[str, Any]:
        """Everything about it, secrets masked; a body that is not JSON is not shown."""
        parsed = _json_object(self.body)
        props = {
            k: _plain(v)
            for k, v in self.properties.items()
            if k != "application_headers" and v is not None
        }
        return {
            **self.summary(),
            "properties": props,
            "headers": mask_secrets(_plain(self.headers)),
            "body": mask_secrets(parsed) if parsed else f"<{self.size} bytes, not a JSON object>",
        }


def _body_bytes(body: bytes | str) -> bytes:
    """The message body as bytes (py-amqp decodes bodies that declare a content encoding)."""
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def read_dead_letters(
    channel: Any, satellite_id: str, *, limit: int = LIST_LIMIT
) -> Iterator[DeadLetter]:
    """Take the DLQ's messages one by one, unacknowledged (they return when `channel` closes)."""
    queue = dead_letter_queue(satellite_id)
    for _ in range(limit):
        message = channel.basic_get(queue=queue, no_ack=False)
        if message is None:
            return
        yield DeadLetter.from_message(message)


@dataclass(slots=True)
class ReplayReport:
    replayed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed and not self.not_found,
            "replayed": self.replayed,
            "failed": [{"job_id": job_id, "reason": reason} for job_id, reason in self.failed],
            "not_found": self.not_found,
        }


def replay_headers(letter: DeadLetter, now: datetime | None = None) -> dict[str, Any]:
    headers = {
        key: value
        for key, value in letter.headers.items()
        if key not in _DROPPED_HEADERS and not key.startswith(_DROPPED_PREFIXES)
    }
    previous = headers.get("x-replay-count")
    headers["x-replay-count"] = (previous if isinstance(previous, int) else 0) + 1
    headers["x-replayed-at"] = format_timestamp(now or datetime.now(UTC))
    headers["x-replay-reason"] = letter.reason or "unknown"
    return headers


_COPIED = ("content_type", "content_encoding", "message_id", "correlation_id", "reply_to", "type")


def replay_dead_letters(
    channel: Any,
    satellite_id: str,
    *,
    job_ids: Collection[str] | None = None,
    confirm_timeout: float = 10.0,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> ReplayReport:
    """Replay the chosen (None: all) dead letters to the satellite's job queue.

    `channel` must belong to a connection opened with `confirm_publish` (each publish then
    waits for its confirm). Dead letters not chosen, or not replayed, stay in the DLQ.
    """
    wanted = set(job_ids) if job_ids is not None else None
    report = ReplayReport()
    returned: list[str] = []
    channel.events["basic_return"].add(
        lambda exc, exchange, key, message: returned.append(str(exc))
    )
    for letter in read_dead_letters(channel, satellite_id):
        if wanted is not None and letter.job_id not in wanted:
            continue
        job_id = letter.job_id or f"<tag {letter.delivery_tag}>"
        props = {k: letter.properties[k] for k in _COPIED if letter.properties.get(k) is not None}
        priority = letter.properties.get("priority")
        if priority is not None:
            props["priority"] = priority
        message = amqp.Message(
            letter.body, delivery_mode=2, application_headers=replay_headers(letter), **props
        )
        returned.clear()
        try:
            channel.basic_publish(
                message,
                exchange=jobs_exchange(),
                routing_key=jobs_routing_key(satellite_id),
                mandatory=True,
                confirm_timeout=confirm_timeout,
            )
        except MessageNacked:
            report.failed.append((job_id, "refused by the broker (queue full?)"))
            continue
        except TimeoutError:
            raise PublishNotConfirmedError(
                f"no publisher confirm for replayed job {job_id} within {confirm_timeout:g} s; "
                "it stays in the dead-letter queue"
            ) from None
        if returned:
            report.failed.append((job_id, f"unroutable: {returned[0]}"))
            continue
        channel.basic_ack(letter.delivery_tag)
        report.replayed.append(job_id)
        if on_replayed is not None:
            on_replayed(letter)
        if wanted is not None:
            wanted.discard(job_id)
            if not wanted:
                break
    if wanted:
        report.not_found = sorted(wanted)
    return report


def purge_dead_letters(channel: Any, satellite_id: str) -> int:
    """Delete every message of the satellite's DLQ; the number deleted."""
    count: int = channel.queue_purge(queue=dead_letter_queue(satellite_id)) or 0
    return count
