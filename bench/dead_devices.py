"""Dead-device benchmark: healthy-job latency with and without 1,000 dead-device jobs queued.

    .venv/bin/python bench/dead_devices.py              # writes docs/performance.md
    .venv/bin/python bench/dead_devices.py --no-write --seconds 3 --rounds 1 --load 0

Side by side in one run (every scenario in each of `--rounds` rounds, a fresh poller per
round; the table gives medians and ranges), against the real RabbitMQ (a vhost of its own),
the real Net-SNMP agent and real `poller run` processes (default settings: concurrency 64, 4
jobs at once per device, prefetch 512):

- healthy only: `snmp.get` jobs to snmpd at `--rate` jobs/s for `--seconds`;
- the same stream with 1,000 `snmp.get` jobs to dead devices mixed in (50 loopback addresses
  127.0.1.x whose UDP port is bound by this process and never read: real silence), each with a
  `--dead-timeout` deadline:
  - *cold*: the poller has never seen these devices (the first timeouts happen during the
    stream, then the devices are quarantined);
  - *warm*: the devices were quarantined by an earlier round (the steady state of a periodic
    poller: a dead device's jobs keep coming every cycle);
  - *cold, all queued first* (a second poller, cold): the 1,000 dead jobs are published at
    once before the healthy stream, as a scheduler that queues a whole polling cycle does:
    more than the prefetch window holds, so the spare consumer has to widen it;
  - *quarantine off* (`USM_POLLER_QUARANTINE_AFTER=0`, a third poller, cold): what the
    per-device limit alone does. This cell stops after `--limit` seconds.

Then the same rounds again under CPU contention (`--load`, default one busy-looping process
per core, started here and stopped by PID): what a satellite host that also runs other work
sees. Latency is publish → `finished_at` of the result (same machine clock): time in the queue
plus the run. Every loop is bounded; traffic stays on loopback. The table goes into
docs/performance.md under `## Dead devices` (only that section is replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import DOC, snmp_agent, vhost, write_section  # noqa: E402

from tests.support.poller_proc import JobClient, PollerFactory, snmp_job  # noqa: E402

HEADING = "## Dead devices"
COLD = "dead devices, cold"
WARM = "dead devices, warm (quarantined)"
OFF = "dead devices, quarantine off"
BURST = "dead devices, cold, all queued first"
DEAD_JOBS = 1000
DEAD_DEVICES = [f"127.0.1.{n}" for n in range(1, 51)]


@dataclass(frozen=True)
class Cell:
    name: str
    healthy: list[float]  # latencies in ms of the healthy jobs answered
    healthy_run: list[float]  # their run time in the poller (`duration_ms`)
    healthy_sent: int
    healthy_ok: int
    dead_sent: int
    dead_answered: int
    dead_codes: dict[str, int]
    dead_p99: float | None
    seconds: float

    def pct(self, q: float, values: list[float] | None = None) -> float:
        values = self.healthy if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def dead_devices() -> Iterator[dict[str, int]]:
    """{host: UDP port} bound here and never read: SNMP requests to them get no answer."""
    with contextlib.ExitStack() as stack:
        ports = {}
        for host in DEAD_DEVICES:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((host, 0))
            ports[host] = sock.getsockname()[1]
        yield ports


# A busy loop that ends by itself if it is ever left behind (it is killed by PID anyway).
BUSY_LOOP = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_cpus(count: int) -> Iterator[None]:
    """`count` processes that spin on the CPU for as long as the block runs."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            # One at a time: those started before a failure are still stopped below.
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]))  # noqa: PERF401
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def stream(
    client: JobClient,
    agent: tuple[str, int],
    dead: dict[str, int] | None,
    args: argparse.Namespace,
    tag: str,
    *,
    burst: bool = False,
) -> tuple[list[str], list[str], dict[str, float]]:
    """Publish the healthy stream and the dead jobs, mixed in evenly or (`burst`) all before
    it; ids and send times."""
    healthy_n = int(args.rate * args.seconds)
    dead_n = DEAD_JOBS if dead else 0
    events: list[tuple[float, str]] = [(i / args.rate, "healthy") for i in range(healthy_n)]
    events += [(0.0 if burst else i * args.seconds / dead_n, "dead") for i in range(dead_n)]
    events.sort()
    hosts = list(dead or {})
    healthy_ids: list[str] = []
    dead_ids: list[str] = []
    sent: dict[str, float] = {}
    start = time.monotonic()
    for offset, what in events:
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if what == "healthy":
            job = snmp_job(*agent, job_id=f"{tag}-ok-{len(healthy_ids)}", timeout=10)
            healthy_ids.append(job["id"])
        else:
            assert dead is not None
            host = hosts[len(dead_ids) % len(hosts)]
            job = snmp_job(
                host, dead[host], job_id=f"{tag}-dead-{len(dead_ids)}", timeout=args.dead_timeout
            )
            dead_ids.append(job["id"])
        sent[job["id"]] = time.time()
        client.publish(job)
    return healthy_ids, dead_ids, sent


def run_cell(
    name: str,
    client: JobClient,
    agent: tuple[str, int],
    dead: dict[str, int] | None,
    args: argparse.Namespace,
    *,
    burst: bool = False,
) -> Cell:
    tag = uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    healthy_ids, dead_ids, sent = stream(client, agent, dead, args, tag, burst=burst)
    left = max(1.0, args.limit - (time.monotonic() - t0))
    received = client.collect_ids(healthy_ids + dead_ids, timeout=left)
    seconds = time.monotonic() - t0
    results = {r.result.job_id: r.result for r in received}
    latencies = [
        (results[i].finished_at.timestamp() - sent[i]) * 1000 for i in healthy_ids if i in results
    ]
    codes: dict[str, int] = {}
    dead_lat = []
    for i in dead_ids:
        if i in results:
            error = results[i].error
            code = error.code if error else "ok"
            codes[code] = codes.get(code, 0) + 1
            dead_lat.append(results[i].duration_ms)
    cell = Cell(
        name=name,
        healthy=latencies,
        healthy_run=[results[i].duration_ms for i in healthy_ids if i in results],
        healthy_sent=len(healthy_ids),
        healthy_ok=sum(1 for i in healthy_ids if i in results and results[i].status == "ok"),
        dead_sent=len(dead_ids),
        dead_answered=len(dead_lat),
        dead_codes=codes,
        dead_p99=sorted(dead_lat)[int(0.99 * (len(dead_lat) - 1))] if dead_lat else None,
        seconds=seconds,
    )
    print(
        f"{name}: healthy p50 {cell.pct(0.5):.1f} ms p99 {cell.pct(0.99):.1f} ms "
        f"(run p99 {cell.pct(0.99, cell.healthy_run):.1f} ms) "
        f"({cell.healthy_ok}/{cell.healthy_sent} ok), dead {cell.dead_answered}/"
        f"{cell.dead_sent} {codes}, {seconds:.1f} s",
        flush=True,
    )
    return cell


def warm_up(client: JobClient, dead: dict[str, int], args: argparse.Namespace) -> None:
    """Quarantine every dead device: 4 jobs each (the per-device limit) that time out."""
    ids = []
    for host, port in dead.items():
        for n in range(4):
            job = snmp_job(host, port, job_id=f"warm-{host}-{n}", timeout=args.dead_timeout)
            ids.append(job["id"])
            client.publish(job)
    client.collect_ids(ids, timeout=args.dead_timeout * 3 + 10)


def baseline(cells: list[Cell]) -> Cell:
    """The healthy-only cell with the lower p99: the stricter reference for the 2x goal."""
    return min((c for c in cells if c.name.startswith("healthy only")), key=lambda c: c.pct(0.99))


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min-max)' of per-round figures; just the figure for a single round."""
    if not values:
        return "-"
    mid = statistics.median(values)
    if len(values) == 1:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


@dataclass(frozen=True)
class Row:
    """One scenario over every round."""

    name: str
    cells: list[Cell]
    ratios: list[float]  # per round: healthy p99 / that round's healthy-only p99

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")


def rows(rounds: list[list[Cell]]) -> list[Row]:
    names = [c.name for c in rounds[0]]
    out = []
    for name in names:
        cells, ratios = [], []
        for cells_of_round in rounds:
            cell = next(c for c in cells_of_round if c.name == name)
            base = baseline(cells_of_round)
            cells.append(cell)
            if cell.healthy and base.healthy:
                ratios.append(cell.pct(0.99) / base.pct(0.99))
        out.append(Row(name, cells, ratios))
    return out


def section(quiet: list[list[Cell]], loaded: list[list[Cell]], args: argparse.Namespace) -> str:
    lines = [
        HEADING,
        "",
        f"`bench/dead_devices.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}, RabbitMQ and Net-SNMP "
        "snmpd on loopback, a new `poller run` per round with the default settings "
        "(concurrency 64, 4 jobs at once per device, prefetch 512, quarantine after 3 "
        f"timeouts). Healthy stream: `snmp.get` to snmpd at {args.rate:g} jobs/s for "
        f"{args.seconds:g} s (the agent has answered the poller before: it is trusted). Dead "
        f"devices: {DEAD_JOBS} `snmp.get` jobs to {len(DEAD_DEVICES)} loopback addresses that "
        f"never answer, timeout {args.dead_timeout:g} s, mixed evenly into the same "
        f'{args.seconds:g} s (in the "all queued first" row: all published at once just '
        "before the healthy stream, to a poller that has not seen them). Latency = publish "
        "→ the result's `finished_at` (queue wait + "
        "run); run time = the result's `duration_ms` (in the poller). The healthy-only stream "
        "runs before and after the dead-device cells of each round (the machine is shared); "
        "each round's ratios are against the one with the lower p99. Figures are medians "
        f"(min-max) of {len(quiet)} rounds. Load average (1 min) at the start and end of the "
        f"run: {args.load_start:.1f} and {os.getloadavg()[0]:.1f}; every figure here grows "
        "with the machine's other work, so compare rows of the same table only.",
        "",
        *table(quiet),
        "",
        *notes(rows(quiet), args),
    ]
    if loaded:
        lines += [
            "",
            f"### Under CPU contention ({args.load} busy-looping processes)",
            "",
            f"The same {len(loaded)} rounds with {args.load} processes spinning on the CPU "
            f"for the whole run ({args.load} for {os.cpu_count()} cores): the poller, the "
            "broker, snmpd and this benchmark's publisher get a share of the cores, and a "
            "thread that wakes up may wait for a scheduler tick (4 ms here) before it runs. "
            "Every latency grows, the healthy-only stream's included.",
            "",
            *table(loaded),
            "",
            *loaded_notes(rows(loaded)),
        ]
    return "\n".join(lines) + "\n"


def table(rounds: list[list[Cell]]) -> list[str]:
    lines = [
        "| scenario | healthy p50 | healthy p99 | p99 vs healthy only | healthy p99 run time | "
        "healthy ok | dead answered | dead outcomes (all rounds) | dead p99 run time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in rows(rounds):
        cells = row.cells
        codes: dict[str, int] = {}
        for c in cells:
            for code, n in c.dead_codes.items():
                codes[code] = codes.get(code, 0) + n
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) or "-"
        dead_p99 = [c.dead_p99 for c in cells if c.dead_p99 is not None]
        lines.append(
            f"| {row.name} | {median_range([c.pct(0.5) for c in cells])} ms | "
            f"{median_range([c.pct(0.99) for c in cells])} ms | "
            f"{median_range(row.ratios, '{:.1f}x')} | "
            f"{median_range([c.pct(0.99, c.healthy_run) for c in cells])} ms | "
            f"{sum(c.healthy_ok for c in cells)}/{sum(c.healthy_sent for c in cells)} | "
            f"{sum(c.dead_answered for c in cells)}/{sum(c.dead_sent for c in cells)} | "
            f"{outcomes} | {median_range(dead_p99, '{:.0f}')} ms |"
        )
    return lines


def goal(row: Row) -> str:
    """'1.3x ..., which meets the goal of at most 2x' for a dead-device row."""
    verdict = "meets" if row.ratio <= 2 else "misses"
    return (
        f"healthy p99 is {row.ratio:.1f}x the healthy-only p99 (median of the rounds), "
        f"which {verdict} the goal of at most 2x"
    )


def notes(table_rows: list[Row], args: argparse.Namespace) -> list[str]:
    by = {r.name: r for r in table_rows}
    out = []
    warm = by.get(WARM)
    if warm and warm.ratios:
        out.append(
            f"- Warm (the steady state of periodic polling): {goal(warm)}; the dead devices' "
            'jobs are answered at once (`device_unreachable`, retryable, "quarantined until '
            '..."), through a low-priority lane (one answer per event-loop iteration).'
        )
    cold = by.get(COLD)
    if cold and cold.ratios:
        out.append(
            f"- Cold (dead devices the poller has never seen): {goal(cold)}. Until a dead "
            f"device has timed out 3 times its jobs wait out their {args.dead_timeout:g} s, but "
            "jobs of devices that have not answered yet may hold only half of the 64 run "
            "slots, and the prefetch window (8 x 64) is wide enough for the healthy jobs to be "
            "delivered past the waiting ones. When a device is quarantined, the jobs waiting "
            "for it are answered at once (a few hundred within half a second, about 2.5 s "
            "into the stream), through the same low-priority lane, so that the burst does not "
            "hold up the healthy jobs."
        )
    burst = by.get(BURST)
    if burst and burst.ratios:
        out.append(
            f"- Cold, all queued first (a whole polling cycle queued at once): {goal(burst)}. "
            "The first 512 dead jobs fill the prefetch window, most of them waiting for their "
            "devices; once half the window waits with run slots free, a spare consumer opens "
            "with a window of 3 x 512 and the healthy jobs behind the burst are delivered. "
            "Without it they waited until the dead jobs timed out: healthy p99 1.7 s "
            "(about 500x). About 2 s in, the dead devices are quarantined and the jobs waiting "
            "for them, about a thousand, are answered; those whose time ran out leave the slot "
            "queue through the low-priority lane too, and the SNMP calls of the timed-out jobs "
            "(which block a thread until Net-SNMP gives up) no longer keep the healthy jobs' "
            "calls waiting for a thread. What is left is the wave itself: jobs queued together "
            "are due together, nothing is known of their devices before the first timeouts, and "
            "about a thousand answers (a result, a publish, a confirm, an ack and a log line "
            "each) go out within half a second on the 2 cores that the broker, snmpd and this "
            "benchmark share; the slow healthy jobs are the ones that arrive during it. On a "
            "site the broker runs on another host."
        )
    off = by.get(OFF)
    if off:
        ok = sum(c.healthy_ok for c in off.cells)
        sent = sum(c.healthy_sent for c in off.cells)
        out.append(
            f"- Quarantine off (`USM_POLLER_QUARANTINE_AFTER=0`): every dead job waits out its "
            f"{args.dead_timeout:g} s (or is answered `not started` when it waited that long "
            f"for a slot); the healthy jobs keep their half of the slots ({ok}/{sent} ok)."
        )
    healthy = [c for r in table_rows if r.name.startswith("healthy only") for c in r.cells]
    dead = [c for r in table_rows if r.name in (WARM, COLD, BURST, OFF) for c in r.cells]
    if healthy and dead:
        out.append(
            "- The healthy jobs' p50 is lower with the dead devices' jobs mixed in "
            f"({median_range([c.pct(0.5) for c in dead])} ms against "
            f"{median_range([c.pct(0.5) for c in healthy])} ms without): at 100 jobs/s the "
            "cores sleep between jobs and each job pays for waking them up; with 300 "
            "messages/s they sleep less."
        )
    return out


def loaded_notes(table_rows: list[Row]) -> list[str]:
    by = {r.name: r for r in table_rows}
    out = []
    labels = ((WARM, "Warm"), (COLD, "Cold"), (BURST, "Cold, all queued first"))
    for name, label in (*labels, (OFF, "Quarantine off")):
        row = by.get(name)
        if row and row.ratios:
            spread = median_range(row.ratios, "{:.1f}x")
            out.append(f"- {label}: {goal(row)}; per round {spread}.")
    return out


def run_round(
    factory: PollerFactory,
    dsn: str,
    agent: tuple[str, int],
    dead: dict[str, int],
    args: argparse.Namespace,
) -> list[Cell]:
    """Every scenario once, each poller started fresh and stopped after its cells."""
    cells: list[Cell] = []
    sid = f"bench{uuid.uuid4().hex[:8]}"
    client = JobClient(dsn, sid)
    poller = factory(sid, quarantine_seconds=300)
    try:
        run_cell("warm-up (not reported)", client, agent, None, args)
        cells.append(run_cell("healthy only (before)", client, agent, None, args))
        cells.append(run_cell(COLD, client, agent, dead, args))
        warm_up(client, dead, args)
        cells.append(run_cell(WARM, client, agent, dead, args))
        cells.append(run_cell("healthy only (after)", client, agent, None, args))
    finally:
        client.close()
        poller.kill()
    sid_burst = f"bench{uuid.uuid4().hex[:8]}"
    client = JobClient(dsn, sid_burst)
    poller = factory(sid_burst, quarantine_seconds=300)
    try:
        run_cell("warm-up (not reported)", client, agent, None, args)
        cells.append(run_cell(BURST, client, agent, dead, args, burst=True))
    finally:
        client.close()
        poller.kill()
    sid_off = f"bench{uuid.uuid4().hex[:8]}"
    client = JobClient(dsn, sid_off)
    poller = factory(sid_off, quarantine_after=0)
    try:
        run_cell("warm-up (not reported)", client, agent, None, args)
        cells.append(run_cell(OFF, client, agent, dead, args))
    finally:
        client.close()
        poller.kill()
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=100, help="healthy jobs per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each stream")
    parser.add_argument("--dead-timeout", type=float, default=2.0, help="dead jobs' timeout")
    parser.add_argument("--limit", type=float, default=25.0, help="seconds per cell at most")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument(
        "--load",
        type=int,
        default=os.cpu_count() or 1,
        help="busy-looping processes for the rounds under CPU contention (0: skip them)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    args = parser.parse_args()
    args.load_start = os.getloadavg()[0]
    quiet: list[list[Cell]] = []
    loaded: list[list[Cell]] = []
    with (
        vhost() as vh,
        snmp_agent() as (agent_host, agent_port, _agent_pid),
        dead_devices() as dead,
        tempfile.TemporaryDirectory(prefix="bench-poller-") as tmp,
    ):
        factory = PollerFactory(vh, Path(tmp))
        agent = (agent_host, agent_port)
        rounds = max(1, args.rounds)
        try:
            for r in range(rounds):
                print(f"round {r + 1} of {rounds}", flush=True)
                quiet.append(run_round(factory, vh.dsn, agent, dead, args))
            if args.load > 0:
                with busy_cpus(args.load):
                    for r in range(rounds):
                        print(f"round {r + 1} of {rounds}, {args.load} busy CPUs", flush=True)
                        loaded.append(run_round(factory, vh.dsn, agent, dead, args))
        finally:
            for poller in factory.started:
                poller.kill()
    text = section(quiet, loaded, args)
    print()
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
        print(f"written to {DOC.relative_to(ROOT)} under {HEADING!r}")


if __name__ == "__main__":
    main()
