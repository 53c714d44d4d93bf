"""Pure parts of provisioning, sender checks, bulk files, dead letters and replica advice."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from poller.errors import ConfigError
from poller.wire import Heartbeat
from satellite import render
from satellite.bulk import read_jobs_file
from satellite.config import CoreSettings
from satellite.dispatch import InvalidJobError, SenderPolicy, satellite_of_key
from satellite.dlq import mask_secrets
from satellite.management import ManagementApi, ManagementError, ManagementSettings
from satellite.provision import (
    satellite_dsn,
    satellite_of_user,
    satellite_permissions,
    satellite_user,
)
from satellite.results import ReceivedResult
from satellite.status import FleetView, QueueView, SatelliteStatus, advise, satellite_status
from tests.support.responder import bare_result

SECRET = "pw-never-shown-93b1"

# ------------------------------------------------------------------------------ provisioning


def test_user_names_and_permissions() -> None:
    assert satellite_user("site_7-a") == "sat-site_7-a"
    assert satellite_of_user("sat-site_7-a") == "site_7-a"
    assert satellite_of_user("guest") is None
    with pytest.raises(ValueError, match="satellite id"):
        satellite_user("a.b")
    perms = satellite_permissions("7")
    assert perms.configure == "^$"
    assert perms.read == r"^(usm_poller-sat-7|usm_poller-sat-7\.interactive)$"
    for name, allowed in (
        ("usm_poller-sat-7", True),
        ("usm_poller-sat-7.interactive", True),
        ("usm_poller-sat-70", False),
        ("usm_poller-sat-70.interactive", False),
        ("usm_poller-sat-7.dlq", False),
        ("usm_poller-sat-7xinteractive", False),
    ):
        assert bool(re.search(perms.read, name)) is allowed, name
    for name, allowed in (
        ("usm_poller.results", True),
        ("usm_poller.events", True),
        ("usm_poller.jobs", False),
        ("usm_poller.dlx", False),
        ("usm_poller-results", False),
        ("", False),
    ):
        assert bool(re.search(perms.write, name)) is allowed, name
    for key, allowed in (
        ("result.7.snmp.get", True),
        ("reply.7.satellite-reply-ab", True),
        ("heartbeat.7", True),
        ("event.7.started", True),
        ("result.70.snmp.get", False),
        ("heartbeat.70", False),
        ("result.8.snmp.get", False),
        ("job.7", False),
        ("xresult.7", False),
    ):
        assert bool(re.search(perms.topic_write, key)) is allowed, key


def test_dsn_for_the_site() -> None:
    assert (
        satellite_dsn("sat-7", "p_w-1", host="rabbit", port=None, vhost="/", tls=False)
        == "amqp://sat-7:p_w-1@rabbit:5672/%2F"
    )
    assert (
        satellite_dsn("sat-7", "pw", host="::1", port=None, vhost="core", tls=True)
        == "amqps://sat-7:pw@[::1]:5671/core"
    )


def test_management_settings_default_to_the_dsn() -> None:
    core = CoreSettings.from_dsn(f"amqp://core:{SECRET}@rabbit.example:5672/prod")
    found = ManagementSettings.resolve(core, environ={})
    assert (found.base_url, found.username, found.vhost) == (
        "http://rabbit.example:15672",
        "core",
        "prod",
    )
    assert found.password.get_secret_value() == SECRET
    assert SECRET not in repr(found)
    env = {"USM_MANAGEMENT_URL": "https://admin:other@mgmt.example:443/rabbit/"}
    found = ManagementSettings.resolve(core, environ=env)
    assert (found.base_url, found.username) == ("https://mgmt.example:443/rabbit", "admin")
    with pytest.raises(ConfigError, match=r"^--management-url: must be an http"):
        ManagementSettings.resolve(core, "ftp://x", environ={})


def _api(handler: httpx.MockTransport) -> ManagementApi:
    core = CoreSettings.from_dsn(f"amqp://core:{SECRET}@rabbit:5672/%2F")
    return ManagementApi(ManagementSettings.resolve(core, environ={}), transport=handler)


def test_management_errors_are_one_clear_line_without_the_password() -> None:
    def unauthorized(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text=f"bad {SECRET}")

    with _api(httpx.MockTransport(unauthorized)) as api, pytest.raises(ManagementError) as info:
        api.user("sat-7")
    assert "401 unauthorized as 'core'" in str(info.value)
    assert SECRET not in str(info.value)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with _api(httpx.MockTransport(down)) as api, pytest.raises(ManagementError) as info:
        api.queues()
    assert "rabbitmq_management plugin" in str(info.value)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    with _api(httpx.MockTransport(slow)) as api, pytest.raises(ManagementError, match="no answer"):
        api.overview()


def test_management_paths_quote_the_vhost_and_404_is_none() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"error": "Object Not Found"})

    with _api(httpx.MockTransport(handler)) as api:
        assert api.queue("usm_poller-sat-7") is None
        assert api.delete_user("sat-7") is False
    assert seen[0].startswith("/api/queues/%2F/usm_poller-sat-7?")
    assert seen[1] == "/api/users/sat-7"


# ------------------------------------------------------------------------------ senders


def test_sender_policy() -> None:
    strict = SenderPolicy()
    assert strict("7", "sat-7")
    assert not strict("7", "sat-8")
    assert not strict("7", "guest")
    assert not strict("7", None)
    lab = SenderPolicy.trusting("guest", "")
    assert lab("7", "guest")
    assert lab("7", "sat-7")
    assert not lab("7", "sat-8")
    assert SenderPolicy.trusting("*")("7", None)


def test_satellite_of_key() -> None:
    assert satellite_of_key("result.7.snmp.get") == "7"
    assert satellite_of_key("reply.a-b.satellite-reply-1") == "a-b"
    assert satellite_of_key("heartbeat.x") == "x"
    assert satellite_of_key("other.7") is None
    assert satellite_of_key("result") is None


# ------------------------------------------------------------------------------ bulk files


def test_jobs_file_fills_in_version_and_id() -> None:
    text = (
        '# comment\n\n{"kind": "tcp.connect", "target": {"host": "h"}, "params": {"port": 22}}\n'
        '{"v": 1, "id": "x1", "kind": "icmp.ping", "target": {"host": "h"}}\n'
    )
    jobs = read_jobs_file(io.StringIO(text))
    assert [job.kind for job in jobs] == ["tcp.connect", "icmp.ping"]
    assert jobs[1].id == "x1"
    assert len(jobs[0].id) == 36


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json\n", "line 1: not valid JSON"),
        ("[1]\n", "line 1: not a JSON object"),
        (
            '{"kind": "snmp.get", "target": {"host": "h"}, "auth": {"version": "2c", '
            f'"community": "{SECRET}"}}, "params": {{"oids": ["x"]}}}}\n',
            "line 1: params.oids",
        ),
        (
            '{"id": "a", "kind": "icmp.ping", "target": {"host": "h"}}\n'
            '{"id": "a", "kind": "icmp.ping", "target": {"host": "h"}}\n',
            "line 2: job id 'a' is repeated",
        ),
    ],
)
def test_jobs_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(InvalidJobError, match=re.escape(message)) as info:
        read_jobs_file(io.StringIO(text), name="jobs.jsonl")
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------------------ dead letters


def test_mask_secrets() -> None:
    body = {
        "auth": {"version": "3", "user": "u", "auth_key": "a", "priv_key": "p", "context": ""},
        "params": {"commands": ["show run"]},
        "nested": [{"password": "x", "enable_password": "y", "community": "c", "host_key": "k"}],
    }
    assert mask_secrets(body) == {
        "auth": {"version": "3", "user": "u", "auth_key": "***", "priv_key": "***", "context": ""},
        "params": {"commands": ["show run"]},
        "nested": [
            {"password": "***", "enable_password": "***", "community": "***", "host_key": "k"}
        ],
    }


# ------------------------------------------------------------------------------ advice


def beat(worker: str, *, jobs_per_s: float, in_flight: int, concurrency: int = 10) -> Heartbeat:
    now = datetime.now(UTC)
    return Heartbeat(
        satellite_id="7",
        worker=worker,
        version="1",
        hostname="h",
        started_at=now - timedelta(hours=1),
        sent_at=now,
        concurrency=concurrency,
        in_flight=in_flight,
        jobs_ok=0,
        jobs_error=0,
        jobs_per_s=jobs_per_s,
        loop_lag_ms=0.1,
        rss_bytes=1,
    )


def queue(publish_rate: float, ready: int = 0, growth: float = 0.0) -> QueueView:
    return QueueView("q", ready, 0, 1, publish_rate, publish_rate, publish_rate, growth)


def test_advice_adds_replicas_when_arrivals_outrun_capacity() -> None:
    # each replica: 10 jobs in flight at 10 jobs/s -> W = 1 s -> capacity 10 jobs/s
    replicas = [beat("a", jobs_per_s=10, in_flight=10)]
    advice = advise(queue(publish_rate=30, ready=500, growth=20), replicas)
    # (30 + 500/300) / (10 * 0.7) = 4.5 -> 5
    assert (advice.needed, advice.verdict) == (5, "add 4 replicas")
    assert advice.service_time_s == pytest.approx(1.0)
    assert advice.capacity_per_replica == pytest.approx(10.0)


def test_advice_finds_idle_replicas_and_ok() -> None:
    replicas = [beat(w, jobs_per_s=1, in_flight=1) for w in "abcd"]
    # W = 4/4 = 1 s, capacity 10/s per replica; 10 jobs/s needs ceil(10/7) = 2
    advice = advise(queue(publish_rate=10), replicas)
    assert (advice.needed, advice.verdict) == (2, "2 idle replicas")
    advice = advise(queue(publish_rate=10), replicas[:2])
    assert advice.verdict == "ok"


def test_advice_without_measurements() -> None:
    assert advise(queue(0), [beat("a", jobs_per_s=0, in_flight=0)]).verdict == (
        "ok (no load to measure)"
    )
    stuck = advise(queue(0, ready=5), [beat("a", jobs_per_s=0, in_flight=0)])
    assert stuck.verdict == "5 jobs waiting but no replica is taking jobs"
    assert advise(queue(1, ready=3), []).verdict == "no replica is running: start one"


def test_advice_counts_the_interactive_lane() -> None:
    # Jobs waiting only in the lane need a replica as much as bulk ones do.
    assert advise(queue(0), [], lane=queue(0, ready=2)).verdict == (
        "no replica is running: start one"
    )
    assert advise(queue(0), [], lane=queue(0)).verdict == "no replica"
    stuck = advise(queue(0), [beat("a", jobs_per_s=0, in_flight=0)], lane=queue(0, ready=4))
    assert stuck.verdict == "4 jobs waiting but no replica is taking jobs"
    # capacity 10/s per replica; 10 + 10 jobs/s across both lanes needs ceil(20/7) = 3
    replicas = [beat(w, jobs_per_s=1, in_flight=1) for w in "ab"]
    advice = advise(queue(publish_rate=10), replicas, lane=queue(publish_rate=10))
    assert (advice.needed, advice.verdict) == (3, "add 1 replica")


def test_growing_queue() -> None:
    assert queue(5, ready=100, growth=2.0).growing
    assert not queue(5, ready=5, growth=2.0).growing
    assert not queue(5, ready=100, growth=0.0).growing


def test_status_shows_the_interactive_lane_and_warns_when_nobody_consumes_it() -> None:
    fleet = FleetView()
    fleet.add(beat("a", jobs_per_s=1, in_flight=1))

    def status(lane: tuple[int, int] | None) -> SatelliteStatus:
        return satellite_status(
            "7",
            queue={"name": "usm_poller-sat-7"},
            counts=(3, 1),
            dlq=None,
            lane={"name": "usm_poller-sat-7.interactive"} if lane else None,
            lane_counts=lane,
            fleet=fleet,
            core_version=beat("a", jobs_per_s=1, in_flight=1).version,
        )

    fine = status((2, 1))
    assert fine.lane is not None
    assert (fine.lane.ready, fine.lane.consumers) == (2, 1)
    assert fine.as_dict()["lane"]["name"] == "usm_poller-sat-7.interactive"
    assert fine.ok
    assert not fine.warnings
    [old] = status((2, 0)).warnings
    assert "no consumer on the interactive lane" in old
    missing = status(None)
    assert missing.as_dict()["lane"] is None
    assert missing.warnings == ["no interactive lane queue (run `satellite declare`)"]
    assert missing.ok  # a warning: bulk jobs still flow


# ------------------------------------------------------------------------------ recycles


def test_status_shows_how_often_a_replica_recycled(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = FleetView()
    fleet.add(beat("w-fresh", jobs_per_s=1, in_flight=0))
    fleet.add(
        beat("w-old", jobs_per_s=1, in_flight=0).model_copy(
            update={"recycles": 3, "last_recycle": "rss"}
        )
    )
    status = satellite_status("7", queue=None, dlq=None, fleet=fleet, core_version="1")
    rows = {r.heartbeat.worker: r.as_dict() for r in status.replicas}
    assert (rows["w-old"]["recycles"], rows["w-old"]["last_recycle"]) == (3, "rss")
    assert (rows["w-fresh"]["recycles"], rows["w-fresh"]["last_recycle"]) == (0, None)
    render.status([status])
    out = capsys.readouterr().out
    assert "recycled" in out
    [old] = [line for line in out.splitlines() if "w-old" in line]
    assert "3 (rss)" in old


def test_the_results_table_header_names_every_column(capsys: pytest.CaptureFixture[str]) -> None:
    """`satellite results`: the header names the duration and summary columns too, aligned."""
    result = bare_result("0b5c6a0e-7d7f-4a7c-9a51-7c2d3e4f5a6b", "7")
    printer = render.ResultPrinter(json_lines=False)
    printer.print(ReceivedResult(result, "result.7.snmp.get", "core", redelivered=False))
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-3:] == ["status", "duration", "summary"]
    assert header.index("duration") + len("duration") == row.index(" ms") + len(" ms")
