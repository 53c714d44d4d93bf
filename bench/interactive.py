"""Interactive lane benchmark: latency of jobs someone waits for, idle vs behind 10,000 bulk jobs.

    .venv/bin/python bench/interactive.py              # writes docs/performance.md
    .venv/bin/python bench/interactive.py --no-write --rounds 1 --backlog 2000 --jobs 100
    .venv/bin/python bench/interactive.py --variant pause --variant "off:interactive_pause_ms=0"

Without `--variant`, two: *defaults* (the lane in a process of its own beside each replica,
`USM_POLLER_INTERACTIVE_PROCESS=true`, poller/laneproc.py), and *in-process lane*
(`USM_POLLER_INTERACTIVE_PROCESS=false`: the replica consumes and runs the lane itself).

Side by side in one run (every scenario in each of `--rounds` rounds, a fresh poller per
round and per `--variant` (poller settings), taken in turn, the order swapped every round; the
table gives medians and ranges), against the real RabbitMQ (a vhost of its own), the real Net-SNMP
agent and real `poller run` processes with the default settings (concurrency 64, 8 run slots
kept for the lane, 4 jobs at once per device, prefetch 512):

- *idle*: `--jobs` `snmp.get` jobs to snmpd through the interactive lane
  (`<id>.interactive`), one at a time as an operator clicking would send them, with
  `--gap` seconds between an answer and the next job;
- *10,000 bulk jobs queued ahead*: the same, with `--backlog` bulk `snmp.get` jobs queued on
  the satellite's bulk key for slow devices (32 loopback addresses answering every request
  after a delay, served by a child process), topped up to `--backlog` before every `--batch`
  jobs, so that the poller's bulk run slots stay full for the whole measurement (the least
  backlog left before a top-up is in the table). Once per delay of `--delays`: 50 ms keeps
  the poller busy with about 1,100 bulk jobs/s (the cores are the limit), 500 ms with about
  110/s (the run slots are);
- *bulk key, AMQP priority 9*: what a core without the lane could try: the same jobs published
  to the bulk key with `priority=9` behind the same backlog (RabbitMQ 3.x quorum queues ignore
  priorities, and a prioritised job still waits behind the poller's prefetched window). Each
  job waits for at most `--limit` seconds.

Latency = publish → the result in the caller's hands (the caller consumes its reply queue,
like `satellite call`), measured with one monotonic clock, and split with the result's
`started_at` and `finished_at` (wall clocks of the same host) into the time to the poller, in
it and back. A p99 of 100 jobs is their second slowest: hence 300 per scenario and round, and
the p99 of every round's jobs together besides the per-round ones. Every loop is bounded;
traffic stays on loopback. The table goes into docs/performance.md under `## Interactive
lane` (only that section is replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
import pika.exceptions  # noqa: E402
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
class Variant:
    """A poller's settings to compare (`--variant LABEL[:SETTING=VALUE,...]`; settings by their
    `USM_POLLER_` name in lower case, e.g. `interactive_pause_ms=0`)."""

    label: str
    settings: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        label, _, rest = text.partition(":")
        pairs = [p.split("=", 1) for p in rest.split(",") if p.strip()]
        if not label.strip() or any(len(p) != 2 for p in pairs):
            raise argparse.ArgumentTypeError(f"not LABEL[:SETTING=VALUE,...]: {text!r}")
        return cls(label.strip(), {k.strip().lower(): v.strip() for k, v in pairs})

    def describe(self) -> str:
        if not self.settings:
            return f"*{self.label}*: the defaults"
        pairs = ", ".join(f"`USM_POLLER_{k.upper()}={v}`" for k, v in self.settings.items())
        return f"*{self.label}*: {pairs}"


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
    to_poller: list[float]  # ms, publish → the job's `started_at` (broker, delivery, loop)
    to_bystander: list[float]  # ms, publish → a copy of the job in a bystander's hands
    back: list[float]  # ms, the result's `finished_at` → in the caller's hands
    sent: int
    ok: int
    backlog_after: int | None  # bulk jobs still queued when the last job was answered
    bulk_per_s: float | None = None  # bulk jobs taken from the backlog per second meanwhile

    def pct(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Answer:
    seconds: float  # publish → the result in the caller's hands (inf: none within the limit)
    duration_ms: float  # the result's own, in the poller
    to_poller_ms: float  # publish → the result's `started_at` (wall clocks of one host)
    back_ms: float  # the result's `finished_at` → received
    published: float = math.nan  # wall clock


MISSED = Answer(float("inf"), float("nan"), float("nan"), float("nan"))


class Caller:
    """Publishes jobs with `reply_to` and waits for each reply, like `satellite call`.

    The reply queue is consumed (not polled with `basic.get`): an answer is in hand as soon
    as the broker sends it, and the caller adds no requests of its own to the broker's load.
    """

    def __init__(self, dsn: str, sid: str) -> None:
        self.sid = sid
        self.conn = pika.BlockingConnection(pika.URLParameters(dsn))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.reply = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(
            self.reply, wire.results_exchange(), wire.reply_binding_key(self.reply)
        )
        self._inbox: list[tuple[float, bytes]] = []
        self.channel.basic_consume(self.reply, self._on_reply, auto_ack=True)
        self.bulk = self.conn.channel()  # no confirms: the backlog goes out fast

    def _on_reply(self, _channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        self._inbox.append((time.time(), body))

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()

    def depth(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.message_count
        return count

    def backlog(self, devices: Backlog, count: int, first: int = 0) -> None:
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        hosts = devices.hosts
        for n in range(first, first + count):
            job = snmp_job(hosts[n % len(hosts)], devices.port, job_id=f"bulk-{n}", timeout=60)
            self.bulk.basic_publish(
                wire.jobs_exchange(), wire.jobs_routing_key(self.sid), json.dumps(job), props
            )
        # A synchronous call on the same channel: the broker has routed every publish before.
        self.bulk.queue_declare(wire.jobs_queue(self.sid), passive=True)

    def call(self, job: dict[str, Any], *, lane: wire.Lane, limit: float, **props: Any) -> Answer:
        """The answer to `job`, or `MISSED` when none came within `limit` seconds."""
        self._inbox.clear()
        published = time.time()
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
        while (left := limit - (time.monotonic() - started)) > 0:
            self.conn.process_data_events(time_limit=min(left, 0.5))
            for received, body in self._inbox:
                result = wire.decode_result(body)
                if result.job_id == job["id"]:
                    return Answer(
                        time.monotonic() - started,
                        result.duration_ms,
                        (result.started_at.timestamp() - published) * 1000,
                        (received - result.finished_at.timestamp()) * 1000,
                        published,
                    )
            self._inbox.clear()
        return MISSED


class Bystander:
    """A copy of every interactive job, in a quorum queue of its own bound to the lane's key,
    consumed by a process of its own that notes when each copy arrives: publish → its hands
    is what the broker and the host take to deliver a lane job to a consumer that does
    nothing else, the share of *to the poller* the poller cannot shorten."""

    def __init__(self, dsn: str, sid: str, channel: Any, path: Path) -> None:
        self.path = path
        self.queue = f"bench-bystander-{sid}"
        self.channel = channel
        channel.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(
            self.queue, wire.jobs_exchange(), wire.lane_routing_key(sid, "interactive")
        )
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bystander", dsn, self.queue, str(path)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if not self.proc.stdout.readline().strip():
            sys.exit("the bystander did not start")

    def seen(self) -> dict[str, float]:
        """Job id → when its copy arrived (wall clock), for every copy so far."""
        time.sleep(0.2)  # the last job's copy is written
        got = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text(encoding="utf-8").splitlines():
                job_id, _, at = line.partition(" ")
                got[job_id] = float(at)
        return got

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.channel.queue_delete(self.queue)


def serve_bystander(dsn: str, queue: str, path: str) -> None:
    """`--bystander`: consume `queue`, write `<job id> <wall clock>` per copy to `path`."""
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    channel = conn.channel()
    with open(path, "a", encoding="utf-8") as out:

        def on_copy(_ch: Any, _method: Any, props: Any, _body: bytes) -> None:
            out.write(f"{props.message_id} {time.time():.6f}\n")
            out.flush()

        channel.basic_consume(queue, on_copy, auto_ack=True)
        print("ready", flush=True)
        end = time.monotonic() + 3600
        while time.monotonic() < end:
            conn.process_data_events(time_limit=1)


def run_cell(
    name: str,
    caller: Caller,
    agent: tuple[str, int],
    args: argparse.Namespace,
    *,
    lane: wire.Lane = "interactive",
    backlog: Backlog | None = None,
    bystander: Bystander | None = None,
    **props: Any,
) -> Cell:
    """`args.jobs` jobs one at a time; with a backlog, it is topped up to `args.backlog` bulk
    jobs before each `args.batch` of them (the same "queued ahead" for every job)."""
    cell = Cell(name, [], [], [], [], [], args.jobs, 0, None)
    sent: dict[str, tuple[float, float]] = {}  # job id → published (wall clock), to the poller
    ok = 0
    published = 0
    lefts: list[int] = []
    taken = 0  # bulk jobs taken from the backlog since `since` (between depth readings)
    since = 0.0
    after = 0  # the depth read right after the last top-up
    for n in range(args.jobs):
        if backlog is not None and n % args.batch == 0:
            depth = caller.depth(wire.jobs_queue(caller.sid))
            if n:
                lefts.append(depth)
                taken += after - depth
            if depth < args.backlog:
                caller.backlog(backlog, args.backlog - depth, published)
                published += args.backlog - depth
            after = caller.depth(wire.jobs_queue(caller.sid))
            if not n:
                since = time.monotonic()
            if depth < args.backlog:
                time.sleep(args.settle)  # the broker has written them
        job = snmp_job(*agent, job_id=f"{uuid.uuid4().hex[:6]}-{n}", timeout=10)
        answer = caller.call(job, lane=lane, limit=args.limit, **props)
        if answer.seconds != float("inf"):
            sent[job["id"]] = (answer.published, answer.to_poller_ms)
            cell.latencies.append(answer.seconds * 1000)
            cell.in_poller.append(answer.duration_ms)
            cell.to_poller.append(answer.to_poller_ms)
            cell.back.append(answer.back_ms)
            ok += 1
        time.sleep(args.gap)
    bulk_per_s = None
    if backlog is not None:
        depth = caller.depth(wire.jobs_queue(caller.sid))
        lefts.append(depth)
        taken += after - depth
        bulk_per_s = taken / max(time.monotonic() - since, 1e-6)
    seen = bystander.seen() if bystander is not None else {}
    # Per job: how much longer it took to reach the poller than its copy the bystander.
    beyond = sorted(to - (seen[i] - t) * 1000 for i, (t, to) in sent.items() if i in seen)
    cell = Cell(
        name,
        cell.latencies,
        cell.in_poller,
        cell.to_poller,
        [(seen[i] - t) * 1000 for i, (t, _) in sent.items() if i in seen],
        cell.back,
        args.jobs,
        ok,
        min(lefts) if lefts else None,
        bulk_per_s,
    )
    print(
        f"{name}: p50 {cell.pct(0.5):.1f} ms p99 {cell.pct(0.99):.1f} ms "
        f"max {max(cell.latencies, default=float('nan')):.1f} ms; p50/p99 to the poller "
        f"{cell.pct(0.5, cell.to_poller):.1f}/{cell.pct(0.99, cell.to_poller):.1f} (a "
        f"bystander {cell.pct(0.5, cell.to_bystander):.1f}/"
        f"{cell.pct(0.99, cell.to_bystander):.1f}), in it "
        f"{cell.pct(0.5, cell.in_poller):.1f}/{cell.pct(0.99, cell.in_poller):.1f}, back "
        f"{cell.pct(0.5, cell.back):.1f}/{cell.pct(0.99, cell.back):.1f} "
        f"({cell.ok}/{args.jobs} answered), least backlog left {cell.backlog_after}, bulk "
        f"{cell.bulk_per_s or float('nan'):.0f} jobs/s; to the "
        f"poller beyond the bystander p50/p90/p99 {cell.pct(0.5, beyond):.1f}/"
        f"{cell.pct(0.9, beyond):.1f}/{cell.pct(0.99, beyond):.1f}",
        flush=True,
    )
    if backlog is not None:
        caller.channel.queue_purge(wire.jobs_queue(caller.sid))
        time.sleep(backlog.delay * 10)  # the jobs the poller holds finish
        # A core consumes the bulk results as they come; nobody does here: drop them, so that
        # the broker does not carry a results queue growing by 1,100 messages a second.
        caller.channel.queue_purge(wire.results_queue())
    return cell


def run_round(
    factory: PollerFactory,
    dsn: str,
    agent: tuple[str, int],
    backlogs: list[Backlog],
    args: argparse.Namespace,
    *,
    variant: Variant,
) -> list[Cell]:
    sid = f"bench{uuid.uuid4().hex[:8]}"
    print(f"variant {variant.describe()}", flush=True)
    poller = factory(sid, wait=True, named=True, **variant.settings)
    caller = Caller(dsn, sid)
    bystander = (
        Bystander(dsn, sid, caller.channel, Path(args.tmp) / f"bystander-{sid}.txt")
        if args.bystander
        else None
    )
    try:
        warm = argparse.Namespace(**{**vars(args), "jobs": 10})
        run_cell("warm-up (not reported)", caller, agent, warm)
        cells = [run_cell(IDLE, caller, agent, args, bystander=bystander)]
        for n, backlog in enumerate(backlogs):
            cells.append(
                run_cell(
                    behind(backlog.delay),
                    caller,
                    agent,
                    args,
                    backlog=backlog,
                    bystander=bystander,
                )
            )
            if n == 0 and args.priority_jobs:
                # Right after the fastest backlog: the poller holds only its jobs.
                few = argparse.Namespace(**{**vars(args), "jobs": args.priority_jobs})
                cells.append(
                    run_cell(PRIORITY, caller, agent, few, lane="bulk", backlog=backlog, priority=9)
                )
        return cells
    finally:
        if bystander is not None:
            bystander.close()
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


def pooled(cells: list[Cell], q: float, field: str = "latencies") -> float:
    """The `q` percentile of every round's jobs together."""
    values = [v for c in cells for v in getattr(c, field)]
    return cells[0].pct(q, values) if values else float("nan")


def section(by_variant: dict[str, list[list[Cell]]], args: argparse.Namespace) -> str:
    rounds = by_variant[args.variants[0].label]
    several = len(by_variant) > 1
    lines = [
        HEADING,
        "",
        f"`bench/interactive.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}, RabbitMQ and Net-SNMP "
        "snmpd on loopback, a new `poller run` per round with the default settings "
        "(concurrency 64, `USM_POLLER_INTERACTIVE_SLOTS` 8, lane window 16, 4 jobs at once "
        f"per device, prefetch 512). {args.jobs} `snmp.get` jobs to snmpd per scenario and "
        f"round, one at a time ({args.gap:g} s between an answer and the next job), as "
        "`satellite call` sends them: to the interactive lane, with `reply_to` (the reply "
        "queue consumed). Latency = publish → the result in the caller's hands. Backlog: "
        f"{args.backlog:,} bulk `snmp.get` jobs queued on the bulk key, topped up to "
        f"{args.backlog:,} before every {args.batch} interactive jobs, for {DEVICES} devices "
        "answering after a delay (a row per delay; served by a process of their own), which "
        "keep the poller's bulk run slots full for the whole measurement (the least backlog "
        "left before a top-up is in the table, and *bulk jobs/s*: the jobs taken from the "
        "backlog per second while the interactive ones ran, from the queue's depth). The "
        "latency split: *to the poller* = publish "
        "→ the job's `started_at` (the broker, the delivery, the poller's event loop until "
        "the job's task runs), *in the poller* = its `duration_ms` (admission, the device, "
        "the result), *back* = its `finished_at` → in the caller's hands (the result's "
        "publish, the broker, the caller). p99 columns: the median (min-max) of the "
        f"rounds' p99, each of {args.jobs} jobs, then in brackets the p99 of all "
        f"{args.jobs * len(rounds)} jobs of the {len(rounds)} rounds together; the other "
        "columns are medians (min-max) of the rounds. Load average (1 min) at the start and "
        f"end: {args.load_start:.1f} and {os.getloadavg()[0]:.1f}."
        + (
            " Each round ran a poller per variant, in turn, the order swapped every round: "
            + "; ".join(v.describe() for v in args.variants)
            + "."
            if several
            else (
                f" Poller settings: {args.variants[0].describe()}."
                if args.variants[0].settings
                else ""
            )
        ),
        "",
        "| scenario | p50 | p99 [all rounds] | max | p99 to the poller | p99 to a bystander | "
        "p99 in the poller | p99 back | answered | least bulk backlog left | bulk jobs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, group in by_variant.items():
        lines.extend(_rows(group, label if several else None))
    lines.append("")
    for label, group in by_variant.items():
        lines.extend(_verdicts(group, args, label if several else None))
    if several:
        lines.extend(_variant_effect(by_variant, args))
    modes = {v.settings.get("interactive_process", "true").lower() for v in args.variants}
    if "false" in modes:
        lines.append(
            "- With the in-process lane (`USM_POLLER_INTERACTIVE_PROCESS=false`) the lane's jobs "
            "never queue behind the bulk backlog or the bulk window (their own "
            "queue, channel and window) and take one of the 8 run slots bulk jobs may not use. "
            "What they share with the backlog is the event loop, the broker and the cores: with "
            "50 ms devices the poller runs about 1,100 bulk jobs/s, each a delivery, a result, a "
            "confirm, an ack and a log line, on the 2 cores it shares with the broker, this "
            "benchmark and its slow devices. From an interactive job's delivery until its result "
            "is confirmed, bulk jobs start nothing and publish nothing "
            '(`USM_POLLER_INTERACTIVE_PAUSE_MS`, docs/operations.md, "Interactive lane"): that '
            "shortens the time *in the poller* and *back*. The rest of the time *to the poller* "
            "is the poller's loop reading the delivery (a turn or more late when the backlog "
            "keeps it busy) and starting the job, which goes ahead of the bulk work already "
            "scheduled."
        )
    lines.append(
        "- Part of the time *to the poller* (the "
        "broker committing the job to the lane's quorum queue and sending it) passes before "
        "the poller knows the job exists: the *bystander* column is that share, a copy of "
        "every lane job (a quorum queue of its own bound to the lane's key) delivered by the "
        "same broker on the same host to a process that does nothing else; no change in the "
        "poller can shorten it."
    )
    if "true" in modes:
        lines.append(
            "- With the lane process (`USM_POLLER_INTERACTIVE_PROCESS=true`, the default) the "
            "lane's jobs run in a process of "
            'their own beside the poller (docs/operations.md, "Interactive lane"): they share '
            "no event loop, GIL or thread pool with the backlog, only the broker and the cores, "
            "and bulk work does not pause for them. Their time *to the poller* is then about "
            "the bystander's, and their time *in the poller* about the idle poller's: what is "
            "left of the difference to the idle rows is the broker's and the host's."
        )
    rank = args.jobs - int(0.99 * args.jobs)
    nth = f"{rank}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(rank, 'th') }"
    lines.append(
        f"- The p99 of {args.jobs} jobs is their {nth} slowest: a scheduling hiccup of the "
        "machine moves it, hence the per-round range and the p99 of all rounds' jobs together. "
        "Compare rows of the same run only, with the load average above in mind."
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


def _by_name(rounds: list[list[Cell]]) -> dict[str, list[Cell]]:
    names = [c.name for c in rounds[0]]
    return {name: [next(c for c in r if c.name == name) for r in rounds] for name in names}


def _rows(rounds: list[list[Cell]], label: str | None) -> list[str]:
    lines = []
    suffix = "" if label is None else f", {label}"
    for name, cells in _by_name(rounds).items():
        left = [float(c.backlog_after) for c in cells if c.backlog_after is not None]
        rates = [c.bulk_per_s for c in cells if c.bulk_per_s is not None]
        lines.append(
            f"| {name}{suffix} | {median_range([c.pct(0.5) for c in cells])} ms | "
            f"{median_range([c.pct(0.99) for c in cells])} [{pooled(cells, 0.99):.1f}] ms | "
            f"{median_range([max(c.latencies, default=math.nan) for c in cells])} ms | "
            f"{median_range([c.pct(0.99, c.to_poller) for c in cells])} ms | "
            f"{median_range([c.pct(0.99, c.to_bystander) for c in cells])} ms | "
            f"{median_range([c.pct(0.99, c.in_poller) for c in cells])} ms | "
            f"{median_range([c.pct(0.99, c.back) for c in cells])} ms | "
            f"{sum(c.ok for c in cells)}/{sum(c.sent for c in cells)} | "
            f"{median_range(left, '{:,.0f}')} | "
            f"{median_range(rates, '{:,.0f}')} |"
        )
    return lines


def _verdicts(rounds: list[list[Cell]], args: argparse.Namespace, label: str | None) -> list[str]:
    lines = []
    by_name = _by_name(rounds)
    ratios: dict[float, list[float]] = {d: [] for d in args.delay_list}
    for cells in rounds:
        by = {c.name: c for c in cells}
        for d in args.delay_list:
            if by[IDLE].latencies and by[behind(d)].latencies:
                ratios[d].append(by[behind(d)].pct(0.99) / by[IDLE].pct(0.99))
    idle = by_name[IDLE]
    poller = "" if label is None else f" ({label})"
    for d, values in ratios.items():
        ratio = statistics.median(values) if values else float("nan")
        together = pooled(by_name[behind(d)], 0.99) / pooled(idle, 0.99)
        verdict = "meets" if ratio <= 2 else "misses"
        lines.append(
            f"- Behind the backlog of {d * 1000:g} ms devices{poller}, the lane's p99 is "
            f"{ratio:.1f}x "
            f"its p99 on the idle poller (median of the rounds' ratios; per round "
            f"{median_range(values, '{:.1f}x')}; all rounds' jobs together {together:.1f}x), "
            f"which {verdict} the goal of at most 2x."
        )
    return lines


def _variant_effect(by_variant: dict[str, list[list[Cell]]], args: argparse.Namespace) -> list[str]:
    """The first and the last variant side by side: the effect, and the noise."""
    p99 = {
        label: {
            name: statistics.median(c.pct(0.99) for c in cells) for name, cells in names.items()
        }
        for label, names in ((v, _by_name(r)) for v, r in by_variant.items())
    }
    labels = list(p99)
    first, last = labels[0], labels[-1]
    effect = "; ".join(
        f"{d * 1000:g} ms devices {p99[first][behind(d)]:.0f} against "
        f"{p99[last][behind(d)]:.0f} ms ({p99[first][behind(d)] / p99[last][behind(d)]:.2f}x)"
        for d in args.delay_list
    )
    idle = " and ".join(f"{p99[v][IDLE]:.1f}" for v in labels)
    return [
        f"- *{first}* against *{last}*, the same run, rounds interleaved: the lane's p99 "
        f"behind the backlog (median of the rounds) with {effect}.",
        f"- The idle rows of the variants measure much the same thing (no backlog): their p99 "
        f"of {idle} ms show how far this host's noise moves the idle p99, the divisor of "
        "every ratio above.",
    ]


def serve_slow(hosts: list[str], delay: float) -> None:
    """`--serve-slow`: the slow devices in a process of their own; prints their port, serves
    until its stdin closes (the benchmark's end, or its death)."""
    with SlowSnmpAgents(hosts, delay=delay, max_seconds=3600) as slow:
        print(slow.port, flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def slow_devices(hosts: list[str], delay: float) -> Iterator[int]:
    """Slow devices served by a child process (not by this one: answering about 1,100 requests
    a second in the caller's process would delay the caller's own reads); their port."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-slow", ",".join(hosts), "--delays", str(delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            sys.exit("the slow devices did not start")
        yield int(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="interactive jobs per cell")
    parser.add_argument("--batch", type=int, default=100, help="jobs between backlog top-ups")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a top-up")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between jobs")
    parser.add_argument("--backlog", type=int, default=10_000, help="bulk jobs queued ahead")
    parser.add_argument(
        "--delays", default="0.05,0.5", help="slow devices' answer delays, seconds, comma-separated"
    )
    parser.add_argument("--priority-jobs", type=int, default=1, help="0: skip that scenario")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds per job at most")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        type=Variant.parse,
        metavar="LABEL[:SETTING=VALUE,...]",
        help=(
            "poller settings to compare (repeat; a poller each per round); default: "
            '"defaults" (the lane process) and "in-process lane:interactive_process=false"'
        ),
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    parser.add_argument(
        "--no-bystander",
        dest="bystander",
        action="store_false",
        help="no copy of the lane's jobs to a bystander consumer",
    )
    parser.add_argument("--serve-slow", metavar="HOSTS", help=argparse.SUPPRESS)
    parser.add_argument("--bystander", nargs=3, dest="serve_bystander", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_slow:
        serve_slow(args.serve_slow.split(","), float(args.delays))
        return
    if args.serve_bystander:
        serve_bystander(*args.serve_bystander)
        return
    args.load_start = os.getloadavg()[0]
    args.delay_list = [float(d) for d in args.delays.split(",") if d.strip()]
    args.variants = args.variants or [
        Variant("defaults", {}),
        Variant("in-process lane", {"interactive_process": "false"}),
    ]
    if len({v.label for v in args.variants}) < len(args.variants):
        sys.exit("--variant labels must differ")
    by_variant: dict[str, list[list[Cell]]] = {v.label: [] for v in args.variants}
    with (
        vhost() as vh,
        snmp_agent() as (agent_host, agent_port, _agent_pid),
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="bench-poller-") as tmp,
    ):
        backlogs = []
        for i, delay in enumerate(args.delay_list):
            hosts = bulk_hosts(i)
            port = stack.enter_context(slow_devices(hosts, delay))
            backlogs.append(Backlog(hosts, port, delay))
        factory = PollerFactory(vh, Path(tmp))
        args.tmp = tmp
        try:
            for r in range(max(1, args.rounds)):
                print(f"round {r + 1} of {args.rounds}", flush=True)
                order = args.variants if r % 2 == 0 else args.variants[::-1]
                for variant in order:
                    by_variant[variant.label].append(
                        run_round(
                            factory,
                            vh.dsn,
                            (agent_host, agent_port),
                            backlogs,
                            args,
                            variant=variant,
                        )
                    )
        finally:
            for poller in factory.started:
                poller.kill()
    text = section(by_variant, args)
    print()
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
        print(f"written to {DOC.relative_to(ROOT)} under {HEADING!r}")


if __name__ == "__main__":
    main()
