"""`Broker` on a link that dies: a silent connection is given up within 2.25 heartbeat
intervals, and the attempts after a timed-out one are never more than `backoff_max` apart.

The partition itself is tests/faults/test_network.py (scenario 6, network namespaces); here a
TCP relay on loopback swallows what the broker sends, which a poller sees the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from poller.broker import Broker, BrokerOptions, QueueSpec, Topology
from poller.config import parse_dsn
from tests.support.rabbitmq import AmqpVhost


class SwallowingRelay:
    """Relays a TCP connection to the broker; `cut()` drops every byte the broker sends."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut_off = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.cut_off = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(10):
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, from_broker=False)),
            asyncio.create_task(self._pump(up_reader, writer, from_broker=True)),
        ):
            self._tasks.add(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_broker: bool
    ) -> None:
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if from_broker and self.cut_off:
                        continue
                    writer.write(data)
                    await writer.drain()
        finally:  # cancelled by close() too: a writer left open warns when the loop is gone
            writer.close()


@pytest.mark.integration
async def test_a_silent_connection_is_given_up_within_three_heartbeats(
    amqp_vhost: AmqpVhost,
) -> None:
    """Fails on pika's own check alone: it looks every heartbeat + 5 s (6-12 s here)."""
    url = parse_dsn(amqp_vhost.dsn)[0]
    relay = SwallowingRelay((url.host, url.port))
    await relay.start()
    dsn = amqp_vhost.dsn.replace(f"{url.host}:{url.port}", f"127.0.0.1:{relay.port}")
    queue = f"test-link-{uuid.uuid4().hex[:8]}"
    heartbeat = 1
    dropped = asyncio.Event()
    broker: Broker

    def on_state() -> None:
        if not broker.connected:
            dropped.set()

    broker = Broker(
        parse_dsn(dsn),
        BrokerOptions(connection_name="test_broker_link", heartbeat=heartbeat),
        queue=queue,
        topology=Topology(
            queues=(QueueSpec(queue, {"x-queue-type": "classic", "x-expires": 60_000}),)
        ),
        on_delivery=lambda _d: None,
        on_state=on_state,
    )
    task = asyncio.create_task(broker.run())
    try:
        assert await broker.wait_ready(30)
        relay.cut()
        loop = asyncio.get_running_loop()
        cut = loop.time()
        dropped.clear()
        async with asyncio.timeout(15):
            await dropped.wait()
        took = loop.time() - cut
        assert took <= 3 * heartbeat, f"noticed after {took:.1f} s"
    finally:
        await broker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.close()


def test_attempts_start_at_most_backoff_max_apart() -> None:
    """A timed-out attempt has waited already: the next one starts within `backoff_max` of its
    start, whatever the attempt count (before: the backoff, up to 30 s, came on top)."""
    opts = BrokerOptions(connection_name="test_backoff")
    broker = Broker(
        parse_dsn("amqp://guest:guest@127.0.0.1:5672/"),
        opts,
        queue="q",
        topology=Topology(),
        on_delivery=lambda _d: None,
    )
    for attempt in range(1, 30):
        for took in (0.0, 0.3, opts.tcp_connect_timeout, opts.connect_timeout):
            for _ in range(50):
                delay = broker._retry_delay(attempt, took)
                assert delay >= 0
                assert took + delay <= max(opts.backoff_max, took), (attempt, took, delay)
        # Refused at once: still a jittered backoff, never a tight loop.
        assert broker._retry_delay(attempt, 0.0) >= opts.backoff_initial / 2
