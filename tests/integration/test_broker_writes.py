"""What `poller.broker` puts on the wire, against the real broker: a message in one write, the
messages of one event-loop turn in one send(), a group of deliveries acked with one `multiple`
ack only when no other delivery is below it, and `satellite serve`'s reply queue consumed without
acks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pika
import pytest

from poller import broker as broker_module
from poller import wire
from poller.broker import (
    _JOIN_LIMIT,
    Broker,
    BrokerOptions,
    Delivery,
    QueueSpec,
    Topology,
    _join_buffers,
    properties,
)
from poller.config import parse_dsn
from satellite.service.jobs import Waiters
from satellite.service.replies import Replies
from tests.support.rabbitmq import AmqpVhost, _list, list_queues

pytestmark = pytest.mark.integration


def group_acking_broker(vhost: AmqpVhost, spec: QueueSpec, got: list[Delivery]) -> Broker:
    """A consumer of its own queue `spec` with `group_acks`."""
    return Broker(
        parse_dsn(vhost.dsn),
        BrokerOptions(connection_name=f"test {spec.name}", group_acks=True),
        queue=spec.name,
        topology=Topology(queues=(spec,)),
        on_delivery=got.append,
    )


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


def record_sends(broker: Broker) -> list[bytes]:
    """Every buffer the connection's transport send()s from now on (queued writes; not the
    write-through's own sends), in order."""
    transport: Any = broker._conn._transport  # the socket writes are the point
    sends: list[bytes] = []
    send = transport._sigint_safe_send

    def recording(sock: Any, data: bytes) -> int:
        sends.append(bytes(data))
        sent: int = send(sock, data)
        return sent

    transport._sigint_safe_send = recording
    return sends


async def arrived(got: list[Delivery], count: int) -> None:
    for _ in range(600):
        if len(got) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(got)} of {count} deliveries after 30 s")


async def left_unacked(dsn: str, spec: QueueSpec) -> list[Delivery]:
    """What comes back on a new connection: everything before a marker published now (what the
    closed channel left unacked was put back at the head of the queue)."""
    again: list[Delivery] = []
    broker = Broker(
        parse_dsn(dsn),
        BrokerOptions(connection_name="test left unacked", group_acks=True),
        queue=spec.name,
        topology=Topology(queues=(spec,)),
        on_delivery=again.append,
    )
    async with running(broker):
        await broker.publish("", spec.name, b"marker", properties(message_id="marker"))
        for _ in range(600):
            if any(d.body == b"marker" for d in again):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the marker did not come back")
        broker.ack_many(again)
    return [d for d in again if d.body != b"marker"]


async def test_publishes_of_one_loop_turn_leave_in_one_send(amqp_vhost: AmqpVhost) -> None:
    """pika queued each message and then sent each queued buffer in a send() of its own: a batch
    of 50 publishes was 50 syscalls and 50 TCP segments. Every one is still confirmed."""
    queue = f"test-burst-{uuid.uuid4().hex[:8]}"
    broker = Broker(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(connection_name="test burst"),
        queue=queue,
        topology=Topology(queues=(QueueSpec(queue, {"x-expires": 60_000}),)),
        on_delivery=lambda _d: None,
    )
    async with running(broker):
        sends = record_sends(broker)
        bodies = [b"burst-%03d-" % n + b"y" * 100 for n in range(50)]
        futures = [
            broker.publish_nowait("", queue, body, properties(message_id=f"b{n}"))
            for n, body in enumerate(bodies)
        ]
        async with asyncio.timeout(30):
            await asyncio.gather(*futures)  # each confirmed on its own
        carrying = [w for w in sends if any(body in w for body in bodies)]
        assert len(carrying) == 1, [len(w) for w in sends]
        assert all(body in carrying[0] for body in bodies)
        depth = {q["name"]: q["messages"] for q in list_queues(amqp_vhost.name, "name", "messages")}
        assert depth[queue] == 50


async def test_a_write_through_publish_leaves_in_the_call_and_a_burst_behind_it_joined(
    amqp_vhost: AmqpVhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `write_through` (`satellite serve`'s publishing connection) the first publish of a
    loop turn, with nothing queued before it, is sent before `publish_nowait` returns, not at
    the next turn; the publishes behind it in the same turn are queued and leave joined. All
    arrive, in order, each confirmed."""
    queue = f"test-through-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []
    broker = Broker(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(connection_name="test write-through", write_through=True),
        queue=queue,
        topology=Topology(queues=(QueueSpec(queue, {"x-expires": 60_000}),)),
        on_delivery=got.append,
    )
    async with running(broker):
        through: list[bytes] = []
        send_through = broker_module._send_through

        def recording_through(sock: Any, data: bytes) -> int:
            through.append(bytes(data))
            return send_through(sock, data)

        monkeypatch.setattr(broker_module, "_send_through", recording_through)
        queued = record_sends(broker)
        bodies = [b"through-%03d-" % n + b"z" * 100 for n in range(21)]
        first = broker.publish_nowait("", queue, bodies[0], properties(message_id="t0"))
        assert len(through) == 1
        assert bodies[0] in through[0]
        futures = [
            broker.publish_nowait("", queue, body, properties(message_id=f"t{n}"))
            for n, body in enumerate(bodies[1:], 1)
        ]
        assert len(through) == 1  # the later publishes of the same turn are queued
        async with asyncio.timeout(30):
            await asyncio.gather(first, *futures)  # each confirmed on its own
        carrying = [w for w in queued if any(body in w for body in bodies)]
        assert len(carrying) == 1, [len(w) for w in queued]
        assert all(body in carrying[0] for body in bodies[1:])
        await arrived(got, len(bodies))
        assert [d.body for d in got] == bodies
        for delivery in got:
            broker.ack(delivery)


def test_queued_buffers_are_joined_in_order_up_to_the_limit() -> None:
    small = [bytes([n]) * 1000 for n in range(10)]
    big = b"B" * (_JOIN_LIMIT + 1)
    buffers = deque([*small, big, *small, b"t" * (_JOIN_LIMIT - 5), b"u" * 10])
    before = b"".join(buffers)
    _join_buffers(buffers)
    assert b"".join(buffers) == before
    assert [len(b) for b in buffers] == [10_000, len(big), 10_000, _JOIN_LIMIT - 5, 10]
    one = deque([b"only"])
    _join_buffers(one)
    assert list(one) == [b"only"]


async def test_a_group_is_acked_at_once_only_when_nothing_older_is_unacked(
    amqp_vhost: AmqpVhost,
) -> None:
    """`ack_many` acks with `multiple=True` up to the group's highest tag only while every
    unacked delivery below it is the group's: the others stay unacked and come back."""
    queue = f"test-group-acks-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []
    spec = QueueSpec(queue, {"x-expires": 60_000})
    broker = group_acking_broker(amqp_vhost, spec, got)
    async with running(broker):
        for n in range(1, 9):
            await broker.publish("", queue, b"m%d" % n, properties(message_id=f"m{n}"))
        await arrived(got, 8)
        m = {d.body.decode(): d for d in got}
        assert broker.ack_many([m["m1"], m["m2"]]) == 1  # the oldest two: one multiple ack
        # m3 is not committed: a multiple ack up to m5 would take it too. One by one instead.
        assert broker.ack_many([m["m5"], m["m4"]]) == 2
        broker.ack(m["m7"])  # settled out of order, below the next group's highest tag
        # m6 and m8 are the oldest unacked after m3: still not a run that starts at the oldest.
        assert broker.ack_many([m["m6"], m["m8"]]) == 2
        broker.ack(m["m3"])  # now nothing is unacked
        for n in range(9, 12):
            await broker.publish("", queue, b"m%d" % n, properties(message_id=f"m{n}"))
        await arrived(got, 11)
        m = {d.body.decode(): d for d in got}
        assert broker.ack_many([m["m9"], m["m10"]]) == 1  # a run from the oldest again
        # m11 stays unacked: it is the only message that comes back after the close.
    again = await left_unacked(amqp_vhost.dsn, spec)
    assert [(d.body, d.redelivered) for d in again] == [(b"m11", True)]


async def test_uncommitted_deliveries_between_groups_stay_unacked(amqp_vhost: AmqpVhost) -> None:
    """The ingest's invariant with the deliveries interleaved: a group's multiple ack never takes
    an older delivery that is not the group's (it is redelivered after the channel closes)."""
    queue = f"test-interleaved-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []
    spec = QueueSpec(queue, {"x-expires": 60_000})
    broker = group_acking_broker(amqp_vhost, spec, got)
    async with running(broker):
        futures = [
            broker.publish_nowait("", queue, b"%02d" % n, properties(message_id=str(n)))
            for n in range(40)
        ]
        async with asyncio.timeout(30):
            await asyncio.gather(*futures)
        await arrived(got, 40)
        by_tag = sorted(got, key=lambda d: d.delivery_tag)
        uncommitted = {d.body for d in by_tag[::4]}  # every fourth: never acked
        for start in range(0, 40, 8):
            group = [d for d in by_tag[start : start + 8] if d.body not in uncommitted]
            broker.ack_many(reversed(group))
    again = await left_unacked(amqp_vhost.dsn, spec)
    assert sorted(d.body for d in again) == sorted(uncommitted)


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
