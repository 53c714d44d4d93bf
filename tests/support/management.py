"""The RabbitMQ management API for tests: the `management_api` fixture and `provisioned` users.

The API must answer on 127.0.0.1:15672 (`scripts/rabbitmq-management.sh` enables the plugin);
when it does not, tests that need it are skipped with the reason, or fail when `CI` is set.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from satellite.config import CoreSettings
from satellite.management import ManagementApi, ManagementSettings
from satellite.provision import Provisioned, provision_satellite, revoke_satellite
from tests.support.rabbitmq import AmqpVhost

__all__ = ["ProvisionedSatellite", "management_api", "provision"]

MANAGEMENT_PORT = 15672


def _unavailable_reason(host: str) -> str | None:
    try:
        with socket.create_connection((host, MANAGEMENT_PORT), timeout=3):
            return None
    except OSError as exc:
        return f"no management API on {host}:{MANAGEMENT_PORT} ({exc})"


@pytest.fixture(scope="session")
def management_api(amqp_vhost: AmqpVhost) -> Iterator[ManagementApi]:
    """The management API for the test vhost, as the test broker user."""
    reason = _unavailable_reason(amqp_vhost.host)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the RabbitMQ management plugin is required in CI: {reason}")
        pytest.skip(f"RabbitMQ management API not available: {reason}")
    core = CoreSettings.from_dsn(amqp_vhost.dsn)
    with ManagementApi(ManagementSettings.resolve(core, environ={}, timeout=10)) as api:
        yield api


@dataclass(frozen=True)
class ProvisionedSatellite:
    satellite_id: str
    user: str
    password: str
    dsn: str


@pytest.fixture
def provision(
    management_api: ManagementApi, amqp_vhost: AmqpVhost
) -> Iterator[Callable[..., ProvisionedSatellite]]:
    """Provision satellites (a fresh id unless given); their users are revoked at the end."""
    made: list[str] = []

    def make(satellite_id: str | None = None, **options: Any) -> ProvisionedSatellite:
        sid = satellite_id or f"p{uuid.uuid4().hex[:10]}"
        done: Provisioned = provision_satellite(
            management_api, sid, host=amqp_vhost.host, port=amqp_vhost.port, **options
        )
        made.append(sid)
        assert done.dsn is not None
        password = done.dsn.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        return ProvisionedSatellite(sid, done.user, password, done.dsn)

    yield make
    for sid in made:
        revoke_satellite(management_api, sid)
