"""The permission model of DESIGN §3 against the real broker: what a provisioned satellite may do.

Each satellite gets its broker user from `satellite provision` (through the management API);
the topology comes from `satellite declare`, as the core would do it. Refusals are checked with
pika `BlockingConnection`s as that user: 403 ACCESS_REFUSED, or 406 PRECONDITION_FAILED for a
forged `user_id`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pika
import pika.exceptions
import pytest

from poller import wire
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import SenderPolicy, build_job
from satellite.management import ManagementApi
from satellite.provision import (
    provision_satellite,
    revoke_satellite,
    satellite_permissions,
    satellite_user,
)
from satellite.results import ResultReader
from satellite.status import FleetView
from tests.support.management import ProvisionedSatellite
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.responder import ok_result
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406
SYS_NAME = "1.3.6.1.2.1.1.5.0"

Provision = Callable[..., ProvisionedSatellite]


@pytest.fixture
def core(amqp_vhost: AmqpVhost) -> Iterator[Client]:
    with Client(CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5)) as client:
        yield client


@pytest.fixture
def pair(core: Client, provision: Provision) -> tuple[ProvisionedSatellite, ProvisionedSatellite]:
    """Two provisioned, declared satellites: `a` (under test) and `b` (its neighbour)."""
    a, b = provision(), provision()
    assert core.declare([a.satellite_id, b.satellite_id]).ok
    return a, b


@contextlib.contextmanager
def connect(dsn: str) -> Iterator[pika.BlockingConnection]:
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        yield conn
    finally:
        if conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()


def refused(conn: pika.BlockingConnection, action: Callable[[Any], object]) -> int:
    """Run `action(channel)` on a fresh confirm-mode channel; the broker's reply code."""
    channel = conn.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        action(channel)
    return int(info.value.reply_code)


def result_body(sid: str) -> bytes:
    job = build_job(
        "snmp.get", target={"host": "192.0.2.1"}, credential_ref="x", params={"oids": [SYS_NAME]}
    )
    return wire.encode(ok_result(job, sid))


def props(user: str, **extra: Any) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json", delivery_mode=2, user_id=user, **extra
    )


def test_permissions_are_exactly_those_of_the_design(
    management_api: ManagementApi, provision: Provision
) -> None:
    sat = provision()
    sid = sat.satellite_id
    assert sat.user == satellite_user(sid) == f"sat-{sid}"
    assert management_api.permissions(sat.user) == {
        "user": sat.user,
        "vhost": management_api.vhost,
        "configure": "^$",
        "write": r"^(usm_poller\.results|usm_poller\.events)$",
        "read": rf"^(usm_poller-sat-{sid}|usm_poller-sat-{sid}\.interactive)$",
    }
    topic = {row["exchange"]: row for row in management_api.topic_permissions(sat.user)}
    assert set(topic) == {"usm_poller.results", "usm_poller.events"}
    for row in topic.values():
        assert row["write"] == rf"^(result|reply|heartbeat|event)\.{sid}(\.|$)"
        assert row["read"] == "^$"
    assert management_api.user_limits(sat.user) == {"max-connections": 16, "max-channels": 64}
    user = management_api.user(sat.user)
    assert user is not None
    assert user["tags"] in ("", [])  # no management access
    assert satellite_permissions(sid).topic_write == topic["usm_poller.results"]["write"]


def test_a_satellite_consumes_its_queue_and_publishes_its_own_results(
    core: Client, pair: tuple[ProvisionedSatellite, ProvisionedSatellite]
) -> None:
    a, _ = pair
    sid = a.satellite_id
    job = build_job(
        "snmp.get", target={"host": "192.0.2.1"}, credential_ref="x", params={"oids": [SYS_NAME]}
    )
    core.submit(sid, job)
    with connect(a.dsn) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        # passive declare needs no permission: the poller may check its queue exists
        assert channel.queue_declare(wire.jobs_queue(sid), passive=True).method.message_count == 1
        got: list[bytes] = []

        def on_job(ch: Any, method: Any, _props: Any, body: bytes) -> None:
            got.append(body)
            ch.basic_ack(method.delivery_tag)

        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(wire.jobs_queue(sid), on_job)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert wire.decode_job(got[0]).id == job.id
        # ...and its interactive lane (DESIGN §13)
        lane_job = build_job(
            "snmp.get",
            target={"host": "192.0.2.2"},
            credential_ref="x",
            params={"oids": [SYS_NAME]},
        )
        core.submit(sid, lane_job, lane="interactive")
        channel.basic_consume(wire.interactive_queue(sid), on_job)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert wire.decode_job(got[1]).id == lane_job.id
        for key in (
            wire.result_routing_key(sid, "snmp.get"),
            wire.reply_routing_key(sid, "satellite-reply-abc"),
        ):
            channel.basic_publish(
                wire.results_exchange(), key, result_body(sid), props(a.user), mandatory=False
            )
        channel.basic_publish(
            wire.events_exchange(), wire.heartbeat_routing_key(sid), b"{}", props(a.user)
        )
        channel.basic_publish(
            wire.events_exchange(), wire.event_routing_key(sid, "started"), b"{}", props(a.user)
        )
    with core.result_reader([sid]) as reader:
        results = list(reader.read())
    assert [r.result.satellite_id for r in results] == [sid]
    assert results[0].user_id == a.user


def test_everything_else_is_refused(
    pair: tuple[ProvisionedSatellite, ProvisionedSatellite],
) -> None:
    a, b = pair
    sid, other = a.satellite_id, b.satellite_id
    body = result_body(sid)
    results, events = wire.results_exchange(), wire.events_exchange()
    with connect(a.dsn) as conn:
        reads: dict[str, Callable[[Any], object]] = {
            "another satellite's queue": lambda ch: ch.basic_get(wire.jobs_queue(other)),
            "another satellite's interactive lane": lambda ch: ch.basic_get(
                wire.interactive_queue(other)
            ),
            "consume another satellite's queue": lambda ch: ch.basic_consume(
                wire.jobs_queue(other), lambda *_: None
            ),
            "the core's result queue": lambda ch: ch.basic_get(wire.results_queue()),
            "its own DLQ": lambda ch: ch.basic_get(wire.dead_letter_queue(sid)),
            "another DLQ": lambda ch: ch.basic_get(wire.dead_letter_queue(other)),
        }
        publishes: dict[str, Callable[[Any], object]] = {
            "a job to the jobs exchange": lambda ch: ch.basic_publish(
                wire.jobs_exchange(), sid, b"{}", props(a.user)
            ),
            "a job to another satellite": lambda ch: ch.basic_publish(
                wire.jobs_exchange(), other, b"{}", props(a.user)
            ),
            "through the default exchange": lambda ch: ch.basic_publish(
                "", wire.jobs_queue(other), b"{}", props(a.user)
            ),
            "to the result queue through the default exchange": lambda ch: ch.basic_publish(
                "", wire.results_queue(), body, props(a.user)
            ),
            "to the dead-letter exchange": lambda ch: ch.basic_publish(
                wire.dead_letter_exchange(), other, b"{}", props(a.user)
            ),
            "a result under another satellite's key": lambda ch: ch.basic_publish(
                results, wire.result_routing_key(other, "snmp.get"), body, props(a.user)
            ),
            "a reply under another satellite's key": lambda ch: ch.basic_publish(
                results, wire.reply_routing_key(other, "q"), body, props(a.user)
            ),
            "a result under a key that only starts with its id": lambda ch: ch.basic_publish(
                results, f"result.{sid}x.snmp.get", body, props(a.user)
            ),
            "a result under a key of another form": lambda ch: ch.basic_publish(
                results, f"x.{sid}", body, props(a.user)
            ),
            "a heartbeat under another satellite's key": lambda ch: ch.basic_publish(
                events, wire.heartbeat_routing_key(other), b"{}", props(a.user)
            ),
            "an event under another satellite's key": lambda ch: ch.basic_publish(
                events, wire.event_routing_key(other, "started"), b"{}", props(a.user)
            ),
        }
        changes: dict[str, Callable[[Any], object]] = {
            "declaring a queue": lambda ch: ch.queue_declare("mine", durable=True),
            "declaring a server-named queue": lambda ch: ch.queue_declare("", exclusive=True),
            "redeclaring its own queue": lambda ch: ch.queue_declare(
                wire.jobs_queue(sid), durable=True, arguments=wire.jobs_queue_arguments(sid)
            ),
            "declaring an exchange": lambda ch: ch.exchange_declare("mine", "topic"),
            "deleting its own queue": lambda ch: ch.queue_delete(wire.jobs_queue(sid)),
            "deleting another queue": lambda ch: ch.queue_delete(wire.jobs_queue(other)),
            "deleting the result queue": lambda ch: ch.queue_delete(wire.results_queue()),
            "deleting an exchange": lambda ch: ch.exchange_delete(wire.results_exchange()),
            "binding its queue to other jobs": lambda ch: ch.queue_bind(
                wire.jobs_queue(sid), wire.jobs_exchange(), other
            ),
            "binding the result queue": lambda ch: ch.queue_bind(
                wire.results_queue(), wire.events_exchange(), "#"
            ),
            "unbinding the result queue": lambda ch: ch.queue_unbind(
                wire.results_queue(), wire.results_exchange(), wire.results_binding_key()
            ),
            "purging another queue": lambda ch: ch.queue_purge(wire.jobs_queue(other)),
        }
        codes = {
            name: refused(conn, action) for name, action in (reads | publishes | changes).items()
        }
        forged = {
            "another satellite's user": refused(
                conn,
                lambda ch: ch.basic_publish(
                    results, wire.result_routing_key(sid, "snmp.get"), body, props(b.user)
                ),
            ),
            "the core's user": refused(
                conn,
                lambda ch: ch.basic_publish(
                    results, wire.result_routing_key(sid, "snmp.get"), body, props("guest")
                ),
            ),
        }
        assert conn.is_open  # channel errors only: the connection itself is still fine
    assert codes == dict.fromkeys(codes, ACCESS_REFUSED)
    assert forged == dict.fromkeys(forged, PRECONDITION_FAILED)


def test_wrong_password_and_revoked_user_cannot_connect(
    amqp_vhost: AmqpVhost, management_api: ManagementApi, provision: Provision
) -> None:
    sat = provision()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn_for(sat.user, "wrong")))
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        # another vhost: the user has no permissions there
        pika.BlockingConnection(pika.URLParameters(sat.dsn.rsplit("/", 1)[0] + "/%2F"))
    conn = pika.BlockingConnection(pika.URLParameters(sat.dsn))
    revoked = revoke_satellite(management_api, sat.satellite_id)
    assert revoked.deleted
    deadline = time.monotonic() + 10
    with contextlib.suppress(pika.exceptions.AMQPError):
        while conn.is_open and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
    assert not conn.is_open
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(sat.dsn))


def test_rotate_changes_the_password_and_limits_hold(
    amqp_vhost: AmqpVhost, management_api: ManagementApi, provision: Provision
) -> None:
    sat = provision(max_connections=2)
    again = provision_satellite(management_api, sat.satellite_id, host="h", max_connections=2)
    assert (again.created, again.password_set, again.dsn) == (False, False, None)
    with (
        connect(sat.dsn),
        connect(sat.dsn),
        pytest.raises(pika.exceptions.ProbableAccessDeniedError, match="limit"),
    ):
        pika.BlockingConnection(pika.URLParameters(sat.dsn))  # max-connections: 2
    rotated = provision_satellite(
        management_api, sat.satellite_id, host=amqp_vhost.host, port=amqp_vhost.port, rotate=True
    )
    assert rotated.dsn is not None
    assert rotated.dsn != sat.dsn
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(sat.dsn))
    with connect(rotated.dsn) as conn:
        assert conn.is_open


def test_real_poller_runs_as_a_provisioned_satellite(
    amqp_vhost: AmqpVhost,
    core: Client,
    provision: Provision,
    start_poller: PollerFactory,
    snmpd: Snmpd,
) -> None:
    sat = provision()
    sid = sat.satellite_id
    assert core.declare([sid]).ok
    # The poller connects as the provisioned user and declares nothing (DESIGN §3).
    start_poller.vhost = replace(amqp_vhost, username=sat.user, password=sat.password)
    poller = start_poller(sid, declare="false", heartbeat_interval="0.5")
    job = build_job(
        "snmp.get",
        target={"host": snmpd.host, "port": snmpd.port},
        auth={"version": "2c", "community": snmpd.community},
        params={"oids": [SYS_NAME]},
        timeout=5,
    )
    result = core.call(sid, job, timeout=20)  # default policy: user_id must be sat-<id>
    assert result.status == "ok", result.error
    assert result.data is not None
    assert json.loads(json.dumps(result.data))["varbinds"][0]["value"] == snmpd.sys_name
    assert not poller.events("declare_skipped")
    # and the heartbeats it publishes are accepted as this satellite's
    fleet = FleetView()
    listener = core.heartbeat_listener(fleet, [sid])
    try:
        listener.listen(1.5)
    finally:
        listener.close()
    assert [r.heartbeat.worker for r in fleet.replicas(sid)] == [f"poller-{sid}-0"]
    assert listener.rejected == 0


def test_results_of_untrusted_senders_are_dropped(
    core: Client, pair: tuple[ProvisionedSatellite, ProvisionedSatellite], amqp_vhost: AmqpVhost
) -> None:
    """A reader trusting no shared user drops results sent by another user than `sat-<id>`."""
    a, b = pair
    # the core's user (guest) publishes results: trusted by `Client`'s default, not here
    with connect(amqp_vhost.dsn) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for sid in (a.satellite_id, b.satellite_id):
            channel.basic_publish(
                wire.results_exchange(),
                wire.result_routing_key(sid, "snmp.get"),
                result_body(sid),
                props("guest"),
            )
        # a body that names another satellite than its routing key
        channel.basic_publish(
            wire.results_exchange(),
            wire.result_routing_key(a.satellite_id, "snmp.get"),
            result_body(b.satellite_id),
            props("guest"),
        )
    strict_channel = core._connection().channel()  # a reader trusting nobody but sat-<id>
    reader = ResultReader(
        strict_channel,
        sender_check=SenderPolicy(),
        satellites=[a.satellite_id, b.satellite_id],
    )
    try:
        assert list(reader.read()) == []
    finally:
        reader.close()
    assert reader.stats.rejected == 3
