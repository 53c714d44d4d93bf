"""The real `poller run` when the broker turns it away: what it logs, and that it consumes anyway.

- A provisioned user (configure `^$`) with `USM_POLLER_DECLARE` left at `true`: the first
  declaration is refused (403); one warning says so and the poller consumes without declaring,
  then and after every reconnect of the process.
- A wrong password: one `broker_connect_failed` warning per attempt, one `broker_refused` saying
  to check the password, and no error-level line (pika's own logging is written at debug only).
- A mistyped satellite id with a provisioned user: the broker refuses the queue (403) and
  `broker_refused` names the id and the user to check, once a minute, not once per attempt.
- A dead-letter queue held exclusively by another connection (405 RESOURCE_LOCKED on declare):
  one warning naming it, and the poller consumes its job queue all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pika
import pytest
from structlog.testing import capture_logs

from poller import wire
from poller.broker import Broker, BrokerOptions, Topology
from poller.config import parse_dsn
from poller.health import check as health_check
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import build_job
from tests.support.management import ProvisionedSatellite
from tests.support.poller_proc import IN_PROCESS_LANE, JobClient, PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
from tests.support.snmpd import Snmpd

#: The replica's own connection: one line per attempt, once per process (a lane process
#: would make its own attempts and lines).
pytestmark = [pytest.mark.integration, IN_PROCESS_LANE]

SYS_NAME = "1.3.6.1.2.1.1.5.0"
#: How long the poller with the wrong password is watched.
WRONG_PASSWORD_WINDOW_S = 5.0

Provision = Callable[..., ProvisionedSatellite]


@pytest.fixture
def core(amqp_vhost: AmqpVhost) -> Iterator[Client]:
    with Client(CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5)) as client:
        yield client


def _close_connections_of(user: str) -> None:
    rabbitmqctl("close_all_user_connections", user, "test: cut the poller")


def _wait_for(poller_events: Callable[[], Sequence[object]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not poller_events() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_user_that_may_not_declare_warns_once_and_consumes(
    amqp_vhost: AmqpVhost,
    core: Client,
    provision: Provision,
    start_poller: PollerFactory,
    snmpd: Snmpd,
) -> None:
    sat = provision()
    sid = sat.satellite_id
    assert core.declare([sid]).ok
    start_poller.vhost = replace(amqp_vhost, username=sat.user, password=sat.password)
    poller = start_poller(sid)  # USM_POLLER_DECLARE is left at its default, true

    def job() -> wire.JobRequest:
        return build_job(
            "snmp.get",
            target={"host": snmpd.host, "port": snmpd.port},
            auth={"version": "2c", "community": snmpd.community},
            params={"oids": [SYS_NAME]},
            timeout=5,
        )

    assert core.call(sid, job(), timeout=20).status == "ok"
    [refused] = poller.events("declare_refused")
    assert refused["level"] == "warning"
    assert refused["object"] == "exchange"
    assert "ACCESS_REFUSED" in refused["broker_says"]
    assert "USM_POLLER_DECLARE=false" in refused["reason"]

    # A reconnect of the same process does not try again.
    _close_connections_of(sat.user)
    _wait_for(lambda: poller.events("broker_reconnected"))
    assert poller.events("broker_reconnected"), poller.log_text()
    assert core.call(sid, job(), timeout=20).status == "ok"
    assert len(poller.events("declare_refused")) == 1
    assert not poller.events("declare_skipped")
    assert not [line for line in poller.log_lines() if line.get("level") == "error"]


def test_a_wrong_password_is_one_warning_per_attempt_and_no_error_lines(
    amqp_vhost: AmqpVhost, start_poller: PollerFactory, sid: str
) -> None:
    wrong = replace(amqp_vhost, password="not-the-password").dsn
    poller = start_poller(sid, wait=False, amqp_dsn=wrong)
    deadline = time.monotonic() + WRONG_PASSWORD_WINDOW_S
    while time.monotonic() < deadline and poller.proc.poll() is None:
        time.sleep(0.2)
    poller.kill()
    lines = poller.log_lines()
    failed = [line for line in lines if line.get("event") == "broker_connect_failed"]
    assert len(failed) >= 2, poller.log_text()
    assert [line["attempt"] for line in failed] == list(range(1, len(failed) + 1))
    assert all("ACCESS_REFUSED" in line["error"] for line in failed), failed[0]
    loud = [line for line in lines if line.get("level") not in ("info", "debug", "warning")]
    assert not loud, f"{len(loud)} error-level or unparsed lines, first: {loud[0]}"
    warnings = {line["event"] for line in lines if line.get("level") == "warning"}
    assert warnings == {"broker_connect_failed", "broker_refused"}
    # Within the first minute, one line says what was refused and what to check.
    [refused] = [line for line in lines if line.get("event") == "broker_refused"]
    assert refused["code"] == 403
    assert "Login was refused" in refused["refused"]
    assert "password in US_AMQP_DSN" in refused["check"]
    assert "not-the-password" not in poller.log_text()


def test_a_mistyped_satellite_id_is_told_what_the_broker_refused_and_what_to_check(
    amqp_vhost: AmqpVhost,
    core: Client,
    provision: Provision,
    start_poller: PollerFactory,
) -> None:
    """A provisioned user may read its own satellite's queue only: a poller started with
    another id (a typo at 3 a.m.) is refused that queue. It retries, and says why, with
    the id and the user to check, not only a `broker_connect_failed` per attempt."""
    sat = provision()
    assert core.declare([sat.satellite_id]).ok
    typo = sat.satellite_id + "x"
    start_poller.vhost = replace(amqp_vhost, username=sat.user, password=sat.password)
    poller = start_poller(typo, wait=False, declare="false")
    _wait_for(lambda: poller.events("broker_refused"))
    deadline = time.monotonic() + 3  # a few more attempts: still the one warning
    while time.monotonic() < deadline and poller.proc.poll() is None:
        time.sleep(0.2)
    # `poller check` (the container's health check) says why, not only "not connected".
    healthy, reason = health_check(poller.health_path)
    assert not healthy
    assert "not connected to the broker" in reason
    assert f"the broker refused: ACCESS_REFUSED - access to queue '{wire.jobs_queue(typo)}'" in (
        reason
    )
    poller.kill()
    [refused] = poller.events("broker_refused")
    assert refused["level"] == "warning"
    assert refused["code"] == 403
    assert f"access to queue '{wire.jobs_queue(typo)}'" in refused["refused"]
    check = refused["check"]
    assert f"USM_POLLER_SATELLITE_ID={typo}" in check
    assert repr(sat.user) in check
    # The provisioned user's name says which satellite it belongs to: the id to check.
    assert f"made for satellite {sat.satellite_id!r}" in check
    assert f"(={sat.satellite_id}?)" in check
    assert len(poller.events("broker_connect_failed")) >= 2
    assert sat.password not in poller.log_text()


async def test_a_lasting_refusal_is_repeated_every_interval_and_a_new_one_at_once(
    amqp_vhost: AmqpVhost,
) -> None:
    """The periodic `broker_refused` of `poller.broker`, in-process with a 1 s interval."""
    queue = f"test-refused-{uuid.uuid4().hex[:8]}"
    broker = Broker(
        parse_dsn(amqp_vhost.dsn),
        BrokerOptions(
            connection_name="test refused",
            declare=False,
            backoff_initial=0.1,
            backoff_max=0.2,
            refused_warn_interval=1.0,
        ),
        queue=queue,
        topology=Topology(),
        on_delivery=lambda _d: None,
    )
    with capture_logs() as logs:
        task = asyncio.create_task(broker.run())
        try:
            await asyncio.sleep(2.6)
            refused = [e for e in logs if e["event"] == "broker_refused"]
            # At 0 s, about 1 s and about 2 s; each repeat counts the attempts since the last.
            assert 2 <= len(refused) <= 4, refused
            assert all(e["code"] == 404 for e in refused)
            assert refused[0]["refused_attempts"] == 1
            assert all(e["refused_attempts"] > 1 for e in refused[1:])
            assert f"queue {queue!r} is declared" in refused[0]["check"]
            failed = [e for e in logs if e["event"] == "broker_connect_failed"]
            assert len(failed) > len(refused)
            # The queue appears: the broker connects, and the warnings stop.
            await asyncio.to_thread(_declare, amqp_vhost.dsn, queue)
            assert await broker.wait_ready(10)
            count = len([e for e in logs if e["event"] == "broker_refused"])
            await asyncio.sleep(1.2)
            assert len([e for e in logs if e["event"] == "broker_refused"]) == count
        finally:
            await broker.close(timeout=5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(_delete, amqp_vhost.dsn, queue)


def _declare(dsn: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(dsn)) as conn:
        conn.channel().queue_declare(queue, arguments={"x-expires": 60_000})


def _delete(dsn: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(dsn)) as conn:
        conn.channel().queue_delete(queue)


def test_a_dead_letter_queue_that_cannot_be_declared_does_not_stop_consumption(
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
) -> None:
    # Another connection holds an exclusive queue under the DLQ's name: 405 RESOURCE_LOCKED.
    holder = pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn))
    try:
        holder.channel().queue_declare(wire.dead_letter_queue(sid), exclusive=True)
        poller = start_poller(sid)
        client.publish(snmp_job(snmpd.host, snmpd.port, job_id="despite-the-dlq"))
        assert client.by_id(1)["despite-the-dlq"].status == "ok"
    finally:
        holder.close()
    [skipped] = poller.events("declare_skipped")
    assert skipped["level"] == "warning"
    assert (skipped["object"], skipped["name"]) == ("queue", wire.dead_letter_queue(sid))
    assert "RESOURCE_LOCKED" in skipped["broker_says"]
    assert skipped["bindings_skipped"] == 1


def test_a_job_queue_the_poller_had_to_create_is_a_warning(
    core: Client, start_poller: PollerFactory, sid: str
) -> None:
    """A mistyped satellite id with a user that may declare: the poller makes an empty queue
    of its own and consumes it, and says so. A satellite the core declared: no such line."""
    typo = sid + "x"
    poller = start_poller(typo)  # waits until it consumes
    assert poller.terminate() == 0
    [created] = poller.events("job_queue_created")
    assert created["level"] == "warning"
    assert created["queue"] == wire.jobs_queue(typo)
    assert "check the satellite id" in created["hint"]
    assert not [line for line in poller.log_lines() if line.get("level") == "error"]
    # The same id again (its queue exists now), and a satellite the core declared: silent.
    again = start_poller(typo)
    assert core.declare([sid]).ok
    declared = start_poller(sid)
    for started in (again, declared):
        assert started.terminate() == 0
        assert not started.events("job_queue_created"), started.log_text()
        assert started.events("broker_connected")
