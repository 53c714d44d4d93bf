"""`Client.submit` and `Client.call` against the real broker, with a stand-in poller."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu as _kombu
import pytest

from poller.errors import BrokerError, PublishNotConfirmedError
from poller.wire import JobRequest, decode_job, jobs_queue
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import NoResultError, build_job
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
from tests.support.responder import Responder, error_result

kombu: Any = _kombu
pytestmark = pytest.mark.integration

OID = "1.3.6.1.2.1.1.5.0"


@pytest.fixture
def sat_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(amqp_vhost: AmqpVhost, sat_id: str) -> Iterator[Client]:
    settings = CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5, operation_timeout=5)
    with Client(settings) as client:
        assert client.declare([sat_id]).ok
        yield client


def snmp_job(**options: Any) -> JobRequest:
    return build_job(
        "snmp.get",
        target={"host": "127.0.0.1", "port": 16100},
        auth={"version": "2c", "community": "public"},
        params={"oids": [OID]},
        **options,
    )


def get_raw(amqp_vhost: AmqpVhost, queue: str) -> Any:
    """One message from `queue` (acked), waiting up to 5 s for it."""
    with kombu.Connection(amqp_vhost.dsn, connect_timeout=5) as conn:
        channel = conn.channel()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = channel.basic_get(queue=queue, no_ack=True)
            if message is not None:
                return message
            time.sleep(0.05)
    raise AssertionError(f"no message in {queue}")


def test_submit_puts_a_well_formed_job_in_the_satellite_queue(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    job = snmp_job(meta={"device_id": 1532}, timeout=12)
    assert client.submit(sat_id, job, priority=3) == job.id
    message = get_raw(amqp_vhost, jobs_queue(sat_id))
    assert decode_job(message.body) == job
    props = message.properties
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["message_id"] == job.id
    assert props["type"] == "snmp.get"
    assert props["priority"] == 3
    assert "reply_to" not in props
    assert message.delivery_info["exchange"] == "usm_poller.jobs"
    assert message.delivery_info["routing_key"] == sat_id


def test_submit_to_an_undeclared_satellite_is_not_confirmed(client: Client) -> None:
    with pytest.raises(PublishNotConfirmedError, match=r"not routed.*satellite declare nobody"):
        client.submit("nobody", snmp_job())
    # The client stays usable after a returned message.
    with pytest.raises(PublishNotConfirmedError):
        client.submit("nobody", snmp_job())


def test_call_returns_the_matching_result(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    job = snmp_job(meta={"device_id": 7})
    with Responder(amqp_vhost.dsn, sat_id) as responder:
        result = client.call(sat_id, job, timeout=10)
        second = client.call(sat_id, snmp_job(), timeout=10)  # the reply queue is reused
    assert result.status == "ok"
    assert (result.job_id, result.satellite_id, result.meta) == (job.id, sat_id, {"device_id": 7})
    assert second.status == "ok"
    [(seen, props), _] = responder.jobs
    assert seen == job
    assert props["reply_to"].startswith("satellite-reply-")
    assert "." not in props["reply_to"]
    assert props["correlation_id"]
    assert props["message_id"] == job.id


def test_call_returns_error_results_too(client: Client, amqp_vhost: AmqpVhost, sat_id: str) -> None:
    with Responder(amqp_vhost.dsn, sat_id, answer=error_result):
        result = client.call(sat_id, snmp_job(), timeout=10)
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "device_timeout"


def test_call_times_out_cleanly_without_a_poller(client: Client, sat_id: str) -> None:
    job = snmp_job()
    started = time.monotonic()
    with pytest.raises(NoResultError, match=f"no result for job {job.id}") as info:
        client.call(sat_id, job, timeout=1)
    assert 0.9 <= time.monotonic() - started < 5
    assert info.value.job_id == job.id
    assert isinstance(info.value, TimeoutError)


def test_results_with_another_correlation_id_are_ignored(
    client: Client, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    with (
        Responder(amqp_vhost.dsn, sat_id, correlation_id=lambda _cid: "someone-else"),
        pytest.raises(NoResultError),
    ):
        client.call(sat_id, snmp_job(), timeout=1.5)


def test_sender_check_sees_the_broker_user_and_can_reject(
    amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    seen: list[tuple[str, str | None]] = []

    def reject(satellite_id: str, user_id: str | None) -> bool:
        seen.append((satellite_id, user_id))
        return False

    settings = CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5, operation_timeout=5)
    with Client(settings, sender_check=reject) as client:
        client.declare([sat_id])
        with Responder(amqp_vhost.dsn, sat_id), pytest.raises(NoResultError):
            client.call(sat_id, snmp_job(), timeout=1.5)
    assert seen == [(sat_id, "guest")]


def test_client_fails_over_to_the_next_url(amqp_vhost: AmqpVhost, sat_id: str) -> None:
    dead = amqp_vhost.dsn.replace(f":{amqp_vhost.port}/", ":1/")
    settings = CoreSettings.from_dsn(f"{dead},{amqp_vhost.dsn}", connect_timeout=5)
    with Client(settings) as client:
        assert client.connected_to is not None
        assert f":{amqp_vhost.port}/" in client.connected_to
        assert "guest:guest" not in client.connected_to
        assert client.declare([sat_id]).ok


def test_submit_without_the_jobs_exchange_is_a_clear_error(amqp_vhost: AmqpVhost) -> None:
    empty = f"{amqp_vhost.name}-empty"
    rabbitmqctl("add_vhost", empty)
    try:
        rabbitmqctl("set_permissions", "-p", empty, amqp_vhost.username, ".*", ".*", ".*")
        dsn = amqp_vhost.dsn.rsplit("/", 1)[0] + "/" + empty
        with Client(CoreSettings.from_dsn(dsn, connect_timeout=5, operation_timeout=5)) as client:
            with pytest.raises(PublishNotConfirmedError, match="NOT_FOUND - no exchange"):
                client.submit("7", snmp_job())
            with pytest.raises(BrokerError, match=r"reply queue.*satellite declare"):
                client.call("7", snmp_job(), timeout=1)
            assert client.declare(["7"]).ok  # the same client recovers
            assert client.submit("7", snmp_job())
    finally:
        rabbitmqctl("delete_vhost", empty)
