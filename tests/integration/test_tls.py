"""The real `poller run` process over AMQPS to a private RabbitMQ node with a throw-away CA.

The broker (`tls_broker`) verifies client certificates when one is offered but does not require
one, so the same node serves server-verified TLS and mutual TLS; which one a connection used is
read back from the broker (`rabbitmqctl list_connections ssl peer_cert_subject`). Jobs are
published over the node's plain AMQP port, the way the core's side would on its own network.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from poller import wire
from poller.health import check
from poller.worker import build_topology
from tests.support.poller_proc import JobClient, PollerFactory, PollerProcess, snmp_job
from tests.support.tls_broker import TlsBroker

#: How long a poller that must not connect is watched, at most.
REFUSED_WINDOW = 5.0


@pytest.fixture
def pollers(tls_broker: TlsBroker, tmp_path: Path) -> Iterator[PollerFactory]:
    """`poller run` processes whose default DSN is the private node's plain port."""
    factory = PollerFactory(tls_broker.plain, tmp_path)
    yield factory
    for poller in factory.started:
        poller.kill()


@pytest.fixture
def client(tls_broker: TlsBroker, sid: str) -> Iterator[JobClient]:
    c = JobClient(tls_broker.plain.dsn, sid)
    yield c
    c.close()


def tls_connections(broker: TlsBroker) -> dict[str, dict[str, Any]]:
    """The node's client connections by connection name: `ssl`, `peer_cert_subject`."""
    out = broker.rabbitmqctl(
        "list_connections",
        "client_properties",
        "ssl",
        "peer_cert_subject",
        "--formatter",
        "json",
        "--quiet",
    )
    return {_connection_name(row): row for row in json.loads(out or "[]")}


def _connection_name(row: dict[str, Any]) -> str:
    for key, _type, value in row["client_properties"]:
        if key == "connection_name":
            return str(value)
    return ""


def poller_connections(broker: TlsBroker, sid: str, count: int) -> list[dict[str, Any]]:
    """The broker's view of the `count` connections of satellite `sid`'s pollers (waited for,
    up to 20 s: a lane process connects a moment after its replica)."""
    deadline = time.monotonic() + 20
    while True:
        rows = [row for name, row in tls_connections(broker).items() if f"poller {sid} " in name]
        if len(rows) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(rows) == count, rows
    return rows


def answer_one_job(client: JobClient, sid: str, udp_port: int) -> None:
    """A job makes the round trip: consumed over TLS, result published over TLS."""
    job = snmp_job("127.0.0.1", udp_port, timeout=0.5)
    client.publish(job)
    results = client.by_id(1, timeout=15)
    assert set(results) == {job["id"]}
    result = results[job["id"]]
    assert result.satellite_id == sid
    assert result.error is not None
    assert result.error.code == "device_timeout"


def declare_and_queue_job(broker: TlsBroker, sid: str) -> str:
    """Declare `sid`'s topology as its poller would, and leave one job in its queue."""
    conn = pika.BlockingConnection(pika.URLParameters(broker.plain.dsn))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        topology = build_topology(sid, "quorum")
        for name, kind in topology.exchanges:
            ch.exchange_declare(name, kind, durable=True)
        for spec in topology.queues:
            ch.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
            for exchange, key in spec.bindings:
                ch.queue_bind(spec.name, exchange, key)
        job = snmp_job("127.0.0.1", 9, timeout=0.5)
        ch.basic_publish(
            wire.jobs_exchange(),
            wire.jobs_routing_key(sid),
            json.dumps(job).encode(),
            pika.BasicProperties(content_type="application/json", delivery_mode=2),
            mandatory=True,
        )
        return wire.jobs_queue(sid)
    finally:
        conn.close()


def watch_refused(
    broker: TlsBroker, refused: dict[str, PollerProcess], attempts: int = 3
) -> dict[str, list[dict[str, Any]]]:
    """Each poller keeps failing to connect and never reports itself ready or consuming.

    Once every poller has started, it is watched until it has logged `attempts` failed connects
    (REFUSED_WINDOW s, longer only while one has not failed twice yet on a loaded machine).
    Returns the `broker_connect_failed` lines by poller.
    """
    hard_deadline = time.monotonic() + 30
    window_end: float | None = None
    while time.monotonic() < hard_deadline:
        for name, poller in refused.items():
            assert poller.proc.poll() is None, f"{name}: exited\n{poller.log_text()}"
            healthy, why = check(poller.health_path)
            assert not healthy, f"{name}: became ready ({why})\n{poller.log_text()}"
        if window_end is None and all(p.events("poller_started") for p in refused.values()):
            window_end = time.monotonic() + REFUSED_WINDOW
        counts = [len(p.events("broker_connect_failed")) for p in refused.values()]
        if min(counts) >= attempts or (
            window_end is not None and time.monotonic() > window_end and min(counts) >= 2
        ):
            break
        time.sleep(0.1)
    failures = {name: poller.events("broker_connect_failed") for name, poller in refused.items()}
    for name, poller in refused.items():
        assert len(failures[name]) >= 2, f"{name}: too few attempts\n{poller.log_text()}"
        assert not poller.events("broker_connected"), name
        state = json.loads(poller.health_path.read_text()) if poller.health_path.exists() else {}
        assert not state.get("consuming"), (name, state)
    return failures


def assert_certificate_error(poller: PollerProcess, reason: str) -> None:
    """The poller's log names the certificate verification failure and its reason.

    Both pika's own error lines and our `broker_connect_failed` carry it.
    """
    named = [
        text
        for text in (json.dumps(line) for line in poller.log_lines())
        if "CERTIFICATE_VERIFY_FAILED" in text
    ]
    assert named, poller.log_text()
    assert all(reason in text for text in named), (reason, named)


def queued(broker: TlsBroker, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(broker.plain.dsn))
    try:
        depth: int = conn.channel().queue_declare(queue, passive=True).method.message_count
        return depth
    finally:
        conn.close()


def test_server_verified_tls_connects_consumes_and_answers(
    tls_broker: TlsBroker,
    pollers: PollerFactory,
    client: JobClient,
    sid: str,
    silent_udp_port: int,
) -> None:
    poller = pollers(sid, amqp_dsn=tls_broker.amqps_dsn(cafile=str(tls_broker.ca_file)))
    answer_one_job(client, sid, silent_udp_port)
    assert poller.events("broker_connected")[0]["broker"].startswith("amqps://guest:***@")


def test_mutual_tls_with_the_tls_settings(
    tls_broker: TlsBroker,
    pollers: PollerFactory,
    client: JobClient,
    sid: str,
    silent_udp_port: int,
) -> None:
    pollers(
        sid,
        # By address: the certificate names 127.0.0.1 too (and 127.0.0.2 is refused below).
        amqp_dsn=tls_broker.amqps_dsn(host="127.0.0.1"),
        tls_ca_file=str(tls_broker.ca_file),
        tls_cert_file=str(tls_broker.client_cert),
        tls_key_file=str(tls_broker.client_key),
    )
    answer_one_job(client, sid, silent_udp_port)
    # The replica's and its lane process's: both with the client certificate.
    conns = poller_connections(tls_broker, sid, 2)
    assert sorted(_connection_name(c).endswith("(interactive lane)") for c in conns) == [
        False,
        True,
    ]
    for conn in conns:
        assert conn["ssl"] is True
        assert conn["peer_cert_subject"] == "CN=usm-poller"


def test_server_certificate_from_another_ca_is_refused(
    tls_broker: TlsBroker, pollers: PollerFactory
) -> None:
    cases = {
        # No cafile: the system store, which does not hold the test CA.
        "system store": tls_broker.amqps_dsn(),
        "other CA": tls_broker.amqps_dsn(cafile=str(tls_broker.other_ca_file)),
    }
    queues = {}
    started = {}
    for name, dsn in cases.items():
        case_sid = f"tls{uuid.uuid4().hex[:10]}"
        queues[name] = declare_and_queue_job(tls_broker, case_sid)
        started[name] = pollers(case_sid, wait=False, amqp_dsn=dsn)
    watch_refused(tls_broker, started)
    for poller in started.values():
        assert_certificate_error(poller, "self-signed certificate in certificate chain")
    for name, queue in queues.items():
        assert queued(tls_broker, queue) == 1, f"{name}: the job was consumed"


def test_server_certificate_for_another_name_is_refused(
    tls_broker: TlsBroker, pollers: PollerFactory
) -> None:
    ca = str(tls_broker.ca_file)
    cases = {
        # The certificate names localhost and 127.0.0.1; the node listens on 127.0.0.2 too.
        "IP address mismatch, certificate is not valid for '127.0.0.2'": tls_broker.amqps_dsn(
            host=tls_broker.unnamed_address, cafile=ca
        ),
        "Hostname mismatch, certificate is not valid for 'broker.example.net'": (
            tls_broker.amqps_dsn(cafile=ca, server_hostname="broker.example.net")
        ),
    }
    started = {
        reason: pollers(f"tls{uuid.uuid4().hex[:10]}", wait=False, amqp_dsn=dsn)
        for reason, dsn in cases.items()
    }
    watch_refused(tls_broker, started)
    for reason, poller in started.items():
        assert_certificate_error(poller, reason)


def test_refused_connect_is_logged_as_a_certificate_error(
    tls_broker: TlsBroker, pollers: PollerFactory
) -> None:
    dsn = tls_broker.amqps_dsn(cafile=str(tls_broker.ca_file), server_hostname="other.example")
    poller = pollers(f"tls{uuid.uuid4().hex[:10]}", wait=False, amqp_dsn=dsn)
    for line in watch_refused(tls_broker, {"mismatch": poller}, attempts=2)["mismatch"]:
        assert "CERTIFICATE_VERIFY_FAILED" in line["error"], line
        assert "mismatch" in line["error"], line


@pytest.mark.parametrize(
    "option",
    [
        "verify=none",
        "ssl_options=%7B%22cert_reqs%22%3A0%7D",
        "cert_reqs=CERT_NONE",
        "check_hostname=false",
    ],
)
def test_dsn_option_that_would_turn_verification_off_exits_2(
    tls_broker: TlsBroker, pollers: PollerFactory, option: str
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    dsn = f"amqps://guest:{secret}@localhost:{tls_broker.port}/?cafile={tls_broker.ca_file}"
    poller = pollers(f"tls{uuid.uuid4().hex[:10]}", wait=False, amqp_dsn=f"{dsn}&{option}")
    assert poller.proc.wait(timeout=30) == 2
    lines = poller.log_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("poller: US_AMQP_DSN: ")
    assert option.split("=", maxsplit=1)[0] in lines[0]
    assert secret not in lines[0]
