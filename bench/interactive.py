"""Interactive lane benchmark: latency of jobs someone waits for, idle vs behind 10,000 bulk jobs.

    .venv/bin/python bench/interactive.py              # writes docs/performance.md
    .venv/bin/python bench/interactive.py --no-write --rounds 1 --backlog 2000 --jobs 20

Side by side in one run (every scenario in each of `--rounds` rounds, a fresh poller per
round; the table gives medians and ranges), against the real RabbitMQ (a vhost of its own),
the real Net-SNMP agent and real `poller run` processes with the default settings
(concurrency 64, 8 run slots kept for the lane, 4 jobs at once per device, prefetch 512):

- *idle*: `--jobs` `snmp.get` jobs to snmpd through the interactive lane
  (`<id>.interactive`), one at a time as an operator clicking would send them, with
  `--gap` seconds between an answer and the next job;
- *10,000 bulk jobs queued ahead*: the same, after `--backlog` bulk `snmp.get` jobs were
  published to the satellite's bulk key for slow devices (32 loopback addresses answering every
  request after a delay, served by this process), so that the poller's bulk run slots stay full
  for the whole measurement (the backlog left at its end is in the table). Once per delay of
  `--delays`: 50 ms keeps the poller busy with about 1,100 bulk jobs/s (the cores are the
  limit), 500 ms with about 110/s (the run slots are);
- *bulk key, AMQP priority 9*: what a core without the lane could try: the same jobs published
  to the bulk key with `priority=9` behind the same backlog (RabbitMQ 3.x quorum queues ignore
  priorities, and a prioritised job still waits behind the poller's prefetched window). Each
  job waits for at most `--limit` seconds.

Latency = publish → the result in the caller's reply queue (the `reply_to` of `satellite
call`), measured with one monotonic clock. Every loop is bounded; traffic stays on loopback.
The table goes into docs/performance.md under `## Interactive lane` (only that section is
replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
from common import DOC, snmp_agent, vhost, write_section  # noqa: E402

from poller import wire  # noqa: E402
from tests.support.poller_proc import PollerFactory, snmp_job  # noqa: E402
from tests.support.slow_snmp import SlowSnmpAgents  # noqa: E402

HEADING = "## Interactive lane"
IDLE = "idle poller, interactive lane"
PRIORITY = "bulk backlog queued ahead, bulk key with priority 9"
DEVICES = 32


def behind(delay: float) -> str:
    return f"bulk backlog queued ahead ({delay * 1000:g} ms devices), interactive lane"


def bulk_hosts(index: int) -> list[str]:
    """The slow devices of the `index`th delay: 127.0.<2 + index>.1-32."""
    return [f"127.0.{2 + index}.{n}" for n in range(1, DEVICES + 1)]


@dataclass(frozen=True)
class Backlog:
    hosts: list[str]
    port: int
    delay: float


@dataclass(frozen=True)
class Cell:
    name: str
    latencies: list[float]  # ms, of the jobs answered within the limit
    in_poller: list[float]  # ms, their `duration_ms`: from delivery to result, in the poller
    sent: int
    ok: int
    backlog_after: int | None  # bulk jobs still queued when the last job was answered

    def pct(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Caller:
    """Publishes jobs with `reply_to` and waits for each reply, like `satellite call`."""

    def __init__(self, dsn: str, sid: str) -> None:
        self.sid = sid
        self.conn = pika.BlockingConnection(pika.URLParameters(dsn))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.reply = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(
            self.reply, wire.results_exchange(), wire.reply_binding_key(self.reply)
        )
        self.bulk = self.conn.channel()  # no confirms: the backlog goes out fast

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()

    def depth(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.message_count
        return count

    def backlog(self, devices: Backlog, count: int) -> None:
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        hosts = devices.hosts
        for n in range(count):
            job = snmp_job(hosts[n % len(hosts)], devices.port, job_id=f"bulk-{n}", timeout=60)
            self.bulk.basic_publish(
                wire.jobs_exchange(), wire.jobs_routing_key(self.sid), json.dumps(job), props
            )
        # A synchronous call on the same channel: the broker has routed every publish before.
        self.bulk.queue_declare(wire.jobs_queue(self.sid), passive=True)

    def call(
        self, job: dict[str, Any], *, lane: wire.Lane, limit: float, **props: Any
    ) -> tuple[float, float]:
        """Seconds to the answer (inf when none within `limit`) and its `duration_ms`."""
        started = time.monotonic()
        self.channel.basic_publish(
            wire.jobs_exchange(),
            wire.lane_routing_key(self.sid, lane),
            json.dumps(job),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=job["id"],
                reply_to=self.reply,
                **props,
            ),
        )
        while time.monotonic() - started < limit:
            method, _props, body = self.channel.basic_get(self.reply, auto_ack=True)
            if method is None:
                self.conn.sleep(0.001)
                continue
            result = wire.decode_result(body)
            if result.job_id == job["id"]:
                return time.monotonic() - started, result.duration_ms
        return float("inf"), float("nan")


def run_cell(
    name: str,
    caller: Caller,
    agent: tuple[str, int],
    args: argparse.Namespace,
    *,
    lane: wire.Lane = "interactive",
    backlog: Backlog | None = None,
    **props: Any,
) -> Cell:
    if backlog is not None:
        caller.backlog(backlog, args.backlog)
    latencies: list[float] = []
    in_poller: list[float] = []
    ok = 0
    for n in range(args.jobs):
        job = snmp_job(*agent, job_id=f"{uuid.uuid4().hex[:6]}-{n}", timeout=10)
        seconds, duration_ms = caller.call(job, lane=lane, limit=args.limit, **props)
        if seconds != float("inf"):
            latencies.append(seconds * 1000)
            in_poller.append(duration_ms)
            ok += 1
        time.sleep(args.gap)
    left = caller.depth(wire.jobs_queue(caller.sid)) if backlog is not None else None
    cell = Cell(name, latencies, in_poller, args.jobs, ok, left)
    print(
        f"{name}: p50 {cell.pct(0.5):.1f} ms p99 {cell.pct(0.99):.1f} ms "
        f"(in the poller p50 {cell.pct(0.5, in_poller):.1f} p99 {cell.pct(0.99, in_poller):.1f}) "
        f"({ok}/{args.jobs} answered), backlog left {left}",
        flush=True,
    )
    if backlog is not None:
        caller.channel.queue_purge(wire.jobs_queue(caller.sid))
        time.sleep(backlog.delay * 10)  # the jobs the poller holds finish
    return cell


def run_round(
    factory: PollerFactory,
    dsn: str,
    agent: tuple[str, int],
    backlogs: list[Backlog],
    args: argparse.Namespace,
) -> list[Cell]:
    sid = f"bench{uuid.uuid4().hex[:8]}"
    poller = factory(sid)
    caller = Caller(dsn, sid)
    try:
        warm = argparse.Namespace(**{**vars(args), "jobs": 10})
        run_cell("warm-up (not reported)", caller, agent, warm)
        cells = [run_cell(IDLE, caller, agent, args)]
        for n, backlog in enumerate(backlogs):
            cells.append(run_cell(behind(backlog.delay), caller, agent, args, backlog=backlog))
            if n == 0 and args.priority_jobs:
                # Right after the fastest backlog: the poller holds only its jobs.
                few = argparse.Namespace(**{**vars(args), "jobs": args.priority_jobs})
                cells.append(
                    run_cell(PRIORITY, caller, agent, few, lane="bulk", backlog=backlog, priority=9)
                )
        return cells
    finally:
        caller.close()
        poller.kill()


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mid = statistics.median(values)
    if len(values) == 1:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def section(rounds: list[list[Cell]], args: argparse.Namespace) -> str:
    names = [c.name for c in rounds[0]]
    ratios: dict[float, list[float]] = {d: [] for d in args.delay_list}
    for cells in rounds:
        by = {c.name: c for c in cells}
        for d in args.delay_list:
            if by[IDLE].latencies and by[behind(d)].latencies:
                ratios[d].append(by[behind(d)].pct(0.99) / by[IDLE].pct(0.99))
    lines = [
        HEADING,
        "",
        f"`bench/interactive.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}, RabbitMQ and Net-SNMP "
        "snmpd on loopback, a new `poller run` per round with the default settings "
        "(concurrency 64, `USM_POLLER_INTERACTIVE_SLOTS` 8, lane window 16, 4 jobs at once "
        f"per device, prefetch 512). {args.jobs} `snmp.get` jobs to snmpd, one at a time "
        f"({args.gap:g} s between an answer and the next job), as `satellite call` sends them: "
        "to the interactive lane, with `reply_to`. Latency = publish → the result in the "
        f"caller's reply queue. Backlog: {args.backlog:,} bulk `snmp.get` jobs published to "
        f"the bulk key just before, for {DEVICES} devices answering after a delay (a row per "
        "delay), which keep the poller's bulk run slots full for the whole measurement (the "
        "backlog left when the last job was answered is in the table); time in the poller = "
        "the result's `duration_ms`, the rest is the broker and the client. "
        f"Figures are medians (min-max) of {len(rounds)} rounds; load average (1 min) at the "
        f"start and end: {args.load_start:.1f} and {os.getloadavg()[0]:.1f}.",
        "",
        "| scenario | p50 | p99 | p50 in the poller | p99 in the poller | answered | "
        "bulk backlog left |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        cells = [next(c for c in r if c.name == name) for r in rounds]
        left = [float(c.backlog_after) for c in cells if c.backlog_after is not None]
        lines.append(
            f"| {name} | {median_range([c.pct(0.5) for c in cells])} ms | "
            f"{median_range([c.pct(0.99) for c in cells])} ms | "
            f"{median_range([c.pct(0.5, c.in_poller) for c in cells])} ms | "
            f"{median_range([c.pct(0.99, c.in_poller) for c in cells])} ms | "
            f"{sum(c.ok for c in cells)}/{sum(c.sent for c in cells)} | "
            f"{median_range(left, '{:,.0f}')} |"
        )
    lines.append("")
    for d, values in ratios.items():
        ratio = statistics.median(values) if values else float("nan")
        verdict = "meets" if ratio <= 2 else "misses"
        lines.append(
            f"- Behind the backlog of {d * 1000:g} ms devices, the lane's p99 is {ratio:.1f}x "
            f"its p99 on the idle poller (median of the rounds; per round "
            f"{median_range(values, '{:.1f}x')}), which {verdict} the goal of at most 2x."
        )
    lines.append(
        "- The lane's jobs never queue behind the bulk backlog or the bulk window (their own "
        "queue, channel and window) and take one of the 8 run slots bulk jobs may not use. "
        "What they still share with the backlog is the event loop, the broker and the cores: "
        "with 50 ms devices the poller runs about 1,100 bulk jobs/s, each a delivery, a "
        "result, a confirm, an ack and a log line, on the 2 cores it shares with the broker, "
        "this benchmark and its slow devices, and that costs the lane's jobs milliseconds "
        "both in the poller (its event loop) and outside it (the broker). With 500 ms "
        "devices (run slots full, cores mostly idle) the lane's p50 is the idle poller's."
    )
    lines.append(
        "- A p99 of 100 jobs is their second slowest: one scheduling hiccup of the machine "
        "moves it. These figures were taken on a 2-core machine shared with other test runs "
        "(see the load average above); compare rows of the same run only, and rerun on a quiet "
        "host before reading much into the ratios."
    )
    if any(c.name == PRIORITY for c in rounds[0]):
        lines.append(
            f"- The bulk key with AMQP priority 9 (limit {args.limit:g} s per job): the job "
            "waits behind the backlog like any other, since RabbitMQ 3.x quorum queues "
            "have no priorities (and then, in the poller, behind the jobs it already holds: the "
            "time in the poller); jobs not answered within the limit are not in the "
            "percentiles."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="interactive jobs per cell")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between jobs")
    parser.add_argument("--backlog", type=int, default=10_000, help="bulk jobs queued ahead")
    parser.add_argument(
        "--delays", default="0.05,0.5", help="slow devices' answer delays, seconds, comma-separated"
    )
    parser.add_argument("--priority-jobs", type=int, default=1, help="0: skip that scenario")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds per job at most")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    args = parser.parse_args()
    args.load_start = os.getloadavg()[0]
    args.delay_list = [float(d) for d in args.delays.split(",") if d.strip()]
    rounds: list[list[Cell]] = []
    with (
        vhost() as vh,
        snmp_agent() as (agent_host, agent_port, _agent_pid),
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="bench-poller-") as tmp,
    ):
        backlogs = []
        for i, delay in enumerate(args.delay_list):
            hosts = bulk_hosts(i)
            slow = stack.enter_context(SlowSnmpAgents(hosts, delay=delay, max_seconds=3600))
            backlogs.append(Backlog(hosts, slow.port, delay))
        factory = PollerFactory(vh, Path(tmp))
        try:
            for r in range(max(1, args.rounds)):
                print(f"round {r + 1} of {args.rounds}", flush=True)
                rounds.append(run_round(factory, vh.dsn, (agent_host, agent_port), backlogs, args))
        finally:
            for poller in factory.started:
                poller.kill()
    text = section(rounds, args)
    print()
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
        print(f"written to {DOC.relative_to(ROOT)} under {HEADING!r}")


if __name__ == "__main__":
    main()
