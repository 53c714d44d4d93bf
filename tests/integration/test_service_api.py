"""HTTP API v1 in process (httpx over ASGI) on a started `Core`: real broker, real store (both
databases), and a real `poller run` against snmpd where a job must be answered."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from structlog.testing import capture_logs

from poller import wire
from satellite.cli import main as satellite_cli
from satellite.management import ManagementApi
from satellite.service import app as app_module
from satellite.service.api import jobs as jobs_api
from satellite.service.app import Core, create_app
from satellite.service.settings import DatabaseUrl, load_settings
from satellite.service.store.queries import NOT_PUBLISHED
from satellite.service.tokens import TokensFile
from tests.support.database import pg_admin
from tests.support.poller_proc import JobClient, PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost
from tests.support.responder import bare_result
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

SECRET = f"community-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def core(amqp_vhost: AmqpVhost, db_url: DatabaseUrl) -> AsyncIterator[Core]:
    settings = load_settings(
        {
            "US_AMQP_DSN": amqp_vhost.dsn,
            "USM_CORE_DB": db_url.url.render_as_string(hide_password=False),
        }
    )
    started = await Core.start(settings)
    assert await started.replies.broker.wait_ready(30)
    assert await started.ingest.broker.wait_ready(30)
    yield started
    await started.stop()


@dataclass
class Tokens:
    file: TokensFile
    admin: str
    reader: str


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    file = TokensFile(tmp_path / "tokens.yaml")
    return Tokens(file, file.create("tester", ["admin"]), file.create("reader", ["read"]))


@pytest.fixture
async def api(core: Core, tokens: Tokens) -> AsyncIterator[httpx.AsyncClient]:
    """A client over TCP (as ASGI tells it) with an admin token."""
    transport = httpx.ASGITransport(app=create_app(core, tokens=tokens.file))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://core:8480",  # a port: ASGI scope server [host, port] is TCP
        timeout=90,
        headers={"Authorization": f"Bearer {tokens.admin}"},
    ) as client:
        yield client


def job(host: str = "127.0.0.1", port: int = 161, **kw: Any) -> dict[str, Any]:
    body = snmp_job(host, port, community=SECRET, **kw)
    del body["v"]
    if "job_id" not in kw:
        del body["id"]
    return body


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["title"]
    assert SECRET not in response.text
    return body


async def test_health_readiness_and_openapi(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"store": True, "broker": True}
    spec = (await api.get("/v1/openapi.json")).json()
    assert {"/v1/satellites/{satellite_id}/jobs", "/v1/jobs/{job_id}", "/v1/jobs"} <= set(
        spec["paths"]
    )


async def test_tcp_needs_a_token_with_the_scope(
    api: httpx.AsyncClient, tokens: Tokens, sid: str
) -> None:
    url = f"/v1/satellites/{sid}/jobs"
    anonymous = {"Authorization": ""}
    problem = assert_problem(await api.get("/v1/jobs", headers=anonymous), 401, "unauthorized")
    assert problem["detail"]
    bad = {"Authorization": "Bearer usm_" + "x" * 43}
    assert_problem(await api.get("/v1/jobs", headers=bad), 401, "unauthorized")
    reader = {"Authorization": f"Bearer {tokens.reader}"}
    assert (await api.get("/v1/jobs", headers=reader)).status_code == 200
    refused = await api.post(url, json=job(), headers=reader)
    assert_problem(refused, 403, "forbidden")
    assert "insufficient_scope" in refused.headers["www-authenticate"]
    # Health and the API description need no token (load balancers, client generators).
    for path in ("/healthz", "/readyz", "/v1/openapi.json"):
        assert (await api.get(path, headers=anonymous)).status_code == 200
    assert_problem(await api.get("/metrics", headers=anonymous), 401, "unauthorized")


async def test_readiness_fails_when_the_broker_is_gone(core: Core, api: httpx.AsyncClient) -> None:
    await core.replies.broker.close()
    body = assert_problem(await api.get("/readyz"), 503, "not_ready")
    assert body["checks"]["broker"] is False


async def test_a_job_without_prefer_is_queued_202_with_location(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    await declare_satellite(core, sid)
    response = await api.post(f"/v1/satellites/{sid}/jobs", json=job())
    assert response.status_code == 202, response.text
    record = response.json()
    assert response.headers["location"] == f"/v1/jobs/{record['id']}"
    assert (record["status"], record["source"], record["satellite_id"]) == ("queued", "api", sid)
    assert record["lane"] == "bulk"
    assert (record["host"], record["port"], record["kind"]) == ("127.0.0.1", 161, "snmp.get")
    assert record["result"] is None
    uuid.UUID(record["id"])  # the service filled the id in
    again = await api.get(response.headers["location"])
    assert again.json()["status"] == "queued"
    found = await api.get("/v1/jobs", params={"satellite": sid})
    assert [r["id"] for r in found.json()["items"]] == [record["id"]]
    # The same id twice is a conflict.
    conflict = await api.post(f"/v1/satellites/{sid}/jobs", json=job() | {"id": record["id"]})
    assert_problem(conflict, 409, "job_exists")


async def declare_satellite(core: Core, sid: str) -> None:
    """The satellite's queues, made by the real `satellite declare`."""
    dsn = core.settings.amqp_dsn.get_secret_value()
    code = await asyncio.to_thread(satellite_cli, ["declare", sid, "--dsn", dsn])
    assert code == 0


async def test_a_satellite_without_a_queue_is_404_and_the_job_is_not_left_queued(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    response = await api.post(f"/v1/satellites/{sid}/jobs", json=job(job_id="nowhere-" + sid))
    detail = assert_problem(response, 404, "unknown_satellite")["detail"]
    # A bulk job: the detail names the job queue, not the interactive lane it did not use.
    assert f"(usm_poller-sat-{sid})" in detail
    assert "interactive" not in detail
    record = await core.store.get_job("nowhere-" + sid)
    assert record is not None
    assert (record.status, record.error_code) == ("error", NOT_PUBLISHED)


async def test_a_broker_that_is_down_is_503_with_retry_after_and_nothing_queued(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    await core.replies.broker.close()
    response = await api.post(f"/v1/satellites/{sid}/jobs", json=job() | {"id": f"down-{sid}"})
    assert_problem(response, 503, "broker_unavailable")
    assert response.headers["retry-after"] == "5"
    record = await core.store.get_job(f"down-{sid}")
    assert record is not None
    assert record.status == "error"


@pytest.mark.parametrize(
    ("body", "code", "path"),
    [
        (
            {"kind": "snmp.get", "target": {"host": "h"}, "params": {"oids": ["1.3.6"]}},
            "invalid_job",
            "auth",
        ),
        ({"kind": "snmp.gte", "target": {"host": "h"}}, "unknown_kind", None),
        ({"v": 2, "kind": "snmp.get", "target": {"host": "h"}}, "unsupported_version", None),
        (
            {
                "kind": "snmp.get",
                "target": {"host": "h"},
                "auth": {"version": "2c", "community": SECRET},
                "params": {"oids": [SECRET]},
            },
            "invalid_job",
            "params.oids",
        ),
    ],
)
async def test_an_invalid_job_is_422_with_the_wire_code_and_paths_never_values(
    api: httpx.AsyncClient, sid: str, body: dict[str, Any], code: str, path: str | None
) -> None:
    problem = assert_problem(await api.post(f"/v1/satellites/{sid}/jobs", json=body), 422, code)
    if path is not None:
        assert path in problem["detail"]


async def test_a_body_that_is_not_json_or_too_large_is_refused(
    api: httpx.AsyncClient, sid: str
) -> None:
    url = f"/v1/satellites/{sid}/jobs"
    assert_problem(await api.post(url, content=b"{not json"), 422, "invalid_job")
    assert_problem(await api.post(url, content=b"[1, 2]"), 422, "invalid_job")
    assert_problem(await api.post(url, content=b" " * 300_000), 413, "too_large")


async def test_unknown_jobs_and_bad_queries_are_problems(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v1/jobs/no-such-job"), 404, "job_not_found")
    assert_problem(await api.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request")
    assert_problem(await api.get("/v1/jobs", params={"cursor": "xyz"}), 422, "invalid_cursor")
    # A source that no job can have (a typo) is refused, not answered with nothing.
    assert_problem(
        await api.get("/v1/jobs", params={"source": "shedule:x"}), 422, "invalid_request"
    )
    for source in ("api", "cli", "amqp", "schedule:if-table.5m"):
        assert (await api.get("/v1/jobs", params={"source": source})).status_code == 200
    assert_problem(await api.get("/v1/nothing-here"), 404, "not_found")


async def test_prefer_wait_returns_the_answer_from_a_real_poller(
    core: Core,
    api: httpx.AsyncClient,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    sid: str,
) -> None:
    await asyncio.to_thread(start_poller, sid)
    body = job(snmpd.host, snmpd.port)
    body["auth"]["community"] = snmpd.community
    response = await api.post(
        f"/v1/satellites/{sid}/jobs", json=body, headers={"Prefer": "wait=30"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=30"
    record = response.json()
    assert record["status"] == "ok"
    assert record["answers"] >= 1
    assert record["lane"] == "interactive"  # someone waits: ahead of the bulk backlog
    assert record["result"]["data"]["varbinds"][0]["value"] == snmpd.sys_name
    # The history's copy arrives through usm_poller.history (reply.#) as well.
    for _ in range(100):
        stored = await core.store.get_job(record["id"])
        if stored is not None and stored.answers:
            break
        await asyncio.sleep(0.1)
    assert stored is not None
    assert (stored.status, stored.source, stored.answers) == ("ok", "api", 1)
    found = await api.get("/v1/jobs", params={"satellite": sid, "status": "ok"})
    assert [r["id"] for r in found.json()["items"]] == [record["id"]]
    metrics = await api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert f'satellite_core_jobs_submitted_total{{kind="snmp.get",satellite="{sid}"}} 1.0' in text
    ingested = f'satellite_core_results_ingested_total{{kind="snmp.get",satellite="{sid}",'
    assert f'{ingested}status="ok"}} 1.0' in text
    assert "satellite_core_ingest_commits_total" in text
    assert "satellite_core_jobs_overdue 0.0" in text


async def test_prefer_wait_that_runs_out_is_202_and_a_long_poll_gets_the_answer(
    core: Core,
    api: httpx.AsyncClient,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    sid: str,
) -> None:
    await declare_satellite(core, sid)
    body = job(snmpd.host, snmpd.port)
    body["auth"]["community"] = snmpd.community
    response = await api.post(
        f"/v1/satellites/{sid}/jobs", json=body, headers={"Prefer": "respond-async, wait=1"}
    )
    assert response.status_code == 202, response.text
    assert len(core.waiters) == 0  # the wait that ran out left nothing behind
    location = response.headers["location"]
    lane = wire.interactive_queue(sid)
    assert await asyncio.to_thread(queue_depth, core, sid, 1, queue=lane) == 1
    assert await asyncio.to_thread(queue_depth, core, sid, 0) == 0
    still = await api.get(location, params={"wait": 0.5})
    assert still.json()["status"] == "queued"
    poll = asyncio.create_task(api.get(location, params={"wait": 45}))
    await asyncio.to_thread(start_poller, sid)
    answered = await poll
    assert answered.status_code == 200
    assert answered.json()["status"] == "ok"


async def test_a_batch_is_validated_whole_recorded_and_published(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    await declare_satellite(core, sid)
    url = f"/v1/satellites/{sid}/jobs:batch"
    jobs = [job(job_id=f"{sid}-b{n}") for n in range(5)] + [job() for _ in range(5)]
    response = await api.post(url, json=jobs)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["satellite_id"] == sid
    assert accepted["not_published"] == []
    assert len(accepted["ids"]) == 10
    assert accepted["ids"][:5] == [f"{sid}-b{n}" for n in range(5)]
    found = (await api.get("/v1/jobs", params={"satellite": sid, "limit": 100})).json()
    assert {r["id"] for r in found["items"]} == set(accepted["ids"])
    assert {r["status"] for r in found["items"]} == {"queued"}
    depth = await asyncio.to_thread(queue_depth, core, sid)
    assert depth == 10
    # NDJSON works too; an id already used is a conflict and nothing of that batch is recorded.
    lines = b"\n".join(json.dumps(j).encode() for j in [job(job_id=f"{sid}-n1"), job()])
    ndjson = {"Content-Type": "application/x-ndjson"}
    response = await api.post(url, content=lines, headers=ndjson)
    assert response.status_code == 202, response.text
    assert len(response.json()["ids"]) == 2
    again = [job(job_id=f"{sid}-fresh"), job(job_id=f"{sid}-b0")]
    assert_problem(await api.post(url, json=again), 409, "job_exists")
    assert await core.store.get_job(f"{sid}-fresh") is None


async def test_a_bad_batch_is_refused_whole_with_each_problem_indexed(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    url = f"/v1/satellites/{sid}/jobs:batch"
    bad = [job(job_id=f"{sid}-ok"), {"kind": "snmp.gte", "target": {"host": "h"}}, 7]
    problem = assert_problem(await api.post(url, json=bad), 422, "invalid_job")
    assert "[1] unknown job kind" in problem["detail"]
    assert "[2] must be a JSON object" in problem["detail"]
    assert await core.store.get_job(f"{sid}-ok") is None
    twice = [job(job_id="same"), job(job_id="same")]
    assert (
        "appears twice"
        in assert_problem(await api.post(url, json=twice), 422, "invalid_job")["detail"]
    )
    assert_problem(await api.post(url, json=[]), 422, "invalid_job")
    assert_problem(await api.post(url, json={"not": "a list"}), 422, "invalid_job")
    problem = assert_problem(await api.post(url, json=[job()] * 1001), 422, "batch_too_large")
    assert "limit is 1000" in problem["detail"]


async def test_a_waited_job_for_a_satellite_without_a_queue_names_its_interactive_lane(
    api: httpx.AsyncClient, sid: str
) -> None:
    response = await api.post(
        f"/v1/satellites/{sid}/jobs", json=job(), headers={"Prefer": "wait=2"}
    )
    detail = assert_problem(response, 404, "unknown_satellite")["detail"]
    assert f"usm_poller-sat-{sid}.interactive" in detail


async def test_a_batch_for_a_satellite_without_a_queue_is_404_and_not_left_queued(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    response = await api.post(
        f"/v1/satellites/{sid}/jobs:batch", json=[job(job_id=f"{sid}-x{n}") for n in range(3)]
    )
    detail = assert_problem(response, 404, "unknown_satellite")["detail"]
    assert "interactive" not in detail
    for n in range(3):
        record = await core.store.get_job(f"{sid}-x{n}")
        assert record is not None
        assert (record.status, record.error_code) == ("error", NOT_PUBLISHED)


def queue_depth(core: Core, sid: str, expected: int = 10, *, queue: str | None = None) -> int:
    """The satellite's (bulk) queue depth once it reaches `expected` (or after 5 s)."""
    client = JobClient(core.settings.amqp_dsn.get_secret_value(), sid)
    try:
        for _ in range(50):
            depth = client.queue_depth(queue or wire.jobs_queue(sid))
            if depth >= expected:
                return depth
            time.sleep(0.1)
        return depth
    finally:
        client.close()


async def test_a_store_that_is_down_is_503_and_nothing_is_published(
    core: Core, api: httpx.AsyncClient, db_url: DatabaseUrl, sid: str
) -> None:
    if db_url.dialect != "postgresql":
        pytest.skip("PostgreSQL: its connections can be refused from outside")
    await declare_satellite(core, sid)
    name = db_url.url.database
    await core.store.engine.dispose()
    await pg_admin(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )
    try:
        response = await api.post(f"/v1/satellites/{sid}/jobs", json=job())
        assert_problem(response, 503, "store_unavailable")
        assert response.headers["retry-after"] == "5"
        ready = assert_problem(await api.get("/readyz"), 503, "not_ready")
        assert ready["checks"]["store"] is False
    finally:
        await pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert await asyncio.to_thread(queue_depth, core, sid, 0) == 0


async def test_the_dlq_is_listed_replayed_and_purged(
    core: Core, api: httpx.AsyncClient, tokens: Tokens, sid: str
) -> None:
    await declare_satellite(core, sid)
    letters = [job(job_id=f"{sid}-dead{n}") for n in range(3)]
    await asyncio.to_thread(dead_letter, core, sid, letters)
    url = f"/v1/satellites/{sid}/dlq"
    listed = (await api.get(url)).json()
    assert listed["satellite_id"] == sid
    assert sorted(d["job_id"] for d in listed["dead_letters"]) == [
        f"{sid}-dead{n}" for n in range(3)
    ]
    assert SECRET not in json.dumps(listed)
    reader = {"Authorization": f"Bearer {tokens.reader}"}
    assert_problem(
        await api.post(f"{url}/replay", json={"all": True}, headers=reader), 403, "forbidden"
    )
    assert_problem(await api.post(f"{url}/replay", json={}), 422, "invalid_request")
    replayed = (await api.post(f"{url}/replay", json={"ids": [f"{sid}-dead0", "nope"]})).json()
    assert replayed["replayed"] == [f"{sid}-dead0"]
    assert replayed["not_found"] == ["nope"]
    assert await asyncio.to_thread(queue_depth, core, sid, 1) == 1
    purged = (await api.delete(url)).json()
    assert purged == {"satellite_id": sid, "purged": 2}
    assert (await api.get(url)).json()["dead_letters"] == []
    assert_problem(await api.get("/v1/satellites/nosuch-sat/dlq"), 404, "unknown_satellite")
    assert_problem(await api.get("/v1/satellites/bad%20id/dlq"), 422, "invalid_request")


def dead_letter(core: Core, sid: str, letters: list[dict[str, Any]]) -> None:
    """Put jobs in the satellite's DLQ as the broker does: through usm_poller.dlx."""
    conn = pika.BlockingConnection(pika.URLParameters(core.settings.amqp_dsn.get_secret_value()))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for letter in letters:
            props = pika.BasicProperties(
                content_type="application/json", delivery_mode=2, message_id=letter["id"]
            )
            body = json.dumps({"v": 1, **letter}).encode()
            channel.basic_publish(wire.dead_letter_exchange(), sid, body, props)
    finally:
        conn.close()


async def test_fleet_status_shows_a_running_poller(
    core: Core,
    api: httpx.AsyncClient,
    start_poller: PollerFactory,
    management_api: ManagementApi,
    sid: str,
) -> None:
    await asyncio.to_thread(start_poller, sid)
    record: dict[str, Any] = {}
    for _ in range(150):
        response = await api.get(f"/v1/satellites/{sid}")
        if response.status_code == 200:
            record = response.json()
            if record["replicas"] and record["queue"] and record["queue"]["consumers"]:
                break
        await asyncio.sleep(0.2)
    assert record["satellite_id"] == sid
    assert [r["worker"] for r in record["replicas"]] == [f"poller-{sid}-0"]
    assert record["queue"]["consumers"] >= 1
    # The interactive lane `satellite declare` made is seen (no "no interactive lane" warning).
    assert record["lane"]["name"] == f"usm_poller-sat-{sid}.interactive"
    assert not [w for w in record["warnings"] if "interactive lane" in w], record["warnings"]
    everything = (await api.get("/v1/satellites")).json()
    assert sid in {s["satellite_id"] for s in everything["satellites"]}
    assert_problem(await api.get("/v1/satellites/nosuch-sat"), 404, "unknown_satellite")


async def test_a_retry_publishes_the_job_again_under_a_new_id(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    await declare_satellite(core, sid)
    by_ref = job()
    del by_ref["auth"]
    by_ref["credential_ref"] = "public-v2c"
    first = (await api.post(f"/v1/satellites/{sid}/jobs", json=by_ref)).json()
    response = await api.post(f"/v1/jobs/{first['id']}/retry")
    assert response.status_code == 202, response.text
    second = response.json()
    assert second["id"] != first["id"]
    assert second["retry_of"] == first["id"]
    assert (second["kind"], second["host"], second["satellite_id"]) == (
        "snmp.get",
        "127.0.0.1",
        sid,
    )
    assert response.headers["location"] == f"/v1/jobs/{second['id']}"
    assert await asyncio.to_thread(queue_depth, core, sid, 2) == 2

    inline = (await api.post(f"/v1/satellites/{sid}/jobs", json=job())).json()
    kept = await core.store.get_request(inline["id"])
    assert kept is not None
    assert "auth" not in kept[1]
    assert SECRET not in json.dumps(kept[1])
    assert_problem(await api.post(f"/v1/jobs/{inline['id']}/retry"), 409, "not_retryable")
    assert_problem(await api.post("/v1/jobs/no-such-job/retry"), 404, "job_not_found")
    await core.store.apply_results([bare_result("from-amqp-" + sid, sid)])
    assert_problem(await api.post(f"/v1/jobs/from-amqp-{sid}/retry"), 409, "not_retryable")


async def test_a_job_nobody_answers_becomes_overdue_in_a_running_service(
    amqp_vhost: AmqpVhost, db_url: DatabaseUrl, monkeypatch: pytest.MonkeyPatch, sid: str
) -> None:
    monkeypatch.setattr(app_module, "OVERDUE_EVERY", 0.2)
    settings = load_settings(
        {
            "US_AMQP_DSN": amqp_vhost.dsn,
            "USM_CORE_DB": db_url.url.render_as_string(hide_password=False),
            "USM_CORE_OVERDUE_GRACE": "0",
        }
    )
    started = await Core.start(settings)
    try:
        assert await started.replies.broker.wait_ready(30)
        await declare_satellite(started, sid)
        submitted = await started.jobs.submit(sid, job(timeout=0.5))
        assert submitted.record.status == "queued"
        for _ in range(100):
            record = await started.store.get_job(submitted.record.id)
            if record is not None and record.status == "overdue":
                break
            await asyncio.sleep(0.1)
        assert record is not None
        assert record.status == "overdue"
        for _ in range(50):
            if started.metrics.overdue >= 1:
                break
            await asyncio.sleep(0.1)
        assert started.metrics.overdue >= 1
    finally:
        await started.stop()


async def test_every_request_is_one_log_line_without_its_token(
    api: httpx.AsyncClient, tokens: Tokens
) -> None:
    with capture_logs() as logs:
        await api.get("/v1/jobs", params={"host": "10.0.0.9"})
        await api.get("/v1/jobs", headers={"Authorization": ""})
    lines = [line for line in logs if line["event"] == "request_finished"]
    assert [(x["method"], x["path"], x["status"], x["caller"]) for x in lines] == [
        ("GET", "/v1/jobs", 200, "tester"),
        ("GET", "/v1/jobs", 401, None),
    ]
    assert tokens.admin not in repr(logs)


# The lane is the broker's business: one database is enough for these.
ONE_DATABASE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@ONE_DATABASE
async def test_a_job_goes_to_the_lane_its_body_names(
    core: Core, api: httpx.AsyncClient, sid: str
) -> None:
    await declare_satellite(core, sid)
    url = f"/v1/satellites/{sid}/jobs"
    asked = await api.post(url, json=job() | {"lane": "interactive"})
    assert asked.status_code == 202, asked.text
    assert asked.json()["lane"] == "interactive"
    # Waited for but sent to the bulk queue as asked (nothing answers: 202 after the wait).
    waited = await api.post(url, json=job() | {"lane": "bulk"}, headers={"Prefer": "wait=0.2"})
    assert waited.status_code == 202, waited.text
    assert waited.json()["lane"] == "bulk"
    batch = [
        job() | {"lane": "interactive"},
        job(),
        job() | {"lane": "bulk"},
        job() | {"lane": None},
    ]
    accepted = await api.post(f"{url}:batch", json=batch)
    assert accepted.status_code == 202, accepted.text
    lanes = [(await api.get(f"/v1/jobs/{i}")).json()["lane"] for i in accepted.json()["ids"]]
    assert lanes == ["interactive", "bulk", "bulk", "bulk"]
    interactive = wire.interactive_queue(sid)
    assert await asyncio.to_thread(queue_depth, core, sid, 2, queue=interactive) == 2
    assert await asyncio.to_thread(queue_depth, core, sid, 4) == 4
    # `lane` is the API's, not the wire's: the job a poller gets is a valid wire job.
    client = JobClient(core.settings.amqp_dsn.get_secret_value(), sid)
    try:
        published = client.get(interactive)
    finally:
        client.close()
    assert published is not None
    assert wire.decode_job(published).id == asked.json()["id"]


@ONE_DATABASE
async def test_an_unknown_lane_is_422_with_its_path_and_the_schema_names_the_lanes(
    api: httpx.AsyncClient, sid: str
) -> None:
    url = f"/v1/satellites/{sid}/jobs"
    problem = assert_problem(
        await api.post(url, json=job() | {"lane": "express"}), 422, "invalid_job"
    )
    assert "lane" in problem["detail"]
    assert "express" not in problem["detail"]
    batch = [job(), job() | {"lane": 3}]
    problem = assert_problem(await api.post(f"{url}:batch", json=batch), 422, "invalid_job")
    assert "[1] lane" in problem["detail"]
    assert (await api.get("/v1/jobs", params={"satellite": sid})).json()["items"] == []
    spec = (await api.get("/v1/openapi.json")).json()
    post = spec["paths"]["/v1/satellites/{satellite_id}/jobs"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["lane"]["enum"] == ["interactive", "bulk"]
    post = spec["paths"]["/v1/satellites/{satellite_id}/jobs:batch"]["post"]
    items = post["requestBody"]["content"]["application/json"]["schema"]["items"]
    assert items["properties"]["lane"]["enum"] == ["interactive", "bulk"]


@ONE_DATABASE
async def test_a_real_poller_takes_each_job_from_the_lane_asked_and_toolkit_jobs_are_cli(
    core: Core,
    api: httpx.AsyncClient,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    sid: str,
) -> None:
    await asyncio.to_thread(start_poller, sid)
    dsn = core.settings.amqp_dsn.get_secret_value()
    watch = JobClient(dsn, sid)  # every result and reply of the satellite, with its headers
    try:
        body = job(snmpd.host, snmpd.port)
        body["auth"]["community"] = snmpd.community
        url = f"/v1/satellites/{sid}/jobs"
        wait = {"Prefer": "wait=30"}
        expected = {}
        for extra, headers, lane in (
            ({"lane": "bulk"}, wait, "bulk"),
            ({}, wait, "interactive"),
            ({"lane": "interactive"}, {}, "interactive"),
            ({}, {}, "bulk"),
        ):
            response = await api.post(url, json=body | extra, headers=headers)
            assert response.status_code == (200 if headers else 202), response.text
            assert response.json()["lane"] == lane
            expected[response.json()["id"]] = lane
        # A job the toolkit publishes straight to the broker (`satellite call`): source `cli`.
        called = await asyncio.to_thread(
            satellite_cli,
            [
                "call",
                sid,
                "snmp.get",
                "--host",
                snmpd.host,
                "--port",
                str(snmpd.port),
                "--community",
                snmpd.community,
                "--dsn",
                dsn,
                "1.3.6.1.2.1.1.5.0",
            ],
        )
        assert called == 0
        received = await asyncio.to_thread(watch.collect, len(expected) + 1, 60)
    finally:
        watch.close()
    lanes = {r.result.job_id: (r.props.headers or {}).get(wire.LANE_HEADER) for r in received}
    assert {job_id: lanes.get(job_id) for job_id in expected} == expected
    (call_id,) = set(lanes) - set(expected)
    assert lanes[call_id] == "interactive"  # `satellite call` uses the lane by default
    for _ in range(100):
        record = await core.store.get_job(call_id)
        if record is not None:
            break
        await asyncio.sleep(0.1)
    assert record is not None
    assert (record.source, record.status) == ("cli", "ok")
    for job_id in expected:
        stored = await core.store.get_job(job_id)
        assert stored is not None
        assert stored.source == "api"


@ONE_DATABASE  # the routes are compared: the store behind them is the same for both
async def test_the_lean_submit_route_answers_as_fastapis_route_does(
    core: Core, tokens: Tokens, sid: str
) -> None:
    """`POST /v1/satellites/{id}/jobs` is served by a plain Starlette route ahead of FastAPI's
    (the hot path): the same answers, headers and log line's caller, and the same OpenAPI
    document, as the app without it."""
    lean = create_app(core, tokens=tokens.file)
    assert getattr(lean.router.routes[0], "endpoint", None) is jobs_api._lean_submit
    plain = create_app(core, tokens=tokens.file)
    plain.router.routes[:] = [
        r for r in plain.router.routes if getattr(r, "endpoint", None) is not jobs_api._lean_submit
    ]
    await declare_satellite(core, sid)
    url = f"/v1/satellites/{sid}/jobs"
    admin = {"Authorization": f"Bearer {tokens.admin}"}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", url, {"json": job()}),  # no token
        ("POST", url, {"json": job(), "headers": {"Authorization": f"Bearer {tokens.reader}"}}),
        ("POST", url, {"content": b"{not json", "headers": admin}),
        ("POST", url, {"content": b" " * 300_000, "headers": admin}),
        ("POST", url, {"json": {"kind": "snmp.gte", "target": {"host": "h"}}, "headers": admin}),
        ("POST", "/v1/satellites/no%20such/jobs", {"json": job(), "headers": admin}),
        ("POST", f"/v1/satellites/x{sid}/jobs", {"json": job(), "headers": admin}),  # no queue
        ("GET", url, {"headers": admin}),
        ("POST", url + "/", {"json": job(), "headers": admin}),
    ]
    answers: list[list[object]] = []
    statuses: list[int] = []
    for app in (lean, plain):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://core:8480") as client:
            seen: list[object] = []
            for method, path, kw in cases:
                response = await client.request(method, path, **kw)
                headers = {
                    k: v for k, v in response.headers.items() if k not in ("content-length",)
                }
                seen.append((response.status_code, headers, response.content))
                statuses.append(response.status_code)
            for wait in ("wait=0", None):  # queued: the same record but for its id and times
                response = await client.post(
                    url, json=job(), headers=admin | {"Prefer": wait or ""}
                )
                record = response.json()
                assert response.headers["location"] == f"/v1/jobs/{record['id']}"
                shape = {k: v for k, v in record.items() if not k.endswith(("id", "_at"))}
                seen.append(
                    (
                        response.status_code,
                        {"preference-applied": response.headers.get("preference-applied")},
                        shape,
                    )
                )
            with capture_logs() as logs:
                await client.post(url, json=job(), headers=admin)
            seen.append(
                [(e["status"], e["caller"]) for e in logs if e["event"] == "request_finished"]
            )
            with capture_logs() as logs:  # a valid token without the scope: named, on both
                reader = {"Authorization": f"Bearer {tokens.reader}"}
                assert (await client.post(url, json=job(), headers=reader)).status_code == 403
            finished = [
                (e["status"], e["caller"]) for e in logs if e["event"] == "request_finished"
            ]
            assert finished == [(403, "reader")]
            seen.append((await client.get("/v1/openapi.json")).json())
        answers.append(seen)
    assert answers[0] == answers[1]
    assert statuses[: len(cases)] == [401, 403, 422, 413, 422, 404, 404, 405, 307]


@ONE_DATABASE
async def test_an_unexpected_error_in_the_submit_is_the_same_500_in_front_of_the_stack(
    core: Core, tokens: Tokens, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit served in front of FastAPI's stack (`LeanSubmitApp`) answers an error no
    handler takes as the stack does: a plain 500, the error raised on to the server, and one
    `request_finished` line with status 500 and the caller."""
    lean = create_app(core, tokens=tokens.file)
    plain = create_app(core, tokens=tokens.file)
    plain.router.routes[:] = [
        r for r in plain.router.routes if getattr(r, "endpoint", None) is not jobs_api._lean_submit
    ]

    async def broken(*_args: object, **_kw: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(core.jobs, "submit", broken)
    answers = []
    for app in (lean, plain):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://core:8480") as client:
            with capture_logs() as logs:
                response = await client.post(
                    f"/v1/satellites/{sid}/jobs",
                    json=job(),
                    headers={"Authorization": f"Bearer {tokens.admin}"},
                )
        lines = [(e["status"], e["caller"]) for e in logs if e["event"] == "request_finished"]
        answers.append((response.status_code, response.text, lines))
    assert answers[0] == answers[1] == (500, "Internal Server Error", [(500, "tester")])
