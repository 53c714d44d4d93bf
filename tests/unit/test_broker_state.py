"""`Broker`'s state hook: called on every change of `connected` and `consuming`, and only then."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import pytest

from poller.broker import Broker, BrokerOptions, QueueSpec, Topology
from poller.config import parse_dsn
from tests.support.rabbitmq import AmqpVhost

pytestmark = pytest.mark.integration


def _broker(amqp_vhost: AmqpVhost, on_state: Callable[[], None]) -> Broker:
    """A broker that consumes a classic queue of its own and calls `on_state`."""
    queue = f"test-state-{uuid.uuid4().hex[:8]}"
    return Broker(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(connection_name="test_broker_state"),
        queue=queue,
        topology=Topology(queues=(QueueSpec(queue, {"x-queue-type": "classic"}),)),
        on_delivery=lambda _d: None,
        on_state=on_state,
    )


async def test_state_hook_sees_connect_consume_and_close(amqp_vhost: AmqpVhost) -> None:
    seen: list[tuple[bool, bool]] = []
    broker: Broker

    def on_state() -> None:
        seen.append((broker.connected, broker.consuming))

    broker = _broker(amqp_vhost, on_state)
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(15)
        assert seen == [(True, False), (True, True)]
        await broker.stop_consuming()
        assert seen[-1] == (True, False)
        await broker.close()
        assert seen[-1] == (False, False)
        assert len(seen) == 4, "called on changes only"
    finally:
        await broker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failing_state_hook_does_not_break_the_connection(amqp_vhost: AmqpVhost) -> None:

    def on_state() -> None:
        raise RuntimeError("hook bug")

    broker = _broker(amqp_vhost, on_state)
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(15)
        assert broker.connected
        assert broker.consuming
    finally:
        await broker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
