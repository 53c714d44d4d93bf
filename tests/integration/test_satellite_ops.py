"""`satellite submit --file`, `results`, `dlq` and `status` against the real broker (and poller)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from poller import wire
from satellite.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import build_job
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.responder import error_result, ok_result
from tests.support.satellite_cli import in_process
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

SYS_NAME = "1.3.6.1.2.1.1.5.0"
COMMUNITY = "s3cret-community-7"


@pytest.fixture
def sid() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


@pytest.fixture
def core(amqp_vhost: AmqpVhost, sid: str) -> Iterator[Client]:
    with Client(CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5)) as client:
        assert client.declare([sid]).ok
        yield client


@pytest.fixture
def satellite(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], amqp_vhost: AmqpVhost
) -> Any:
    """Runs `satellite ARGS` in-process with `US_AMQP_DSN` set."""
    return in_process(monkeypatch, capsys, amqp_vhost.dsn)


def snmp_job(job_id: str | None = None) -> dict[str, Any]:
    return {
        "kind": "snmp.get",
        **({"id": job_id} if job_id else {}),
        "target": {"host": "192.0.2.1"},
        "auth": {"version": "2c", "community": COMMUNITY},
        "params": {"oids": [SYS_NAME]},
    }


def publish_results(dsn: str, items: list[tuple[str, str, str, str]]) -> None:
    """(routing satellite, body satellite, job id, status) results, published as `dsn`'s user."""
    with pika.BlockingConnection(pika.URLParameters(dsn)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for key_sid, body_sid, job_id, status in items:
            job = build_job(
                "snmp.get",
                target={"host": "h"},
                credential_ref="c",
                params={"oids": [SYS_NAME]},
                job_id=job_id,
            )
            result = (ok_result if status == "ok" else error_result)(job, body_sid)
            channel.basic_publish(
                wire.results_exchange(),
                wire.result_routing_key(key_sid, "snmp.get"),
                wire.encode(result),
                pika.BasicProperties(delivery_mode=2, user_id="guest"),
            )


# ------------------------------------------------------------------------------ submit --file


def test_submit_file_publishes_every_job(
    satellite: Any, core: Client, sid: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    ids = [f"bulk-{n}" for n in range(3000)]
    lines = ["# a comment", ""] + [json.dumps(snmp_job(job_id)) for job_id in ids]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = satellite("submit", sid, "--file", str(path), "--json", "--window", "500")
    assert run.code == EXIT_OK, run.err
    report = run.json()
    assert report["submitted"] == 3000
    assert report["failed"] == []
    assert report["jobs_per_s"] > 200  # thousands on an idle machine; the CI box is shared
    assert core.queue_counts(wire.jobs_queue(sid)) == (3000, 0)


def test_submit_file_validates_everything_first(
    satellite: Any, core: Client, sid: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    bad = {**snmp_job(), "params": {"oids": ["not-an-oid"]}}
    path.write_text(f"{json.dumps(snmp_job())}\n{json.dumps(bad)}\n", encoding="utf-8")
    run = satellite("submit", sid, "--file", str(path))
    assert run.code == EXIT_USAGE
    assert "line 2: params.oids" in run.err
    assert COMMUNITY not in run.err
    assert core.queue_counts(wire.jobs_queue(sid)) == (0, 0)


def test_submit_file_to_an_undeclared_satellite_reports_each_job(
    satellite: Any, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(snmp_job("lost-1")) + "\n", encoding="utf-8")
    run = satellite("submit", "nobody-here", "--file", str(path), "--json")
    assert run.code == EXIT_ERROR
    assert run.json()["failed"][0]["job_id"] == "lost-1"
    assert "unroutable" in run.json()["failed"][0]["reason"]


# ------------------------------------------------------------------------------ results


def test_results_prints_each_result_once_and_checks_the_sender(
    satellite: Any, core: Client, amqp_vhost: AmqpVhost
) -> None:
    a, b = f"r{uuid.uuid4().hex[:8]}", f"r{uuid.uuid4().hex[:8]}"
    publish_results(
        amqp_vhost.dsn,
        [
            (a, a, "job-1", "ok"),
            (a, a, "job-1", "ok"),  # a redelivered job's second result
            (a, a, "job-2", "error"),
            (a, b, "job-3", "ok"),  # the body names another satellite than the key
            (b, b, "job-4", "ok"),  # another satellite: left in the queue
        ],
    )
    run = satellite("results", "--satellite", a, "--json")
    assert run.code == EXIT_OK, run.err
    lines = run.json_lines()
    assert [(r["job_id"], r["status"]) for r in lines] == [("job-1", "ok"), ("job-2", "error")]
    # the results of b were left in the queue for the next reader
    run = satellite("results", "--satellite", b)
    assert run.code == EXIT_OK
    assert "job-4" in run.out
    assert run.out.splitlines()[0].split()[:3] == ["finished", "satellite", "job"]


def test_results_follow_stops_after_its_time(satellite: Any, core: Client) -> None:
    run = satellite("results", "--follow", "--for", "0.5", "--satellite", "nobody", "--json")
    assert run.code == EXIT_OK
    assert run.out == ""


# ------------------------------------------------------------------------------ dlq


def settled_counts(core: Client, queue: str, expected: tuple[int, int]) -> tuple[int, int]:
    """The queue's (ready, consumers) once they are `expected`, or after 5 s.

    Dead letters read and not replayed go back to the queue when the reading channel closes;
    a quorum dead-letter queue takes them back a moment later (asynchronously).
    """
    deadline = time.monotonic() + 5
    while (counts := core.queue_counts(queue)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts or (-1, -1)


def dead_letter(core: Client, amqp_vhost: AmqpVhost, sid: str, count: int) -> list[str]:
    """Submit `count` jobs and reject them (as a poller does with a bad job): DLQ'd."""
    ids = []
    for _ in range(count):
        job = build_job(
            "snmp.get",
            target={"host": "192.0.2.1"},
            auth={"version": "2c", "community": COMMUNITY},
            params={"oids": [SYS_NAME]},
        )
        core.submit(sid, job)
        ids.append(job.id)
    with pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn)) as conn:
        channel = conn.channel()
        for _ in ids:
            method, _props, _body = channel.basic_get(wire.jobs_queue(sid))
            assert method is not None
            channel.basic_reject(method.delivery_tag, requeue=False)
    deadline = time.monotonic() + 5
    while core.queue_counts(wire.dead_letter_queue(sid)) != (count, 0):
        assert time.monotonic() < deadline, "the rejected jobs did not reach the DLQ"
        time.sleep(0.05)
    return ids


def test_dlq_list_show_replay_purge(
    satellite: Any, core: Client, amqp_vhost: AmqpVhost, sid: str
) -> None:
    ids = dead_letter(core, amqp_vhost, sid, 3)
    listed = satellite("dlq", "list", sid, "--json")
    assert listed.code == EXIT_OK, listed.err
    rows = listed.json()["dead_letters"]
    assert [row["job_id"] for row in rows] == ids
    assert {(row["kind"], row["reason"], row["count"]) for row in rows} == {
        ("snmp.get", "rejected", 1)
    }
    table = satellite("dlq", "list", sid)
    assert ids[0] in table.out
    assert "rejected" in table.out
    # x-delivery-count on the quorum DLQ counts the DLQ's own reads (the list above was one):
    # it says nothing about the job, so the table does not show it.
    assert "deliveries" not in table.out

    shown = satellite("dlq", "show", sid, ids[1])
    assert shown.code == EXIT_OK
    assert COMMUNITY not in shown.out
    details = json.loads(shown.out)
    assert details["body"]["auth"]["community"] == "***"
    assert details["headers"]["x-death"][0]["reason"] == "rejected"
    assert satellite("dlq", "show", sid, "no-such-job").code == EXIT_ERROR

    replayed = satellite("dlq", "replay", sid, ids[1], "--json")
    assert replayed.code == EXIT_OK, replayed.err
    assert replayed.json()["replayed"] == [ids[1]]
    assert settled_counts(core, wire.dead_letter_queue(sid), (2, 0)) == (2, 0)
    with pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn)) as conn:
        method, props, body = conn.channel().basic_get(wire.jobs_queue(sid), auto_ack=True)
    assert method is not None
    assert props.message_id == ids[1]
    assert wire.decode_job(body).id == ids[1]
    headers = props.headers or {}
    assert headers["x-replay-count"] == 1
    assert headers["x-replay-reason"] == "rejected"
    assert "x-death" not in headers
    # the rest are still there (a quorum queue puts ids[0], read past, back behind ids[2])
    assert {letter.job_id for letter in core.dead_letters(sid)} == {ids[0], ids[2]}

    assert satellite("dlq", "replay", sid).code == EXIT_USAGE  # neither ids nor --all
    assert settled_counts(core, wire.dead_letter_queue(sid), (2, 0)) == (2, 0)
    purged = satellite("dlq", "purge", sid, "--yes", "--json")
    assert purged.json()["purged"] == 2
    assert core.queue_counts(wire.dead_letter_queue(sid)) == (0, 0)


def test_dlq_replay_keeps_what_the_broker_did_not_take(
    satellite: Any, core: Client, amqp_vhost: AmqpVhost, sid: str
) -> None:
    ids = dead_letter(core, amqp_vhost, sid, 2)
    with pika.BlockingConnection(pika.URLParameters(amqp_vhost.dsn)) as conn:
        conn.channel().queue_unbind(wire.jobs_queue(sid), wire.jobs_exchange(), sid)
    run = satellite("dlq", "replay", sid, "--all", "--json")
    assert run.code == EXIT_ERROR
    assert [f["job_id"] for f in run.json()["failed"]] == ids
    assert settled_counts(core, wire.dead_letter_queue(sid), (2, 0)) == (2, 0)  # nothing lost
    assert core.declare([sid]).ok  # bound again
    run = satellite("dlq", "replay", sid, "--all", "--json")
    assert run.json()["replayed"] == ids
    assert core.queue_counts(wire.jobs_queue(sid)) == (2, 0)


def test_dlq_purge_without_yes_refuses_when_it_cannot_ask(
    satellite: Any, core: Client, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    run = satellite("dlq", "purge", sid)
    assert run.code == EXIT_USAGE
    assert "--yes" in run.err


# ------------------------------------------------------------------------------ status


def test_status_with_a_running_poller(
    satellite: Any, core: Client, sid: str, start_poller: PollerFactory
) -> None:
    start_poller(sid, heartbeat_interval="0.3", declare="false")
    run = satellite("status", sid, "--listen", "1", "--json")
    assert run.code == EXIT_OK, run.out + run.err
    status = run.json()["satellites"][0]
    assert status["ok"] is True
    assert status["queue"]["consumers"] == 1
    assert status["lane"]["name"] == f"usm_poller-sat-{sid}.interactive"
    assert status["lane"]["consumers"] == 1
    assert not [w for w in status["warnings"] if "interactive" in w]
    [replica] = status["replicas"]
    assert replica["worker"] == f"poller-{sid}-0"
    assert replica["concurrency"] == 64
    assert status["advice"]["replicas"] == 1
    human = satellite("status", sid, "--listen", "0.8")
    assert f"satellite {sid}" in human.out
    assert f"poller-{sid}-0" in human.out
    assert "advice:" in human.out
    assert f"lane  usm_poller-sat-{sid}.interactive: 0 ready" in human.out


def test_status_exits_1_without_consumer_or_heartbeat(
    satellite: Any, core: Client, sid: str
) -> None:
    run = satellite("status", sid, "--listen", "0.3", "--json")
    assert run.code == EXIT_ERROR
    problems = run.json()["satellites"][0]["problems"]
    assert "no consumer on the job queue" in problems
    assert "no heartbeat" in problems


def test_status_advises_starting_a_replica_for_jobs_waiting_only_in_the_lane(
    satellite: Any, core: Client, sid: str
) -> None:
    job = build_job(
        "snmp.get",
        target={"host": "192.0.2.1"},
        credential_ref="c",
        params={"oids": [SYS_NAME]},
    )
    core.submit(sid, job, lane="interactive")
    run = satellite("status", sid, "--listen", "0.3", "--json")
    [status] = run.json()["satellites"]
    assert status["lane"]["ready"] == 1
    assert status["queue"]["ready"] == 0
    assert status["advice"]["verdict"] == "no replica is running: start one"
    assert status["advice"]["needed"] == 1


# ------------------------------------------------------------------------------ end to end


def test_satellite_call_cli_against_a_real_poller_and_snmpd(
    amqp_vhost: AmqpVhost, core: Client, sid: str, start_poller: PollerFactory, snmpd: Snmpd
) -> None:
    start_poller(sid, declare="false")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
    env["US_AMQP_DSN"] = amqp_vhost.dsn
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "satellite.cli",
            "call",
            sid,
            "snmp.get",
            "--host",
            snmpd.host,
            "--port",
            str(snmpd.port),
            "--community",
            snmpd.community,
            "--job-timeout",
            "5",
            "--json",
            SYS_NAME,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "ok"
    assert result["satellite_id"] == sid
    [varbind] = result["data"]["varbinds"]
    assert (varbind["oid"], varbind["value"]) == (SYS_NAME, snmpd.sys_name)
    assert snmpd.community not in done.stderr


def test_provision_and_revoke_commands(satellite: Any, amqp_vhost: AmqpVhost) -> None:
    sid = f"c{uuid.uuid4().hex[:8]}"
    made = satellite("provision", sid, "--tls", "--broker-host", "rabbit.example", "--json")
    assert made.code == EXIT_OK, made.err
    done = made.json()
    assert (done["user"], done["created"]) == (f"sat-{sid}", True)
    assert done["dsn"].startswith(f"amqps://sat-{sid}:")
    assert done["dsn"].endswith(f"@rabbit.example:5671/{amqp_vhost.name}")
    human = satellite("provision", sid)
    assert "password unchanged" in human.out
    assert "US_AMQP_DSN" not in human.out
    rotated = satellite("provision", sid, "--rotate")
    assert f"US_AMQP_DSN=amqp://sat-{sid}:" in rotated.out
    assert "USM_POLLER_DECLARE=false" in rotated.out
    assert satellite("provision", sid, "--disconnect").code == EXIT_USAGE
    gone = satellite("revoke", sid, "--json")
    assert gone.json()["deleted"] is True
    assert satellite("revoke", sid, "--json").json()["deleted"] is False
