"""A real process serving unix and TCP with `satellite.service.listen`, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

WAIT = 20.0  # bound on start-up and on each step (2 cores shared with other test runs)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def start(listen: str, shutdown_timeout: float = 30.0) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USM_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.listen_app",
        listen,
        str(shutdown_timeout),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(WAIT):
        return (await process.stdout.readline()).decode().strip()


async def test_sigterm_finishes_the_request_in_flight_and_exits_0(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    process = await start(f"unix:{path},tcp:127.0.0.1:0")
    try:
        ready = (await line(process)).split()
        assert ready[0] == "ready", ready
        port = int(ready[1])
        assert path.exists()
        async with (
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://api"
            ) as unix,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as tcp,
        ):
            assert (await unix.get("/where", timeout=WAIT)).text == "unix"
            assert (await tcp.get("/where", timeout=WAIT)).text == "tcp"
            in_flight = asyncio.create_task(tcp.get("/slow", timeout=WAIT))
            assert await line(process) == "entered"
            process.send_signal(signal.SIGTERM)
            response = await in_flight
        assert (response.status_code, response.text) == (200, "finished")
        async with asyncio.timeout(WAIT):
            code = await process.wait()
        assert await line(process) == "stopped"
        assert code == 0
        assert not path.exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_second_process_on_the_same_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    first = await start(f"unix:{path}")
    try:
        assert await line(first) == "ready"
        second = await start(f"unix:{path}")
        async with asyncio.timeout(WAIT):
            _, err = await second.communicate()
        assert second.returncode == 2
        assert err.decode() == (
            f"listen_app: USM_CORE_LISTEN: unix:{path}: another process is listening on it"
            " (stop it, or listen elsewhere)\n"
        )
        first.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await first.wait() == 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()


async def test_after_sigkill_the_next_process_replaces_the_stale_socket(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    first = await start(f"unix:{path}")
    assert await line(first) == "ready"
    first.kill()  # no clean-up: the socket file stays behind
    await first.wait()
    assert path.exists()
    second = await start(f"unix:{path}")
    try:
        assert await line(second) == "ready"
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://api"
        ) as unix:
            assert (await unix.get("/where", timeout=WAIT)).text == "unix"
        second.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await second.wait() == 0
        assert not path.exists()
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
