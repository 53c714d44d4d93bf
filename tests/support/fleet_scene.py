"""A fleet for the page's tests: a real `satellite serve` with two satellites, one stopped.

`fleet_scene` starts a poller for `healthy` (answering), starts and stops one for `stopped`
(its queue stays, with no consumer and no heartbeat), puts two dead letters in the stopped
one's DLQ, a job in its queue submitted through the service and one in its interactive lane,
and results in the history (one answered job with its host and duration, and three errors
with codes) for `healthy`. The ids are chosen so that alphabetical order is the reverse of
attention order. The service runs two hourly schedules (`schedules`: one per satellite, the
healthy one's polling the local snmpd) and alerts every 2 s to two webhooks: `ops` answers
200, `pager` always 500 (a failing channel).

```python
def test_x(fleet_scene: FleetScene) -> None:
    with fleet_scene.serve.tcp(fleet_scene.reader) as http: ...
```
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pika
import pytest

from poller import wire
from satellite.cli import main as satellite_cli
from satellite.service.tokens import TokensFile
from tests.support.poller_proc import PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost
from tests.support.receiver import ThreadedReceiver
from tests.support.serve_proc import ServeFactory, ServeProcess
from tests.support.snmpd import Snmpd

__all__ = ["FleetScene", "fleet_scene", "page_rows", "wait_for_rows"]


@dataclass
class FleetScene:
    serve: ServeProcess
    admin: str
    reader: str
    healthy: str
    stopped: str
    letters: list[str]
    answered_job: str
    queued_job: str
    host: str
    schedules: list[str]
    ops: ThreadedReceiver
    pager: ThreadedReceiver


def _dead_letter(dsn: str, sid: str, job_ids: list[str]) -> None:
    """Put jobs in the satellite's DLQ as the broker does: through usm_poller.dlx."""
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for job_id in job_ids:
            body = snmp_job("192.0.2.1", 161, job_id=job_id)
            props = pika.BasicProperties(
                content_type="application/json", delivery_mode=2, message_id=job_id
            )
            channel.basic_publish(
                wire.dead_letter_exchange(), sid, json.dumps(body).encode(), props
            )
    finally:
        conn.close()


def _interactive_job(dsn: str, sid: str) -> None:
    """One job waiting in the satellite's interactive lane (docs/design.md §13), as if the poller
    that consumes it were stopped."""
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        queue = wire.interactive_queue(sid)
        channel.queue_declare(queue, durable=True, arguments=wire.jobs_queue_arguments(sid))
        body = json.dumps(snmp_job("192.0.2.8", 161)).encode()
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def _error_results(dsn: str, sid: str, codes: list[str]) -> None:
    """Results with these error codes, published as a poller does (the history ingests them)."""
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for code in codes:
            now = datetime.now(UTC)
            result = wire.JobResult(
                job_id=f"{sid}-{code}-{uuid.uuid4().hex[:6]}",
                kind="snmp.get",
                satellite_id=sid,
                worker=f"poller-{sid}-0",
                status="error",
                error=wire.ErrorInfo(code=code, message=f"a {code} for the page", retryable=False),
                attempt=1,
                redelivered=False,
                started_at=now,
                finished_at=now,
                duration_ms=5.0,
            )
            key = wire.result_routing_key(sid, "snmp.get")
            channel.basic_publish(wire.results_exchange(), key, wire.encode(result), props)
    finally:
        conn.close()


def page_rows(html: str) -> list[tuple[str, str]]:
    """(satellite id, level) of each fleet row, in page order (from the data attributes)."""
    rows = []
    for chunk in html.split('data-satellite="')[1:]:
        sid, _, rest = chunk.partition('"')
        level = rest.split('data-level="', 1)[1].split('"', 1)[0]
        rows.append((sid, level))
    return rows


def wait_for_rows(
    http: httpx.Client,
    want: dict[str, str],
    timeout: float = 60.0,
    until: Callable[[str], bool] | None = None,
) -> list[tuple[str, str]]:
    """The fleet page's rows once every satellite in `want` shows the wanted level (and the
    page satisfies `until`: the management API's figures lag by up to 5 s)."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        response = http.get("/")
        if response.status_code == 200:
            rows = page_rows(response.text)
            levels = dict(rows)
            if all(levels.get(sid) == level for sid, level in want.items()) and (
                until is None or until(response.text)
            ):
                return rows
        time.sleep(0.5)
    raise AssertionError(f"the fleet page never showed {want}; last rows {rows}")


def _service_files(
    tmp_path: Path, healthy: str, stopped: str, snmpd: Snmpd, *, ops: str, pager: str
) -> tuple[dict[str, str], list[str]]:
    """The schedules and alerts files of the scene's service, as its environment."""
    names = [f"{healthy}-sysname", f"{stopped}-walk"]
    auth = {"version": "2c", "community": snmpd.community}
    common = {"every": 3600, "spread": False, "kind": "snmp.get", "timeout": 5}
    schedules = tmp_path / "schedules.yaml"
    schedules.write_text(
        json.dumps(
            {
                "schedules": [
                    common
                    | {
                        "name": names[0],
                        "satellite": healthy,
                        "params": {"oids": ["1.3.6.1.2.1.1.5.0"]},
                        "auth": auth,
                        "targets": [{"host": snmpd.host, "port": snmpd.port}],
                    },
                    common
                    | {
                        "name": names[1],
                        "satellite": stopped,
                        "params": {"oids": ["1.3.6.1.2.1.1.3.0"]},
                        "auth": auth,
                        "targets": [{"host": "192.0.2.9"}, {"host": "192.0.2.10"}],
                    },
                ]
            }
        )
    )
    alerts = tmp_path / "alerts.yaml"
    alerts.write_text(
        json.dumps(
            {
                "channels": [
                    {"name": "ops", "type": "webhook", "url": ops + "/ops"},
                    {"name": "pager", "type": "webhook", "url": pager + "/pager"},
                ],
                "rules": {"satellite_down": {"after": 4}},
            }
        )
    )
    env = {
        "USM_CORE_SCHEDULES_FILE": str(schedules),
        "USM_CORE_ALERTS_FILE": str(alerts),
        "USM_CORE_ALERT_INTERVAL": "2",
        "USM_CORE_ALERT_RETRY_BASE": "0.5",
    }
    return env, names


@pytest.fixture
def fleet_scene(
    amqp_vhost: AmqpVhost, tmp_path: Path, start_poller: PollerFactory, snmpd: Snmpd
) -> Iterator[FleetScene]:
    prefix = uuid.uuid4().hex[:6]
    healthy, stopped = f"{prefix}-lyon", f"{prefix}-zurich"
    tokens = TokensFile(tmp_path / "state" / "tokens.yaml")
    admin = tokens.create("page-admin", ["admin"])
    reader = tokens.create("page-reader", ["read"])
    for sid in (healthy, stopped):
        assert satellite_cli(["declare", sid, "--dsn", amqp_vhost.dsn]) == 0
    start_poller(healthy)
    start_poller(stopped).terminate()
    letters = [f"{stopped}-dead{n}" for n in range(2)]
    _dead_letter(amqp_vhost.dsn, stopped, letters)
    _interactive_job(amqp_vhost.dsn, stopped)
    with ThreadedReceiver() as ops, ThreadedReceiver([(500, {"error": "down"})]) as pager:
        factory = ServeFactory(amqp_vhost, tmp_path)
        try:
            env, schedules = _service_files(
                tmp_path, healthy, stopped, snmpd, ops=ops.url, pager=pager.url
            )
            serve = factory(env=env)
            serve.wait_ready()
            with serve.tcp(admin) as http:
                answered = http.post(
                    f"/v1/satellites/{healthy}/jobs",
                    json={k: v for k, v in snmp_job(snmpd.host, snmpd.port).items() if k != "v"}
                    | {"auth": {"version": "2c", "community": snmpd.community}},
                    headers={"Prefer": "wait=30"},
                )
                assert answered.status_code == 200, answered.text
                assert answered.json()["status"] == "ok", answered.text
                queued = http.post(
                    f"/v1/satellites/{stopped}/jobs",
                    json={
                        k: v for k, v in snmp_job("192.0.2.7", 161).items() if k not in ("v", "id")
                    },
                )
                assert queued.status_code == 202, queued.text
            _error_results(amqp_vhost.dsn, healthy, ["timeout", "timeout", "auth_failed"])
            yield FleetScene(
                serve,
                admin,
                reader,
                healthy,
                stopped,
                letters,
                answered.json()["id"],
                queued.json()["id"],
                snmpd.host,
                schedules,
                ops,
                pager,
            )
        finally:
            factory.kill_all()
