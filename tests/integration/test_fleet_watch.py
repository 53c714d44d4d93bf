"""`FleetWatch` against the real broker's management API: one client for the replica's life."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pika
import pytest

from poller import wire
from poller.wire import Heartbeat
from satellite.service import fleet as fleet_module
from satellite.service.fleet import FleetError, FleetWatch
from satellite.service.settings import load_settings
from satellite.service.web.overview import collect
from tests.support.rabbitmq import AmqpVhost

pytestmark = pytest.mark.integration


def connections_to(port: int) -> int:
    """Established TCP connections of this process to `port` on loopback (ss)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return sum(f"pid={os.getpid()}," in line for line in out.splitlines())


async def test_passes_share_one_management_client_closed_at_stop(amqp_vhost: AmqpVhost) -> None:
    """The fleet page's collector, the alert rules' facts and `/v1/satellites` built an httpx
    client (and its TLS context) per pass: now one, kept alive, closed when the replica stops."""
    settings = load_settings({"US_AMQP_DSN": amqp_vhost.dsn})
    fleet = FleetWatch(settings.broker(), settings.management())
    port = urlsplit(fleet.management.base_url).port or 80
    before = connections_to(port)
    try:
        await fleet.status()
        await collect(fleet, {}, datetime.now(UTC))
        await fleet.status()
        # Three passes over one kept-alive connection (none closed after its pass).
        assert connections_to(port) - before == 1
    finally:
        await asyncio.to_thread(fleet.stop, 2.0)
    assert connections_to(port) == before
    with pytest.raises(FleetError, match="stopping"):
        await fleet.status()


def _thread_cpu_seconds(native_id: int) -> float:
    """CPU time (user + system) of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _beat(sid: str) -> bytes:
    now = datetime.now(UTC)
    beat = Heartbeat(
        satellite_id=sid,
        worker="w1",
        version="1",
        hostname="host",
        started_at=now,
        sent_at=now,
        concurrency=1,
        in_flight=0,
        jobs_ok=0,
        jobs_error=0,
        jobs_per_s=0.0,
        loop_lag_ms=0.0,
        rss_bytes=1,
    )
    return wire.encode(beat)


async def test_started_before_the_events_exchange_it_waits_without_spinning_and_then_hears(
    amqp_vhost: AmqpVhost, monkeypatch: pytest.MonkeyPatch, sid: str
) -> None:
    """A replica started before any poller or `satellite declare` made the events exchange:
    its heartbeat thread neither spins (it held the GIL the event loop needs) nor stays deaf
    once the exchange exists."""
    monkeypatch.setattr(fleet_module, "EXCHANGE_RETRY_SECONDS", 0.3)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn))
    channel = conn.channel()
    channel.exchange_delete(wire.events_exchange())
    settings = load_settings({"US_AMQP_DSN": amqp_vhost.dsn})
    fleet = FleetWatch(settings.broker(), settings.management())
    fleet.start()
    try:
        await asyncio.sleep(1.0)
        native_id = fleet._thread.native_id
        assert native_id is not None
        before = _thread_cpu_seconds(native_id)
        await asyncio.sleep(2.0)
        assert _thread_cpu_seconds(native_id) - before < 0.5
        channel.exchange_declare(wire.events_exchange(), "topic", durable=True)
        for _ in range(50):
            channel.basic_publish(
                wire.events_exchange(),
                wire.heartbeat_routing_key(sid),
                _beat(sid),
                pika.BasicProperties(user_id=amqp_vhost.username),
            )
            if fleet.fleet.replicas(sid):
                break
            await asyncio.sleep(0.2)
        assert [r.heartbeat.worker for r in fleet.fleet.replicas(sid)] == ["w1"]
    finally:
        await asyncio.to_thread(fleet.stop, 5.0)
        channel.exchange_declare(wire.events_exchange(), "topic", durable=True)
        conn.close()
