"""The broker topology of DESIGN §3: what to declare (pure) and declaring it idempotently.

`core_topology(ids)` lists the exchanges, queues and bindings for some satellites plus the core's
result queue. `declare_topology(open_channel, topology, ...)` declares them one by one and
reports, per object, whether it was created, already existed, or exists with other arguments (a
406 PRECONDITION_FAILED that is reported, not raised). Each exchange and queue is first
declared passively, to tell "created" from "already existed", then actively.

Every queue is quorum by default, the dead-letter queues included; a classic dead-letter queue
left by an older version is reported as a conflict that says how to migrate it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from poller.errors import BrokerError, PollerError
from poller.wire import (
    dead_letter_exchange,
    dead_letter_queue,
    dead_letter_queue_arguments,
    events_exchange,
    interactive_queue,
    interactive_routing_key,
    jobs_exchange,
    jobs_queue,
    jobs_queue_arguments,
    jobs_routing_key,
    results_binding_key,
    results_exchange,
    results_queue,
    results_queue_arguments,
    validate_satellite_id,
)

__all__ = [
    "BindingSpec",
    "DeclareReport",
    "Declared",
    "ExchangeSpec",
    "NotDeclaredError",
    "Outcome",
    "QueueSpec",
    "QueueType",
    "Topology",
    "core_topology",
    "declare_topology",
]

QueueType = Literal["quorum", "classic"]

NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406


class NotDeclaredError(PollerError):
    """A queue or exchange a command needs does not exist: `satellite declare` was not run.

    The message is one line that says which object and what to run.
    """

    code = "not_found"

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: Literal["direct", "topic"]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, str | int] = field(default_factory=dict)
    dead_letters: bool = False  # a satellite's dead-letter queue


@dataclass(frozen=True, slots=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str

    @property
    def name(self) -> str:
        return f"{self.exchange} -> {self.queue} ({self.routing_key})"


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]


def core_topology(
    satellite_ids: Iterable[str],
    *,
    queue_type: QueueType = "quorum",
    include_results_queue: bool = True,
) -> Topology:
    """Every object of DESIGN §3 for these satellites (duplicates ignored); raise ValueError."""
    ids: list[str] = []
    for sat in satellite_ids:
        try:
            validate_satellite_id(sat)
        except ValueError as exc:
            raise ValueError(f"{sat!r}: {exc}") from None
        if sat not in ids:
            ids.append(sat)
    exchanges = (
        ExchangeSpec(jobs_exchange(), "direct"),
        ExchangeSpec(dead_letter_exchange(), "direct"),
        ExchangeSpec(results_exchange(), "topic"),
        ExchangeSpec(events_exchange(), "topic"),
    )
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for sat in ids:
        key = jobs_routing_key(sat)
        queues.append(QueueSpec(jobs_queue(sat), jobs_queue_arguments(sat, queue_type)))
        bindings.append(BindingSpec(jobs_queue(sat), jobs_exchange(), key))
        lane = interactive_queue(sat)
        queues.append(QueueSpec(lane, jobs_queue_arguments(sat, queue_type)))
        bindings.append(BindingSpec(lane, jobs_exchange(), interactive_routing_key(sat)))
        queues.append(
            QueueSpec(dead_letter_queue(sat), dead_letter_queue_arguments(queue_type), True)
        )
        bindings.append(BindingSpec(dead_letter_queue(sat), dead_letter_exchange(), key))
    if include_results_queue:
        queues.append(QueueSpec(results_queue(), results_queue_arguments()))
        bindings.append(BindingSpec(results_queue(), results_exchange(), results_binding_key()))
    return Topology(exchanges, tuple(queues), tuple(bindings))


# --------------------------------------------------------------------------------------------
# Declaring


class Outcome(StrEnum):
    CREATED = "created"
    EXISTS = "exists"
    CONFLICT = "conflict"
    """Exists with other arguments or type (406): left as it is, and still bound."""
    BOUND = "bound"
    """Bindings are idempotent and AMQP cannot tell whether one existed."""


@dataclass(frozen=True, slots=True)
class Declared:
    object: Literal["exchange", "queue", "binding"]
    name: str
    outcome: Outcome
    detail: str | None = None
    messages: int | None = None
    consumers: int | None = None

    def as_dict(self) -> dict[str, str | int | None]:
        return {
            "object": self.object,
            "name": self.name,
            "outcome": self.outcome.value,
            "detail": self.detail,
            "messages": self.messages,
            "consumers": self.consumers,
        }


@dataclass(frozen=True, slots=True)
class DeclareReport:
    items: tuple[Declared, ...]

    @property
    def conflicts(self) -> tuple[Declared, ...]:
        return tuple(item for item in self.items if item.outcome is Outcome.CONFLICT)

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "objects": [item.as_dict() for item in self.items]}


class AmqpChannel(Protocol):
    """The part of a py-amqp channel (what kombu's `Connection.channel()` returns) used here."""

    is_open: bool

    def exchange_declare(self, *, exchange: str, type: str, **options: Any) -> Any: ...

    def queue_declare(self, *, queue: str, **options: Any) -> Any: ...

    def queue_bind(self, *, queue: str, exchange: str, routing_key: str) -> Any: ...


def declare_topology(
    open_channel: Callable[[], AmqpChannel],
    topology: Topology,
    *,
    channel_errors: tuple[type[BaseException], ...],
) -> DeclareReport:
    """Declare exchanges, then queues, then bindings; a 406 is reported, other errors raise.

    `channel_errors` are the client library's channel-level exceptions (they carry
    `reply_code` and `reply_text`). The broker closes the channel on each of them; py-amqp
    reopens it by itself, and any other channel found closed is replaced with `open_channel`.
    Raises `BrokerError` when the broker refuses something for another reason (for example
    403 ACCESS_REFUSED).
    """
    declarer = _Declarer(open_channel, channel_errors)
    items = [declarer.exchange(spec) for spec in topology.exchanges]
    items += [declarer.queue(spec) for spec in topology.queues]
    items += [declarer.binding(spec) for spec in topology.bindings]
    return DeclareReport(tuple(items))


class _Declarer:
    def __init__(
        self,
        open_channel: Callable[[], AmqpChannel],
        channel_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._open_channel = open_channel
        self._errors = channel_errors
        self._channel: AmqpChannel | None = None

    @property
    def channel(self) -> AmqpChannel:
        if self._channel is None or not getattr(self._channel, "is_open", True):
            self._channel = self._open_channel()
        return self._channel

    def exchange(self, spec: ExchangeSpec) -> Declared:
        try:
            self.channel.exchange_declare(exchange=spec.name, type=spec.type, passive=True)
            existed = True
        except self._errors as exc:
            self._expect(exc, NOT_FOUND, "exchange", spec.name)
            existed = False
        try:
            self.channel.exchange_declare(
                exchange=spec.name, type=spec.type, durable=True, auto_delete=False
            )
        except self._errors as exc:
            detail = self._expect(exc, PRECONDITION_FAILED, "exchange", spec.name)
            return Declared("exchange", spec.name, Outcome.CONFLICT, detail)
        return Declared("exchange", spec.name, Outcome.EXISTS if existed else Outcome.CREATED)

    def queue(self, spec: QueueSpec) -> Declared:
        before: Any = None
        try:
            before = self.channel.queue_declare(queue=spec.name, passive=True)
        except self._errors as exc:
            self._expect(exc, NOT_FOUND, "queue", spec.name)
        try:
            after = self.channel.queue_declare(
                queue=spec.name,
                durable=True,
                exclusive=False,
                auto_delete=False,
                arguments=dict(spec.arguments),
            )
        except self._errors as exc:
            detail = self._expect(exc, PRECONDITION_FAILED, "queue", spec.name, RESOURCE_LOCKED)
            if _is_classic_dead_letter_queue(spec, detail):
                detail = CLASSIC_DLQ_DETAIL
            return Declared(
                "queue",
                spec.name,
                Outcome.CONFLICT,
                detail,
                messages=_count(before, "message_count"),
                consumers=_count(before, "consumer_count"),
            )
        return Declared(
            "queue",
            spec.name,
            Outcome.CREATED if before is None else Outcome.EXISTS,
            messages=_count(after, "message_count"),
            consumers=_count(after, "consumer_count"),
        )

    def binding(self, spec: BindingSpec) -> Declared:
        try:
            self.channel.queue_bind(
                queue=spec.queue, exchange=spec.exchange, routing_key=spec.routing_key
            )
        except self._errors as exc:
            raise BrokerError(f"binding {spec.name}: {_reply_text(exc)}") from exc
        return Declared("binding", spec.name, Outcome.BOUND)

    def _expect(self, exc: BaseException, code: int, what: str, name: str, *also: int) -> str:
        """Return the broker's reply text when `exc` carries an expected code; else raise."""
        if getattr(exc, "reply_code", None) in (code, *also):
            return _reply_text(exc)
        raise BrokerError(f"{what} {name}: {_reply_text(exc)}") from exc


#: What `declare` says of a classic dead-letter queue it finds where a quorum one belongs.
CLASSIC_DLQ_DETAIL = (
    "a classic dead-letter queue (made by an older version): it lives on one broker node and is "
    "unusable while that node is down; to make it quorum, drain it (`satellite dlq replay` or "
    '`purge`), delete it, and declare again (docs/operations.md, "Classic dead-letter queues")'
)


def _is_classic_dead_letter_queue(spec: QueueSpec, detail: str) -> bool:
    """Whether a 406 says that a dead-letter queue meant to be quorum exists as classic."""
    return (
        spec.dead_letters
        and spec.arguments.get("x-queue-type") == "quorum"
        and "'x-queue-type'" in detail
    )


def _reply_text(exc: BaseException) -> str:
    text = getattr(exc, "reply_text", None)
    return str(text) if text else str(exc)


def _count(declare_ok: Any, name: str) -> int | None:
    value = getattr(declare_ok, name, None)
    return value if isinstance(value, int) else None
