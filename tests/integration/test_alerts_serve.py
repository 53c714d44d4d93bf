"""Alerts end to end: two real `satellite serve` replicas on PostgreSQL, a real poller, a local
webhook receiver. A SIGKILLed poller is `satellite_down` (firing) and, once a poller is back,
`resolved`: each delivered exactly once across the replicas (no flap: a stale look at the
lagging consumer count or at heartbeats does not fire it again), and listed by the API and the
CLI."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from poller import wire
from satellite.cli import main as satellite_cli
from satellite.management import ManagementApi
from satellite.service.tokens import TokensFile
from tests.integration.test_satellite_serve import reset_schema, start_serve
from tests.support.management import management_api
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.receiver import Received, ThreadedReceiver
from tests.support.serve_proc import ServeFactory

pytestmark = pytest.mark.integration
__all__ = ["management_api", "start_serve"]  # the fixtures, imported for pytest


def wait_for(
    hook: ThreadedReceiver, sid: str, states: list[str], timeout: float = 90.0
) -> list[Received]:
    deadline = time.monotonic() + timeout
    found: list[Received] = []
    while time.monotonic() < deadline:
        found = [r for r in hook.requests if r.json()["satellite"] == sid]
        if [r.json()["state"] for r in found] == states:
            return found
        time.sleep(0.25)
    raise AssertionError(f"wanted {states} for {sid}; got {[r.json() for r in found]}")


#: satellite_down's `after` and the evaluation interval of the killed-poller test: short (the
#: test pollers send a heartbeat a second), so that firing and resolving take a few seconds.
DOWN_AFTER = 4
INTERVAL = 1


@pytest.mark.timeout(300)  # two serve replicas and two pollers start: slow on a loaded machine
def test_a_killed_poller_fires_and_resolves_once_across_two_replicas(
    *,
    start_serve: ServeFactory,
    start_poller: PollerFactory,
    pg_database: str,
    amqp_vhost: AmqpVhost,
    sid: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    management_api: ManagementApi,
) -> None:
    asyncio.run(reset_schema(pg_database))
    assert satellite_cli(["declare", sid, "--dsn", amqp_vhost.dsn]) == 0
    poller = start_poller(sid)
    # The management API counts consumers with a lag (its statistics interval): the replicas
    # start once it shows the poller's, as an operator's would after the poller had run a while.
    for _ in range(120):
        if (management_api.queue(wire.jobs_queue(sid)) or {}).get("consumers") == 1:
            break
        time.sleep(0.25)
    tokens = TokensFile(tmp_path / "state" / "tokens.yaml")
    admin = tokens.create("alerts-admin", ["admin"])
    with ThreadedReceiver() as hook:
        alerts = tmp_path / "alerts.yaml"
        alerts.write_text(
            json.dumps(
                {
                    "channels": [{"name": "hook", "type": "webhook", "url": hook.url + "/a"}],
                    "rules": {"satellite_down": {"after": DOWN_AFTER}},
                }
            )
        )
        env = {
            "USM_CORE_DB": pg_database,
            "USM_CORE_ALERTS_FILE": str(alerts),
            "USM_CORE_ALERT_INTERVAL": str(INTERVAL),
            "USM_CORE_ALERT_RETRY_BASE": "0.5",
        }
        replicas = [start_serve(env=env), start_serve(env=env)]
        time.sleep(DOWN_AFTER + 3)  # past the start-up grace, with the poller up: nothing fires
        assert [r for r in hook.requests if r.json()["satellite"] == sid] == []
        poller.kill()  # SIGKILL
        fired = wait_for(hook, sid, ["firing"])[0].json()
        assert fired["alert"] == "satellite_down"
        assert sid in fired["summary"]
        with replicas[1].tcp(admin) as api:
            listed = api.get("/v1/alerts").json()
        mine = next(s for s in listed["satellites"] if s["satellite_id"] == sid)
        assert mine["firing"] == 1
        assert mine["alerts"][0]["rule"] == "satellite_down"
        api_address = f"http://127.0.0.1:{replicas[0].tcp_port}"
        token_file = tmp_path / "admin.token"
        token_file.write_text(admin)
        capsys.readouterr()
        cli = ["--api", api_address, "--token-file", str(token_file)]
        assert satellite_cli(["alerts", "list", *cli]) == 1  # something fires
        assert "satellite_down" in capsys.readouterr().out
        start_poller(sid)
        wait_for(hook, sid, ["firing", "resolved"])
        time.sleep(4 * INTERVAL)  # four more evaluations: nothing more is sent
        got = [r.json() for r in hook.requests if r.json()["satellite"] == sid]
        assert [(g["alert"], g["state"]) for g in got] == [
            ("satellite_down", "firing"),
            ("satellite_down", "resolved"),
        ]
        assert satellite_cli(["alerts", "history", "--json", *cli]) == 0
        history = json.loads(capsys.readouterr().out)
        sent = [n for n in history["notifications"] if n["satellite_id"] == sid]
        assert sorted(n["state"] for n in sent) == ["firing", "resolved"]
        assert all(n["status"] == "sent" and n["http_status"] == 200 for n in sent)
        assert (
            satellite_cli(
                ["alerts", "silence", sid, "--for", "2h", "--reason", "maintenance", *cli]
            )
            == 0
        )
        with replicas[0].tcp(admin) as api:
            silences = api.get("/v1/alerts").json()["silences"]
        assert [(s["satellite_id"], s["reason"], s["created_by"]) for s in silences] == [
            (sid, "maintenance", "alerts-admin")
        ]
        for replica in replicas:
            assert replica.terminate() == 0


def test_a_wrong_alerts_file_stops_serve_with_exit_2_and_one_line_per_mistake(
    start_serve: ServeFactory, tmp_path: Path
) -> None:
    bad = tmp_path / "alerts.yaml"
    bad.write_text("channels:\n  - {name: x, type: telegram}\nrules:\n  backlog: {age: soon}\n")
    serve = start_serve(wait=False, USM_CORE_ALERTS_FILE=str(bad))
    assert serve.proc.wait(timeout=60) == 2
    lines = [line for line in serve.log_text().splitlines() if "USM_CORE_ALERTS_FILE" in line]
    assert [line.removeprefix("satellite: ").split("): ", 1)[1] for line in lines] == [
        "channels[0].bot_token_file: a telegram channel needs one",
        "channels[0].chat_id: a telegram channel needs one",
        "rules.backlog.age: must be a number >= 0",
    ]
