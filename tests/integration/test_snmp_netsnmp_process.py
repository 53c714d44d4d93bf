"""The Net-SNMP backend's process-wide state against a real snmpd: memory and private directory.

- Memory: ezsnmp 2.5 leaks a log handler and (v1/v2c) a copy of the community on every call;
  the backend frees the handlers and keeps Net-SNMP's default community at the one in use so
  that `-c` can be left out (docs/drivers/snmp.md, "Memory"). A child process runs thousands
  of GETs and reports its RSS and Net-SNMP's handler list; requests with different communities,
  SNMPv3 and an empty community at once must each still get their own answers.
- Private directory: each process keeps its Net-SNMP configuration and state in its own locked
  directory under `<tmp>/usm-netsnmp.<uid>/`; a process killed with SIGKILL leaves its
  directory (and a running walk program's) behind, and the next process removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from poller.drivers.snmp import SnmpDriver, SnmpOptions
from poller.drivers.snmp_netsnmp import _KEEP_HANDLERS, TRIM_EVERY, NetsnmpBackend, _Process
from poller.errors import DeviceTimeoutError
from tests.integration.test_snmp_driver import by_oid, run, v2c, v3
from tests.support.procs import has_ended
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

SYS_NAME = "1.3.6.1.2.1.1.5.0"
IF_NUMBER = "1.3.6.1.2.1.2.1.0"  # outside the system group: `private` does not see it
ROOT = Path(__file__).resolve().parents[2]

#: A child process using the backend; prints one JSON line, then waits as its mode says.
CHILD = r"""
import asyncio, json, os, sys, time
from poller.drivers.snmp_base import SnmpTarget
from poller.drivers import snmp_netsnmp as netsnmp
from poller.wire import SnmpAuth

mode, port = sys.argv[1], int(sys.argv[2])
PUBLIC = SnmpAuth(version="2c", community="public")


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def target(loop, timeout=2.0, retries=1):
    return SnmpTarget("127.0.0.1", port, PUBLIC, loop.time() + 10, timeout, retries, 1 << 20)


def report(**more):
    print(json.dumps({"private": netsnmp._Process.private,
                      "env": os.environ.get("SNMPCONFPATH"), **more}), flush=True)


async def gets(backend, count):
    loop = asyncio.get_running_loop()

    async def worker(first):
        for _ in range(first, count, 32):
            [vb] = await backend.get(target(loop), ["1.3.6.1.2.1.1.5.0"])
            assert vb["value"], vb

    await asyncio.gather(*(worker(w) for w in range(32)))


async def main():
    loop = asyncio.get_running_loop()
    if mode == "walk":  # a walk program that waits for an agent that never answers
        backend = netsnmp.NetsnmpBackend(program_after_pages=0)
        real, started = asyncio.create_subprocess_exec, asyncio.Event()
        child = {}

        async def spy(*args, **kwargs):
            proc = await real(*args, **kwargs)
            child.update(walk_dir=kwargs["env"]["SNMPCONFPATH"], walk_pid=proc.pid)
            started.set()
            return proc

        asyncio.create_subprocess_exec = spy
        walk = asyncio.ensure_future(backend.walk(
            target(loop, timeout=3.0, retries=0), ["1.3.6.1.2.1.1"],
            max_repetitions=10, max_varbinds=100))
        await started.wait()
        report(**child)
        await asyncio.sleep(60)  # killed before this ends
        walk.cancel()
        return
    backend = netsnmp.NetsnmpBackend(open_sessions=int(os.environ.get("OPEN_SESSIONS", "8")))
    if mode == "get":
        await gets(backend, 1)
        report()
        await loop.run_in_executor(None, sys.stdin.readline)  # exit normally when told
    elif mode == "soak":
        await gets(backend, 5000)
        before = rss_kib()
        await gets(backend, int(sys.argv[3]))
        native, sessions = netsnmp._Process.native, backend.sessions
        report(rss_before=before, rss_after=rss_kib(),
               handlers=native.handlers() if native else None,
               default=(netsnmp._Process.community.value or b"").decode(),
               handled=sessions.handled if sessions else 0,
               opened=sessions.opened if sessions else 0,
               fds=len(os.listdir("/proc/self/fd")))
    await backend.aclose()


asyncio.run(main())
"""


class Child:
    """One child process running `CHILD`, with `TMPDIR` pointing into the test's directory."""

    def __init__(self, tmp: Path, *args: str, open_sessions: int = 8) -> None:
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "PYTHONPATH": str(ROOT),
            "OPEN_SESSIONS": str(open_sessions),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def report(self, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the child: it prints or exits
        assert line, f"child exited with {self.proc.wait(timeout)} before reporting"
        report: dict[str, Any] = json.loads(line)
        return report

    def stop(self, timeout: float = 30) -> int:
        """Tell a `get` child to exit normally; its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------------------------
# The private directory


def test_a_killed_process_leaves_its_directory_and_the_next_one_removes_it(
    tmp_path: Path, children: list[Child], snmpd: Snmpd, silent_udp_port: int
) -> None:
    parent = tmp_path / f"usm-netsnmp.{os.getuid()}"
    killed = Child(tmp_path, "walk", str(silent_udp_port))
    children.append(killed)
    first = killed.report()
    private, walk_dir = Path(first["private"]), Path(first["walk_dir"])
    assert private.parent == parent
    assert first["env"] == str(private)
    assert walk_dir.parent == private  # a walk program's credentials are in there too
    assert (walk_dir / "snmp.conf").is_file()
    killed.kill()  # SIGKILL: no atexit, no cleanup
    assert private.is_dir()
    assert walk_dir.is_dir()

    live = Child(tmp_path, "get", str(snmpd.port))
    children.append(live)
    second = Path(live.report()["private"])
    assert second.parent == parent
    assert second.is_dir()
    assert not private.exists()  # nobody held it any more: removed at start-up

    third = Child(tmp_path, "get", str(snmpd.port))
    children.append(third)
    assert Path(third.report()["private"]).is_dir()
    assert second.is_dir()  # held by a process that lives: left alone

    assert live.stop() == 0
    assert third.stop() == 0
    assert list(parent.iterdir()) == []  # a normal exit removes its own
    assert [p.name for p in tmp_path.iterdir()] == [parent.name]

    deadline = time.monotonic() + 10  # the orphaned walk program times out on its own
    while not has_ended(first["walk_pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not has_ended(first["walk_pid"]):
        os.kill(first["walk_pid"], signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("open_sessions", [0, 8], ids=["ezsnmp", "open-sessions"])
def test_memory_stays_flat_over_thousands_of_requests(
    tmp_path: Path, children: list[Child], snmpd: Snmpd, open_sessions: int
) -> None:
    requests = 20_000
    child = Child(tmp_path, "soak", str(snmpd.port), str(requests), open_sessions=open_sessions)
    children.append(child)
    report = child.report(timeout=300)
    assert child.proc.wait(60) == 0
    # ezsnmp alone keeps ~120 bytes per request: 2.4 MB here.
    growth_kib = report["rss_after"] - report["rss_before"]
    assert growth_kib < 800, f"RSS grew by {growth_kib} KiB over {requests} requests"
    if open_sessions:
        # Every GET on an open session: one per pool thread (32) for the one agent, kept.
        assert report["handled"] == requests + 5000
        assert 1 <= report["opened"] <= 32
        assert report["fds"] < 100
        return
    assert report["handled"] == 0
    # Freed every TRIM_EVERY requests, but the newest few; the pool has 32 threads.
    assert report["handlers"] is not None
    assert report["handlers"] <= TRIM_EVERY + _KEEP_HANDLERS + 32
    assert report["default"] == "public"  # requests left `-c` out


async def test_requests_with_other_communities_at_once_each_get_their_own_answers(
    snmpd: Snmpd,
) -> None:
    driver = SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp"))
    assert isinstance(driver.backend, NetsnmpBackend)
    public, private = v2c(snmpd), v2c(snmpd, snmpd.write_community)
    user = v3(snmpd.v3_users["sha-aes"])
    empty: dict[str, JsonValue] = {"version": "2c", "community": ""}
    oids: dict[str, JsonValue] = {"oids": [SYS_NAME, IF_NUMBER]}
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> tuple[str, Any]:
        kind = ("public", "private", "v3", "public", "private", "empty")[n % 6]
        auth = {"public": public, "private": private, "v3": user, "empty": empty}[kind]
        async with limit:
            try:
                timeout = 1.5 if kind == "empty" else 5.0
                return kind, await run(
                    driver, "snmp.get", oids, auth, port=snmpd.port, timeout=timeout
                )
            except DeviceTimeoutError as exc:
                return kind, exc

    try:
        results = await asyncio.gather(*(one(n) for n in range(240)))
    finally:
        await driver.aclose()
    for kind, result in results:
        if kind == "empty":  # the agent has no empty community: `public` must not be sent
            assert isinstance(result, DeviceTimeoutError), result
            continue
        got = by_oid(result)
        assert got[SYS_NAME]["value"] == snmpd.sys_name, (kind, got)
        # `private` sees the system group only; `public` and the v3 user see everything.
        expected = "noSuchObject" if kind == "private" else "Integer"
        assert got[IF_NUMBER]["type"] == expected, (kind, got)
    assert _Process.native is not None
    assert _Process.community.held == 0
