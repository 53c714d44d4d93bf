"""Refusals named for what they are: the management API's two 401s (a wrong password, a user
without a tag), and a broker user without a permission (not "run `satellite declare`")."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from poller.errors import BrokerError, PublishNotConfirmedError
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import build_job
from satellite.management import ManagementApi, ManagementError, ManagementSettings
from tests.support.management import ProvisionedSatellite
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl

pytestmark = pytest.mark.integration


def _refusal(dsn: str) -> str:
    core = CoreSettings.from_dsn(dsn)
    with (
        ManagementApi(ManagementSettings.resolve(core, environ={}, timeout=10)) as api,
        pytest.raises(ManagementError) as info,
    ):
        api.queues()
    assert info.value.status == 401
    return str(info.value)


def test_a_wrong_password_is_not_called_a_missing_tag(
    management_api: ManagementApi, amqp_vhost: AmqpVhost
) -> None:
    secret = "not-the-password-5c1e"
    message = _refusal(amqp_vhost.dsn_for(amqp_vhost.username, secret))
    assert "wrong user or password" in message
    assert "tagged" not in message
    assert secret not in message


def test_a_user_without_a_management_tag_is_told_so(
    provision: Callable[..., ProvisionedSatellite],
) -> None:
    sat = provision()  # a satellite's user: no tags
    message = _refusal(sat.dsn)
    assert "tagged administrator or monitoring" in message
    assert sat.password not in message


@pytest.fixture
def read_only_core(amqp_vhost: AmqpVhost) -> Iterator[str]:
    """A DSN for a core user that may configure and read but write nothing."""
    user, secret = f"core-nw-{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex
    rabbitmqctl("add_user", user, secret)
    try:
        rabbitmqctl("set_permissions", "-p", amqp_vhost.name, user, "^$", "^$", ".*")
        yield amqp_vhost.dsn_for(user, secret)
    finally:
        rabbitmqctl("delete_user", user)


def test_a_missing_permission_is_named_not_blamed_on_declare(
    read_only_core: str, amqp_vhost: AmqpVhost, sid: str
) -> None:
    with Client(amqp_vhost.dsn) as admin:
        assert admin.declare([sid]).ok
    job = build_job("tcp.connect", target={"host": "127.0.0.1", "port": 1})
    with Client(read_only_core) as client:
        with pytest.raises(PublishNotConfirmedError) as published:
            client.submit(sid, job)
        assert "ACCESS_REFUSED" in str(published.value)
        assert "needs write on usm_poller.jobs" in str(published.value)
        assert "satellite declare" not in str(published.value)
    with Client(read_only_core) as client, pytest.raises(BrokerError) as called:
        client.call(sid, job, timeout=5)
    assert "needs configure and read on satellite-reply-*" in str(called.value)
    assert "satellite declare" not in str(called.value)
