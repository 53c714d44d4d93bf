"""The interactive lane's test pieces (tests/integration/test_interactive_lane.py and
test_interactive_process.py): slow devices for a bulk backlog, a fast one for the lane, a reply
queue, and an operator asking the lane one job at a time.

The slow devices answer every SNMP request after 50 ms (`tests.support.slow_snmp`), each on its
own 127.0.0.x address, so a poller's throughput is its run slots / 50 ms: a backlog of bulk jobs
keeps it saturated for as long as a test needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from poller import wire
from tests.support.poller_proc import PollerProcess, snmp_job
from tests.support.rabbitmq import AmqpVhost
from tests.support.slow_snmp import SlowSnmpAgents

__all__ = [
    "BULK_HOSTS",
    "DELAY",
    "LANE_HOST",
    "ReplyQueue",
    "ask_the_lane",
    "publish_bulk",
    "replies",
    "slow_devices",
    "wait_for",
]

DELAY = 0.05
BULK_HOSTS = [f"127.0.0.{n}" for n in range(41, 49)]
LANE_HOST = "127.0.0.49"


@pytest.fixture
def slow_devices() -> Iterator[SlowSnmpAgents]:
    with SlowSnmpAgents([*BULK_HOSTS, LANE_HOST], delay=DELAY) as agents:
        yield agents


def publish_bulk(dsn: str, sid: str, port: int, count: int, *, prefix: str = "bulk") -> None:
    """`count` bulk jobs spread over the slow devices, fast (no confirms; depth checked)."""
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        channel = conn.channel()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for n in range(count):
            job = snmp_job(BULK_HOSTS[n % len(BULK_HOSTS)], port, job_id=f"{prefix}-{n}")
            channel.basic_publish(
                wire.jobs_exchange(),
                wire.jobs_routing_key(sid),
                wire.encode(wire.decode_job(_json(job))),
                props,
            )
    finally:
        conn.close()


def _json(job: dict[str, Any]) -> bytes:
    return json.dumps(job).encode()


class ReplyQueue:
    """An exclusive queue for RPC replies of one satellite (`reply.<id>.<name>`)."""

    def __init__(self, dsn: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(dsn))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.name = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(
            self.name, wire.results_exchange(), wire.reply_binding_key(self.name)
        )

    def publish(self, sid: str, job: dict[str, Any], *, interactive: bool) -> None:
        self.channel.basic_publish(
            wire.jobs_exchange(),
            wire.lane_routing_key(sid, "interactive" if interactive else "bulk"),
            _json(job),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=job["id"],
                reply_to=self.name,
            ),
        )

    def get(self, timeout: float) -> tuple[pika.BasicProperties, wire.JobResult] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.name, auto_ack=True)
            if method is not None:
                return props, wire.decode_result(body)
            self.conn.sleep(0.005)
        return None

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


@pytest.fixture
def replies(amqp_vhost: AmqpVhost) -> Iterator[ReplyQueue]:
    queue = ReplyQueue(amqp_vhost.dsn)
    yield queue
    queue.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def ask_the_lane(
    poller: PollerProcess, replies: ReplyQueue, sid: str, port: int, count: int = 20
) -> list[tuple[float, wire.JobResult]]:
    """`count` interactive jobs to `LANE_HOST`, one at a time: (seconds to the answer, the
    answer) of each; every one answered `ok`, and saying it came from the lane."""
    out = []
    for n in range(count):
        job = snmp_job(LANE_HOST, port, job_id=f"lane-{n}")
        sent = time.monotonic()
        replies.publish(sid, job, interactive=True)
        got = replies.get(timeout=10)
        assert got is not None, f"no answer to {job['id']}:\n{poller.log_text()[-3000:]}"
        props, result = got
        out.append((time.monotonic() - sent, result))
        assert result.job_id == job["id"]
        assert result.status == "ok", result.error
        assert props.headers[wire.LANE_HEADER] == "interactive"
    return out
