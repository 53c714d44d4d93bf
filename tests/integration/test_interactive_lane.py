"""The interactive lane (DESIGN §13) with the real poller, the real broker and slow devices.

The slow devices answer every SNMP request after 50 ms (`tests.support.slow_snmp`), each on its
own 127.0.0.x address, so a poller's throughput is its run slots / 50 ms: a backlog of bulk jobs
keeps it saturated for as long as the test needs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from poller import wire
from satellite.client import Client
from satellite.config import CoreSettings
from satellite.dispatch import build_job
from satellite.management import ManagementApi
from tests.support.lane import (
    BULK_HOSTS,
    LANE_HOST,
    ReplyQueue,
    ask_the_lane,
    publish_bulk,
    wait_for,
)
from tests.support.management import ProvisionedSatellite
from tests.support.poller_proc import IN_PROCESS_LANE, JobClient, PollerFactory, snmp_job
from tests.support.rabbitmq import AmqpVhost, rabbitmqctl
from tests.support.slow_snmp import SlowSnmpAgents

#: What the lane does inside a replica (admission, run slots, the bulk pause, one log): the
#: in-process lane. The lane process has tests/integration/test_interactive_process.py; the
#: tests here that cover both modes say `interactive_process=` themselves.
pytestmark = [pytest.mark.integration, IN_PROCESS_LANE]

SYS_NAME = "1.3.6.1.2.1.1.5.0"


@pytest.mark.timeout(90)
def test_interactive_jobs_overtake_a_saturating_bulk_backlog(
    *,
    amqp_vhost: AmqpVhost,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    replies: ReplyQueue,
    slow_devices: SlowSnmpAgents,
) -> None:
    # 8 run slots (1 kept for the lane): ~140 bulk jobs/s; 5,000 of them last ~35 s.
    poller = start_poller(sid, concurrency=8)
    publish_bulk(amqp_vhost.dsn, sid, slow_devices.port, 5000)
    wait_for("the poller saturated", lambda: slow_devices.answered >= 50, 20)
    latencies = [seconds for seconds, _ in ask_the_lane(poller, replies, sid, slow_devices.port)]
    backlog = client.queue_depth(wire.jobs_queue(sid))
    assert backlog > 4000, f"the bulk backlog drained too fast to prove anything: {backlog}"
    assert max(latencies) < 1.0, sorted(latencies)
    # The bulk jobs meanwhile: answered, and saying so.
    bulk = client.collect(1, timeout=10)
    assert bulk[0].result.job_id.startswith("bulk-")
    assert bulk[0].props.headers[wire.LANE_HEADER] == "bulk"
    client._ch.queue_purge(wire.jobs_queue(sid))
    # Every lane job was acked on the lane's channel (a wrong channel would have closed it).
    assert client.queue_depth(wire.interactive_queue(sid)) == 0
    assert poller.terminate() == 0
    assert not poller.events("broker_channel_closed")
    assert not poller.events("interactive_lane_channel_closed")


@pytest.mark.timeout(90)
def test_a_steady_interactive_stream_does_not_starve_bulk_jobs(
    *,
    amqp_vhost: AmqpVhost,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    replies: ReplyQueue,
    slow_devices: SlowSnmpAgents,
) -> None:
    # 4 run slots, ~80 jobs/s; interactive jobs at half that, 40/s, for as long as it takes.
    poller = start_poller(sid, concurrency=4)
    publish_bulk(amqp_vhost.dsn, sid, slow_devices.port, 300)
    interval = 1 / 40
    sent = answered = 0
    bulk_done: set[str] = set()
    started = time.monotonic()
    deadline = started + 60
    while len(bulk_done) < 300 and time.monotonic() < deadline:
        if sent < (time.monotonic() - started) / interval:
            job = snmp_job(LANE_HOST, slow_devices.port, job_id=f"lane-{sent}")
            replies.publish(sid, job, interactive=True)
            sent += 1
        while replies.get(timeout=0) is not None:
            answered += 1
        method, _props, body = client._ch.basic_get(client.queue, auto_ack=True)
        while method is not None:
            job_id = wire.decode_result(body).job_id  # replies come here too: "lane-..."
            if job_id.startswith("bulk-"):
                bulk_done.add(job_id)
            method, _props, body = client._ch.basic_get(client.queue, auto_ack=True)
        client._conn.sleep(0.005)
    took = time.monotonic() - started
    assert len(bulk_done) == 300, f"{len(bulk_done)} bulk jobs done in {took:.1f} s"
    # The stream kept going all along, and was served.
    assert sent >= 0.8 * took / interval
    while replies.get(timeout=2) is not None:
        answered += 1
    assert answered == sent
    assert poller.terminate() == 0


@pytest.mark.timeout(60)
def test_bulk_work_waits_while_an_interactive_job_is_in_flight(
    *,
    amqp_vhost: AmqpVhost,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    replies: ReplyQueue,
    slow_devices: SlowSnmpAgents,
) -> None:
    # The lane's device answers after 1.5 s; bulk work may step aside for up to 10 s.
    poller = start_poller(sid, interactive_pause_ms=10_000)
    with SlowSnmpAgents(["127.0.0.50"], delay=1.5) as slow_lane:
        replies.publish(
            sid, snmp_job("127.0.0.50", slow_lane.port, job_id="lane-slow"), interactive=True
        )
        wait_for(
            "the lane's job delivered",
            lambda: client.queue_depth(wire.interactive_queue(sid)) == 0,
            20,
        )
        publish_bulk(amqp_vhost.dsn, sid, slow_devices.port, 20)  # answered after 50 ms
        order: list[str] = []
        deadline = time.monotonic() + 30
        while len(order) < 21 and time.monotonic() < deadline:
            method, _props, body = client._ch.basic_get(client.queue, auto_ack=True)
            while method is not None:
                order.append(wire.decode_result(body).job_id)  # a reply may come here too
                method, _props, body = client._ch.basic_get(client.queue, auto_ack=True)
            got = replies.get(timeout=0)
            if got is not None:
                order.append(got[1].job_id)
            order = list(dict.fromkeys(order))
            client._conn.sleep(0.01)
    # Each round reads the bulk results first: the lane's answer, routed before any of them
    # was published, comes first all the same.
    assert order[0] == "lane-slow", order
    assert sorted(order[1:]) == sorted(f"bulk-{n}" for n in range(20))
    assert poller.terminate() == 0


# ------------------------------------------------------------------ pollers without the lane


def bulk_call(core: Client, sid: str, port: int) -> wire.JobResult:
    job = build_job(
        "snmp.get",
        target={"host": BULK_HOSTS[0], "port": port},
        auth={"version": "2c", "community": "public"},
        params={"oids": [SYS_NAME]},
        timeout=5,
    )
    return core.call(sid, job, timeout=20, lane="bulk")


@pytest.fixture
def core(amqp_vhost: AmqpVhost) -> Iterator[Client]:
    with Client(CoreSettings.from_dsn(amqp_vhost.dsn, connect_timeout=5)) as client:
        yield client


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "lane-process"])
def test_a_user_provisioned_before_the_lane_keeps_consuming_bulk_jobs(
    *,
    process: bool,
    amqp_vhost: AmqpVhost,
    core: Client,
    management_api: ManagementApi,
    provision: Callable[..., ProvisionedSatellite],
    start_poller: PollerFactory,
    slow_devices: SlowSnmpAgents,
) -> None:
    sat = provision()
    sid = sat.satellite_id
    assert core.declare([sid]).ok
    # The read permission of an older `satellite provision`: the job queue only.
    perms = management_api.permissions(sat.user)
    assert perms is not None
    management_api.set_permissions(
        sat.user,
        configure=perms["configure"],
        write=perms["write"],
        read=f"^usm_poller-sat-{sid}$",
    )
    start_poller.vhost = replace(amqp_vhost, username=sat.user, password=sat.password)
    poller = start_poller(sid, declare="false", interactive_process=str(process).lower())
    for _ in range(3):
        result = bulk_call(core, sid, slow_devices.port)
        assert result.status == "ok", result.error
    wait_for("the warning", lambda: bool(poller.events("interactive_lane_unavailable")), 20)
    [warning] = poller.events("interactive_lane_unavailable")
    assert warning["level"] == "warning"
    assert "403" in warning["error"] or "ACCESS_REFUSED" in warning["error"]
    assert not poller.events("broker_connection_lost")
    assert not poller.events("broker_channel_closed")
    assert poller.terminate() == 0


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "lane-process"])
def test_a_broker_without_the_lane_queue_keeps_consuming_bulk_jobs(
    *,
    core: Client,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    slow_devices: SlowSnmpAgents,
    process: bool,
) -> None:
    # The topology of an older `satellite declare`: no interactive queue.
    client._ch.queue_declare(
        wire.jobs_queue(sid), durable=True, arguments=wire.jobs_queue_arguments(sid)
    )
    client._ch.queue_bind(wire.jobs_queue(sid), wire.jobs_exchange(), wire.jobs_routing_key(sid))
    poller = start_poller(sid, declare="false", interactive_process=str(process).lower())
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for job_id in ids:
        client.publish(snmp_job(BULK_HOSTS[1], slow_devices.port, job_id=job_id))
    got = client.by_id(5, timeout=20)
    assert sorted(got) == sorted(ids)
    assert all(r.status == "ok" for r in got.values())
    # In the lane process (`process`), the same one warning, and no other noise.
    wait_for("the warning", lambda: bool(poller.events("interactive_lane_unavailable")), 20)
    [warning] = poller.events("interactive_lane_unavailable")
    assert "404" in warning["error"] or "NOT_FOUND" in warning["error"]
    assert not poller.events("broker_channel_closed")
    assert not poller.events("broker_connect_failed")
    assert poller.terminate() == 0
    assert not poller.events("interactive_process_exited")


@pytest.mark.parametrize("own_connection", [False, True], ids=["shared", "own-connection"])
def test_sigterm_returns_unstarted_lane_jobs_and_reconnects_consume_the_lane_again(
    *,
    amqp_vhost: AmqpVhost,
    sid: str,
    start_poller: PollerFactory,
    client: JobClient,
    silent_udp_port: int,
    slow_devices: SlowSnmpAgents,
    own_connection: bool,
) -> None:
    own = str(own_connection).lower()
    poller = start_poller(sid, concurrency=2, shutdown_grace=5, interactive_connection=own)
    # The lane: 1 run slot, a window of 4; these wait (silent device), one at a time.
    ids = [f"lane-{n}" for n in range(6)]
    for job_id in ids:
        client.publish(
            snmp_job("127.0.0.1", silent_udp_port, job_id=job_id, timeout=1.5), interactive=True
        )
    lane = wire.interactive_queue(sid)
    wait_for("the lane's window (4) filled", lambda: client.queue_depth(lane) == 2, 10)
    assert poller.terminate(timeout=30) == 0
    assert poller.events("returning_unstarted_jobs")
    assert not poller.events("interactive_lane_unavailable")
    start_poller(sid, concurrency=4, interactive_connection=own)
    results = client.collect_ids(ids, timeout=60)
    assert sorted({r.result.job_id for r in results}) == sorted(ids)
    assert {r.props.headers[wire.LANE_HEADER] for r in results} == {"interactive"}
    # A lost connection: the lane is consumed again with the rest.
    rabbitmqctl("close_all_connections", "-p", amqp_vhost.name, "test: cut the poller")
    again = JobClient(amqp_vhost.dsn, sid)
    try:
        again.publish(snmp_job(LANE_HOST, slow_devices.port, job_id="after"), interactive=True)
        [got] = again.collect(1, timeout=30)
        assert got.result.job_id == "after"
        assert got.result.status == "ok"
        assert got.props.headers[wire.LANE_HEADER] == "interactive"
    finally:
        again.close()


def test_results_say_which_lane_their_job_came_from(
    core: Client, sid: str, start_poller: PollerFactory, slow_devices: SlowSnmpAgents
) -> None:
    start_poller(sid)
    jobs = {}
    for lane in ("interactive", "bulk"):
        job = build_job(
            "snmp.get",
            target={"host": LANE_HOST, "port": slow_devices.port},
            auth={"version": "2c", "community": "public"},
            params={"oids": [SYS_NAME]},
        )
        core.submit(sid, job, lane=lane)
        jobs[job.id] = lane
    got: dict[str, str | None] = {}
    with core.result_reader([sid]) as reader:
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            for received in reader.read():
                got[received.result.job_id] = received.lane
    assert got == jobs
