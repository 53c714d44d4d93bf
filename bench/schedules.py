"""Schedules of `satellite serve`: 10,000 targets every 60 s on 2 replicas (one PostgreSQL).

Two real `satellite serve` processes run one schedule; a consumer reads the satellite's queue and
notes when each job id arrives. Measured:

* **evenness**: jobs arriving per second over one whole interval (min, max, mean, stdev);
* **CPU per job**: user+system CPU of both replicas over that interval (from /proc), divided by
  the jobs published in it (everything the processes do: claims, publishes, idle ticks);
* **store rows per job**: history rows, and outbox rows left, per job published;
* **duplicates / missing**: ids seen twice; (slot, target) pairs of the whole interval not seen;
* **takeover**: a second schedule of the same targets with `spread: false` claims all 10,000 at
  its slot's start; right then the replica holding outbox rows is SIGKILLed, and the time from
  the kill to the last of its rows arriving on the broker (published by the other) is measured.

Usage: `.venv/bin/python bench/schedules.py [--targets N] [--every S]` (default 10,000 and 60;
about 3 intervals). Needs RabbitMQ and PostgreSQL on loopback; writes `## Schedules` in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import pg_database, vhost, write_section  # noqa: E402

from poller import wire  # noqa: E402
from satellite.cli import main as satellite_cli  # noqa: E402
from satellite.service.settings import parse_database_url  # noqa: E402
from satellite.service.store import Store  # noqa: E402
from satellite.service.store.tables import schedule_outbox  # noqa: E402
from tests.support.procs import stop_process  # noqa: E402

SID = "benchsched"
TICKS = os.sysconf("SC_CLK_TCK")


class Collector:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seen: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.dsn))
        ch = conn.channel()
        ch.basic_qos(prefetch_count=1000)

        def got(_c: Any, _m: Any, _p: Any, body: bytes) -> None:
            self.seen.append((json.loads(body)["id"], time.time()))

        ch.basic_consume(wire.jobs_queue(SID), got, auto_ack=True)
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def write_file(path: Path, targets: int, every: int, *, spread: bool, name: str) -> None:
    csv = path.parent / "targets.csv"
    csv.write_text("".join(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}\n" for i in range(targets)))
    path.write_text(
        "schedules:\n"
        f"  - name: {name}\n"
        f"    satellite: {SID}\n"
        f"    every: {every}\n"
        "    kind: icmp.ping\n"
        "    timeout: 5\n"
        "    overlap: queue\n"
        f"    spread: {'true' if spread else 'false'}\n"
        "    targets_file: targets.csv\n"
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "satellite", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def replica_of(log: Path) -> str:
    for _ in range(600):
        for line in log.read_text(errors="replace").splitlines():
            if '"core_started"' in line:
                return str(json.loads(line)["replica"])
        time.sleep(0.1)
    sys.exit(f"no core_started in {log}")


async def sql(url: str, query: str) -> list[Any]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(query, timeout=30))
    finally:
        await conn.close(timeout=10)


async def delete_window(url: str, rows: int = 42, rounds: int = 200) -> tuple[float, float]:
    """Median and p99 (ms) of the DELETE + COMMIT that follows a batch's confirms: the window in
    which a replica killed after the broker's confirm leaves a row that is published again."""
    store = await Store.open(parse_database_url(url))
    times: list[float] = []
    try:
        for r in range(rounds):
            ids = [f"w:{r}:{i}" for i in range(rows)]
            values = [
                {
                    "id": i,
                    "schedule": "w",
                    "satellite_id": SID,
                    "body": {},
                    "not_after": 0.0,
                    "owner": "bench",
                    "lease_until": 0.0,
                }
                for i in ids
            ]
            async with store.engine.begin() as conn:
                await conn.execute(schedule_outbox.insert(), values)
            start = time.perf_counter()
            async with store.engine.begin() as conn:
                await conn.execute(schedule_outbox.delete().where(schedule_outbox.c.id.in_(ids)))
            times.append((time.perf_counter() - start) * 1000)
    finally:
        await store.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> None:  # noqa: PLR0915 - one measurement after the other
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=60)
    args = parser.parse_args()
    cleanup = contextlib.ExitStack()  # the database, dropped at the end
    url = cleanup.enter_context(pg_database("bench_sched"))
    work = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with vhost() as vh:
            assert satellite_cli(["declare", SID, "--dsn", vh.dsn]) == 0
            path = work / "schedules.yaml"
            write_file(path, args.targets, args.every, spread=True, name="even")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
            env |= {
                "US_AMQP_DSN": vh.dsn,
                "USM_CORE_DB": url,
                "USM_CORE_SCHEDULES_FILE": str(path),
                "USM_CORE_LOG_FORMAT": "json",
            }
            collector = Collector(vh.dsn)
            logs = [work / "serve-0.log", work / "serve-1.log"]
            for n, log in enumerate(logs):
                state = work / f"state-{n}"
                run = state / "run"
                run.mkdir(parents=True)
                procs.append(
                    start(
                        env
                        | {
                            "USM_CORE_STATE_DIR": str(state),
                            "USM_CORE_LISTEN": f"unix:{run / 'api.sock'}",
                        },
                        log,
                    )
                )
            replicas = [replica_of(log) for log in logs]
            # One whole interval, measured from its start to its end.
            t0 = (time.time() // args.every + 1) * args.every
            time.sleep(max(0.0, t0 - time.time()))
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            time.sleep(args.every)
            cpu1 = sum(cpu_seconds(p.pid) for p in procs)
            time.sleep(2)
            window = [(i, at) for i, at in collector.seen if i.split(":")[1] == str(int(t0))]
            per_second = [0] * args.every
            for _, at in window:
                if t0 <= at < t0 + args.every:
                    per_second[int(at - t0)] += 1
            ids = [i for i, _ in collector.seen]
            dup = len(ids) - len(set(ids))
            missing = args.targets - len({i for i, _ in window})
            history = asyncio.run(sql(url, "SELECT count(*) FROM jobs"))[0][0]
            outbox = asyncio.run(sql(url, "SELECT count(*) FROM schedule_outbox"))[0][0]
            published = len(set(ids))
            mean = statistics.mean(per_second)
            even = (
                f"min {min(per_second)}, max {max(per_second)}, mean {mean:.1f}, "
                f"stdev {statistics.pstdev(per_second):.1f} jobs/s"
            )
            cpu_ms = (cpu1 - cpu0) * 1000 / max(1, len(window))

            # Takeover: the same targets unspread, all claimed at once at a slot's start.
            write_file(path, args.targets, args.every, spread=False, name="burst")
            for p in procs:
                p.send_signal(signal.SIGHUP)
            t1 = (time.time() // args.every + 1) * args.every
            time.sleep(max(0.0, t1 - time.time()))
            victim, owner = None, ""
            for _ in range(200):
                rows = asyncio.run(
                    sql(url, "SELECT owner, count(*) AS n FROM schedule_outbox GROUP BY owner")
                )
                if rows:
                    owner = max(rows, key=lambda r: r["n"])["owner"]
                    victim = procs[replicas.index(owner)]
                    victim.send_signal(signal.SIGSTOP)  # frozen: its rows stay as they are
                    break
                time.sleep(0.01)
            left_ids: set[str] = set()
            if victim is not None:
                left_ids = {
                    r["id"]
                    for r in asyncio.run(
                        sql(url, f"SELECT id FROM schedule_outbox WHERE owner = '{owner}'")
                    )
                }
                victim.kill()
            killed = time.time()
            deadline = time.time() + 60
            while time.time() < deadline:
                arrived = {i: at for i, at in collector.seen if i in left_ids}
                if len(arrived) >= len(left_ids):
                    break
                time.sleep(0.2)
            arrived = {i: at for i, at in collector.seen if i in left_ids}
            takeover = max(arrived.values()) - killed if arrived else float("nan")
            first_after = min(arrived.values()) - killed if arrived else float("nan")
            collector.stop()
            burst_ids = [i for i, _ in collector.seen if i.startswith("burst:")]
            burst_dup = len(burst_ids) - len(set(burst_ids))
            window_median, window_p99 = asyncio.run(delete_window(url))
    finally:
        for p in procs:
            stop_process(p, grace=40)
        cleanup.close()
    load = os.getloadavg()
    section = f"""## Schedules

`bench/schedules.py --targets {args.targets} --every {args.every}` ({time.strftime("%Y-%m-%d")},
2 shared cores): two `satellite serve` replicas on one PostgreSQL 15, one schedule of
{args.targets:,} `icmp.ping` targets every {args.every} s (spread), a consumer on the
satellite's queue. One whole interval:

| measure | value |
| --- | --- |
| jobs of the interval on the broker | {len({i for i, _ in window}):,} of {args.targets:,} |
| missing | {missing} |
| arrivals per second | {even} |
| CPU of both replicas per job (claim + publish + everything else they did) | {cpu_ms:.2f} ms |
| history rows per job published | {history / max(1, published):.2f} (outbox rows left: {outbox}) |
| ids seen twice (whole run) | {dup} |

Takeover: the same {args.targets:,} targets with `spread: false` (all claimed at the slot's
start); the replica holding outbox rows was SIGSTOPped as soon as it had some, its rows
counted, then SIGKILLed:
{len(left_ids):,} rows were left; the first reached the broker {first_after:.1f} s after the kill,
the last {takeover:.1f} s after (lease {5} s, takeover looked for once a second); ids of that
slot seen twice: {burst_dup}.

The duplicate window (a replica killed between the broker's confirms and the DELETE + COMMIT
of their outbox rows; the one case that publishes a job twice): that DELETE + COMMIT of 42 rows
(one tick's claim here) took {window_median:.1f} ms median, {window_p99:.1f} ms p99 (200 rounds).

Load average at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}.
"""
    print(section)
    write_section("## Schedules", section)


if __name__ == "__main__":
    main()
