"""`Broker` against the real RabbitMQ: confirms, the publish deadline, deliveries and acks.

A small TCP relay between the broker and `Broker` can hold back what the broker sends, so that
confirms are late for real (the broker is never mocked).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pika
import pika.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.broker import Broker, BrokerOptions, Delivery, QueueSpec, Topology, UnroutableError
from poller.broker import properties as amqp_properties
from poller.config import parse_dsn
from poller.errors import PublishNotConfirmedError
from tests.support.rabbitmq import AmqpVhost, consumer_connections, rabbitmqctl

pytestmark = pytest.mark.integration


@dataclass
class Relay:
    """A TCP relay to the broker whose broker-to-client direction can be held back."""

    target: tuple[str, int]
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, gated=False)),
            asyncio.create_task(self._pump(up_reader, writer, gated=True)),
        ):
            self._tasks.add(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if gated:
                    await self.flowing.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _queue_topology(queue: str, exchange: str, queue_type: str = "quorum") -> Topology:
    return Topology(
        exchanges=((exchange, "topic"),),
        queues=(QueueSpec(queue, {"x-queue-type": queue_type}, ((exchange, "#"),)),),
    )


@contextlib.asynccontextmanager
async def running_broker(
    dsn: str,
    *,
    queue: str,
    topology: Topology,
    on_delivery: Callable[[Delivery], None] = lambda _d: None,
    publish_timeout: float = 30.0,
    prefetch: int = 64,
    lane_queue: str | None = None,
    lane_prefetch: int = 4,
    lane_retry: float = 60.0,
    lane_connection: bool = False,
) -> AsyncIterator[Broker]:
    broker = Broker(
        parse_dsn(dsn),
        BrokerOptions(
            connection_name="test_broker",
            publish_timeout=publish_timeout,
            prefetch=prefetch,
            lane_prefetch=lane_prefetch,
            lane_retry=lane_retry,
            lane_connection=lane_connection,
        ),
        queue=queue,
        topology=topology,
        on_delivery=on_delivery,
        lane_queue=lane_queue,
    )
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(15), "the broker connection did not come up"
        yield broker
    finally:
        await broker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"test-broker-{tag}", f"test-broker-x-{tag}"


def _props(message_id: str) -> pika.BasicProperties:
    return amqp_properties(content_type="application/json", delivery_mode=2, message_id=message_id)


async def test_pipelined_publishes_are_each_confirmed(amqp_vhost: AmqpVhost) -> None:
    queue, exchange = _names()
    async with running_broker(
        amqp_vhost.dsn, queue=queue, topology=_queue_topology(queue, exchange)
    ) as broker:
        await asyncio.gather(
            *(broker.publish(exchange, "k", b"{}", _props(f"m{i}")) for i in range(300))
        )
        # Confirms came back (many with multiple=True); nothing is left waiting.
        assert broker._pending == {}


async def test_unroutable_mandatory_publish_fails_and_the_next_one_is_confirmed(
    amqp_vhost: AmqpVhost,
) -> None:
    queue, exchange = _names()
    async with running_broker(
        amqp_vhost.dsn, queue=queue, topology=_queue_topology(queue, exchange)
    ) as broker:
        with pytest.raises(UnroutableError):
            await broker.publish("amq.topic", "nobody.listens", b"{}", _props("lost"))
        await broker.publish(exchange, "k", b"{}", _props("kept"))


async def test_each_publish_fails_at_its_own_deadline_when_confirms_are_late(
    amqp_vhost: AmqpVhost,
) -> None:
    queue, exchange = _names()
    relay = Relay((amqp_vhost.host, amqp_vhost.port))
    await relay.start()
    dsn = amqp_vhost.dsn.replace(f":{amqp_vhost.port}/", f":{relay.port}/")
    timeout = 0.4
    try:
        async with running_broker(
            dsn, queue=queue, topology=_queue_topology(queue, exchange), publish_timeout=timeout
        ) as broker:
            loop = asyncio.get_running_loop()
            relay.flowing.clear()  # confirms (and everything else from the broker) held back

            async def timed_publish(n: int) -> tuple[float, float, BaseException | None]:
                await asyncio.sleep(n * 0.15)
                sent = loop.time()
                try:
                    await broker.publish(exchange, "k", b"{}", _props(f"late{n}"))
                except PublishNotConfirmedError as exc:
                    return sent, loop.time(), exc
                return sent, loop.time(), None

            unbounded = broker.publish_nowait(exchange, "k", b"{}", _props("nowait"))
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*(timed_publish(n) for n in range(3)))
            for sent, failed, exc in outcomes:
                assert exc is not None
                assert str(exc) == f"no confirm within {timeout:g} s"
                assert timeout - 0.01 <= failed - sent < timeout + 1.0
            # `publish_nowait` has no deadline: still waiting, and confirmed once the broker's
            # frames flow again; the late confirms of the failed publishes change nothing.
            assert not unbounded.done()
            relay.flowing.set()
            await asyncio.wait_for(unbounded, 10)
            await broker.publish(exchange, "k", b"{}", _props("after"))
            assert broker._pending == {}
    finally:
        await relay.close()


async def test_deliveries_carry_properties_and_redelivery_counts(amqp_vhost: AmqpVhost) -> None:
    queue, exchange = _names()
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_queue_topology(queue, exchange),
        on_delivery=got.put_nowait,
    ) as broker:
        await broker.publish(
            exchange,
            "k",
            b'{"a": 1}',
            amqp_properties(
                message_id="j1", correlation_id="c1", reply_to="r1", headers={"x-h": "v"}
            ),
        )
        await broker.publish(exchange, "k", b"{}", amqp_properties(message_id="j2"))
        first = await asyncio.wait_for(got.get(), 10)
        second = await asyncio.wait_for(got.get(), 10)
        assert (first.body, first.message_id, first.correlation_id, first.reply_to) == (
            b'{"a": 1}',
            "j1",
            "c1",
            "r1",
        )
        assert first.headers["x-h"] == "v"
        assert (first.redelivered, first.delivery_count, first.generation) == (False, 0, 1)
        assert (second.message_id, second.correlation_id, second.reply_to) == ("j2", None, None)
        assert second.delivery_count == 0
        broker.ack(first)
        broker.reject(second, requeue=True)
        again = await asyncio.wait_for(got.get(), 10)
        assert again.message_id == "j2"
        assert again.delivery_count == 1
        broker.ack(again)
        assert got.empty()


async def _take(got: asyncio.Queue[Delivery], count: int) -> list[Delivery]:
    return [await asyncio.wait_for(got.get(), 10) for _ in range(count)]


async def _nothing_more(got: asyncio.Queue[Delivery], seconds: float = 0.5) -> None:
    with contextlib.suppress(TimeoutError):
        extra = await asyncio.wait_for(got.get(), seconds)
        raise AssertionError(f"delivered beyond the window: {extra.message_id}")


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_the_spare_consumer_widens_the_window_and_its_jobs_stay_ackable(
    amqp_vhost: AmqpVhost, queue_type: str
) -> None:
    queue, exchange = _names()
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_queue_topology(queue, exchange, queue_type),
        on_delivery=got.put_nowait,
        prefetch=2,
    ) as broker:
        for i in range(10):
            await broker.publish(exchange, "k", b"{}", _props(f"m{i}"))
        held = await _take(got, 2)
        await _nothing_more(got)  # the main consumer's window is full
        assert await broker.open_spare(3)
        assert broker.spare_open
        assert not await broker.open_spare(3)  # one spare at a time
        held += await _take(got, 3)
        await _nothing_more(got)  # 2 + 3 unacked: both windows are full
        await broker.close_spare()
        assert not broker.spare_open
        for delivery in held:  # those of the cancelled spare are acked like the others
            broker.ack(delivery)
        rest: list[Delivery] = []
        for batch in (2, 2, 1):  # only the main consumer's window of 2 from now on
            taken = await _take(got, batch)
            await _nothing_more(got, 0.3)
            for delivery in taken:
                broker.ack(delivery)
            rest += taken
        ids = [d.message_id for d in held + rest]
        assert sorted(ids) == sorted(f"m{i}" for i in range(10))  # each once: acks were taken
        assert not any(d.redelivered for d in held + rest)


async def test_stop_consuming_cancels_the_spare_consumer_too(amqp_vhost: AmqpVhost) -> None:
    queue, exchange = _names()
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_queue_topology(queue, exchange),
        on_delivery=got.put_nowait,
        prefetch=1,
    ) as broker:
        assert await broker.open_spare(1)
        await broker.stop_consuming()
        assert not broker.spare_open
        assert not await broker.open_spare(1)  # not consuming: no spare either
        await broker.publish(exchange, "k", b"{}", _props("after-stop"))
        await _nothing_more(got)


def _lane_topology(queue: str, lane: str, exchange: str, *, with_lane: bool = True) -> Topology:
    queues = [QueueSpec(queue, {"x-queue-type": "quorum"}, ((exchange, "bulk"),))]
    if with_lane:
        queues.append(QueueSpec(lane, {"x-queue-type": "quorum"}, ((exchange, "lane"),)))
    return Topology(exchanges=((exchange, "direct"),), queues=tuple(queues))


@pytest.mark.parametrize("lane_connection", [False, True], ids=["shared", "own-connection"])
async def test_the_lane_has_its_own_channel_and_window_and_its_acks_go_there(
    amqp_vhost: AmqpVhost, lane_connection: bool
) -> None:
    queue, exchange = _names()
    lane = f"{queue}.interactive"
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_lane_topology(queue, lane, exchange),
        on_delivery=got.put_nowait,
        prefetch=2,
        lane_queue=lane,
        lane_prefetch=3,
        lane_connection=lane_connection,
    ) as broker:
        assert broker.lane_consuming
        consumers = await asyncio.to_thread(consumer_connections, amqp_vhost.name)
        # On a connection of its own, or on the bulk connection (a channel of its own).
        assert (consumers[lane] != consumers[queue]) is lane_connection
        for i in range(5):
            await broker.publish(exchange, "bulk", b"{}", _props(f"b{i}"))
        bulk = await _take(got, 2)
        await _nothing_more(got)  # the bulk window is full...
        for i in range(5):
            await broker.publish(exchange, "lane", b"{}", _props(f"i{i}"))
        lane_jobs = await _take(got, 3)  # ...and the lane's is its own
        await _nothing_more(got)
        assert [d.interactive for d in bulk + lane_jobs] == [False] * 2 + [True] * 3
        # Same delivery tags on both channels: each ack must go to its own.
        assert {d.delivery_tag for d in bulk} <= {d.delivery_tag for d in lane_jobs}
        for delivery in lane_jobs:
            broker.ack(delivery)
        more = await _take(got, 2)
        assert [d.message_id for d in more] == ["i3", "i4"]
        for delivery in [*more, *bulk]:
            broker.ack(delivery)
        rest = await _take(got, 2)
        assert [d.message_id for d in rest] == ["b2", "b3"]
        # No channel was closed by an ack on the wrong channel.
        assert broker.consuming
        assert broker.lane_consuming
        await broker.stop_consuming()
        await broker.publish(exchange, "lane", b"{}", _props("after-stop"))
        await _nothing_more(got)  # the lane's consumer was cancelled too


@pytest.mark.parametrize("lane_connection", [False, True], ids=["shared", "own-connection"])
async def test_a_missing_lane_is_tried_again_while_bulk_jobs_flow(
    amqp_vhost: AmqpVhost, lane_connection: bool
) -> None:
    queue, exchange = _names()
    lane = f"{queue}.interactive"
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_lane_topology(queue, lane, exchange, with_lane=False),
        on_delivery=got.put_nowait,
        lane_queue=lane,
        lane_retry=0.3,
        lane_connection=lane_connection,
    ) as broker:
        assert broker.consuming
        assert not broker.lane_consuming
        await broker.publish(exchange, "bulk", b"{}", _props("bulk"))
        [delivery] = await _take(got, 1)
        assert not delivery.interactive
        broker.ack(delivery)
        # An operator runs `satellite declare`: the lane is consumed at the next attempt.
        conn = pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn))
        try:
            channel = conn.channel()
            channel.queue_declare(lane, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(lane, exchange, "lane")
        finally:
            conn.close()
        for _ in range(50):
            if broker.lane_consuming:
                break
            await asyncio.sleep(0.1)
        assert broker.lane_consuming
        await broker.publish(exchange, "lane", b"{}", _props("lane"))
        [delivery] = await _take(got, 1)
        assert delivery.interactive
        broker.ack(delivery)
        assert broker.consuming


_short_text = st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=40))
_octet = st.one_of(st.none(), st.integers(0, 255))
_header_value = st.one_of(
    st.text(max_size=20), st.integers(-(2**31), 2**31 - 1), st.booleans(), st.none()
)


@settings(max_examples=100, deadline=None)
@given(
    content_type=_short_text,
    content_encoding=_short_text,
    headers=st.one_of(st.none(), st.dictionaries(st.text(max_size=10), _header_value, max_size=4)),
    delivery_mode=_octet,
    priority=_octet,
    correlation_id=_short_text,
    reply_to=_short_text,
    expiration=_short_text,
    message_id=_short_text,
    timestamp=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    type_=_short_text,
    user_id=_short_text,
    app_id=_short_text,
    cluster_id=_short_text,
)
def test_properties_encode_to_the_bytes_pika_makes(type_: object, **fields: object) -> None:
    """Every result is published with these: the fast encoder must say what pika's says."""
    fields["type"] = type_
    ours, pikas = amqp_properties(**fields), pika.BasicProperties(**fields)
    assert isinstance(ours, pika.BasicProperties)
    for _ in range(2):  # the second time from the kept header table
        assert b"".join(ours.encode()) == b"".join(pikas.encode())


def test_properties_refuse_what_pika_refuses() -> None:
    too_long = "x" * 256
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        amqp_properties(message_id=too_long).encode()
    with pytest.raises(AssertionError):
        amqp_properties(type=5).encode()


async def test_a_lost_lane_connection_is_opened_again_while_bulk_jobs_flow(
    amqp_vhost: AmqpVhost,
) -> None:
    queue, exchange = _names()
    lane = f"{queue}.interactive"
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_lane_topology(queue, lane, exchange),
        on_delivery=got.put_nowait,
        lane_queue=lane,
        lane_retry=0.3,
        lane_connection=True,
    ) as broker:
        before = await asyncio.to_thread(consumer_connections, amqp_vhost.name)
        [lane_conn] = before[lane]
        await broker.publish(exchange, "lane", b"{}", _props("held"))
        [held] = await _take(got, 1)
        # The broker drops the lane's connection (an operator, a failed-over node).
        await asyncio.to_thread(rabbitmqctl, "close_connection", lane_conn, "test")
        for _ in range(100):
            if not broker.lane_consuming:
                break
            await asyncio.sleep(0.05)
        assert not broker.lane_consuming
        broker.ack(held)  # its channel is gone: dropped, the broker delivers it again
        # The bulk connection stays and bulk jobs flow meanwhile.
        await broker.publish(exchange, "bulk", b"{}", _props("bulk"))
        [bulk] = await _take(got, 1)
        assert not bulk.interactive
        broker.ack(bulk)
        for _ in range(100):
            if broker.lane_consuming:
                break
            await asyncio.sleep(0.05)
        assert broker.lane_consuming
        [again] = await _take(got, 1)
        assert (again.message_id, again.interactive, again.redelivered) == ("held", True, True)
        broker.ack(again)
        after = await asyncio.to_thread(consumer_connections, amqp_vhost.name)
        assert after[queue] == before[queue]
        assert after[lane] != before[lane]
        assert after[lane] != after[queue]


@pytest.mark.parametrize("lane_connection", [False, True], ids=["shared", "own-connection"])
async def test_lane_results_are_confirmed_on_the_lanes_connection_when_it_has_one(
    amqp_vhost: AmqpVhost, lane_connection: bool
) -> None:
    queue, exchange = _names()
    lane = f"{queue}.interactive"
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with running_broker(
        amqp_vhost.dsn,
        queue=queue,
        topology=_lane_topology(queue, lane, exchange),
        on_delivery=got.put_nowait,
        lane_queue=lane,
        lane_connection=lane_connection,
    ) as broker:
        await broker.publish(exchange, "bulk", b"{}", _props("r1"), interactive=True)
        [delivery] = await _take(got, 1)
        assert delivery.message_id == "r1"
        broker.ack(delivery)
        with pytest.raises(UnroutableError):
            await broker.publish(exchange, "nowhere", b"{}", _props("r2"), interactive=True)
        # Confirmed on the lane's channel (its own sequence), or on the bulk channel.
        assert (broker._lane_seq, broker._seq) == ((2, 0) if lane_connection else (0, 2))
        assert broker._lane_pending == {}
        assert broker._pending == {}
