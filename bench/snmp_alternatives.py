"""SNMP client libraries side by side: memory per 100,000 GETs and CPU per GET (issue 19).

    .venv/bin/python bench/snmp_alternatives.py                 # 100k GETs per candidate
    .venv/bin/python bench/snmp_alternatives.py --requests 20000 --rounds 1

Each candidate runs in a fresh child process against the same Net-SNMP `snmpd` on loopback
(the helper of `bench/run.py`), one `GET sysName.0` (v2c) at a time: `--warmup` requests,
then `--requests` more. The child reports its RSS after the warm-up and at the end, and the
CPU time (user + system, all threads) and wall time of the measured requests. Candidates run
in interleaved rounds; the table shows medians. Candidates whose library is not installed are
skipped (install them into the venv only: `pip install netsnmp-cffi gufo-snmp`).

- `backend`: the Net-SNMP backend with every request through ezsnmp (`NetsnmpBackend.get` with
  `open_sessions=0`: ezsnmp 2.5 with the ctypes workaround, through its thread pool) - the
  baseline of the ratios.
- `backend-open`: the same backend as configured by default: plain v1/v2c GETs on Net-SNMP
  sessions kept open per pool thread (`poller/drivers/snmp_netsnmp_open.py`).
- `ezsnmp`: `ezsnmp.netsnmp.snmpget(args)` called directly, as ezsnmp ships it.
- `ezsnmp-session`: one `ezsnmp.Session` kept for all requests.
- `open-session`: the floor of "keep Net-SNMP sessions open across requests": one session
  opened once (`snmp_open`), each GET a PDU built and sent with `snmp_synch_response` and the
  answer's varbinds read, through netsnmp-cffi's CFFI declarations of libnetsnmp (no option
  parsing, no MIB, no event loop).
- `netsnmp-cffi`: one `netsnmpy` `SNMPSession` opened once (a Net-SNMP session kept open,
  requests sent asynchronously, answers read by the event loop).
- `gufo-snmp`: one `gufo.snmp` `SnmpSession` (asyncio).
"""

# ruff: noqa: PLC0415 - each candidate imports its own (optional) library in its child process

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from common import snmp_agent

ROOT = Path(__file__).resolve().parent.parent
OID = "1.3.6.1.2.1.1.5.0"
CANDIDATES = (
    "backend",
    "backend-open",
    "ezsnmp",
    "ezsnmp-session",
    "open-session",
    "netsnmp-cffi",
    "gufo-snmp",
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _async_candidate(name: str, host: str, port: int) -> Callable[[], Coroutine[Any, Any, None]]:
    if name in ("backend", "backend-open"):
        from pydantic import SecretStr

        from poller import wire
        from poller.drivers.snmp_base import SnmpTarget
        from poller.drivers.snmp_netsnmp import NetsnmpBackend

        backend = NetsnmpBackend(threads=1, open_sessions=0 if name == "backend" else 8)
        auth = wire.SnmpAuth(version="2c", community=SecretStr("public"))

        async def call_backend() -> None:
            loop = asyncio.get_running_loop()
            target = SnmpTarget(host, port, auth, loop.time() + 10, 2.0, 1, 1 << 20)
            await backend.get(target, [OID])

        return call_backend
    if name == "netsnmp-cffi":
        from netsnmpy.oids import OID as NOID
        from netsnmpy.session import SNMPSession

        session = SNMPSession(host, port, community="public", version="2c", timeout=2.0)
        oid = NOID(OID)
        opened = False

        async def call_cffi() -> None:
            nonlocal opened
            if not opened:
                session.open()
                opened = True
            await session.aget(oid)

        return call_cffi
    if name == "gufo-snmp":
        from gufo.snmp.aio.client import SnmpSession

        gufo = SnmpSession(addr=host, port=port, community="public", timeout=2.0)

        async def call_gufo() -> None:
            await gufo.get(OID)

        return call_gufo
    raise ValueError(name)


def _sync_candidate(name: str, host: str, port: int) -> Callable[[], None]:
    if name == "ezsnmp":
        from ezsnmp import netsnmp

        args = ["-v", "2c", "-c", "public", "-t", "2", "-r", "1", f"{host}:{port}", "." + OID]

        def call_raw() -> None:
            netsnmp.snmpget(args)

        return call_raw
    if name == "ezsnmp-session":
        from ezsnmp import Session

        session = Session(
            hostname=host, port_number=port, version="2c", community="public", timeout=2, retries=1
        )

        def call_session() -> None:
            session.get(OID)

        return call_session
    if name == "open-session":
        from netsnmpy import netsnmp as nlib
        from netsnmpy.constants import SNMP_MSG_GET
        from netsnmpy.oids import OID as NOID
        from netsnmpy.session import SNMPSession

        opened = SNMPSession(host, port, community="public", version="2c", timeout=2.0)
        opened.open()
        ffi, lib, session = nlib._ffi, nlib._lib, opened.session
        oid = NOID(OID)

        def call_open() -> None:
            request = nlib.make_request_pdu(SNMP_MSG_GET, oid)
            response = ffi.new("netsnmp_pdu **")
            if lib.snmp_synch_response(session, request, response) != 0:
                raise RuntimeError("no answer")
            nlib.parse_response_variables(response[0])
            lib.snmp_free_pdu(response[0])

        return call_open
    raise ValueError(name)


def child(name: str, host: str, port: int, warmup: int, requests: int) -> dict[str, float]:
    if name in ("ezsnmp", "ezsnmp-session", "open-session"):
        call = _sync_candidate(name, host, port)
        for _ in range(warmup):
            call()
        rss0, cpu0, t0 = rss_mb(), time.process_time(), time.perf_counter()
        for _ in range(requests):
            call()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    else:
        acall = _async_candidate(name, host, port)

        async def run() -> tuple[float, float, float]:
            for _ in range(warmup):
                await acall()
            rss0, cpu0, t0 = rss_mb(), time.process_time(), time.perf_counter()
            for _ in range(requests):
                await acall()
            return rss0, time.process_time() - cpu0, time.perf_counter() - t0

        rss0, cpu, wall = asyncio.run(run())
    return {"rss0": rss0, "rss1": rss_mb(), "cpu": cpu, "wall": wall, "n": requests}


def installed(name: str) -> bool:
    module = {
        "netsnmp-cffi": "netsnmpy",
        "open-session": "netsnmpy",
        "backend-open": "netsnmpy",
        "gufo-snmp": "gufo.snmp",
    }.get(name, "ezsnmp")
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, timeout=60, check=False
    )
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", nargs="*", choices=CANDIDATES, default=list(CANDIDATES))
    ap.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--agent", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        host, port = args.agent.rsplit(":", 1)
        print(json.dumps(child(args.child, host, int(port), args.warmup, args.requests)))
        return 0
    names = [n for n in args.only if installed(n)]
    load0 = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with snmp_agent() as (host, port, _pid):
        for rnd in range(args.rounds):
            for name in names:
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        "--agent",
                        f"{host}:{port}",
                        "--warmup",
                        str(args.warmup),
                        "--requests",
                        str(args.requests),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=3600,
                    check=False,
                    env=env,
                    cwd=ROOT,
                )
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(done.stdout.strip().splitlines()[-1])
                results[name].append(res)
                print(
                    f"round {rnd + 1} {name}: +{res['rss1'] - res['rss0']:.1f} MB, "
                    f"{res['cpu'] / res['n'] * 1e6:.0f} us CPU/req, {res['n'] / res['wall']:,.0f}"
                    " req/s",
                    flush=True,
                )
    load1 = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    base = results.get("backend") or []
    base_cpu = statistics.median(r["cpu"] / r["n"] for r in base) if base else float("nan")
    print(f"\nload average {load0} at the start, {load1} at the end")
    print("| candidate | RSS growth per 100k | CPU us/request | vs backend | requests/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        if not runs:
            continue
        growth = statistics.median((r["rss1"] - r["rss0"]) * 100_000 / r["n"] for r in runs)
        cpu = statistics.median(r["cpu"] / r["n"] for r in runs)
        rate = statistics.median(r["n"] / r["wall"] for r in runs)
        print(
            f"| {name} | {growth:+.1f} MB | {cpu * 1e6:.0f} | {cpu / base_cpu:.2f}x | {rate:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
