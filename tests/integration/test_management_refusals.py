"""The management API's two 401s, told apart: a wrong password, and a user without a tag."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from satellite.config import CoreSettings
from satellite.management import ManagementApi, ManagementError, ManagementSettings
from tests.support.management import ProvisionedSatellite
from tests.support.rabbitmq import AmqpVhost

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
