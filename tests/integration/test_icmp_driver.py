"""`icmp.ping` with real ICMP sockets: loopback here, a black hole and sysctls in a namespace."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from typing import Any

import pytest

from poller import wire
from poller.credentials import CredentialStore
from poller.drivers.icmp import SYSCTL, IcmpDriver, PingMode
from poller.runner import Runner
from tests.support.netns import BlackHoleNetns, has_ipv6_loopback


def ping_job(
    host: str, *, count: int = 3, interval: float = 0.05, size: int = 56, **extra: Any
) -> dict[str, Any]:
    return {
        "v": 1,
        "id": f"ping-{uuid.uuid4().hex[:8]}",
        "kind": "icmp.ping",
        "target": {"host": host},
        "params": {"count": count, "interval": interval, "size": size},
        "timeout": 3,
    } | extra


@pytest.fixture
def driver() -> IcmpDriver:
    driver = IcmpDriver()
    if driver.modes[socket.AF_INET] is PingMode.NOT_PERMITTED:
        reason = f"this process may not ping ({SYSCTL} excludes its group, no CAP_NET_RAW)"
        if os.environ.get("CI"):
            pytest.fail(f"ping must work in CI (root): {reason}")
        pytest.skip(reason)
    return driver


async def run(driver: IcmpDriver, job: dict[str, Any]) -> wire.JobResult:
    runner = Runner(
        drivers={"icmp.ping": driver},
        credentials=CredentialStore(),
        satellite_id="t",
        worker="w",
    )
    return await runner.run(wire.decode_job(json.dumps(job).encode()))


def assert_answered(result: wire.JobResult, count: int) -> None:
    assert result.status == "ok", result.error
    data = result.data or {}
    assert (data["sent"], data["received"], data["packet_loss"]) == (count, count, 0.0)
    rtts = [data["rtt_min_ms"], data["rtt_avg_ms"], data["rtt_max_ms"]]
    assert all(isinstance(v, float) for v in rtts)
    assert 0 <= rtts[0] <= rtts[1] <= rtts[2] < 1000  # type: ignore[operator]


async def test_ping_of_ipv4_loopback(driver: IcmpDriver) -> None:
    assert_answered(await run(driver, ping_job("127.0.0.1", count=3)), 3)


@pytest.mark.parametrize("auth", [{}, None])
async def test_a_ping_in_the_uniform_shape_is_run(
    driver: IcmpDriver, auth: dict[str, Any] | None
) -> None:
    """The `auth` a core sends for every kind, empty or null, is no credentials."""
    assert_answered(await run(driver, ping_job("127.0.0.1", count=1, auth=auth)), 1)


async def test_ping_of_ipv6_loopback(driver: IcmpDriver) -> None:
    if not has_ipv6_loopback():
        pytest.skip("::1 is not configured on this machine")
    assert_answered(await run(driver, ping_job("::1", count=2, size=1200)), 2)


async def test_a_name_is_resolved_off_the_event_loop(driver: IcmpDriver) -> None:
    assert_answered(await run(driver, ping_job("localhost", count=1)), 1)


async def test_concurrent_pings_do_not_steal_each_others_replies(driver: IcmpDriver) -> None:
    results = await asyncio.gather(
        *(run(driver, ping_job("127.0.0.1", count=3, interval=0.01)) for _ in range(20))
    )
    for result in results:
        assert_answered(result, 3)


async def test_an_unknown_name_is_unreachable(driver: IcmpDriver) -> None:
    result = await run(driver, ping_job("no-such-host.invalid", count=1))
    assert result.error is not None
    assert result.error.code == "device_unreachable"


async def test_packets_that_cannot_fit_in_the_timeout_fail_fast(driver: IcmpDriver) -> None:
    result = await run(driver, ping_job("127.0.0.1", count=20, interval=1.0, timeout=2))
    assert result.error is not None
    assert result.error.code == "device_timeout"
    assert "do not fit" in result.error.message
    assert result.duration_ms < 100


def test_a_silent_host_is_data_with_full_packet_loss(blackhole_netns: BlackHoleNetns) -> None:
    jobs = [
        ping_job(blackhole_netns.v4, count=3, interval=0.1, timeout=2, id="v4"),
        ping_job(blackhole_netns.v6, count=2, interval=0.1, timeout=2, id="v6"),
    ]
    out, _logs = blackhole_netns.run_jobs(*jobs)
    for result, count in zip(out["results"], (3, 2), strict=True):
        assert result["status"] == "ok", result
        assert result["data"] == {
            "sent": count,
            "received": 0,
            "packet_loss": 1.0,
            "rtt_min_ms": None,
            "rtt_avg_ms": None,
            "rtt_max_ms": None,
        }
        assert result["duration_ms"] < 2000  # answered within the job's own deadline


def test_unprivileged_sockets_are_used_when_ping_group_range_allows(
    blackhole_netns: BlackHoleNetns,
) -> None:
    blackhole_netns.sysctl(SYSCTL, "0 2147483647")
    out, logs = blackhole_netns.run_jobs(
        ping_job("127.0.0.1", count=2), ping_job("::1", count=2), drop_net_raw=True
    )
    assert out["modes"] == {"AF_INET": "unprivileged", "AF_INET6": "unprivileged"}
    for result in out["results"]:
        assert result["status"] == "ok", result
        assert result["data"]["received"] == 2
    assert not [line for line in logs if line.get("event") == "ping_not_permitted"]


def test_raw_sockets_are_used_with_cap_net_raw_only(blackhole_netns: BlackHoleNetns) -> None:
    blackhole_netns.sysctl(SYSCTL, "1 0")
    out, _logs = blackhole_netns.run_jobs(ping_job("127.0.0.1", count=2))
    assert out["modes"]["AF_INET"] == "raw"
    assert out["results"][0]["data"]["received"] == 2


def test_neither_permitted_warns_once_and_answers_ping_not_permitted(
    blackhole_netns: BlackHoleNetns,
) -> None:
    blackhole_netns.sysctl(SYSCTL, "1 0")
    out, logs = blackhole_netns.run_jobs(
        ping_job("127.0.0.1", count=1), ping_job("::1", count=1), drop_net_raw=True
    )
    assert out["modes"] == {"AF_INET": "not_permitted", "AF_INET6": "not_permitted"}
    warnings = [line for line in logs if line.get("event") == "ping_not_permitted"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert SYSCTL in warnings[0]["hint"]
    for result in out["results"]:
        assert result["status"] == "error"
        assert result["error"]["code"] == "ping_not_permitted"
        assert result["error"]["retryable"] is False
        assert SYSCTL in result["error"]["message"]
