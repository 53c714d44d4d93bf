"""What `poller.broker` puts on the wire, against the real broker: a message in one write, and
`satellite serve`'s reply queue consumed without acks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pika
import pytest

from poller import wire
from poller.broker import Broker, BrokerOptions, Delivery, QueueSpec, Topology, properties
from poller.config import parse_dsn
from satellite.service.jobs import Waiters
from satellite.service.replies import Replies
from tests.support.rabbitmq import AmqpVhost, _list, list_queues

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running(broker: Broker) -> AsyncIterator[Broker]:
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(30)
        yield broker
    finally:
        await broker.close(timeout=5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_published_message_goes_to_the_socket_in_one_write(amqp_vhost: AmqpVhost) -> None:
    """pika hands its transport the method, header and body frames one by one, and each buffer
    became a send() and a TCP segment of its own: the broker woke three times per message."""
    queue = f"test-writes-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []
    broker = Broker(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(connection_name="test one write"),
        queue=queue,
        topology=Topology(queues=(QueueSpec(queue, {"x-expires": 60_000}),)),
        on_delivery=got.append,
    )
    async with running(broker):
        conn: Any = broker._conn  # what reaches the transport is the point
        writes: list[bytes] = []
        emit = conn._adapter_emit_data

        def recording(data: bytes) -> None:
            writes.append(bytes(data))
            emit(data)

        conn._adapter_emit_data = recording
        body = b'{"hello": "' + b"x" * 200 + b'"}'
        await broker.publish("", queue, body, properties(message_id="m1", delivery_mode=2))
        publishes = [w for w in writes if body in w]
        assert len(publishes) == 1, writes
        # The basic.publish method frame (with the routing key) and the body, together.
        assert publishes[0].startswith(b"\x01")
        assert queue.encode() in publishes[0]
        # ...and the broker took the joined frames as one well-formed message.
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert [(d.body, d.message_id) for d in got] == [(body, "m1")]
        broker.ack(got[0])


async def test_the_reply_queue_is_consumed_without_acks(amqp_vhost: AmqpVhost) -> None:
    """A reply only wakes a waiting caller (the history keeps its own copy): no ack per reply."""
    waiters = Waiters()
    replies = Replies(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(connection_name="test replies", prefetch=256),
        replica=f"test-{uuid.uuid4().hex[:8]}",
        waiters=waiters,
    )
    job_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    result = wire.JobResult(
        job_id=job_id,
        kind="snmp.get",
        satellite_id="acks",
        worker="w1",
        status="ok",
        data={"varbinds": []},
        error=None,
        attempt=1,
        redelivered=False,
        started_at=now,
        finished_at=now,
        duration_ms=1.0,
    )
    async with running(replies.broker):
        waiting = waiters.watch(job_id)
        conn = pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn))
        try:
            conn.channel().basic_publish(
                wire.results_exchange(),
                wire.reply_routing_key("acks", replies.queue),
                wire.encode(result),
                pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )
        finally:
            conn.close()
        async with asyncio.timeout(10):
            assert (await waiting).job_id == job_id
        consumers = _list("list_consumers", amqp_vhost.name, ("queue_name", "ack_required"))
        mine = [c for c in consumers if c["queue_name"] == replies.queue]
        assert [c["ack_required"] for c in mine] == [False]
        (queue,) = [
            q
            for q in list_queues(amqp_vhost.name, "name", "messages_unacknowledged")
            if q["name"] == replies.queue
        ]
        assert queue["messages_unacknowledged"] == 0
