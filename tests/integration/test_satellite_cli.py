"""`satellite declare|submit|call` end to end against the real broker: output and exit codes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kombu as _kombu
import pytest

from poller.wire import decode_job, jobs_queue
from satellite.cli import EXIT_BROKER, EXIT_ERROR, EXIT_NO_RESULT, EXIT_OK, main
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
from tests.support.responder import Responder, error_result
from tests.support.satellite_cli import Run

kombu: Any = _kombu
pytestmark = pytest.mark.integration

OID = "1.3.6.1.2.1.1.5.0"


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str
    dsn: str


@pytest.fixture(scope="module")
def secret_user(amqp_vhost: AmqpVhost) -> Iterator[BrokerUser]:
    """A broker user with a distinctive password, to prove it is never printed."""
    name = f"core-{uuid.uuid4().hex[:8]}"
    password = f"Pw-{uuid.uuid4().hex}"
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", amqp_vhost.name, name, ".*", ".*", ".*")
        yield BrokerUser(name, password, amqp_vhost.dsn_for(name, password))
    finally:
        rabbitmqctl("delete_user", name)


@pytest.fixture
def sat_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def satellite(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    secret_user: BrokerUser,
    amqp_vhost: AmqpVhost,
) -> Iterator[Any]:
    """Runs `satellite ARGS` in-process with `US_AMQP_DSN` set; asserts no password leaked."""
    monkeypatch.setenv("US_AMQP_DSN", secret_user.dsn)
    # The stand-in poller publishes as the test broker user, not as a provisioned `sat-<id>`.
    monkeypatch.setenv("USM_TRUSTED_USERS", amqp_vhost.username)
    runs: list[Run] = []

    def run(*argv: str) -> Run:
        code = main(["--json" if a == "--json" else a for a in argv])
        out, err = capsys.readouterr()
        runs.append(Run(code, out, err))
        return runs[-1]

    yield run
    for done in runs:
        assert secret_user.password not in done.out + done.err
    assert secret_user.password not in caplog.text


def snmp_args(sat: str, *extra: str) -> list[str]:
    return [sat, "snmp.get", "--host", "127.0.0.1", "--port", "16100", "--community",
            "public", OID, *extra]  # fmt: skip


def test_declare(satellite: Any, sat_id: str) -> None:
    first = satellite("declare", sat_id)
    assert first.code == EXIT_OK
    assert f"created   queue     {jobs_queue(sat_id)}" in first.out
    again = satellite("declare", sat_id, "--json")
    assert again.code == EXIT_OK
    report = json.loads(again.out)
    assert report["ok"] is True
    queue = next(o for o in report["objects"] if o["name"] == jobs_queue(sat_id))
    assert queue["outcome"] == "exists"


def test_declare_with_a_conflict_exits_1(satellite: Any, sat_id: str) -> None:
    assert satellite("declare", sat_id, "--queue-type", "classic").code == EXIT_OK
    run = satellite("declare", sat_id)
    assert run.code == EXIT_ERROR
    assert f"conflict  queue     {jobs_queue(sat_id)}" in run.out
    assert f"conflict  queue     {jobs_queue(sat_id)}.interactive" in run.out
    assert "inequivalent arg" in run.out
    # and the classic dead-letter queue, with how to make it quorum
    assert "classic dead-letter queue (made by an older version)" in run.out
    assert "3 object(s) exist with other arguments" in run.err  # queue, lane, DLQ


def test_submit_prints_the_job_id(satellite: Any, amqp_vhost: AmqpVhost, sat_id: str) -> None:
    satellite("declare", sat_id)
    run = satellite("submit", *snmp_args(sat_id, "--id", "job-42"))
    assert (run.code, run.out) == (EXIT_OK, "job-42\n")
    with kombu.Connection(amqp_vhost.dsn, connect_timeout=5) as conn:
        message = conn.channel().basic_get(queue=jobs_queue(sat_id), no_ack=True)
    assert message is not None
    assert decode_job(message.body).id == "job-42"
    as_json = satellite("submit", *snmp_args(sat_id, "--json"))
    assert json.loads(as_json.out)["ok"] is True
    # --interactive: to the satellite's interactive lane (DESIGN §13)
    lane = satellite("submit", *snmp_args(sat_id, "--id", "job-43", "--interactive"))
    assert (lane.code, lane.out) == (EXIT_OK, "job-43\n")
    with kombu.Connection(amqp_vhost.dsn, connect_timeout=5) as conn:
        message = conn.channel().basic_get(queue=f"{jobs_queue(sat_id)}.interactive", no_ack=True)
    assert message is not None
    assert decode_job(message.body).id == "job-43"


def test_call_ok_exits_0(satellite: Any, amqp_vhost: AmqpVhost, sat_id: str) -> None:
    satellite("declare", sat_id)
    with Responder(amqp_vhost.dsn, sat_id) as responder:
        run = satellite("call", *snmp_args(sat_id, "--timeout", "10"))
        compact = satellite("call", *snmp_args(sat_id, "--timeout", "10", "--json", "--bulk"))
    assert responder.lanes == ["interactive", "bulk"]  # `call` uses the lane unless --bulk
    assert run.code == EXIT_OK
    result = json.loads(run.out)
    assert (result["status"], result["satellite_id"]) == ("ok", sat_id)
    assert result["data"]["varbinds"][0]["value"] == "sw"
    assert compact.code == EXIT_OK
    assert compact.out.count("\n") == 1


def test_call_error_result_exits_1(satellite: Any, amqp_vhost: AmqpVhost, sat_id: str) -> None:
    satellite("declare", sat_id)
    with Responder(amqp_vhost.dsn, sat_id, answer=error_result):
        run = satellite("call", *snmp_args(sat_id, "--timeout", "10"))
    assert run.code == EXIT_ERROR
    assert json.loads(run.out)["error"]["code"] == "device_timeout"


def test_call_without_a_result_exits_3(satellite: Any, sat_id: str) -> None:
    satellite("declare", sat_id)
    started = time.monotonic()
    run = satellite("call", *snmp_args(sat_id, "--timeout", "1", "--json"))
    assert run.code == EXIT_NO_RESULT
    assert time.monotonic() - started < 5
    assert "no result for job" in run.err
    assert json.loads(run.out)["error"]["code"] == "no_result"


def test_call_to_an_undeclared_satellite_exits_4(satellite: Any) -> None:
    run = satellite("call", *snmp_args("nobody", "--timeout", "1"))
    assert run.code == EXIT_BROKER
    assert "satellite declare nobody" in run.err


def test_wrong_password_exits_4_without_printing_either(
    satellite: Any, secret_user: BrokerUser, amqp_vhost: AmqpVhost, sat_id: str
) -> None:
    wrong = amqp_vhost.dsn_for(secret_user.name, f"{secret_user.password}-wrong")
    run = satellite("declare", sat_id, "--dsn", wrong, "--connect-timeout", "2")
    assert run.code == EXIT_BROKER
    assert f"amqp://{secret_user.name}:***@" in run.err
    assert "ACCESS_REFUSED" in run.err
