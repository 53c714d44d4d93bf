"""Memory soak: does one `poller run` stay flat over 100,000 `snmp.get` jobs?

    .venv/bin/python bench/soak.py                    # 100k jobs per backend, writes the doc
    .venv/bin/python bench/soak.py --jobs 20000 --no-write

It starts its own vhost and Net-SNMP agent (the helpers of `bench/run.py`), one poller per
SNMP backend that works here, and keeps 64 jobs in flight. The replica's RSS is read after a
warm-up of `--warmup` jobs and then after every block; the verdict is the growth from the
warm-up to the end (issue 8: flat within +-5 MB over 100k jobs). Bounded by `--jobs` and by
`--limit` seconds per backend; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from common import write_section
from run import (
    Driver,
    get_job,
    loadavg,
    netsnmp_backend_works,
    poller_source,
    rss_mb,
    snmp_agent,
    vhost,
)

from tests.support.poller_proc import PollerFactory

HEADING = "## Memory soak"
BLOCK = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000, help="jobs after the warm-up")
    ap.add_argument("--warmup", type=int, default=5_000, help="jobs before the first reading")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds per backend at most")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def blocks(jobs: int) -> list[int]:
    """`jobs` in blocks of `BLOCK` (the last one shorter)."""
    return [BLOCK] * (jobs // BLOCK) + ([jobs % BLOCK] if jobs % BLOCK else [])


def soak(args: argparse.Namespace, backend: str) -> list[tuple[int, float, float]]:
    """[(jobs done, RSS MB, jobs/s of the block)] for one backend, the warm-up first."""
    readings: list[tuple[int, float, float]] = []
    loop = asyncio.new_event_loop()
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        with vhost() as vh, snmp_agent() as (host, port, _pid):
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            factory = PollerFactory(vh, workdir)
            sid = f"soak-{backend}"
            poller = factory(
                sid,
                wait=False,
                concurrency=64,
                per_device_concurrency=64,
                snmp_backend=backend,
                heartbeat_interval=10,
            )
            try:
                poller.wait_ready(timeout=60)
                source = poller_source(sid, get_job(host, port))
                deadline = time.monotonic() + args.limit
                done = 0
                for size in [args.warmup, *blocks(args.jobs)]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        print(f"{backend}: time limit reached after {done} jobs")
                        break
                    t0 = time.monotonic()
                    result = loop.run_until_complete(
                        driver.round(source, window=64, seconds=left, max_jobs=size)
                    )
                    done += result.jobs
                    rate = result.jobs / max(time.monotonic() - t0, 1e-9)
                    readings.append((done, rss_mb(poller.pid), rate))
                    print(
                        f"{backend}: {done:>7} jobs  RSS {readings[-1][1]:6.1f} MB  {rate:,.0f}/s"
                    )
            finally:
                poller.terminate(timeout=60)
                loop.run_until_complete(driver.close())
    finally:
        loop.close()
    return readings


def render(results: dict[str, list[tuple[int, float, float]]], load: tuple[float, float]) -> str:
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/soak.py`, {time.strftime('%Y-%m-%d')}: one `poller run` "
        "(concurrency 64) per SNMP backend, `snmp.get` of sysName.0 against Net-SNMP `snmpd` "
        "on loopback, 64 jobs in flight. RSS of the replica after the warm-up and after every "
        f"{BLOCK:,} jobs. Load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the "
        "end.",
        "",
        "| backend | jobs after warm-up | RSS after warm-up | RSS at the end | growth | "
        "max RSS | verdict (+-5 MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for backend, readings in results.items():
        if len(readings) < 2:
            continue
        (w_jobs, w_rss, _), (e_jobs, e_rss, _) = readings[0], readings[-1]
        growth = e_rss - w_rss
        verdict = "flat" if abs(growth) <= 5 else f"**grew** {growth:+.1f} MB"
        lines.append(
            f"| {backend} | {e_jobs - w_jobs:,} | {w_rss:.1f} MB | {e_rss:.1f} MB | "
            f"{growth:+.1f} MB | {max(r for _, r, _ in readings):.1f} MB | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_load = loadavg()
    backends = ["netsnmp", "pysnmp"] if netsnmp_backend_works() else ["pysnmp"]
    results = {backend: soak(args, backend) for backend in backends}
    section = render(results, (start_load, loadavg()))
    print(section)
    if not args.no_write:
        write_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
