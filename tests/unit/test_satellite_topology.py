"""The topology plan of DESIGN §3, and how declaring reports created / exists / conflict."""

from __future__ import annotations

from typing import Any

import pytest

from poller.errors import BrokerError
from poller.wire import DEAD_LETTER_DELIVERY_LIMIT, jobs_queue_arguments
from satellite.topology import (
    BindingSpec,
    ExchangeSpec,
    Outcome,
    QueueSpec,
    Topology,
    core_topology,
    declare_topology,
)


def test_plan_has_every_object_of_the_design() -> None:
    topology = core_topology(["7", "olt-2", "7"])
    assert topology.exchanges == (
        ExchangeSpec("usm_poller.jobs", "direct"),
        ExchangeSpec("usm_poller.dlx", "direct"),
        ExchangeSpec("usm_poller.results", "topic"),
        ExchangeSpec("usm_poller.events", "topic"),
    )
    assert [q.name for q in topology.queues] == [
        "usm_poller-sat-7",
        "usm_poller-sat-7.interactive",
        "usm_poller-sat-7.dlq",
        "usm_poller-sat-olt-2",
        "usm_poller-sat-olt-2.interactive",
        "usm_poller-sat-olt-2.dlq",
        "usm_poller.results",
    ]
    assert topology.queues[0].arguments == jobs_queue_arguments("7", "quorum")
    assert topology.queues[0].arguments["x-queue-type"] == "quorum"
    # The interactive lane: the same arguments, dead letters to the same DLQ.
    assert topology.queues[1].arguments == jobs_queue_arguments("7", "quorum")
    # Every queue is quorum: a classic DLQ would stop with the one node that holds it.
    assert topology.queues[2].arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT,  # reading dead letters never drops them
    }
    assert topology.queues[2].dead_letters
    assert topology.queues[-1].arguments == {"x-queue-type": "quorum"}
    assert topology.bindings == (
        BindingSpec("usm_poller-sat-7", "usm_poller.jobs", "7"),
        BindingSpec("usm_poller-sat-7.interactive", "usm_poller.jobs", "7.interactive"),
        BindingSpec("usm_poller-sat-7.dlq", "usm_poller.dlx", "7"),
        BindingSpec("usm_poller-sat-olt-2", "usm_poller.jobs", "olt-2"),
        BindingSpec("usm_poller-sat-olt-2.interactive", "usm_poller.jobs", "olt-2.interactive"),
        BindingSpec("usm_poller-sat-olt-2.dlq", "usm_poller.dlx", "olt-2"),
        BindingSpec("usm_poller.results", "usm_poller.results", "result.#"),
    )


def test_classic_queues_get_no_quorum_arguments() -> None:
    queue, lane, dlq, results = core_topology(["7"], queue_type="classic").queues
    assert "x-queue-type" not in queue.arguments
    assert "x-delivery-limit" not in queue.arguments
    assert queue.arguments["x-dead-letter-exchange"] == "usm_poller.dlx"
    assert lane.arguments == queue.arguments
    assert dlq.arguments == {}  # classic, as before quorum dead-letter queues
    assert results.arguments == {"x-queue-type": "quorum"}  # the core's: always quorum


def test_results_queue_can_be_left_out() -> None:
    topology = core_topology(["7"], include_results_queue=False)
    assert "usm_poller.results" not in [q.name for q in topology.queues]


@pytest.mark.parametrize("bad", ["", "a.b", "x" * 65, "sat 7", "#"])
def test_bad_satellite_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="satellite id"):
        core_topology([bad])


class FakeChannelError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.reply_code = code
        self.reply_text = text


class DeclareOk:
    def __init__(self, messages: int) -> None:
        self.queue = "q"
        self.message_count = messages
        self.consumer_count = 0


class FakeBroker:
    """Just enough of a broker: named objects with their properties; closes channels on error."""

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: set[tuple[str, str, str]] = set()
        self.channels = 0


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.is_open = True
        broker.channels += 1

    def _fail(self, code: int, text: str) -> FakeChannelError:
        self.is_open = False
        return FakeChannelError(code, text)

    def exchange_declare(self, *, exchange: str, type: str, **options: Any) -> None:
        assert self.is_open
        existing = self.broker.exchanges.get(exchange)
        if options.get("passive"):
            if existing is None:
                raise self._fail(404, f"NOT_FOUND - no exchange '{exchange}'")
            return
        if existing is not None and existing != type:
            raise self._fail(406, f"PRECONDITION_FAILED - inequivalent arg 'type' for {exchange}")
        self.broker.exchanges[exchange] = type

    def queue_declare(self, *, queue: str, **options: Any) -> DeclareOk:
        assert self.is_open
        existing = self.broker.queues.get(queue)
        if options.get("passive"):
            if existing is None:
                raise self._fail(404, f"NOT_FOUND - no queue '{queue}'")
            return DeclareOk(3)
        arguments = options.get("arguments", {})
        if existing is not None and existing != arguments:
            raise self._fail(406, f"PRECONDITION_FAILED - inequivalent arg for queue '{queue}'")
        if queue == "forbidden":
            raise self._fail(403, "ACCESS_REFUSED - no configure permission")
        self.broker.queues[queue] = arguments
        return DeclareOk(3 if existing is not None else 0)

    def queue_bind(self, *, queue: str, exchange: str, routing_key: str) -> None:
        assert self.is_open
        self.broker.bindings.add((exchange, queue, routing_key))


def declare(broker: FakeBroker, ids: list[str]) -> Any:
    return declare_topology(
        lambda: FakeChannel(broker), core_topology(ids), channel_errors=(FakeChannelError,)
    )


def test_first_declare_creates_and_second_finds_everything() -> None:
    broker = FakeBroker()
    first = declare(broker, ["7"])
    assert first.ok
    assert {item.outcome for item in first.items if item.object != "binding"} == {Outcome.CREATED}
    assert {item.outcome for item in first.items if item.object == "binding"} == {Outcome.BOUND}
    second = declare(broker, ["7"])
    assert second.ok
    assert {item.outcome for item in second.items if item.object != "binding"} == {Outcome.EXISTS}
    assert ("usm_poller.jobs", "usm_poller-sat-7", "7") in broker.bindings


def test_queue_with_other_arguments_is_a_conflict_not_a_crash() -> None:
    broker = FakeBroker()
    broker.queues["usm_poller-sat-7"] = {}
    broker.exchanges["usm_poller.events"] = "fanout"
    report = declare(broker, ["7"])
    assert not report.ok
    conflicts = {item.name: item for item in report.conflicts}
    assert set(conflicts) == {"usm_poller-sat-7", "usm_poller.events"}
    assert "inequivalent arg" in (conflicts["usm_poller-sat-7"].detail or "")
    assert conflicts["usm_poller-sat-7"].messages == 3
    assert broker.queues["usm_poller-sat-7"] == {}  # left as it was
    assert ("usm_poller.jobs", "usm_poller-sat-7", "7") in broker.bindings  # and still bound
    assert report.as_dict()["ok"] is False


def test_other_channel_errors_raise_a_broker_error() -> None:
    broker = FakeBroker()
    with pytest.raises(BrokerError, match="queue forbidden: ACCESS_REFUSED"):
        declare_topology(
            lambda: FakeChannel(broker),
            Topology((), (QueueSpec("forbidden"),), ()),
            channel_errors=(FakeChannelError,),
        )
