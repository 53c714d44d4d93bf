"""Memory soak: does one `poller run` stay flat over many `snmp.get` jobs?

    .venv/bin/python bench/soak.py                    # 100k jobs per backend, writes the doc
    .venv/bin/python bench/soak.py --jobs 20000 --no-write
    .venv/bin/python bench/soak.py --backend default --jobs 1000000 --limit 3600

It starts its own vhost and Net-SNMP agent (the helpers of `bench/run.py`), one poller per
SNMP backend that works here (`--backend default`: only the one `auto` picks), and keeps 64
jobs in flight. After a warm-up of `--warmup` jobs and then after every block it reads, between
blocks (nothing in flight), the replica's RSS, its open file descriptors
(`/proc/<pid>/fd`), its threads (`Threads:` of `/proc/<pid>/status`) and the jobs it says are
in flight (its health file: a job task that never ended would show there). The verdict is the
growth from the warm-up to the end, within `--tolerance` MB (issue 19: +-10 MB over 1,000,000
jobs; fds and threads
no higher in the second half of the readings than in the first).

`--max-rss-mb` / `--max-jobs` set `USM_POLLER_MAX_RSS_MB` / `USM_POLLER_MAX_JOBS`: a replica
that recycles (drains, exits 0) is started again at once, as its supervisor would, and the
recycles are counted; every job must still be answered. Bounded by `--jobs` and by `--limit`
seconds per backend; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common import snmp_agent, vhost, write_section
from run import (
    Driver,
    get_job,
    netsnmp_backend_works,
    poller_source,
    rss_mb,
)

from tests.support.poller_proc import PollerFactory, PollerProcess

HEADING = "## Memory soak"
BLOCK = 10_000


@dataclass(frozen=True)
class Reading:
    jobs: int
    rss: float
    rate: float
    fds: int
    threads: int
    in_flight: int
    tasks: int
    pid: int


@dataclass
class Soak:
    backend: str
    readings: list[Reading] = field(default_factory=list)
    recycles: int = 0
    lost: int = 0
    errors: int = 0
    seconds: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000, help="jobs after the warm-up")
    ap.add_argument("--warmup", type=int, default=5_000, help="jobs before the first reading")
    ap.add_argument("--block", type=int, default=0, help="jobs between readings (0: auto)")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds per backend at most")
    ap.add_argument(
        "--backend",
        choices=("all", "default", "netsnmp", "pysnmp"),
        default="all",
        help="all: every backend that works here; default: the one the poller picks",
    )
    ap.add_argument("--tolerance", type=float, default=10.0, help="MB of growth still flat")
    ap.add_argument("--max-rss-mb", type=int, default=0, help="USM_POLLER_MAX_RSS_MB (0: off)")
    ap.add_argument("--max-jobs", type=int, default=0, help="USM_POLLER_MAX_JOBS (0: off)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def block_size(args: argparse.Namespace) -> int:
    """`--block`, else 10,000 (at most ~20 readings: 50,000 for a million jobs)."""
    if args.block > 0:
        return int(args.block)
    return max(BLOCK, -(-int(args.jobs) // 20 // BLOCK) * BLOCK)


def blocks(jobs: int, size: int = BLOCK) -> list[int]:
    """`jobs` in blocks of `size` (the last one shorter)."""
    return [size] * (jobs // size) + ([jobs % size] if jobs % size else [])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def health_counts(poller: PollerProcess, after: float, timeout: float = 6.0) -> tuple[int, int]:
    """`in_flight` and `tasks` of the first health file written after `after` (time.time());
    -1: none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(poller.health_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("updated", 0) > after:
            return int(state.get("in_flight", -1)), int(state.get("tasks", -1))
        time.sleep(0.2)
    return -1, -1


def no_growth(values: list[int]) -> bool:
    """The second half of the readings stays within the first half's maximum (a pool that
    fills lazily reaches its size early; a leak keeps growing)."""
    half = max(1, len(values) // 2)
    return max(values[half:], default=0) <= max(values[:half])


class Supervisor:
    """Starts the poller again whenever it exits 0 (a recycle), like compose or systemd would."""

    def __init__(self, start: object) -> None:
        self._start = start
        self.poller: PollerProcess = self._spawn()
        self.recycles = 0
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="soak-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> PollerProcess:
        poller: PollerProcess = self._start()  # type: ignore[operator]
        poller.wait_ready(timeout=60)
        return poller

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self.poller.proc.poll()
            if code is None:
                continue
            if code != 0:
                self.failed = f"poller exited with {code}"
                return
            self.recycles += 1
            self.poller = self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=70)
        self.poller.terminate(timeout=60)


def soak(args: argparse.Namespace, backend: str) -> Soak:
    """Readings for one backend, the warm-up first."""
    out = Soak(backend)
    loop = asyncio.new_event_loop()
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    settings: dict[str, Any] = {
        "concurrency": 64,
        "per_device_concurrency": 64,
        "snmp_backend": backend,
        "heartbeat_interval": 10,
    }
    if args.max_rss_mb:
        settings["max_rss_mb"] = args.max_rss_mb
    if args.max_jobs:
        settings["max_jobs"] = args.max_jobs
    started = time.monotonic()
    try:
        with vhost() as vh, snmp_agent() as (host, port, _pid):
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            factory = PollerFactory(vh, workdir)
            sid = f"soak-{backend}"
            sup = Supervisor(lambda: factory(sid, wait=False, **settings))
            try:
                source = poller_source(sid, get_job(host, port))
                deadline = time.monotonic() + args.limit
                done = 0
                for size in [args.warmup, *blocks(args.jobs, block_size(args))]:
                    left = deadline - time.monotonic()
                    if left <= 0 or sup.failed:
                        print(
                            f"{backend}: stopped after {done} jobs ({sup.failed or 'time limit'})"
                        )
                        break
                    t0 = time.monotonic()
                    result = loop.run_until_complete(
                        driver.round(source, window=64, seconds=left, max_jobs=size)
                    )
                    done += result.jobs
                    out.lost += result.lost
                    out.errors += result.errors
                    rate = result.jobs / max(time.monotonic() - t0, 1e-9)
                    pid = sup.poller.pid
                    in_flight, tasks = health_counts(sup.poller, time.time())
                    reading = Reading(
                        done,
                        rss_mb(pid),
                        rate,
                        fd_count(pid),
                        thread_count(pid),
                        in_flight,
                        tasks,
                        pid,
                    )
                    out.readings.append(reading)
                    print(
                        f"{backend}: {done:>8} jobs  RSS {reading.rss:6.1f} MB  "
                        f"fds {reading.fds}  threads {reading.threads}  "
                        f"in flight {reading.in_flight}  tasks {reading.tasks}  {rate:,.0f}/s  "
                        f"recycles {sup.recycles}  errors {out.errors}  lost {out.lost}",
                        flush=True,
                    )
            finally:
                sup.stop()
                out.recycles = sup.recycles
                loop.run_until_complete(driver.close())
    finally:
        loop.close()
    out.seconds = time.monotonic() - started
    return out


def versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("ezsnmp", "pysnmp", "pika"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _spread(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def render(results: list[Soak], load: tuple[str, str], args: argparse.Namespace, size: int) -> str:
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/soak.py --backend {args.backend} --jobs {args.jobs}`, "
        f"{time.strftime('%Y-%m-%d')} ({versions()}): one `poller run` (concurrency 64) per "
        "SNMP backend, `snmp.get` of sysName.0 against Net-SNMP `snmpd` on loopback, 64 jobs "
        f"in flight. After a {args.warmup:,}-job warm-up and then every {size:,} jobs (nothing "
        "in flight): RSS, open fds, threads, and the jobs in flight and asyncio tasks the "
        "replica's health file counts. Load average (1/5/15 min) "
        f"{load[0]} at the start, {load[1]} at the end.",
        "",
        "| backend | jobs after warm-up | jobs/s | RSS after warm-up | RSS at the end | growth "
        "| max RSS | fds | threads | in flight | asyncio tasks | recycles | errors, lost "
        f"| verdict (+-{args.tolerance:g} MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for res in results:
        if len(res.readings) < 2:
            continue
        first, last = res.readings[0], res.readings[-1]
        growth = last.rss - first.rss
        after = res.readings[1:]
        flat_fds = no_growth([r.fds for r in res.readings])
        flat_threads = no_growth([r.threads for r in res.readings])
        flat_tasks = no_growth([r.tasks for r in res.readings])
        if res.recycles:  # a new process each time: its figures start afresh
            verdict = f"recycled {res.recycles}x"
        elif abs(growth) > args.tolerance:
            verdict = f"**grew** {growth:+.1f} MB"
        elif not (flat_fds and flat_threads and flat_tasks):
            verdict = "**fds, threads or tasks grew**"
        else:
            verdict = "flat"
        rate = sorted(r.rate for r in after)[len(after) // 2]
        lines.append(
            f"| {res.backend} | {last.jobs - first.jobs:,} | {rate:,.0f} | {first.rss:.1f} MB "
            f"| {last.rss:.1f} MB | {growth:+.1f} MB | {max(r.rss for r in res.readings):.1f} MB "
            f"| {_spread([r.fds for r in res.readings])} "
            f"| {_spread([r.threads for r in res.readings])} "
            f"| {_spread([r.in_flight for r in res.readings])} "
            f"| {_spread([r.tasks for r in res.readings])} | {res.recycles} "
            f"| {res.errors}, {res.lost} | {verdict} |"
        )
    for res in results:
        trace = ", ".join(f"{r.rss:.1f}" for r in res.readings)
        lines += [
            "",
            f"{res.backend}, RSS in MB at each reading ({res.seconds / 60:.0f} min): {trace}",
        ]
    return "\n".join(lines) + "\n"


def _load3() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_load = _load3()
    works = netsnmp_backend_works()
    if args.backend == "all":
        backends = ["netsnmp", "pysnmp"] if works else ["pysnmp"]
    elif args.backend == "default":
        backends = ["netsnmp" if works else "pysnmp"]
    else:
        backends = [args.backend]
    results = [soak(args, backend) for backend in backends]
    section = render(results, (start_load, _load3()), args, block_size(args))
    print(section)
    if not args.no_write:
        write_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
