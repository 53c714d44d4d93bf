"""Jobs out, results back: build `JobRequest`s, publish them, and correlate the replies.

- `build_job(kind, ...)` fills in the version and a fresh id and validates the job against the
  wire models, raising `InvalidJobError` (field paths and reasons only, never input values).
- `JobPublisher` publishes a job to `usm_poller.jobs` with the satellite id as routing key:
  persistent, `mandatory`, and with a publisher confirm; an unroutable or nacked job raises
  `PublishNotConfirmedError`.
- `ReplyQueue` is an exclusive, auto-delete queue bound on `usm_poller.results` with
  `reply.*.<its name>`; `wait()` returns the result that matches a correlation id.

Who sent a result is checked by a `SenderCheck` (satellite id and the AMQP `user_id` that the
broker vouches for). `SenderPolicy` is the rule `Client` applies by default: the satellite's own
provisioned user `sat-<id>`, or a user the core trusts for every satellite (by default the core's
own broker user, so that pollers run with the core's credentials, e.g. `guest` in a lab, work).
`satellite_of_key` reads the satellite id out of a result's routing key.

Every job the toolkit publishes carries a correlation id that starts with
`CLI_CORRELATION_PREFIX` (unless the caller gives its own): the poller copies a job's correlation
id into its result, and the core service's history records such a job's source as `cli` rather
than `amqp` (`published_by_toolkit`; docs/core-service.md, "Sources").
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import kombu as _kombu
from amqp.exceptions import MessageNacked  # type: ignore[import-untyped]
from pydantic import JsonValue, TypeAdapter, ValidationError

from poller.errors import BrokerError, PollerError, PublishNotConfirmedError, WireError
from poller.wire import (
    PROTOCOL_VERSION,
    RESENT_HEADER,
    JobKind,
    JobRequest,
    JobResult,
    Lane,
    Target,
    decode_result,
    jobs_exchange,
    lane_routing_key,
    reply_binding_key,
    results_exchange,
)

__all__ = [
    "CLI_CORRELATION_PREFIX",
    "InvalidJobError",
    "JobPublisher",
    "NoResultError",
    "ReplyQueue",
    "SenderCheck",
    "SenderPolicy",
    "build_job",
    "cli_correlation_id",
    "new_job_id",
    "published_by_toolkit",
    "reply_queue_name",
    "satellite_of_key",
]

log = logging.getLogger(__name__)
#: kombu is only partly annotated (untyped calls fail `mypy --strict`): used through `Any`.
kombu: Any = _kombu

_JOB_ADAPTER: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)
CONTENT_TYPE = "application/json"
PERSISTENT = 2
REPLY_QUEUE_PREFIX = "satellite-reply-"
#: AMQP 403: the broker user lacks a permission (configure, write or read) for the object.
ACCESS_REFUSED_CODE = 403
#: Broker users of provisioned satellites are `sat-<id>` (see `satellite.provision`).
USER_PREFIX = "sat-"


class InvalidJobError(PollerError, ValueError):
    """The job does not validate against the wire models; the message names fields only."""

    code = "invalid_job"


class NoResultError(PollerError, TimeoutError):
    """No matching result arrived within the timeout (the job may still run later)."""

    code = "no_result"

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


def new_job_id() -> str:
    return str(uuid.uuid4())


#: How the correlation ids of the toolkit's jobs begin (the rest: 32 hex digits).
CLI_CORRELATION_PREFIX = "satellite-cli."


def cli_correlation_id() -> str:
    """A fresh correlation id that marks a job as published by the toolkit."""
    return f"{CLI_CORRELATION_PREFIX}{uuid.uuid4().hex}"


def published_by_toolkit(correlation_id: str | None) -> bool:
    """Whether a result's correlation id (copied from its job) is one the toolkit gave."""
    return correlation_id is not None and correlation_id.startswith(CLI_CORRELATION_PREFIX)


def reply_queue_name() -> str:
    """A fresh name for an RPC reply queue: no dots, so it is one word of a topic key."""
    return f"{REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"


def build_job(
    kind: str | JobKind,
    *,
    target: Target | Mapping[str, Any],
    auth: Mapping[str, Any] | None = None,
    credential_ref: str | None = None,
    params: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    not_after: datetime | None = None,
    idempotent: bool | None = None,
    meta: Mapping[str, JsonValue] | None = None,
    job_id: str | None = None,
) -> JobRequest:
    """A validated job of `kind`; fields left as None take the wire protocol's defaults."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": job_id if job_id is not None else new_job_id(),
        "kind": str(kind),
        "target": target.model_dump() if isinstance(target, Target) else dict(target),
    }
    optional = {
        "auth": dict(auth) if auth is not None else None,
        "credential_ref": credential_ref,
        "params": dict(params) if params is not None else None,
        "timeout": timeout,
        "not_after": not_after,
        "idempotent": idempotent,
        "meta": dict(meta) if meta is not None else None,
    }
    body |= {key: value for key, value in optional.items() if value is not None}
    try:
        return _JOB_ADAPTER.validate_python(body)
    except ValidationError as exc:
        raise InvalidJobError(f"invalid {kind} job: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """Field paths and reasons only: input values are never repeated (they may be secrets)."""
    kinds = {k.value for k in JobKind}
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"] if p not in kinds)
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Publishing


class JobPublisher:
    """Publishes jobs on one confirm-mode channel and turns returns and nacks into errors."""

    def __init__(
        self,
        channel: Any,
        *,
        confirm_timeout: float,
        channel_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._confirm_timeout = confirm_timeout
        self._channel_errors = channel_errors
        self.broken = False
        """Set when a confirm timed out: the channel must not be used again."""
        self._returned: list[str] = []
        self._producer = kombu.Producer(channel, auto_declare=False, on_return=self._on_return)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        message_id = getattr(message, "properties", {}).get("message_id")
        log.debug(
            "job_returned: %s (exchange %r, routing key %r)",
            getattr(exc, "reply_text", exc),
            exchange,
            routing_key,
        )
        self._returned.append(str(message_id))

    def publish(
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
        """Publish and wait for the confirm; raise `PublishNotConfirmedError` when not taken.

        `resent`: this job was published before and that publish's outcome is unknown (its
        connection was lost before the confirm): the header `RESENT_HEADER` tells the poller
        that the job may be in the queue twice, so its result is flagged `redelivered`.

        `lane="interactive"` sends it to the satellite's interactive lane (DESIGN §13): the
        poller runs it before the bulk backlog. `priority` does not do that: quorum queues on
        RabbitMQ 3.x ignore message priorities (docs/wire.md, "Lanes").
        """
        routing_key = lane_routing_key(satellite_id, lane)
        properties: dict[str, Any] = {
            "message_id": job.id,
            "type": job.kind,
            "correlation_id": correlation_id or cli_correlation_id(),
        }
        if reply_to is not None:
            properties["reply_to"] = reply_to
        if resent:
            properties["headers"] = {RESENT_HEADER: True}
        self._returned.clear()
        try:
            self._producer.publish(
                job.model_dump_json().encode(),
                exchange=jobs_exchange(),
                routing_key=routing_key,
                content_type=CONTENT_TYPE,
                content_encoding="utf-8",
                delivery_mode=PERSISTENT,
                mandatory=True,
                priority=priority,
                expiration=expiration,
                retry=False,
                timeout=self._confirm_timeout,
                confirm_timeout=self._confirm_timeout,
                **properties,
            )
        except self._channel_errors as exc:
            text = getattr(exc, "reply_text", None) or str(exc)
            raise PublishNotConfirmedError(
                f"the broker refused job {job.id} for satellite {satellite_id}: {text} "
                f"({_refusal_hint(exc, 'write on usm_poller.jobs')})"
            ) from exc
        except MessageNacked:
            raise PublishNotConfirmedError(
                f"the broker refused job {job.id} for satellite {satellite_id} "
                "(queue full or unavailable)"
            ) from None
        except TimeoutError:
            self.broken = True
            raise PublishNotConfirmedError(
                f"no publisher confirm for job {job.id} within {self._confirm_timeout:g} s"
            ) from None
        if job.id in self._returned:
            raise PublishNotConfirmedError(
                f"job {job.id} was not routed: no queue is bound to {jobs_exchange()} with key "
                f"{routing_key!r} (run `satellite declare {satellite_id}`)"
            )


# --------------------------------------------------------------------------------------------
# Results


class SenderCheck(Protocol):
    """Decides whether a result really comes from the satellite it names.

    `user_id` is the AMQP `user_id` property, which RabbitMQ checks against the publishing
    connection's user; None when the publisher did not set it.
    """

    def __call__(self, satellite_id: str, user_id: str | None) -> bool: ...


def accept_any_sender(satellite_id: str, user_id: str | None) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class SenderPolicy:
    """Accept a result of satellite `<id>` when its `user_id` is `sat-<id>` or a trusted user.

    `trusted_users` may publish for any satellite (shared legacy users, the core's own user);
    `"*"` among them accepts every sender, even one without `user_id` (not recommended).
    """

    trusted_users: frozenset[str] = frozenset()

    @classmethod
    def trusting(cls, *users: str) -> SenderPolicy:
        return cls(frozenset(user for user in users if user))

    def __call__(self, satellite_id: str, user_id: str | None) -> bool:
        if "*" in self.trusted_users:
            return True
        if not user_id:
            return False
        return user_id == f"{USER_PREFIX}{satellite_id}" or user_id in self.trusted_users

    def describe(self) -> str:
        users = ", ".join(sorted(self.trusted_users)) or "none"
        return f"sat-<id> for its own satellite; trusted for all: {users}"


def satellite_of_key(routing_key: str) -> str | None:
    """The satellite id in `result.<id>.<kind>`, `reply.<id>.<queue>` or `heartbeat.<id>`."""
    parts = routing_key.split(".")
    if len(parts) >= 2 and parts[0] in ("result", "reply", "heartbeat", "event"):
        return parts[1]
    return None


@dataclass(frozen=True, slots=True)
class _Expected:
    satellite_id: str
    job_id: str


class ReplyQueue:
    """An exclusive reply queue for this connection and the results that arrived on it."""

    def __init__(
        self,
        connection: Any,
        channel: Any,
        *,
        channel_errors: tuple[type[BaseException], ...],
        sender_check: SenderCheck = accept_any_sender,
    ) -> None:
        self.name = reply_queue_name()
        self._connection = connection
        self._sender_check = sender_check
        self._expected: dict[str, _Expected] = {}
        self._results: dict[str, JobResult] = {}
        queue = kombu.Queue(
            self.name,
            exchange=kombu.Exchange(results_exchange(), type="topic", no_declare=True),
            routing_key=reply_binding_key(self.name),
            durable=False,
            exclusive=True,
            auto_delete=True,
            queue_arguments={"x-queue-type": "classic"},
        )
        try:
            self._consumer = kombu.Consumer(
                channel, queues=[queue], on_message=self._on_message, no_ack=True
            )
            self._consumer.consume()
        except channel_errors as exc:
            text = getattr(exc, "reply_text", None) or str(exc)
            hint = _refusal_hint(exc, f"configure and read on {REPLY_QUEUE_PREFIX}*")
            raise BrokerError(f"cannot set up the reply queue: {text} ({hint})") from exc

    def expect(self, correlation_id: str, *, satellite_id: str, job_id: str) -> None:
        self._expected[correlation_id] = _Expected(satellite_id, job_id)

    def forget(self, correlation_id: str) -> None:
        self._expected.pop(correlation_id, None)
        self._results.pop(correlation_id, None)

    def wait(self, correlation_id: str, timeout: float) -> JobResult | None:
        """The result for `correlation_id`, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while correlation_id not in self._results:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self._connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        return self._results[correlation_id]

    def _on_message(self, message: Any) -> None:
        properties: Mapping[str, Any] = message.properties
        correlation_id = str(properties.get("correlation_id") or "")
        expected = self._expected.get(correlation_id)
        if expected is None or correlation_id in self._results:
            log.info("result_ignored: no caller waits for correlation id %r", correlation_id)
            return
        try:
            result = decode_result(message.body)
        except WireError as exc:
            log.warning("result_invalid: %s", exc)
            return
        key_satellite = satellite_of_key(str(message.delivery_info.get("routing_key", "")))
        if key_satellite != result.satellite_id:
            log.warning(
                "result_rejected: satellite %r in the body, %r in the routing key",
                result.satellite_id,
                key_satellite,
            )
            return
        if (result.job_id, result.satellite_id) != (expected.job_id, expected.satellite_id):
            log.warning(
                "result_mismatched: job %r from satellite %r for job %r on satellite %r",
                result.job_id,
                result.satellite_id,
                expected.job_id,
                expected.satellite_id,
            )
            return
        user_id = properties.get("user_id")
        if not self._sender_check(result.satellite_id, user_id):
            log.warning(
                "result_rejected: satellite %r sent by broker user %r",
                result.satellite_id,
                user_id,
            )
            return
        self._results[correlation_id] = result

    def cancel(self) -> None:
        self._consumer.cancel()


def _refusal_hint(exc: BaseException, needs: str) -> str:
    """What to do about a channel error: a 403 is a permission of this broker user (the objects
    exist: declaring them again changes nothing), anything else most likely a missing object."""
    if getattr(exc, "reply_code", None) == ACCESS_REFUSED_CODE:
        return f"this broker user lacks a permission: it needs {needs}"
    return "run `satellite declare` first?"
