"""Scenario 12 of issue 17: a matrix of bad job messages through the broker.

Every bad message must become an error result with its documented code (when its id is
readable) and a DLQ entry, or, for a well-formed but expired job, an `expired` result; none may
reach a device (the counting agent and a closed TCP port are the only targets), stop the
poller, or leave a body or a secret in its log.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.checker import Expectation, Observation, Report, assert_invariants, check
from tests.faults.device import CountingAgent, oid_for
from tests.faults.harness import Collector, Publisher, drain_dlq, scale
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost


def _closed_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_input_matrix(  # noqa: PLR0917 - pytest passes fixtures by keyword
    amqp_vhost: AmqpVhost,
    start_poller: PollerFactory,
    agent: CountingAgent,
    sid: str,
    tmp_path: Path,
    fault_report: Callable[[Report], None],
) -> None:
    secret = f"S3CRET{uuid.uuid4().hex[:12]}"
    mark = f"B0DYMARK{uuid.uuid4().hex[:12]}"
    touched = tmp_path / "injected"
    closed = _closed_tcp_port()

    def snmp(job_id: str, **change: Any) -> dict[str, Any]:
        job: dict[str, Any] = {
            "v": 1,
            "id": job_id,
            "kind": "snmp.get",
            "target": {"host": "127.0.0.1", "port": agent.port},
            "auth": {"version": "2c", "community": secret},
            "params": {"oids": [oid_for(1)]},
            "timeout": 5,
            "meta": {"note": mark},
        }
        job.update(change)
        return {k: v for k, v in job.items() if v is not None}

    shell = [f"show version; touch {touched}", f"$(touch {touched})", f"`touch {touched}`"]
    # category → (builds the body of message i, content type, expected code, dead-lettered?)
    cases: dict[str, tuple[Callable[[str], bytes], str, str, bool]] = {
        "broken-json": (
            lambda i: json.dumps(snmp(i)).encode()[:-7],
            "application/json",
            "invalid_job",
            True,
        ),
        "content-type": (
            lambda i: f"v=1&id={i}&community={secret}&note={mark}".encode(),
            "application/x-www-form-urlencoded",
            "invalid_job",
            True,
        ),
        "oversized": (
            lambda i: json.dumps(snmp(i, meta={"pad": mark * (300 * 1024 // len(mark))})).encode(),
            "application/json",
            "invalid_job",
            True,
        ),
        "v99": (
            lambda i: json.dumps(snmp(i, v=99)).encode(),
            "application/json",
            "unsupported_version",
            True,
        ),
        "extra-field": (
            lambda i: json.dumps(snmp(i, surprise=mark)).encode(),
            "application/json",
            "invalid_job",
            True,
        ),
        "missing-field": (
            lambda i: json.dumps(snmp(i, target=None)).encode(),
            "application/json",
            "invalid_job",
            True,
        ),
        "wrong-types": (
            lambda i: json.dumps(snmp(i, timeout="ten", params={"oids": oid_for(1)})).encode(),
            "application/json",
            "invalid_job",
            True,
        ),
        "oid-injection": (
            lambda i: json.dumps(
                snmp(i, params={"oids": [f"1.3.6.1; touch {touched}", "../../etc/passwd"]})
            ).encode(),
            "application/json",
            "invalid_job",
            True,
        ),
        "expired": (
            lambda i: json.dumps(snmp(i, not_after="2020-01-01T00:00:00Z")).encode(),
            "application/json",
            "expired",
            False,
        ),
        # Well-formed: the commands go to the device as text, never to a local shell. Its
        # target is a closed port: `device_unreachable`, and the marker file never appears.
        "command-injection": (
            lambda i: json.dumps(
                {
                    "v": 1,
                    "id": i,
                    "kind": "ssh.exec",
                    "target": {"host": "127.0.0.1", "port": closed},
                    "auth": {"username": "admin", "password": secret},
                    "params": {"commands": shell},
                    "timeout": 5,
                    "meta": {"note": mark},
                }
            ).encode(),
            "application/json",
            "device_unreachable",
            False,
        ),
    }
    poller = start_poller(sid, concurrency=16)
    obs = Observation()
    each = scale(10, 100)
    expected: dict[str, str] = {}
    dead: set[str] = set()
    publisher = Publisher(amqp_vhost.dsn, sid, obs)
    try:
        with Collector(amqp_vhost.dsn, sid, obs) as collector:
            for category, (body, content_type, code, dlq) in cases.items():
                for n in range(each):
                    job_id = f"{sid}-{category}-{n}"
                    publisher.publish(job_id, body(job_id), content_type=content_type)
                    expected[job_id] = code
                    if dlq:
                        dead.add(job_id)
            collector.wait_for(expected, timeout=90, settle=1.0)
            drain_dlq(amqp_vhost.dsn, sid, obs, expect=len(dead), wait=15)
    finally:
        publisher.close()
    report = check("12 bad input", obs, Expectation(dlq=frozenset(dead)))
    fault_report(report)
    assert_invariants(report)
    codes = {a.job_id: a.code for a in obs.answers}
    wrong = {i: (codes.get(i), want) for i, want in expected.items() if codes.get(i) != want}
    assert not wrong, f"{len(wrong)} wrong codes, e.g. {sorted(wrong.items())[:5]}"
    assert report.answered == len(expected) == report.confirmed
    assert agent.requests == 0, "an invalid or expired job reached the device"
    assert not touched.exists(), "an injected command ran on the poller's host"
    assert poller.proc.poll() is None, "the poller exited"
    log = poller.log_text()
    assert secret not in log
    assert mark not in log
    assert poller.terminate(30) == 0
