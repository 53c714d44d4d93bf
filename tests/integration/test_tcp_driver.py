"""`tcp.connect` against real sockets: a port that refuses, one that accepts, two that are silent.

Silence is made two ways: on loopback, a listener whose accept queue is full (Linux then drops
new SYNs without an answer, so the client hears nothing until it gives up), which runs
anywhere; and in a namespace of the test's own, an address whose frames go nowhere (see
`tests/support/netns.py`), which needs root.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from poller import wire
from poller.credentials import CredentialStore
from poller.drivers.tcp import TcpDriver
from poller.runner import Runner
from tests.support.netns import BlackHoleNetns, has_ipv6_loopback


def tcp_job(host: str, port: int, timeout: float = 2.0, **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "id": f"tcp-{uuid.uuid4().hex[:8]}",
        "kind": "tcp.connect",
        "target": {"host": host},
        "params": {"port": port},
        "timeout": timeout,
    } | extra


async def run(job: dict[str, Any]) -> wire.JobResult:
    runner = Runner(
        drivers={"tcp.connect": TcpDriver()},
        credentials=CredentialStore(),
        satellite_id="t",
        worker="w",
    )
    return await runner.run(wire.decode_job(json.dumps(job).encode()))


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bound to find a free one, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A listener that never accepts, with its accept queue filled: new SYNs are dropped."""
    server = socket.socket()
    clients: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        for _ in range(16):
            client = socket.socket()
            clients.append(client)
            client.settimeout(0.3)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # the queue is full: this SYN was dropped
        else:
            pytest.fail("the accept queue never filled up")
        yield port
    finally:
        for client in clients:
            client.close()
        server.close()


async def test_a_listening_port_is_connected_with_its_connect_time(listening_port: int) -> None:
    result = await run(tcp_job("127.0.0.1", listening_port))
    assert result.status == "ok", result.error
    data = result.data or {}
    assert data["connected"] is True
    assert isinstance(data["rtt_ms"], float)
    assert 0 <= data["rtt_ms"] < 1000


@pytest.mark.parametrize("auth", [{}, None])
async def test_a_job_in_the_uniform_shape_connects_to_the_target_port(
    listening_port: int, auth: dict[str, Any] | None
) -> None:
    """The port in `target.port` only, with the `auth` a core sends for every kind."""
    job = tcp_job("127.0.0.1", listening_port, auth=auth)
    job["target"]["port"] = listening_port
    del job["params"]
    result = await run(job)
    assert result.status == "ok", result.error
    assert (result.data or {})["connected"] is True


async def test_params_port_wins_over_the_target_port(listening_port: int, closed_port: int) -> None:
    job = tcp_job("127.0.0.1", listening_port)
    job["target"]["port"] = closed_port
    result = await run(job)
    assert result.status == "ok", result.error
    job = tcp_job("127.0.0.1", closed_port)
    job["target"]["port"] = listening_port
    result = await run(job)
    assert result.error is not None
    assert result.error.code == "device_unreachable"


async def test_ipv6_loopback_and_names_work() -> None:
    if not has_ipv6_loopback():
        pytest.skip("::1 is not configured on this machine")
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen(4)
        port = sock.getsockname()[1]
        result = await run(tcp_job("::1", port))
    assert result.status == "ok", result.error


async def test_a_name_is_resolved(listening_port: int) -> None:
    result = await run(tcp_job("localhost", listening_port))
    # localhost may resolve to ::1 first where the IPv4-only listener refuses: both are answers.
    assert result.status == "ok" or (result.error and result.error.code == "device_unreachable")


async def test_a_refusing_port_is_unreachable_with_connected_false(closed_port: int) -> None:
    t0 = time.monotonic()
    result = await run(tcp_job("127.0.0.1", closed_port))
    assert time.monotonic() - t0 < 0.5
    assert result.status == "error"
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("device_unreachable", True)
    assert "refused" in result.error.message.lower()
    assert result.data == {"connected": False}


async def test_a_silent_port_times_out_within_the_deadline(full_backlog_port: int) -> None:
    t0 = time.monotonic()
    result = await run(tcp_job("127.0.0.1", full_backlog_port, timeout=1.0))
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed <= 1.2
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("device_timeout", True)
    assert result.data == {"connected": False}


def test_a_black_holed_address_times_out(blackhole_netns: BlackHoleNetns) -> None:
    out, _logs = blackhole_netns.run_jobs(
        tcp_job(blackhole_netns.v4, 80, timeout=1.0),
        tcp_job(blackhole_netns.v6, 443, timeout=1.0),
    )
    for result in out["results"]:
        assert result["status"] == "error"
        assert result["error"]["code"] == "device_timeout"
        assert result["data"] == {"connected": False}
        assert 900 <= result["duration_ms"] <= 1200
