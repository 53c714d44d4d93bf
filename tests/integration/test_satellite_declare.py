"""`Client.declare` against the real broker: what it creates, idempotence, conflicts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu as _kombu
import pytest

from poller.wire import (
    DEAD_LETTER_DELIVERY_LIMIT,
    dead_letter_queue,
    interactive_queue,
    jobs_queue,
    jobs_queue_arguments,
)
from satellite.cli import main as cli_main
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.topology import CLASSIC_DLQ_DETAIL, Outcome
from tests.support.rabbitmq import (
    AmqpVhost,
    list_bindings,
    list_exchanges,
    list_queues,
    queue_arguments,
)

kombu: Any = _kombu
pytestmark = pytest.mark.integration


@pytest.fixture
def sat_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(amqp_vhost: AmqpVhost) -> Iterator[Client]:
    settings = CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5, operation_timeout=5)
    with Client(settings) as client:
        yield client


def test_declare_creates_the_design_topology(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    report = client.declare([sat_id])
    assert report.ok
    outcomes = {(item.object, item.name): item.outcome for item in report.items}
    assert outcomes[("queue", jobs_queue(sat_id))] is Outcome.CREATED
    assert outcomes[("queue", f"{jobs_queue(sat_id)}.dlq")] is Outcome.CREATED

    exchanges = {row["name"]: row for row in list_exchanges(amqp_vhost.name)}
    for name, kind in [
        ("usm_poller.jobs", "direct"),
        ("usm_poller.dlx", "direct"),
        ("usm_poller.results", "topic"),
        ("usm_poller.events", "topic"),
    ]:
        assert exchanges[name]["type"] == kind
        assert exchanges[name]["durable"] is True

    queues = {row["name"]: row for row in list_queues(amqp_vhost.name)}
    args = queue_arguments(amqp_vhost.name)
    assert args[jobs_queue(sat_id)] == jobs_queue_arguments(sat_id)
    assert args[jobs_queue(sat_id)]["x-delivery-limit"] == 20
    assert queues[jobs_queue(sat_id)]["type"] == "quorum"
    assert queues[jobs_queue(sat_id)]["durable"] is True
    assert args[f"{jobs_queue(sat_id)}.dlq"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT,
    }
    assert queues[f"{jobs_queue(sat_id)}.dlq"]["type"] == "quorum"
    # the interactive lane: same arguments, dead letters to the same DLQ (docs/design.md §3, §13)
    assert args[interactive_queue(sat_id)] == jobs_queue_arguments(sat_id)
    assert args[interactive_queue(sat_id)]["x-dead-letter-routing-key"] == sat_id
    assert queues[interactive_queue(sat_id)]["type"] == "quorum"
    assert queues[f"{jobs_queue(sat_id)}.dlq"]["durable"] is True
    assert queues["usm_poller.results"]["type"] == "quorum"

    bindings = set(list_bindings(amqp_vhost.name))
    assert {
        ("usm_poller.jobs", jobs_queue(sat_id), sat_id),
        ("usm_poller.jobs", f"usm_poller-sat-{sat_id}.interactive", f"{sat_id}.interactive"),
        ("usm_poller.dlx", f"{jobs_queue(sat_id)}.dlq", sat_id),
        ("usm_poller.results", "usm_poller.results", "result.#"),
    } <= bindings


def test_declare_twice_is_idempotent(client: Client, sat_id: str) -> None:
    client.declare([sat_id])
    again = client.declare([sat_id, sat_id])
    assert again.ok
    assert {item.outcome for item in again.items if item.object != "binding"} == {Outcome.EXISTS}
    assert len([item for item in again.items if item.object == "queue"]) == 4


def test_classic_queue_type(client: Client, amqp_vhost: AmqpVhost, sat_id: str) -> None:
    assert client.declare([sat_id], queue_type="classic").ok
    args = queue_arguments(amqp_vhost.name)[jobs_queue(sat_id)]
    assert args == jobs_queue_arguments(sat_id, "classic")
    assert "x-queue-type" not in args
    queues = {row["name"]: row for row in list_queues(amqp_vhost.name)}
    assert queues[jobs_queue(sat_id)]["type"] == "classic"
    assert queues[dead_letter_queue(sat_id)]["type"] == "classic"


def test_a_classic_dead_letter_queue_of_an_older_version_is_reported(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with kombu.Connection(amqp_vhost.dsn, connect_timeout=5) as conn:
        conn.channel().queue_declare(
            queue=dead_letter_queue(sat_id), durable=True, auto_delete=False
        )
    report = client.declare([sat_id])
    [conflict] = report.conflicts
    assert conflict.name == dead_letter_queue(sat_id)
    assert conflict.detail == CLASSIC_DLQ_DETAIL
    queues = {row["name"]: row for row in list_queues(amqp_vhost.name)}
    assert queues[dead_letter_queue(sat_id)]["type"] == "classic"  # left alone
    assert queues[jobs_queue(sat_id)]["type"] == "quorum"  # the rest went on
    assert ("usm_poller.dlx", dead_letter_queue(sat_id), sat_id) in list_bindings(amqp_vhost.name)
    # `satellite declare` says what it is and how to migrate it.
    code = cli_main(["declare", sat_id, "--dsn", amqp_vhost.dsn])
    out = capsys.readouterr().out
    assert code == 1
    assert f"conflict  queue     {dead_letter_queue(sat_id)}" in out
    assert "classic dead-letter queue (made by an older version)" in out
    assert "drain it" in out


def test_existing_queue_with_other_arguments_is_reported(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    with kombu.Connection(amqp_vhost.dsn, connect_timeout=5) as conn:
        conn.channel().queue_declare(queue=jobs_queue(sat_id), durable=True, auto_delete=False)
    report = client.declare([sat_id])
    assert not report.ok
    [conflict] = report.conflicts
    assert conflict.name == jobs_queue(sat_id)
    assert "PRECONDITION_FAILED" in (conflict.detail or "")
    assert queue_arguments(amqp_vhost.name)[jobs_queue(sat_id)] == {}  # left alone
    assert ("usm_poller.jobs", jobs_queue(sat_id), sat_id) in list_bindings(amqp_vhost.name)
    # The rest of the declare went on, and the client is still usable.
    assert report.items[-1].outcome is Outcome.BOUND
    assert client.declare([f"{sat_id}-b"]).ok


def test_quorum_queue_declared_as_classic_is_a_conflict(client: Client, sat_id: str) -> None:
    client.declare([sat_id])
    report = client.declare([sat_id], queue_type="classic")
    assert [item.name for item in report.conflicts] == [
        jobs_queue(sat_id),
        interactive_queue(sat_id),
        dead_letter_queue(sat_id),
    ]
