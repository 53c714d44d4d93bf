"""`satellite serve` as a real process, with a real `poller run` and snmpd: submit over TCP (token)
and over the unix socket (trusted) with `Prefer: wait`, find the jobs in the history, stop with
SIGTERM (exit 0), restart and find them again, including a job another core published straight
to AMQP while the service was down."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pika
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok

from poller import wire
from satellite.cli import main as satellite_cli
from satellite.service.tokens import TokensFile
from tests.support.poller_proc import JobClient, PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
from tests.support.responder import bare_result
from tests.support.serve_proc import ServeFactory
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration


@pytest.fixture
def start_serve(amqp_vhost: AmqpVhost, tmp_path: Path) -> Iterator[ServeFactory]:
    factory = ServeFactory(amqp_vhost, tmp_path)
    yield factory
    factory.kill_all()


def test_submit_wait_search_stop_and_restart_keep_the_history(
    *,
    start_serve: ServeFactory,
    start_poller: PollerFactory,
    client: JobClient,
    snmpd: Snmpd,
    sid: str,
    tmp_path: Path,
) -> None:
    tokens = TokensFile(tmp_path / "state" / "tokens.yaml")
    token = tokens.create("e2e", ["submit"])
    serve = start_serve()
    start_poller(sid)
    job = snmp_job(snmpd.host, snmpd.port, community=snmpd.community)
    del job["v"], job["id"]

    with serve.tcp(token) as tcp, serve.unix() as unix:
        over_tcp = tcp.post(f"/v1/satellites/{sid}/jobs", json=job, headers={"Prefer": "wait=30"})
        assert over_tcp.status_code == 200, over_tcp.text
        assert over_tcp.json()["result"]["data"]["varbinds"][0]["value"] == snmpd.sys_name
        over_unix = unix.post(f"/v1/satellites/{sid}/jobs", json=job, headers={"Prefer": "wait=30"})
        assert over_unix.status_code == 200, over_unix.text
        assert tcp.get("/v1/jobs").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{serve.tcp_port}/v1/jobs").status_code == 401
        ids = {over_tcp.json()["id"], over_unix.json()["id"]}
        for _ in range(100):
            found = tcp.get("/v1/jobs", params={"satellite": sid}).json()["items"]
            if {r["id"] for r in found if r["answers"] == 1} == ids:
                break
            time.sleep(0.1)
        assert {(r["id"], r["status"], r["source"]) for r in found} == {
            (job_id, "ok", "api") for job_id in ids
        }

    assert serve.terminate() == 0
    assert any(line.get("event") == "core_stopped" for line in serve.log_lines())
    assert not serve.socket_path.exists()

    # While no replica runs, another core publishes a job straight to AMQP; its result waits
    # in usm_poller.history.
    direct = snmp_job(snmpd.host, snmpd.port, community=snmpd.community)
    client.publish(direct)
    seen = client.collect_ids([direct["id"]], timeout=30)
    assert direct["id"] in {r.result.job_id for r in seen}

    again = start_serve()
    with again.tcp(token) as tcp:
        for job_id in ids:
            record = tcp.get(f"/v1/jobs/{job_id}").json()
            assert (record["status"], record["answers"]) == ("ok", 1)
        for _ in range(100):
            response = tcp.get(f"/v1/jobs/{direct['id']}")
            if response.status_code == 200:
                break
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        assert (response.json()["source"], response.json()["status"]) == ("amqp", "ok")
    assert again.terminate() == 0


def test_a_database_that_cannot_be_reached_at_start_is_one_line_and_exit_1(
    start_serve: ServeFactory,
) -> None:
    secret = "pw-" + uuid.uuid4().hex
    serve = start_serve(wait=False, USM_CORE_DB=f"postgresql://core:{secret}@127.0.0.1:1/history")
    assert serve.proc.wait(timeout=60) == 1
    failed = [line for line in serve.log_lines() if line.get("event") == "core_start_failed"]
    assert len(failed) == 1, serve.log_text()
    assert failed[0]["db"] == "postgresql+asyncpg://core:***@127.0.0.1:1/history"
    assert secret not in serve.log_text()
    assert not serve.socket_path.exists()


def test_two_replicas_on_postgresql_ingest_every_result_once_while_one_is_killed(
    start_serve: ServeFactory, pg_database: str, amqp_vhost: AmqpVhost, sid: str
) -> None:
    """3,000 results wait in usm_poller.history; two replicas start together and share them; one
    is SIGKILLed in the middle of the ingest, with deliveries it has not committed. Every result
    ends up as exactly one row."""
    asyncio.run(reset_schema(pg_database))
    # Small commits (prefetch = 2 x batch) make the ingest slow enough to kill a replica in the
    # middle of it, with deliveries held that it has not committed.
    env = {
        "USM_CORE_DB": pg_database,
        "USM_CORE_INGEST_BATCH": "2",
        "USM_CORE_INGEST_LINGER_MS": "0",
    }
    first = start_serve(env=env)  # declares the queue; stopped before the results come
    assert first.terminate() == 0
    ids = [f"{sid}-{n:04}" for n in range(3000)]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for job_id in ids:
            key = wire.result_routing_key(sid, "snmp.get")
            channel.basic_publish(wire.results_exchange(), key, result_body(job_id, sid), props)
    finally:
        conn.close()
    # Both start at once and neither is waited for: a replica that is ready before the other
    # would ingest everything alone (the ingest is faster than a process start).
    victim, survivor = start_serve(wait=False, env=env), start_serve(wait=False, env=env)
    rows, answers = 0, 0
    for _ in range(3000):
        rows, answers = asyncio.run(count_rows(pg_database, sid))
        if rows >= 200 or victim.proc.poll() is not None:
            break
        time.sleep(0.02)
    assert 0 < rows < len(ids), "the kill must land while results are still coming"
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    survivor.wait_listening()
    for _ in range(600):
        rows, answers = asyncio.run(count_rows(pg_database, sid))
        if rows == len(ids):
            break
        time.sleep(0.1)
    assert rows == len(ids)
    assert answers >= len(ids)  # a copy redelivered after the kill counts as a second answer
    assert survivor.terminate() == 0


def result_body(job_id: str, sid: str) -> bytes:
    return wire.encode(bare_result(job_id, sid))


async def reset_schema(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public", timeout=30)
    finally:
        await conn.close(timeout=10)


async def count_rows(url: str, sid: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(answers), 0) FROM jobs WHERE satellite_id = $1",
            sid,
            timeout=10,
        )
    finally:
        await conn.close(timeout=10)
    assert row is not None
    return int(row[0]), int(row[1])


def test_the_openapi_spec_holds_no_server_error(start_serve: ServeFactory, tmp_path: Path) -> None:
    """Schemathesis against a real `satellite serve`: whatever it sends, never a 5xx (besides
    the documented 503s, which need the broker or the store down)."""
    tokens = TokensFile(tmp_path / "state" / "tokens.yaml")
    token = tokens.create("fuzz", ["admin"])
    serve = start_serve()
    base = f"http://127.0.0.1:{serve.tcp_port}"
    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    calls: list[int] = []
    operations = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    assert len(operations) >= 12

    for operation in operations:

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), with_token=st.booleans())
        def check(case: Any, with_token: bool) -> None:
            if case.headers and "prefer" in {k.lower() for k in case.headers}:
                case.headers = {k: v for k, v in case.headers.items() if k.lower() != "prefer"}
            response = case.call(base_url=base, headers=headers if with_token else {}, timeout=30)
            calls.append(response.status_code)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")

        check()
    assert failures == [], failures[:10]
    assert len(calls) >= 100
    assert {200, 401, 404, 422} <= set(calls)
    assert serve.terminate() == 0
    assert "Traceback" not in serve.log_text()


def test_sigterm_answers_a_waiting_request_at_once_and_exits_0(
    start_serve: ServeFactory, amqp_vhost: AmqpVhost, sid: str, tmp_path: Path
) -> None:
    assert satellite_cli(["declare", sid, "--dsn", amqp_vhost.dsn]) == 0
    serve = start_serve()
    job = snmp_job("127.0.0.1", 161)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, serve.unix() as unix:
        waiting = pool.submit(
            unix.post, f"/v1/satellites/{sid}/jobs", json=job, headers={"Prefer": "wait=60"}
        )
        for _ in range(100):  # the job is recorded: the request is waiting now
            if unix.get(f"/v1/jobs/{job['id']}").status_code == 200:
                break
            time.sleep(0.1)
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        response = waiting.result(timeout=30)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
    assert serve.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 15


def test_a_broker_user_that_may_not_declare_is_told_what_the_service_needs(
    start_serve: ServeFactory, amqp_vhost: AmqpVhost
) -> None:
    """The core's user without configure permission: the warning names the service's own
    queues and permissions, not the poller's USM_POLLER_DECLARE; the password never shows."""
    user, secret = f"core-ro-{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex
    rabbitmqctl("add_user", user, secret)
    try:
        rabbitmqctl("set_permissions", "-p", amqp_vhost.name, user, "^$", ".*", ".*")
        serve = start_serve(US_AMQP_DSN=amqp_vhost.dsn_for(user, secret))

        def lines_of(event: str) -> list[dict[str, Any]]:
            """The service's `event` lines, waiting up to 20 s for the first."""
            found: list[dict[str, Any]] = []
            for _ in range(200):
                found = [e for e in serve.log_lines() if e.get("event") == event]
                if found:
                    break
                time.sleep(0.1)
            assert found, serve.log_text()
            return found

        refused = lines_of("declare_refused")
        assert "ACCESS_REFUSED" in refused[0]["broker_says"]
        reason = refused[0]["reason"]
        assert "satellite serve" in reason
        assert "usm_poller.core-reply" in reason
        assert "USM_POLLER_DECLARE" not in reason
        # The fleet's heartbeat listener (an exclusive queue of its own) says what was refused.
        lost = lines_of("heartbeats_lost")
        assert "ACCESS_REFUSED" in lost[0]["error"]
        assert serve.terminate() == 0
        assert secret not in serve.log_text()
    finally:
        rabbitmqctl("delete_user", user)
