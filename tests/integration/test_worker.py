"""The real `poller run` process against the real RabbitMQ and a real Net-SNMP agent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from poller import wire
from tests.support.poller_proc import JobClient, PollerFactory, data, snmp_job
from tests.support.rabbitmq import AmqpVhost, queue_arguments, rabbitmqctl
from tests.support.snmpd import Snmpd

SYS_NAME = "1.3.6.1.2.1.1.5.0"
SYS_UPTIME = "1.3.6.1.2.1.1.3.0"


def v3_auth(snmpd: Snmpd, name: str, **override: str) -> dict[str, Any]:
    user = snmpd.v3_users[name]
    auth: dict[str, Any] = {
        "version": "3",
        "user": user.user,
        "security_level": user.security_level,
    }
    if user.auth_protocol:
        auth |= {"auth_protocol": user.auth_protocol, "auth_key": user.auth_key}
    if user.priv_protocol:
        auth |= {"priv_protocol": user.priv_protocol, "priv_key": user.priv_key}
    return auth | override


def test_every_snmp_kind_and_version_through_the_broker(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    start_poller(sid)
    h, p = snmpd.host, snmpd.port
    jobs = {
        "v1-get": snmp_job(h, p, auth={"version": "1", "community": "public"}, oids=[SYS_NAME]),
        "v2c-get": snmp_job(h, p, oids=[SYS_NAME, SYS_UPTIME]),
        "v2c-getnext": snmp_job(h, p, kind="snmp.getnext", oids=["1.3.6.1.2.1.1.5"]),
        "v2c-walk": snmp_job(h, p, kind="snmp.walk", oids=["1.3.6.1.2.1.1"]),
        "v1-walk": snmp_job(
            h,
            p,
            kind="snmp.walk",
            oids=["1.3.6.1.2.1.1"],
            auth={"version": "1", "community": "public"},
        ),
        "v3-noauth": snmp_job(h, p, auth=v3_auth(snmpd, "noauth")),
        "v3-md5": snmp_job(h, p, auth=v3_auth(snmpd, "md5")),
        "v3-sha-aes": snmp_job(h, p, auth=v3_auth(snmpd, "sha-aes")),
        "v3-des": snmp_job(h, p, auth=v3_auth(snmpd, "md5-des")),
        "v3-sha512-aes256": snmp_job(h, p, auth=v3_auth(snmpd, "sha512-aes256")),
        "v3-walk": snmp_job(
            h, p, kind="snmp.walk", oids=["1.3.6.1.2.1.1"], auth=v3_auth(snmpd, "sha256-aes192")
        ),
    }
    for job_id, job in jobs.items():
        job["id"] = job_id
        client.publish(job)
    results = client.by_id(len(jobs))
    assert set(results) == set(jobs)
    for job_id, result in results.items():
        assert result.status == "ok", (job_id, result.error)
        assert result.satellite_id == sid
        assert result.kind == jobs[job_id]["kind"]
    name = data(results["v2c-get"])["varbinds"][0]
    assert name == {
        "oid": SYS_NAME,
        "type": "OctetString",
        "value": snmpd.sys_name,
        "hex": snmpd.sys_name.encode().hex(),
    }
    walk = [vb["oid"] for vb in data(results["v2c-walk"])["varbinds"]]
    assert len(walk) >= 7
    assert walk == sorted(walk, key=lambda oid: [int(x) for x in oid.split(".")])
    assert walk == [vb["oid"] for vb in data(results["v1-walk"])["varbinds"]]


def test_snmp_set_then_get_reads_it_back(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    start_poller(sid)
    location = f"rack-{uuid.uuid4().hex[:6]}"
    client.publish(
        {
            "v": 1,
            "id": "set-1",
            "kind": "snmp.set",
            "target": {"host": snmpd.host, "port": snmpd.port},
            "auth": {"version": "2c", "community": snmpd.write_community},
            "params": {
                "varbinds": [{"oid": "1.3.6.1.2.1.1.6.0", "type": "OctetString", "value": location}]
            },
            "timeout": 5,
        }
    )
    assert client.by_id(1)["set-1"].status == "ok"
    client.publish(snmp_job(snmpd.host, snmpd.port, oids=["1.3.6.1.2.1.1.6.0"], job_id="get-1"))
    got = client.by_id(2)["get-1"]
    assert data(got)["varbinds"][0]["value"] == location


def test_device_failures_are_results_with_distinct_codes(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    silent_udp_port: int,
) -> None:
    start_poller(sid)
    h, p = snmpd.host, snmpd.port
    client.publish(snmp_job(h, p, job_id="bad-community", community="wrong-one", timeout=1.5))
    client.publish(
        snmp_job(
            h,
            p,
            job_id="bad-v3-key",
            timeout=5,
            auth=v3_auth(snmpd, "sha-aes", auth_key="not-the-key-123"),
        )
    )
    client.publish(snmp_job(h, silent_udp_port, job_id="silent", timeout=1.0))
    t0 = time.monotonic()
    results = client.by_id(3, timeout=20)
    assert results["bad-community"].error is not None
    assert results["bad-community"].error.code == "device_timeout"
    assert results["bad-v3-key"].error is not None
    assert results["bad-v3-key"].error.code == "auth_failed"
    silent = results["silent"]
    assert silent.error is not None
    assert (silent.error.code, silent.error.retryable) == ("device_timeout", True)
    assert silent.duration_ms <= 1000 * 1.2 + 100
    assert time.monotonic() - t0 < 10


def test_200_jobs_at_concurrency_16_are_answered_exactly_once(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    start_poller(sid, concurrency=16)
    ids = [f"bulk-{n}" for n in range(200)]
    for job_id in ids:
        client.publish(snmp_job(snmpd.host, snmpd.port, job_id=job_id))
    received = client.collect(200, timeout=60)
    time.sleep(1.0)
    received = client.collect(201, timeout=0.5)
    assert sorted(r.result.job_id for r in received) == sorted(ids)
    assert all(r.result.status == "ok" for r in received)
    assert client.queue_depth(wire.jobs_queue(sid)) == 0


def test_job_published_to_the_queue_by_name_with_reply_to(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    start_poller(sid)
    client.publish(
        snmp_job(snmpd.host, snmpd.port, job_id="rpc-1"),
        to_queue=True,
        reply_to="caller-queue-1",
        correlation_id="corr-42",
    )
    [got] = client.collect(1)
    assert got.routing_key == f"reply.{sid}.caller-queue-1"
    assert got.props.correlation_id == "corr-42"
    assert got.props.message_id == "rpc-1"
    assert got.props.type == "snmp.get"
    assert got.props.user_id == "guest"
    assert got.props.delivery_mode == 2
    assert got.props.headers == {"x-satellite-id": sid, "x-lane": "bulk"}
    assert got.result.status == "ok"


def test_bad_messages_get_error_results_and_land_in_the_dlq(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    start_poller(sid, max_job_bytes=4096)
    client.publish(b"{not json", message_id="broken-json")
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="unknown", kind="snmp.bulkget"))
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="v2") | {"v": 2})
    big = snmp_job(snmpd.host, snmpd.port, job_id="too-big", meta={"pad": "x" * 8000})
    client.publish(big)
    client.publish(b"\xff\xfe garbage without any id", message_id=None)
    results = client.by_id(4, timeout=20)
    codes = {job_id: r.error.code for job_id, r in results.items() if r.error}
    assert codes == {
        "broken-json": "invalid_job",
        "unknown": "unknown_kind",
        "v2": "unsupported_version",
        "too-big": "invalid_job",
    }
    deadline = time.monotonic() + 15
    dead: list[Any] = []
    while len(dead) < 5 and time.monotonic() < deadline:
        dead += client.drain_dlq()
        time.sleep(0.2)
    assert len(dead) == 5
    assert all(props.headers and "x-death" in props.headers for props, _ in dead)


def test_heartbeats_are_published(start_poller: PollerFactory, client: JobClient, sid: str) -> None:
    queue = client.bind_heartbeats()
    poller = start_poller(sid)
    deadline = time.monotonic() + 10
    body = None
    while body is None and time.monotonic() < deadline:
        body = client.get(queue)
        time.sleep(0.1)
    assert body is not None
    beat = wire.Heartbeat.model_validate_json(body)
    assert beat.satellite_id == sid
    assert beat.worker == f"poller-{sid}-0"
    assert beat.concurrency == 64
    assert beat.rss_bytes > 10_000_000
    assert poller.terminate() == 0


def test_sigterm_mid_load_exits_0_and_loses_nothing(
    start_poller: PollerFactory, client: JobClient, sid: str, silent_udp_port: int
) -> None:
    poller = start_poller(sid, concurrency=8, shutdown_grace=5)
    ids = [f"slow-{n}" for n in range(40)]
    for job_id in ids:
        client.publish(snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=0.5))
    client.collect(4, timeout=20)
    assert poller.terminate(timeout=30) == 0
    assert poller.events("poller_stopped")
    start_poller(sid, concurrency=16)
    results = client.collect_ids(ids, timeout=60)
    assert sorted({r.result.job_id for r in results}) == sorted(ids)


def test_sigkill_mid_batch_then_restart_answers_everything(
    start_poller: PollerFactory, client: JobClient, sid: str, silent_udp_port: int
) -> None:
    poller = start_poller(sid, concurrency=8)
    ids = [f"k-{n}" for n in range(40)]
    for job_id in ids:
        client.publish(snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=5))
    # Kill once the poller holds every job (running or waiting for a slot) and before the
    # first one can time out: all 40 are unacknowledged at the kill.
    deadline = time.monotonic() + 4
    while client.queue_depth(f"usm_poller-sat-{sid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.queue_depth(f"usm_poller-sat-{sid}") == 0
    poller.kill()
    start_poller(sid, concurrency=16)
    results = client.collect_ids(ids, timeout=60)
    by_id: dict[str, list[wire.JobResult]] = {}
    for r in results:
        by_id.setdefault(r.result.job_id, []).append(r.result)
    assert sorted(by_id) == sorted(ids)
    assert all(len(rs) == 1 for rs in by_id.values()), "nothing was answered before the kill"
    assert all(rs[0].redelivered and rs[0].attempt >= 2 for rs in by_id.values())


def test_non_idempotent_redelivery_is_outcome_unknown(
    start_poller: PollerFactory, client: JobClient, sid: str, silent_udp_port: int
) -> None:
    poller = start_poller(sid, concurrency=4)
    job = snmp_job("127.0.0.1", silent_udp_port, job_id="set-once", timeout=5)
    job["idempotent"] = False
    client.publish(job)
    time.sleep(1.0)
    poller.kill()
    start_poller(sid)
    [got] = client.collect(1)
    assert got.result.error is not None
    assert got.result.error.code == "outcome_unknown"
    assert got.result.redelivered


def test_reconnects_after_the_broker_closes_its_connection(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    amqp_vhost: AmqpVhost,
) -> None:
    poller = start_poller(sid)
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="before"))
    client.collect(1)
    rabbitmqctl("close_all_connections", "-p", amqp_vhost.name, "test: cut the poller")
    deadline = time.monotonic() + 30
    while not poller.events("broker_reconnected") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert poller.events("broker_connection_lost")
    assert poller.events("broker_reconnected")
    # our own test connection was closed too: publish through a new one
    again = JobClient(amqp_vhost.dsn, sid)
    try:
        again.publish(snmp_job(snmpd.host, snmpd.port, job_id="after"))
        [got] = again.collect(1)
        assert got.result.job_id == "after"
        assert got.result.status == "ok"
    finally:
        again.close()


def test_existing_queue_with_other_arguments_is_consumed_anyway(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    amqp_vhost: AmqpVhost,
) -> None:
    client._ch.queue_declare(wire.jobs_queue(sid), durable=True, arguments={"x-max-length": 1000})
    client._ch.queue_bind(wire.jobs_queue(sid), wire.jobs_exchange(), sid)
    poller = start_poller(sid)
    assert any(e.get("name") == wire.jobs_queue(sid) for e in poller.events("declare_skipped"))
    assert queue_arguments(amqp_vhost.name)[wire.jobs_queue(sid)] == {"x-max-length": 1000}
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="old-queue"))
    assert client.by_id(1)["old-queue"].status == "ok"


def test_check_reports_health_and_secrets_never_reach_the_logs(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    amqp_vhost: AmqpVhost,
) -> None:
    user = "canary-user"
    password = "canary-dsn-pw-4711"
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", amqp_vhost.name, user, ".*", ".*", ".*")
        factory = PollerFactory(
            type(amqp_vhost)(amqp_vhost.name, amqp_vhost.host, amqp_vhost.port, user, password),
            start_poller.tmp_path,
        )
        poller = factory(sid, log_level="debug")
        try:
            env = {"USM_POLLER_HEALTH_FILE": str(poller.health_path), "PATH": "/usr/bin:/bin"}
            check = subprocess.run(
                [sys.executable, "-m", "poller", "check"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert check.returncode == 0, check.stderr
            community = "canary-community-0815"
            client.publish(
                snmp_job(snmpd.host, snmpd.port, job_id="c1", community=community, timeout=1)
            )
            client.publish(
                snmp_job(
                    snmpd.host,
                    snmpd.port,
                    job_id="c2",
                    timeout=3,
                    auth=v3_auth(
                        snmpd, "sha-aes", auth_key="canary-auth-key-1", priv_key="canary-priv-key-2"
                    ),
                )
            )
            client.publish(b'{"v":1,"id":"c3","auth":{"community":"canary-community-0815"}}')
            results = client.by_id(3, timeout=20)
            assert {r.status for r in results.values()} == {"error"}
            assert poller.terminate() == 0
        finally:
            poller.kill()
        text = poller.log_text()
        assert "job_finished" in text
        for secret in (password, community, "canary-auth-key-1", "canary-priv-key-2"):
            assert secret not in text
        for r in results.values():
            assert community not in json.dumps(r.model_dump(mode="json"))
        check = subprocess.run(
            [sys.executable, "-m", "poller", "check"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 1
    finally:
        rabbitmqctl("delete_user", user)


def test_fails_over_to_the_next_broker_url(
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    amqp_vhost: AmqpVhost,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    dead = f"amqp://guest:guest@127.0.0.1:{dead_port}/x"
    poller = start_poller(sid, amqp_dsn=f"{dead},{amqp_vhost.dsn}")
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="via-second"))
    assert client.by_id(1)["via-second"].status == "ok"
    failed = poller.events("broker_connect_failed")
    assert all(":***@" in e["broker"] for e in failed)


def test_deleted_queue_is_declared_again_and_consumed(
    start_poller: PollerFactory, client: JobClient, snmpd: Snmpd, sid: str
) -> None:
    poller = start_poller(sid)
    client._ch.queue_delete(wire.jobs_queue(sid))
    deadline = time.monotonic() + 30
    while not poller.events("broker_reconnected") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert poller.events("consumer_cancelled")
    client.publish(snmp_job(snmpd.host, snmpd.port, job_id="after-delete"))
    assert client.by_id(1)["after-delete"].status == "ok"
