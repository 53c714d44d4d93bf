"""SNMP benchmark: the poller against the bare floor, Celery and `snmpbulkwalk`, in one run.

    .venv/bin/python bench/run.py              # default: ~4 min, writes docs/performance.md
    .venv/bin/python bench/run.py --quick      # under a minute, writes too (say --no-write)
    .venv/bin/python bench/run.py --no-write --rounds 3 --seconds 2
    .venv/bin/python bench/run.py --profile netsnmp [--profile-job walk]   # py-spy, hot path
    .venv/bin/python bench/run.py --candidate /tmp/copy --skip bare,celery,celery-client --no-write

`--candidate DIR` runs a second `poller run` from DIR (a directory holding a copy of the
`poller/` package with a change) side by side with the repository's, to measure the change.
Needs the `bench` extra (Celery; py-spy for `--profile`).

It starts what it needs: a fresh RabbitMQ vhost on 127.0.0.1:5672 (guest, deleted at the end),
a Net-SNMP `snmpd` on a free loopback port (as `nobody`), and the workers as subprocesses:

- `poller run` (concurrency 64, 64 jobs at once per device since every job goes to the one
  agent), once per SNMP backend that works here (`pysnmp`, and `netsnmp` when it exists);
- the bare pika asyncio worker of `bench/snmp_workers.py`, once per SNMP library (the floor);
- a Celery worker (prefork, `acks_late`, py-amqp) with the same GET, once per library.

One driver (this process: pika `AsyncioConnection`, publisher confirms, results read from the
`usm_poller.results` queue) keeps a window of jobs in flight for every cell, except "Celery's own
client", where a client process calls `task.apply_async` with the same window. Every job queue is
a quorum queue with the poller's arguments, and every worker publishes its result to
`usm_poller.results` with a confirm before it acks the job.

Rounds are interleaved (round 1 of every cell, then round 2, ...) so that a change of load on
the shared machine hits every cell alike; the table shows medians with min-max, and ratios are
medians of per-round ratios. Every loop is bounded in count and in time; all traffic stays on
loopback. Only the processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import DOC, snmp_agent, vhost, write_section  # noqa: E402

from poller import wire  # noqa: E402
from tests.support.poller_proc import PollerFactory, PollerProcess  # noqa: E402
from tests.support.procs import stop_process  # noqa: E402
from tests.support.rabbitmq import (  # noqa: E402
    AmqpVhost,
    rabbitmqctl,
)
from tests.support.slow_snmp import SlowSnmpAgents  # noqa: E402

HEADING = "## SNMP jobs and walks"
WORKERS = Path(__file__).resolve().parent / "snmp_workers.py"
GET_OID = "1.3.6.1.2.1.1.5.0"  # sysName.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAMILIES = ("poller", "bare", "celery", "celery-client")
#: The slow devices (`--slow-delay`): 127.0.9.1-32, answered by one `SlowSnmpAgents`.
SLOW_HOSTS = [f"127.0.9.{n}" for n in range(1, 33)]


# ------------------------------------------------------------------------------------------
# /proc: CPU of process trees, the machine, memory


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


T = TypeVar("T")


def settle(future: asyncio.Future[T], value: T) -> None:
    """Resolve `future` with `value` unless it is done already (pika callbacks may come twice)."""
    if not future.done():
        future.set_result(value)


def pids(pid: int) -> Callable[[], list[int]]:
    """A cell's worker PIDs: one process."""
    return lambda: [pid]


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (Celery's prefork children)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ------------------------------------------------------------------------------------------
# The driver: a window of jobs in flight, publisher confirms, results from usm_poller.results


@dataclass
class JobSource:
    """How to publish one job of a cell: exchange, routing key, body and properties by id."""

    exchange: str
    routing_key: str
    body: Callable[[str], bytes]
    properties: Callable[[str], pika.BasicProperties]


@dataclass
class RoundResult:
    jobs: int
    errors: int
    lost: int
    elapsed: float
    latencies: list[float]
    bodies: list[bytes] = field(default_factory=list)


class Driver:
    """One connection, one confirm channel; results consumed from the core's result queue."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None
        self.ch: Any = None
        self.consumer_tag: str | None = None
        self.counter = 0
        self.prefix = uuid.uuid4().hex[:8]
        self._reset()

    def _reset(self) -> None:
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.bodies: list[bytes] = []
        self.keep_bodies = False
        self.errors = 0
        self.done = 0
        self.published = 0
        self.publish_seq = 0
        self.nacked = 0
        self.last = 0.0
        self.window = 0
        self.max_jobs = 0
        self.end = 0.0
        self.source: JobSource | None = None
        self.finished: asyncio.Future[None] | None = None

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(frame: Any = None) -> None:
            if not future.done():
                future.set_result(frame)

        method(callback=done, **kwargs)
        return await asyncio.wait_for(future, 30)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()

        def on_error(_conn: Any, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(RuntimeError(f"driver connection failed: {exc}"))

        params = pika.URLParameters(self.dsn)
        params.client_properties = {"connection_name": "bench driver"}
        self.conn = AsyncioConnection(
            params,
            on_open_callback=lambda c: settle(opened, c),
            on_open_error_callback=on_error,
            custom_ioloop=loop,
        )
        await asyncio.wait_for(opened, 30)
        channel_open: asyncio.Future[Any] = loop.create_future()
        self.conn.channel(on_open_callback=channel_open.set_result)
        self.ch = await asyncio.wait_for(channel_open, 30)
        await self._call(self.ch.confirm_delivery, ack_nack_callback=self._on_confirm)
        for name, kind in (
            (wire.jobs_exchange(), "direct"),
            (wire.dead_letter_exchange(), "direct"),
            (wire.results_exchange(), "topic"),
        ):
            await self._call(
                self.ch.exchange_declare, exchange=name, exchange_type=kind, durable=True
            )
        await self._call(
            self.ch.queue_declare,
            queue=wire.results_queue(),
            durable=True,
            arguments=wire.results_queue_arguments(),
        )
        await self._call(
            self.ch.queue_bind,
            queue=wire.results_queue(),
            exchange=wire.results_exchange(),
            routing_key=wire.results_binding_key(),
        )
        await self.resume()

    async def declare_jobs_queue(self, name: str, sid: str, queue_type: str) -> None:
        await self._call(
            self.ch.queue_declare,
            queue=name,
            durable=True,
            arguments=wire.jobs_queue_arguments(
                sid, "classic" if queue_type == "classic" else "quorum"
            ),
        )
        await self._call(
            self.ch.queue_bind, queue=name, exchange=wire.jobs_exchange(), routing_key=sid
        )

    async def pause(self) -> None:
        """Stop consuming results (Celery's own client reads them during its cells)."""
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            await self._call(self.ch.basic_cancel, consumer_tag=tag)

    async def resume(self) -> None:
        if self.consumer_tag is None:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.consumer_tag = self.ch.basic_consume(
                wire.results_queue(),
                self._on_result,
                auto_ack=True,
                callback=lambda f: settle(future, f),
            )
            await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        if self.conn is not None and self.conn.is_open:
            closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.conn.add_on_close_callback(lambda *_: settle(closed, None))
            self.conn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed, 10)

    def _on_confirm(self, frame: Any) -> None:
        if not isinstance(frame.method, pika.spec.Basic.Ack):
            self.nacked += 1

    def _on_result(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        sent = self.sent.pop(props.message_id, None)
        if sent is None:
            return  # a late result of an earlier round
        now = time.perf_counter()
        self.latencies.append(now - sent)
        self.last = now
        self.done += 1
        if b'"status":"ok"' not in body:
            self.errors += 1
        if self.keep_bodies:
            self.bodies.append(body)
        self._refill(now)

    def _refill(self, now: float) -> None:
        source = self.source
        if source is None:
            return
        while len(self.sent) < self.window and self.published < self.max_jobs and now < self.end:
            self.counter += 1
            job_id = f"{self.prefix}-{self.counter}"
            self.sent[job_id] = time.perf_counter()
            self.ch.basic_publish(
                source.exchange, source.routing_key, source.body(job_id), source.properties(job_id)
            )
            self.published += 1
        if not self.sent and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    async def round(
        self,
        source: JobSource,
        *,
        window: int,
        seconds: float,
        max_jobs: int,
        keep_bodies: bool = False,
        grace: float = 30.0,
    ) -> RoundResult:
        """Keep `window` jobs in flight until `max_jobs` or `seconds`; wait for the last ones."""
        self._reset()
        self.source, self.window, self.max_jobs = source, window, max_jobs
        self.keep_bodies = keep_bodies
        self.finished = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self.end = start + seconds
        self.last = start
        self._refill(start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished, seconds + grace)
        self.source = None
        return RoundResult(
            jobs=self.done,
            errors=self.errors + self.nacked,
            lost=len(self.sent),
            elapsed=self.last - start,
            latencies=self.latencies,
            bodies=self.bodies,
        )


def poller_source(sid: str, job: dict[str, Any]) -> JobSource:
    """Our wire format to the satellite's routing key (the poller and the bare worker)."""
    head, tail = json.dumps(dict(job, id="@ID@"), separators=(",", ":")).encode().split(b"@ID@")

    def props(job_id: str) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=job_id
        )

    return JobSource(wire.jobs_exchange(), sid, lambda job_id: head + job_id.encode() + tail, props)


def slow_source(sid: str, job: dict[str, Any], hosts: list[str], port: int) -> JobSource:
    """`poller_source`'s job, to `hosts` (the slow devices) in turn."""
    parts = []
    for host in hosts:
        target = dict(job["target"], host=host, port=port)
        template = json.dumps(dict(job, id="@ID@", target=target), separators=(",", ":"))
        parts.append(template.encode().split(b"@ID@"))
    turn = itertools.cycle(parts)

    def body(job_id: str) -> bytes:
        head, tail = next(turn)
        return head + job_id.encode() + tail

    base = poller_source(sid, job)
    return JobSource(base.exchange, base.routing_key, body, base.properties)


def celery_source(sid: str, job: dict[str, Any], task: str) -> JobSource:
    """Celery protocol 2 messages (what `apply_async` sends), published by our driver."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body_head, body_tail = (
        json.dumps([[dict(job, id="@ID@")], {}, embed], separators=(",", ":"))
        .encode()
        .split(b"@ID@")
    )
    argsrepr = repr((job,))

    def props(job_id: str) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            priority=0,
            correlation_id=job_id,
            reply_to="",
            headers={
                "lang": "py",
                "task": task,
                "id": job_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": job_id,
                "parent_id": None,
                "argsrepr": argsrepr,
                "kwargsrepr": "{}",
                "origin": "bench-driver",
                "ignore_result": True,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
        )

    return JobSource(
        wire.jobs_exchange(), sid, lambda job_id: body_head + job_id.encode() + body_tail, props
    )


# ------------------------------------------------------------------------------------------
# Services


class Processes:
    """Subprocesses started here; stopped by PID (and their recorded children) at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, stdin: bool = False) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.started.append((name, proc))
        return proc

    def wait_ready(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode}: see {self.workdir}/{name}.log")
            chunk = proc.stdout.read() or b""
            buf += chunk
            if b"ready" in buf:
                os.set_blocking(proc.stdout.fileno(), True)
                return
            time.sleep(0.05)
        sys.exit(f"{name} not ready after {timeout} s: see {self.workdir}/{name}.log")

    def stop_all(self) -> None:
        for _name, proc in reversed(self.started):
            children = [p for p in process_tree(proc.pid) if p != proc.pid]
            stop_process(proc, grace=15)
            for pid in children:  # prefork children whose parent was killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)


# ------------------------------------------------------------------------------------------
# Cells and rounds


@dataclass
class Sample:
    jobs: int
    errors: int
    lost: int
    elapsed: float
    worker_cpu: float
    client_cpu: float  # the driver, or Celery's own client
    broker_cpu: float
    agent_cpu: float
    busy_cores: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.jobs / self.elapsed if self.elapsed > 0 else 0.0

    def per_job_ms(self, cpu: float) -> float:
        return cpu / self.jobs * 1000 if self.jobs else float("nan")


@dataclass
class Cell:
    key: str
    family: str
    lib: str
    label: str
    worker_pids: Callable[[], list[int]]
    source: JobSource | None = None
    client: subprocess.Popen[bytes] | None = None
    throughput: list[Sample] = field(default_factory=list)
    latency: list[Sample] = field(default_factory=list)


@dataclass
class Bench:
    args: argparse.Namespace
    driver: Driver
    loop: asyncio.AbstractEventLoop
    broker_pids: list[int]
    agent_pid: int
    job: dict[str, Any]
    slow: SlowSnmpAgents | None = None

    def measure(self, cell: Cell, *, window: int, seconds: float, max_jobs: int) -> Sample:
        pids = cell.worker_pids()
        w0, b0, a0 = cpu_seconds(pids), cpu_seconds(self.broker_pids), cpu_seconds([self.agent_pid])
        m0 = machine_busy()
        if cell.client is not None:
            c0 = 0.0
            result = self._client_round(cell.client, window, seconds, max_jobs)
            client_cpu = result.pop("client_cpu")
            rr = RoundResult(**result)
        else:
            c0 = cpu_seconds([os.getpid()])
            assert cell.source is not None
            rr = self.loop.run_until_complete(
                self.driver.round(cell.source, window=window, seconds=seconds, max_jobs=max_jobs)
            )
            client_cpu = cpu_seconds([os.getpid()]) - c0
        m1 = machine_busy()
        cores = os.cpu_count() or 1
        return Sample(
            jobs=rr.jobs,
            errors=rr.errors,
            lost=rr.lost,
            elapsed=rr.elapsed,
            worker_cpu=cpu_seconds(cell.worker_pids()) - w0 if pids else float("nan"),
            client_cpu=client_cpu,
            broker_cpu=cpu_seconds(self.broker_pids) - b0,
            agent_cpu=cpu_seconds([self.agent_pid]) - a0,
            busy_cores=(m1[0] - m0[0]) / max(m1[1] - m0[1], 1) * cores,
            latencies=rr.latencies,
        )

    def _client_round(
        self, client: subprocess.Popen[bytes], window: int, seconds: float, max_jobs: int
    ) -> dict[str, Any]:
        assert client.stdin is not None
        assert client.stdout is not None
        self.loop.run_until_complete(self.driver.pause())
        try:
            client.stdin.write(f"run {window} {seconds} {max_jobs}\n".encode())
            client.stdin.flush()
            line = client.stdout.readline()
        finally:
            self.loop.run_until_complete(self.driver.resume())
        if not line:
            sys.exit("Celery's client process died; see its log")
        return dict(json.loads(line))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


# ------------------------------------------------------------------------------------------


def netsnmp_backend_works() -> bool:
    """True when the poller can build its SNMP driver with `USM_POLLER_SNMP_BACKEND=netsnmp`."""
    probe = (
        "from poller.drivers.snmp import SnmpDriver, SnmpOptions\n"
        "SnmpDriver(SnmpOptions(backend='netsnmp'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def ezsnmp_importable() -> bool:
    done = subprocess.run(
        [sys.executable, "-c", "import ezsnmp"], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def get_job(host: str, port: int) -> dict[str, Any]:
    return {
        "v": 1,
        "id": "x",
        "kind": "snmp.get",
        "target": {"host": host, "port": port},
        "auth": {"version": "2c", "community": "public"},
        "params": {"oids": [GET_OID]},
        "timeout": 10.0,
    }


def walk_job(host: str, port: int, root: str) -> dict[str, Any]:
    return {
        "v": 1,
        "id": "x",
        "kind": "snmp.walk",
        "target": {"host": host, "port": port},
        "auth": {"version": "2c", "community": "public"},
        "params": {"oids": [root], "max_repetitions": 25, "max_varbinds": 200000},
        "timeout": 60.0,
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("pika", "pysnmp", "ezsnmp", "celery", "kombu", "amqp", "pydantic", "structlog"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        text = rabbitmqctl("version", timeout=30).strip()
        out["RabbitMQ"] = text.splitlines()[-1] if text else "?"
    except RuntimeError:
        out["RabbitMQ"] = "?"
    snmpd_bin = shutil.which("snmpd") or "/usr/sbin/snmpd"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            [snmpd_bin, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        found = re.search(r"version:\s*(\S+)", text)
        out["Net-SNMP"] = found.group(1) if found else "?"
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds (< 60 s)")
    ap.add_argument("--rounds", type=int, help="rounds per cell (default 5; quick 3)")
    ap.add_argument("--seconds", type=float, help="seconds per throughput round (3; quick 0.7)")
    ap.add_argument("--window", type=int, default=64, help="jobs in flight for throughput")
    ap.add_argument("--latency-jobs", type=int, help="jobs per window-1 round (300; quick 40)")
    ap.add_argument("--walk-root", default="1.3.6.1.2.1", help="subtree walked")
    ap.add_argument("--celery-concurrency", type=int, default=4, help="prefork children")
    ap.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    ap.add_argument("--backends", default="auto", help="pysnmp,netsnmp or auto (all that work)")
    ap.add_argument(
        "--skip", default="", help="leave out: poller, bare, celery, celery-client, walks"
    )
    ap.add_argument(
        "--slow-delay",
        type=float,
        default=0.5,
        help="also run the poller and bare cells against 32 devices answering after this delay"
        " (seconds; 0: not)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; docs untouched")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--candidate",
        help="also run `poller run` from this directory (a copy with a change), side by side",
    )
    ap.add_argument(
        "--profile",
        choices=["pysnmp", "netsnmp"],
        help="instead of the table: py-spy profile of `poller run` with this backend under load",
    )
    ap.add_argument("--profile-seconds", type=float, default=15.0, help="py-spy duration")
    ap.add_argument(
        "--profile-job", choices=["get", "walk"], default="get", help="what the profiled load is"
    )
    args = ap.parse_args(argv)
    args.rounds = max(1, min(args.rounds or (3 if args.quick else 5), 20))
    args.seconds = min(args.seconds or (0.7 if args.quick else 3.0), 30.0)
    args.latency_jobs = min(args.latency_jobs or (40 if args.quick else 300), 5000)
    args.walk_rounds = min(args.rounds, 2 if args.quick else 5)
    args.warmup = 0.3 if args.quick else 1.0
    args.skip = {s for s in args.skip.split(",") if s}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C: the vhost, agent and workers are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.profile:
        return run_profile(args)
    started = time.monotonic()
    load_start = loadavg()
    print(f"load average at start: {load_start:.2f}", flush=True)
    if args.backends == "auto":
        backends = ["pysnmp"] + (["netsnmp"] if netsnmp_backend_works() else [])
    else:
        backends = [b for b in args.backends.split(",") if b]
    if "netsnmp" in backends and not ezsnmp_importable():
        sys.exit("the netsnmp backend needs ezsnmp")
    print(f"SNMP backends: {', '.join(backends)}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-snmp-"))
    procs = Processes(workdir)
    loop = asyncio.new_event_loop()
    factory: PollerFactory | None = None
    try:
        with contextlib.ExitStack() as stack:
            vh = stack.enter_context(vhost())
            host, port, agent_pid = stack.enter_context(snmp_agent())
            slow = None
            if args.slow_delay > 0:
                slow = stack.enter_context(
                    SlowSnmpAgents(SLOW_HOSTS, delay=args.slow_delay, max_seconds=3600)
                )
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            factory = PollerFactory(vh, workdir)
            bench = Bench(
                args, driver, loop, pids_named("beam.smp"), agent_pid, get_job(host, port), slow
            )
            setup = start_workers(bench, vh, factory, procs, backends)
            print(f"started in {time.monotonic() - started:.1f} s; work dir {workdir}", flush=True)
            walks = run_cells(bench, setup, host, port)
            loop.run_until_complete(driver.close())
            for pp in setup.pollers.values():
                pp.terminate(timeout=30)
    finally:
        procs.stop_all()
        for pp in factory.started if factory is not None else []:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                pp.kill()
        loop.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    load_end = loadavg()
    report = render(
        args,
        setup,
        walks=walks,
        load_start=load_start,
        load_end=load_end,
        runtime=time.monotonic() - started,
        backends=backends,
    )
    print()
    print(report)
    if not args.no_write:
        write_section(HEADING, report)
        print(f"\nwritten to {DOC.relative_to(ROOT)} under '{HEADING}'")
    return 0


LIBS = {"pysnmp": "pysnmp", "netsnmp": "ezsnmp"}


@dataclass
class Setup:
    cells: list[Cell] = field(default_factory=list)
    pollers: dict[str, PollerProcess] = field(default_factory=dict)  # cell key → process
    rss: dict[str, dict[str, float]] = field(default_factory=dict)  # moment → cell key → MB
    jobs: dict[str, int] = field(default_factory=dict)  # cell key → jobs run in the rounds


def start_poller(
    bench: Bench, factory: PollerFactory, sid: str, backend: str, path: str | None
) -> PollerProcess:
    """`poller run` for one cell; from `path` (PYTHONPATH first) for a candidate copy."""
    saved = os.environ.get("PYTHONPATH")
    if path:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(path).resolve()), str(ROOT)])
        # `python -m` puts the working directory first, ahead of PYTHONPATH: without this the
        # candidate would run the repository's own `poller` when started from its root.
        os.environ["PYTHONSAFEPATH"] = "1"
    try:
        return factory(
            sid,
            wait=False,
            concurrency=64,
            per_device_concurrency=64,
            snmp_backend=backend,
            heartbeat_interval=10,
            queue_type=bench.args.queue_type,
            log_level="info",
        )
    finally:
        os.environ.pop("PYTHONSAFEPATH", None)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def start_workers(
    bench: Bench,
    vh: AmqpVhost,
    factory: PollerFactory,
    procs: Processes,
    backends: list[str],
) -> Setup:
    """Start every worker of the matrix at once; return when all are ready."""
    args, job, setup = bench.args, bench.job, Setup()
    starting: list[tuple[str, subprocess.Popen[bytes]]] = []
    qtype: Literal["quorum", "classic"] = "classic" if args.queue_type == "classic" else "quorum"
    for backend in backends:
        lib = LIBS[backend]
        variants = [("poller", None)] + ([("candidate", args.candidate)] if args.candidate else [])
        for name, path in variants if "poller" not in args.skip else []:
            key, sid = f"{name}/{backend}", f"bench-{name}-{backend}"
            pp = start_poller(bench, factory, sid, backend, path)
            setup.pollers[key] = pp
            setup.cells.append(
                Cell(
                    key,
                    "poller",
                    lib,
                    f"{name}, {backend} backend",
                    pids(pp.pid),
                    poller_source(sid, job),
                )
            )
            if bench.slow is not None and backend == "netsnmp":
                setup.cells.append(
                    Cell(
                        f"{key}/slow",
                        "slow",
                        lib,
                        f"{name}, {backend} backend, {bench.slow.delay * 1000:g} ms devices",
                        pids(pp.pid),
                        slow_source(sid, job, bench.slow.hosts, bench.slow.port),
                    )
                )
        common = [sys.executable, str(WORKERS)]
        if "bare" not in args.skip:
            sid = f"bench-bare-{backend}"
            queue = wire.jobs_queue(sid)
            bench.loop.run_until_complete(bench.driver.declare_jobs_queue(queue, sid, qtype))
            opts = ["--dsn", vh.dsn, "--lib", lib, "--queue", queue, "--sid", sid]
            proc = procs.start(f"bare-{backend}", [*common, "bare", *opts])
            starting.append((f"bare-{backend}", proc))
            setup.cells.append(
                Cell(
                    f"bare/{lib}",
                    "bare",
                    lib,
                    f"bare pika worker, {lib}",
                    pids(proc.pid),
                    poller_source(sid, job),
                )
            )
            if bench.slow is not None and backend == "netsnmp":
                setup.cells.append(
                    Cell(
                        f"bare/{lib}/slow",
                        "slow",
                        lib,
                        f"bare pika worker, {lib}, {bench.slow.delay * 1000:g} ms devices",
                        pids(proc.pid),
                        slow_source(sid, job, bench.slow.hosts, bench.slow.port),
                    )
                )
        if {"celery", "celery-client"} <= args.skip:
            continue
        sid = f"bench-celery-{backend}"
        queue = wire.jobs_queue(sid)
        qargs = json.dumps(wire.jobs_queue_arguments(sid, qtype))
        opts = [
            "--dsn",
            vh.dsn,
            "--lib",
            lib,
            "--queue",
            queue,
            "--sid",
            sid,
            "--queue-arguments",
            qargs,
        ]
        n = args.celery_concurrency
        worker = procs.start(f"celery-{backend}", [*common, "celery", *opts, f"--concurrency={n}"])
        bench.loop.run_until_complete(bench.driver.declare_jobs_queue(queue, sid, qtype))

        def tree(worker: subprocess.Popen[bytes] = worker) -> list[int]:
            return process_tree(worker.pid)

        if "celery" not in args.skip:
            setup.cells.append(
                Cell(
                    f"celery/{lib}",
                    "celery",
                    lib,
                    f"Celery prefork x{n}, {lib}, our driver",
                    tree,
                    celery_source(sid, job, "bench.snmp_get"),
                )
            )
        if "celery-client" not in args.skip:
            client = procs.start(
                f"celery-client-{backend}",
                [*common, "celery-client", *opts, "--job-template", json.dumps(job)],
                stdin=True,
            )
            starting.append((f"celery-client-{backend}", client))
            setup.cells.append(
                Cell(
                    f"celery-client/{lib}",
                    "celery-client",
                    lib,
                    f"Celery prefork x{n}, {lib}, `apply_async`",
                    tree,
                    client=client,
                )
            )
    for name, proc in starting:
        procs.wait_ready(name, proc)
    for pp in setup.pollers.values():
        pp.wait_ready(timeout=60)
    setup.rss["idle"] = {k: rss_mb(pp.pid) for k, pp in setup.pollers.items()}
    return setup


def run_cells(bench: Bench, setup: Setup, host: str, port: int) -> dict[str, list[WalkSample]]:
    """Warm-up, interleaved throughput rounds, latency rounds, walks."""
    args, cells = bench.args, setup.cells
    for cell in cells:  # sessions, engines, connections, thread pools
        warm = bench.measure(cell, window=args.window, seconds=args.warmup, max_jobs=5000)
        if warm.jobs == 0 or warm.errors:
            sys.exit(f"{cell.key}: warm-up failed ({warm.jobs} jobs, {warm.errors} errors)")
    setup.rss["warm"] = {k: rss_mb(pp.pid) for k, pp in setup.pollers.items()}
    for r in range(args.rounds):
        for cell in cells:
            s = bench.measure(cell, window=args.window, seconds=args.seconds, max_jobs=200_000)
            cell.throughput.append(s)
            print(
                f"round {r + 1} {cell.key:22s} {s.rate:7.0f} jobs/s "
                f"worker {s.per_job_ms(s.worker_cpu):.3f} ms/job "
                f"broker {s.per_job_ms(s.broker_cpu):.3f} ms/job "
                f"busy {s.busy_cores:.2f} cores (jobs {s.jobs} err {s.errors} lost {s.lost})",
                flush=True,
            )
    for r in range(args.rounds):
        for cell in cells:
            if cell.family == "slow":
                continue  # a job takes the devices' delay: throughput only
            s = bench.measure(cell, window=1, seconds=10, max_jobs=args.latency_jobs)
            cell.latency.append(s)
            print(
                f"latency {r + 1} {cell.key:22s} p50 {pct(s.latencies, 0.5) * 1000:.2f} ms "
                f"p99 {pct(s.latencies, 0.99) * 1000:.2f} ms ({s.jobs} jobs)",
                flush=True,
            )
    walks = {} if "walks" in args.skip else run_walks(bench, setup.pollers, host, port, args)
    setup.rss["end"] = {k: rss_mb(pp.pid) for k, pp in setup.pollers.items()}
    setup.jobs = {c.key: sum(s.jobs for s in c.throughput + c.latency) for c in cells}
    return walks


# ------------------------------------------------------------------------------------------
# Profile (issue 8, item 2): where `poller run` spends its CPU per job

#: (category, pattern on a py-spy frame "function (file:line)"); a sample goes to the category
#: of the innermost frame that matches one of these; generic frames only when none does.
PROFILE_RULES: list[tuple[str, str]] = [
    ("log (structlog: job_finished, bound context)", r"structlog/|poller/logging\.py"),
    ("decode + validate the job (pydantic)", r"decode_job|_JOB_ADAPTER"),
    ("encode the result (model_dump_json)", r"model_dump_json|encode \(poller/wire"),
    (
        "build the result (JobResult, timestamps)",
        r"JobResult|error_result|BaseModel\.__init__|now \(poller/wire",
    ),
    ("confirm handling", r"_on_confirm"),
    ("ack", r"Broker\.ack|basic_ack"),
    (
        "publish (properties, basic_publish, frames)",
        r"publish|BasicProperties|amqp_properties|properties \(poller/broker",
    ),
    (
        "receive (frames, delivery, task start)",
        r"_on_socket_readable|_proto_data_received|_on_message|_on_delivery",
    ),
    ("socket writes (pika transport)", r"_on_socket_writable|_produce \(pika"),
    ("SNMP driver and backend", r"poller/drivers/|ezsnmp|pysnmp|pyasn1"),
    (
        "runner (deadline, device limiter, quarantine)",
        r"poller/runner\.py|poller/quarantine\.py|poller/credentials\.py",
    ),
    ("worker task (_handle, _process, _deliver)", r"poller/worker\.py"),
]
GENERIC_RULES: list[tuple[str, str]] = [
    (
        "thread-pool hand-off",
        r"concurrent/futures|threading\.py|_write_to_self|call_soon_threadsafe",
    ),
    ("event loop (select, scheduling)", r"asyncio/|selectors\.py"),
]


def summarise_profile(
    raw: Path, top: int = 25
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, categories, top self functions, top inclusive poller/pika functions) in %."""
    semantic = [(name, re.compile(p)) for name, p in PROFILE_RULES]
    generic = [(name, re.compile(p)) for name, p in GENERIC_RULES]
    total = 0
    categories: dict[str, int] = {}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        if " " not in line:
            continue
        stack, count_text = line.rsplit(" ", 1)
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        category = None
        for rules in (semantic, generic):
            for frame in reversed(frames):
                category = next((name for name, rx in rules if rx.search(frame)), None)
                if category:
                    break
            if category:
                break
        category = category or "other"
        categories[category] = categories.get(category, 0) + count

    def ranked(d: dict[str, int], keep: Callable[[str], bool], n: int) -> list[tuple[str, float]]:
        items = sorted(((k, v) for k, v in d.items() if keep(k)), key=lambda kv: -kv[1])
        return [(k, v / total * 100) for k, v in items[:n]]

    interesting = re.compile(r"poller/|pika/|structlog|pydantic|ezsnmp|pysnmp")
    return (
        total,
        ranked(categories, lambda _k: True, 50),
        ranked(own, lambda _k: True, top),
        ranked(inclusive, lambda k: bool(interesting.search(k)), top * 2),
    )


def run_profile(args: argparse.Namespace) -> int:
    """py-spy (`--gil`: the thread holding the GIL, i.e. Python CPU) on a loaded poller."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is needed: .venv/bin/pip install py-spy")
    backend = args.profile
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    loop = asyncio.new_event_loop()
    factory: PollerFactory | None = None
    try:
        with vhost() as vh, snmp_agent() as (host, port, _agent_pid):
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            factory = PollerFactory(vh, workdir)
            sid = f"bench-poller-{backend}"
            bench = Bench(args, driver, loop, [], 0, get_job(host, port))
            pp = start_poller(bench, factory, sid, backend, args.candidate)
            pp.wait_ready(timeout=60)
            if args.profile_job == "walk":
                source, window = poller_source(sid, walk_job(host, port, args.walk_root)), 1
            else:
                source, window = poller_source(sid, get_job(host, port)), args.window
            loop.run_until_complete(driver.round(source, window=window, seconds=1.0, max_jobs=5000))
            raw = workdir / "py-spy.txt"
            seconds = min(args.profile_seconds, 60.0)
            spy_proc = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pp.pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--function",
                    "--gil",
                    "--nonblocking",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            cpu0 = cpu_seconds([pp.pid])
            rr = loop.run_until_complete(
                driver.round(source, window=window, seconds=seconds - 1, max_jobs=1_000_000)
            )
            cpu = cpu_seconds([pp.pid]) - cpu0
            spy_proc.wait(timeout=seconds + 60)
            loop.run_until_complete(driver.close())
            pp.terminate(timeout=30)
    finally:
        for p in factory.started if factory is not None else []:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                p.kill()
        loop.close()
    total, categories, own, inclusive = summarise_profile(raw)
    print(
        f"poller ({backend}) under load: {rr.jobs / rr.elapsed:.0f} jobs/s, "
        f"{cpu / max(rr.jobs, 1) * 1000:.3f} ms worker CPU per job; py-spy --gil: {total} samples"
    )
    print("\nwhere the GIL-holding time goes (% of samples):")
    for name, share in categories:
        print(f"  {share:5.1f}%  {name}")
    print("\ntop functions by own time:")
    for name, share in own:
        print(f"  {share:5.1f}%  {name}")
    print("\ntop poller/pika/structlog/pydantic/SNMP functions, inclusive:")
    for name, share in inclusive:
        print(f"  {share:5.1f}%  {name}")
    print(f"\nraw stacks: {raw}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------
# Walks


@dataclass
class WalkSample:
    oids: int
    seconds: float
    run_ms: float | None = None  # the poller's own duration_ms (without queue and transfer)


def run_walks(
    bench: Bench,
    pollers: dict[str, PollerProcess],
    host: str,
    port: int,
    args: argparse.Namespace,
) -> dict[str, list[WalkSample]]:
    job = walk_job(host, port, args.walk_root)
    out: dict[str, list[WalkSample]] = {"snmpbulkwalk": []}
    for key in pollers:
        out[key] = []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MIBS": ":", "HOME": "/nonexistent"}
    cmd = [
        shutil.which("snmpbulkwalk") or "/usr/bin/snmpbulkwalk",
        "-v2c",
        "-c",
        "public",
        "-On",
        "-Cr25",
        "-t",
        "5",
        "-r",
        "1",
        f"{host}:{port}",
        args.walk_root,
    ]
    for r in range(args.walk_rounds):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
        elapsed = time.perf_counter() - t0
        # One varbind per line that starts with an OID (a multi-line string value adds lines).
        oids = done.stdout.count(b"\n.") + done.stdout.startswith(b".")
        if done.returncode == 0:
            out["snmpbulkwalk"].append(WalkSample(oids, elapsed))
        else:
            print(f"snmpbulkwalk failed ({done.returncode}): {done.stderr[:200]!r}", flush=True)
        for key in pollers:
            sid = "bench-" + key.replace("/", "-")
            rr = bench.loop.run_until_complete(
                bench.driver.round(
                    poller_source(sid, job), window=1, seconds=60, max_jobs=1, keep_bodies=True
                )
            )
            if not rr.bodies:
                sys.exit(f"{key}: no walk result")
            result = json.loads(rr.bodies[0])
            if result["status"] != "ok":
                sys.exit(f"{key}: walk failed: {result['error']}")
            n = len(result["data"]["varbinds"])
            out[key].append(WalkSample(n, rr.elapsed, result["duration_ms"]))
        print(
            f"walk {r + 1}: "
            + ", ".join(
                f"{k} {v[-1].oids} OIDs in {v[-1].seconds * 1000:.0f} ms"
                for k, v in out.items()
                if v
            ),
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------
# Report


def _paired(a: list[Sample], b: list[Sample], f: Callable[[Sample, Sample], float]) -> list[float]:
    return [f(x, y) for x, y in zip(a, b, strict=False) if x.jobs and y.jobs]


def _rate(a: Sample, b: Sample) -> float:
    return a.rate / b.rate


def _cpu(a: Sample, b: Sample) -> float:
    return a.per_job_ms(a.worker_cpu) / b.per_job_ms(b.worker_cpu)


def _ratio_line(name: str, values: list[float], goal: str, target: float, higher: bool) -> str:
    if not values:
        return f"| {name} | not measured | {goal} | - |"
    med = statistics.median(values)
    if (med >= target) if higher else (med <= target):
        verdict = "met"
    elif higher:
        verdict = f"**missed** by {(1 - med / target) * 100:.0f}% (needs {target / med:.2f}x)"
    else:
        verdict = f"**missed** by {(med / target - 1) * 100:.0f}% (needs {med / target:.2f}x less)"
    return f"| {name} | {med:.2f}x ({min(values):.2f}-{max(values):.2f}) | {goal} | {verdict} |"


def _header(
    args: argparse.Namespace, load_start: float, load_end: float, runtime: float
) -> list[str]:
    v = versions()
    today = datetime.now(UTC).date().isoformat()
    mode = " --quick" if args.quick else ""
    cores = os.cpu_count()
    return [
        HEADING,
        "",
        f"`.venv/bin/python bench/run.py{mode}`, {today}, on {platform.machine()}, {cores} cores "
        f"({cpu_model()}); load average (1 min) {load_start:.2f} at the start and "
        f"{load_end:.2f} at the end; {runtime:.0f} s in all. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        f"Setup: RabbitMQ and Net-SNMP `snmpd` on loopback, on the same {cores} cores as the "
        "driver and the worker under test. Each job is an `snmp.get` of sysName.0 (v2c). Every "
        f"job queue is a {args.queue_type} queue with the poller's arguments; every worker "
        "publishes its result to `usm_poller.results` (a quorum queue, read by the driver) with "
        "a publisher confirm and acks the job after the confirm. Throughput: "
        f"{args.window} jobs in flight, {args.rounds} rounds of {args.seconds:g} s per cell, "
        f"interleaved across cells; latency: 1 job in flight, {args.latency_jobs} jobs per round, "
        "publish to result received. Worker CPU per job: utime+stime of the worker's processes "
        "(Celery's prefork children included) over the round, divided by its jobs; broker CPU "
        "is RabbitMQ's `beam.smp`; busy cores is the whole machine. Medians (min-max) over the "
        "rounds.",
        "",
        "Workers: **poller** = `poller run`, concurrency 64, "
        "`USM_POLLER_PER_DEVICE_CONCURRENCY=64` (every job goes to the one agent; the default 4 "
        "would cap it), JSON logs with one `job_finished` line per job. **bare** = "
        "`bench/snmp_workers.py bare`: pika `AsyncioConnection`, `json.loads`, the GET, a "
        "hand-built result of the same shape, confirm, ack; ezsnmp sessions cached per thread "
        "(4 threads) or one pysnmp engine; prefetch 64. **Celery** = prefork "
        f"x{args.celery_concurrency}, `acks_late`, prefetch multiplier 4, py-amqp with "
        "`confirm_publish`, log level WARNING (no line per task); the task publishes the same "
        "result body to `usm_poller.results` itself and returns nothing (`ignore_result`), so "
        "its order is ours: execute, publish, confirm, ack. *our driver*: Celery protocol-2 "
        "messages published by the same driver as every other cell; *`apply_async`*: a client "
        "process calls `task.apply_async` with the same window (py-amqp waits for each "
        "publish's confirm) and reads the results with kombu.",
        "",
        *(
            [
                f"Rows with *{args.slow_delay * 1000:g} ms devices* (netsnmp only): the same "
                f"worker and window, each job to one of {len(SLOW_HOSTS)} devices in turn that "
                f"answer every request after {args.slow_delay * 1000:g} ms "
                "(`tests/support/slow_snmp.py`); throughput only. A worker that runs every job "
                f"in flight at once does up to {args.window / args.slow_delay:.0f} jobs/s "
                f"({args.window} / {args.slow_delay:g} s), a little less per round since the "
                "round's last jobs are waited for; one that runs them on 4 threads, "
                f"{4 / args.slow_delay:.0f}.",
                "",
            ]
            if args.slow_delay > 0
            else []
        ),
    ]


def _table(cells: list[Cell]) -> list[str]:
    lines = [
        "| worker | SNMP library | jobs/s | worker CPU/job | broker CPU/job "
        "| driver or client CPU/job | busy cores | p50, 1 in flight | p99, 1 in flight |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in cells:
        t, lat = cell.throughput, cell.latency
        lines.append(
            f"| {cell.label} | {cell.lib} | {spread([s.rate for s in t])} "
            f"| {spread([s.per_job_ms(s.worker_cpu) for s in t], '{:.3f}')} ms "
            f"| {spread([s.per_job_ms(s.broker_cpu) for s in t], '{:.3f}')} ms "
            f"| {spread([s.per_job_ms(s.client_cpu) for s in t], '{:.3f}')} ms "
            f"| {spread([s.busy_cores for s in t], '{:.2f}')} "
            f"| {spread([pct(s.latencies, 0.5) * 1000 for s in lat], '{:.2f}')} ms "
            f"| {spread([pct(s.latencies, 0.99) * 1000 for s in lat], '{:.2f}')} ms |"
        )
    errors = sum(s.errors + s.lost for c in cells for s in c.throughput + c.latency)
    return [*lines, "", f"Error results or lost jobs over all rounds: {errors}.", ""]


def _walk_table(args: argparse.Namespace, walks: dict[str, list[WalkSample]]) -> list[str]:
    if not walks:
        return []
    lines = [
        f"Walks of {args.walk_root} (GETBULK, max-repetitions 25, v2c), {args.walk_rounds} rounds, "
        "interleaved. `snmpbulkwalk` is timed as a whole process (start-up included); the "
        "poller end to end (publish to result received, the result's transfer included) and "
        "by its own `duration_ms`.",
        "",
        "| walker | OIDs | seconds | OIDs/s end to end | OIDs/s in the worker |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, samples in walks.items():
        if samples:
            rates = [s.oids / s.seconds for s in samples if s.seconds > 0]
            inner = [s.oids / (s.run_ms / 1000) for s in samples if s.run_ms]
            lines.append(
                f"| {key} | {spread([float(s.oids) for s in samples])} "
                f"| {spread([s.seconds for s in samples], '{:.3f}')} "
                f"| {spread(rates)} | {spread(inner) if inner else '-'} |"
            )
    return [*lines, ""]


def _targets(setup: Setup, walks: dict[str, list[WalkSample]], backends: list[str]) -> list[str]:
    by = {c.key: c for c in setup.cells}
    lines = [
        "Targets (issue 8, item 4), per replica, as medians (min-max) of per-round ratios of "
        "the same run:",
        "",
        "| target | measured | goal | verdict |",
        "| --- | ---: | ---: | --- |",
    ]
    for key, p in by.items():
        if p.family != "poller":
            continue
        lib = p.lib
        bare, cel = by.get(f"bare/{lib}"), by.get(f"celery/{lib}")
        client = by.get(f"celery-client/{lib}")
        checks: list[tuple[str, Cell | None, Callable[[Sample, Sample], float], str, float, bool]]
        checks = [
            ("jobs/s vs the bare floor", bare, _rate, ">= 0.85x", 0.85, True),
            ("jobs/s vs Celery, our driver", cel, _rate, ">= 1.6x", 1.6, True),
            ("jobs/s vs Celery, `apply_async`", client, _rate, ">= 2x", 2.0, True),
            ("CPU/job vs Celery's (our driver)", cel, _cpu, "<= 0.33x", 1 / 3, False),
            ("CPU/job vs the bare floor's", bare, _cpu, "<= 1.3x", 1.3, False),
        ]
        for name, other, f, goal, target, higher in checks:
            if other is not None:
                values = _paired(p.throughput, other.throughput, f)
                lines.append(_ratio_line(f"{key}: {name}", values, goal, target, higher))
        mine, ref = walks.get(key, []), walks.get("snmpbulkwalk", [])
        if mine and ref:
            ratios = [
                (a.oids / a.seconds) / (b.oids / b.seconds) for a, b in zip(mine, ref, strict=False)
            ]
            lines.append(
                _ratio_line(f"{key}: walk OIDs/s vs snmpbulkwalk", ratios, ">= 0.3x", 0.3, True)
            )
        idle = setup.rss.get("idle", {}).get(key)
        warm, end = setup.rss.get("warm", {}).get(key), setup.rss.get("end", {}).get(key)
        if idle is not None:
            ok = "met" if idle <= 80 else f"**missed** by {idle - 80:.0f} MB"
            lines.append(f"| {key}: RSS of an idle replica | {idle:.1f} MB | <= 80 MB | {ok} |")
        if warm is not None and end is not None:
            growth = end - warm
            ok = "met" if abs(growth) <= 5 else f"**missed** by {abs(growth) - 5:.1f} MB"
            jobs = setup.jobs.get(key, 0)
            lines.append(
                f"| {key}: RSS after warm-up to the end, over {jobs:,} jobs (goal: over 100k) "
                f"| {growth:+.1f} MB ({warm:.1f} to {end:.1f}) | +-5 MB | {ok} |"
            )
    del backends
    return [*lines, ""]


def render(
    args: argparse.Namespace,
    setup: Setup,
    *,
    walks: dict[str, list[WalkSample]],
    load_start: float,
    load_end: float,
    runtime: float,
    backends: list[str],
) -> str:
    lines = _header(args, load_start, load_end, runtime)
    lines += _table(setup.cells)
    lines += _walk_table(args, walks)
    lines += _targets(setup, walks, backends)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.exit(main())
