"""The real `poller run` when the broker turns it away: what it logs, and that it consumes anyway.

- A provisioned user (configure `^$`) with `USM_POLLER_DECLARE` left at `true`: the first
  declaration is refused (403); one warning says so and the poller consumes without declaring,
  then and after every reconnect of the process.
- A wrong password: one `broker_connect_failed` warning per attempt, and no error-level line
  (pika's own logging is written at debug only).
- A dead-letter queue held exclusively by another connection (405 RESOURCE_LOCKED on declare):
  one warning naming it, and the poller consumes its job queue all the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pika
import pytest

from poller import wire
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
    assert warnings == {"broker_connect_failed"}
    assert "not-the-password" not in poller.log_text()


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
