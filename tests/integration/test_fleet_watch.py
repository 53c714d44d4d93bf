"""`FleetWatch` against the real broker's management API: one client for the replica's life."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

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
