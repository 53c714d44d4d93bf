"""Instructions per `snmp.get` job: the poller against the bare floor, counted by callgrind.

    .venv/bin/python bench/callgrind.py                      # ~3 min: poller (netsnmp) and bare
    .venv/bin/python bench/callgrind.py --candidate /tmp/copy  # and a changed copy of `poller/`
    .venv/bin/python bench/callgrind.py --candidate /tmp/a --candidate /tmp/b --keep /tmp/cg

CPU time per job moves with the machine's load (other processes' cache misses, the scheduler
waking threads late); an instruction count does not, so it shows a change of a few per cent
in one run on a busy shared host where `bench/run.py` needs many rounds to. What it does not
see: the kernel's share (system calls, thread wake-ups, about a fifth of the poller's CPU) and
how threads wait for each other (valgrind runs one thread at a time), so a change of the thread
pool is measured with `bench/run.py`, not here.

Each worker runs under `valgrind --tool=callgrind` with counting off; the driver of
`bench/run.py` (64 jobs in flight, the same job as there) warms it up, counting is switched on
for `--jobs` jobs and off again (`callgrind_control`), and the count is divided by the jobs.
The workers: `poller run` (netsnmp backend, concurrency 64, 64 jobs at once per device, JSON
log line per job) and the bare pika + ezsnmp worker of `bench/snmp_workers.py`. Each
`--candidate` (a directory holding a copy of `poller/`, named by the directory) is counted
after the repository's own `poller`, in the order given. Prints a table; writes nothing, unless
`--keep DIR` (the callgrind files, for `callgrind_annotate`). Needs valgrind. Only the
processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import snmp_agent, vhost  # noqa: E402
from run import WORKERS, Driver, get_job, poller_source  # noqa: E402

from poller import wire  # noqa: E402
from tests.support.poller_proc import PollerFactory  # noqa: E402
from tests.support.procs import stop_process  # noqa: E402


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def instructions(out: Path) -> int:
    """The instructions counted in every dump of `out` (its `totals:` lines)."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


@dataclass
class Counting:
    """What every worker's count needs: the driver on its loop, the job, the options."""

    loop: asyncio.AbstractEventLoop
    driver: Driver
    job: dict[str, object]
    work: Path
    args: argparse.Namespace

    def count(self, sid: str, pid: int) -> int:
        """Warm up, then count `args.jobs` jobs: how many were answered."""
        source = poller_source(sid, self.job)
        warm = self.loop.run_until_complete(
            self.driver.round(source, window=64, seconds=600, max_jobs=self.args.warmup)
        )
        if warm.jobs < self.args.warmup or warm.errors:
            sys.exit(f"{sid}: warm-up failed ({warm.jobs} jobs, {warm.errors} errors)")
        control("-i", "on", str(pid))
        done = self.loop.run_until_complete(
            self.driver.round(source, window=64, seconds=1200, max_jobs=self.args.jobs)
        )
        control("-i", "off", str(pid))
        control("-d", str(pid))
        if done.errors or done.lost:
            sys.exit(f"{sid}: {done.errors} errors, {done.lost} lost")
        return done.jobs

    def poller(self, factory: PollerFactory, name: str, path: str | None) -> tuple[str, int, int]:
        """`poller run` (from `path`, a copy of `poller/`, when given) under callgrind."""
        out = self.work / f"{name}.callgrind"
        env = dict(os.environ)
        if path:
            os.environ["PYTHONPATH"] = os.pathsep.join([path, str(ROOT)])
            os.environ["PYTHONSAFEPATH"] = "1"  # see bench/run.py, start_poller
        try:
            pp = factory(
                f"cg-{name}",
                wait=False,
                wrap=callgrind(out),
                concurrency=64,
                per_device_concurrency=64,
                snmp_backend="netsnmp",
                heartbeat_interval=10,
                log_level="info",
            )
        finally:
            os.environ.clear()
            os.environ.update(env)
        try:
            pp.wait_ready(timeout=600)
            jobs = self.count(f"cg-{name}", pp.pid)
        finally:
            pp.terminate(timeout=120)
        return f"{name}, netsnmp backend", jobs, instructions(out)

    def bare(self, dsn: str) -> tuple[str, int, int]:
        """The bare pika + ezsnmp worker of `bench/snmp_workers.py` under callgrind."""
        sid = "cg-bare"
        queue = wire.jobs_queue(sid)
        self.loop.run_until_complete(self.driver.declare_jobs_queue(queue, sid, "quorum"))
        out = self.work / "bare.callgrind"
        argv = [sys.executable, str(WORKERS), "bare", "--dsn", dsn, "--lib", "ezsnmp"]
        proc = subprocess.Popen(
            [*callgrind(out), *argv, "--queue", queue, "--sid", sid],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            wait_for(proc, lambda text: "ready" in text)
            jobs = self.count(sid, proc.pid)
        finally:
            stop_process(proc, grace=120)
        return "bare pika worker, ezsnmp", jobs, instructions(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs counted per worker")
    ap.add_argument("--warmup", type=int, default=300, help="jobs before counting")
    ap.add_argument(
        "--candidate",
        action="append",
        default=[],
        help="also count `poller run` from this directory holding a copy of `poller/` (repeatable)",
    )
    ap.add_argument("--keep", help="copy the callgrind files into this directory")
    args = ap.parse_args()
    args.jobs = max(100, min(args.jobs, 20_000))
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind (callgrind) is needed")
    work = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    loop = asyncio.new_event_loop()
    rows: list[tuple[str, int, int]] = []
    try:
        with vhost() as vh, snmp_agent() as (host, port, _agent):
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            counting = Counting(loop, driver, get_job(host, port), work, args)
            factory = PollerFactory(vh, work)
            pollers: list[tuple[str, str | None]] = [("poller", None)]
            for path in args.candidate:
                resolved = Path(path).resolve()
                pollers.append((resolved.name or "candidate", str(resolved)))
            try:
                for name, path in pollers:
                    rows.append(counting.poller(factory, name, path))
                    print(f"{rows[-1][0]}: {rows[-1][2] / rows[-1][1]:,.0f} instr./job", flush=True)
                rows.append(counting.bare(vh.dsn))
                print(f"{rows[-1][0]}: {rows[-1][2] / rows[-1][1]:,.0f} instr./job", flush=True)
            finally:
                loop.run_until_complete(driver.close())
                for started in factory.started:
                    started.kill()
    finally:
        loop.close()
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            for found in work.glob("*.callgrind*"):
                shutil.copy2(found, keep / found.name)
        shutil.rmtree(work, ignore_errors=True)
    floor = rows[-1][2] / rows[-1][1]
    print("\n| worker | jobs counted | instructions/job | vs the bare floor |")
    print("| --- | ---: | ---: | ---: |")
    for name, jobs, total in rows:
        print(f"| {name} | {jobs:,} | {total / jobs:,.0f} | {total / jobs / floor:.2f}x |")
    return 0


def wait_for(proc: subprocess.Popen[bytes], ready: Callable[[str], bool]) -> None:
    """Read the worker's output until it says it is ready (bounded: it exits or says so)."""
    assert proc.stdout is not None
    seen = ""
    for _ in range(10_000):
        chunk = os.read(proc.stdout.fileno(), 256)
        if not chunk:
            sys.exit("the bare worker exited before it was ready")
        seen += chunk.decode(errors="replace")
        if ready(seen):
            return
    sys.exit("the bare worker did not say it was ready")


if __name__ == "__main__":
    sys.exit(main())
