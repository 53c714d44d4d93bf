"""SNMP benchmark: the poller against the bare floor, Celery and `snmpbulkwalk`, in one run.

    .venv/bin/python bench/run.py              # default: ~4 min, writes docs/performance.md
    .venv/bin/python bench/run.py --quick      # under a minute, writes too (say --no-write)
    .venv/bin/python bench/run.py --no-write --rounds 3 --seconds 2

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
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller import wire  # noqa: E402
from tests.support import snmpd as snmpd_support  # noqa: E402
from tests.support.poller_proc import PollerFactory, PollerProcess  # noqa: E402
from tests.support.rabbitmq import (  # noqa: E402
    AmqpVhost,
    rabbitmq_unavailable_reason,
    rabbitmqctl,
)

DOC = ROOT / "docs" / "performance.md"
HEADING = "## SNMP jobs and walks"
WORKERS = Path(__file__).resolve().parent / "snmp_workers.py"
GET_OID = "1.3.6.1.2.1.1.5.0"  # sysName.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAMILIES = ("poller", "bare", "celery", "celery-client")


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
            on_open_callback=lambda c: opened.done() or opened.set_result(c),
            on_open_error_callback=on_error,
            custom_ioloop=loop,
        )
        await asyncio.wait_for(opened, 30)
        channel_open: asyncio.Future[Any] = loop.create_future()
        self.conn.channel(on_open_callback=lambda ch: channel_open.set_result(ch))
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
                callback=lambda f: future.done() or future.set_result(f),
            )
            await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        if self.conn is not None and self.conn.is_open:
            closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.conn.add_on_close_callback(lambda *_: closed.done() or closed.set_result(None))
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


@contextlib.contextmanager
def vhost() -> Iterator[AmqpVhost]:
    reason = rabbitmq_unavailable_reason()
    if reason:
        sys.exit(f"RabbitMQ is needed: {reason}")
    name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield AmqpVhost(name, "127.0.0.1", 5672, "guest", "guest")
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def snmp_agent() -> Iterator[tuple[str, int, int]]:
    """(host, port, pid) of a Net-SNMP agent on loopback, running as nobody."""
    binary = shutil.which("snmpd") or "/usr/sbin/snmpd"
    workdir = Path(tempfile.mkdtemp(prefix="bench-snmpd-"))
    workdir.chmod(0o755)
    port = snmpd_support._free_udp_port()
    proc = snmpd_support._start(binary, workdir, port)
    try:
        deadline = time.monotonic() + 10
        while not snmpd_support._answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("snmpd did not start")
            time.sleep(0.05)
        yield "127.0.0.1", port, proc.pid
    finally:
        snmpd_support._stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


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
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
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
    vals = [v for v in values if v == v]  # drop NaN
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


def main(argv: list[str] | None = None) -> int:  # noqa: C901, PLR0912, PLR0915 - one scenario
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds (< 60 s)")
    ap.add_argument("--rounds", type=int, help="rounds per cell (default 5; quick 3)")
    ap.add_argument("--seconds", type=float, help="seconds per throughput round (3; quick 1)")
    ap.add_argument("--window", type=int, default=64, help="jobs in flight for throughput")
    ap.add_argument("--latency-jobs", type=int, help="jobs per window-1 round (300; quick 100)")
    ap.add_argument("--walk-root", default="1.3.6.1.2.1", help="subtree walked")
    ap.add_argument("--celery-concurrency", type=int, default=4, help="prefork children")
    ap.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    ap.add_argument("--backends", default="auto", help="pysnmp,netsnmp or auto (all that work)")
    ap.add_argument("--skip", default="", help="comma-separated families to leave out")
    ap.add_argument("--no-write", action="store_true", help="print only; docs untouched")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    args.rounds = max(1, min(args.rounds or (3 if args.quick else 5), 20))
    args.seconds = min(args.seconds or (1.0 if args.quick else 3.0), 30.0)
    args.latency_jobs = min(args.latency_jobs or (100 if args.quick else 300), 5000)
    skip = {s for s in args.skip.split(",") if s}
    started = time.monotonic()
    load_start = loadavg()
    print(f"load average at start: {load_start:.2f}", flush=True)

    if args.backends == "auto":
        backends = ["pysnmp"] + (["netsnmp"] if netsnmp_backend_works() else [])
    else:
        backends = [b for b in args.backends.split(",") if b]
    libs = {"pysnmp": "pysnmp", "netsnmp": "ezsnmp"}
    if "netsnmp" in backends and not ezsnmp_importable():
        sys.exit("the netsnmp backend needs ezsnmp")
    print(f"SNMP backends: {', '.join(backends)}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-snmp-"))
    procs = Processes(workdir)
    loop = asyncio.new_event_loop()
    broker_pids = pids_named("beam.smp")
    factory: PollerFactory | None = None
    try:
        with vhost() as vh, snmp_agent() as (host, port, agent_pid):
            job = get_job(host, port)
            driver = Driver(vh.dsn)
            loop.run_until_complete(driver.start())
            factory = PollerFactory(vh, workdir)
            cells: list[Cell] = []
            pollers: dict[str, PollerProcess] = {}
            starting: list[tuple[str, subprocess.Popen[bytes]]] = []
            for backend in backends:
                lib = libs[backend]
                tag = backend
                if "poller" not in skip:
                    sid = f"bench-poller-{tag}"
                    pollers[backend] = factory(
                        sid,
                        wait=False,
                        concurrency=64,
                        per_device_concurrency=64,
                        snmp_backend=backend,
                        heartbeat_interval=10,
                        queue_type=args.queue_type,
                        log_level="info",
                    )
                    pp = pollers[backend]
                    cells.append(
                        Cell(
                            f"poller/{backend}",
                            "poller",
                            lib,
                            f"poller, {backend} backend",
                            lambda pp=pp: [pp.pid],
                            poller_source(sid, job),
                        )
                    )
                common = ["--dsn", vh.dsn, "--lib", lib]
                if "bare" not in skip:
                    sid = f"bench-bare-{tag}"
                    queue = wire.jobs_queue(sid)
                    loop.run_until_complete(driver.declare_jobs_queue(queue, sid, args.queue_type))
                    proc = procs.start(
                        f"bare-{tag}",
                        [
                            sys.executable,
                            str(WORKERS),
                            "bare",
                            *common,
                            "--queue",
                            queue,
                            "--sid",
                            sid,
                        ],
                    )
                    starting.append((f"bare-{tag}", proc))
                    cells.append(
                        Cell(
                            f"bare/{lib}",
                            "bare",
                            lib,
                            f"bare pika worker, {lib}",
                            lambda proc=proc: [proc.pid],
                            poller_source(sid, job),
                        )
                    )
                if "celery" not in skip or "celery-client" not in skip:
                    sid = f"bench-celery-{tag}"
                    queue = wire.jobs_queue(sid)
                    qargs = wire.jobs_queue_arguments(
                        sid, "classic" if args.queue_type == "classic" else "quorum"
                    )
                    celery_common = [
                        *common,
                        "--queue",
                        queue,
                        "--sid",
                        sid,
                        "--queue-arguments",
                        json.dumps(qargs),
                    ]
                    worker = procs.start(
                        f"celery-{tag}",
                        [
                            sys.executable,
                            str(WORKERS),
                            "celery",
                            *celery_common,
                            f"--concurrency={args.celery_concurrency}",
                        ],
                    )
                    loop.run_until_complete(driver.declare_jobs_queue(queue, sid, args.queue_type))
                    tree = lambda worker=worker: process_tree(worker.pid)  # noqa: E731
                    if "celery" not in skip:
                        cells.append(
                            Cell(
                                f"celery/{lib}",
                                "celery",
                                lib,
                                f"Celery prefork x{args.celery_concurrency}, {lib}, our driver",
                                tree,
                                celery_source(sid, job, "bench.snmp_get"),
                            )
                        )
                    if "celery-client" not in skip:
                        client = procs.start(
                            f"celery-client-{tag}",
                            [
                                sys.executable,
                                str(WORKERS),
                                "celery-client",
                                *celery_common,
                                "--job-template",
                                json.dumps(job),
                            ],
                            stdin=True,
                        )
                        starting.append((f"celery-client-{tag}", client))
                        cells.append(
                            Cell(
                                f"celery-client/{lib}",
                                "celery-client",
                                lib,
                                f"Celery prefork x{args.celery_concurrency}, {lib}, `apply_async`",
                                tree,
                                client=client,
                            )
                        )
            for name, proc in starting:
                procs.wait_ready(name, proc)
            for pp in pollers.values():
                pp.wait_ready(timeout=60)
            rss_idle = {b: rss_mb(pp.pid) for b, pp in pollers.items()}
            bench = Bench(args, driver, loop, broker_pids, agent_pid, job)
            print(f"started in {time.monotonic() - started:.1f} s; work dir {workdir}", flush=True)

            # Warm-up: sessions, engines, connections, JIT-free but cache-warm code paths.
            for cell in cells:
                warm = bench.measure(cell, window=args.window, seconds=0.5, max_jobs=2000)
                if warm.jobs == 0 or warm.errors:
                    sys.exit(f"{cell.key}: warm-up failed ({warm.jobs} jobs, {warm.errors} errors)")
            rss_warm = {b: rss_mb(pp.pid) for b, pp in pollers.items()}

            for r in range(args.rounds):
                for cell in cells:
                    s = bench.measure(
                        cell, window=args.window, seconds=args.seconds, max_jobs=200_000
                    )
                    cell.throughput.append(s)
                    print(
                        f"round {r + 1} {cell.key:22s} {s.rate:7.0f} jobs/s "
                        f"worker {s.per_job_ms(s.worker_cpu):.3f} ms/job "
                        f"broker {s.per_job_ms(s.broker_cpu):.3f} ms/job "
                        f"busy {s.busy_cores:.2f} cores "
                        f"(jobs {s.jobs} err {s.errors} lost {s.lost})",
                        flush=True,
                    )
            for r in range(args.rounds):
                for cell in cells:
                    s = bench.measure(cell, window=1, seconds=10, max_jobs=args.latency_jobs)
                    cell.latency.append(s)
                    print(
                        f"latency {r + 1} {cell.key:22s} p50 {pct(s.latencies, 0.5) * 1000:.2f} ms "
                        f"p99 {pct(s.latencies, 0.99) * 1000:.2f} ms ({s.jobs} jobs)",
                        flush=True,
                    )
            walks = run_walks(bench, pollers, host, port, args)
            rss_end = {b: rss_mb(pp.pid) for b, pp in pollers.items()}
            jobs_done = {
                b: sum(
                    c.jobs for cell in cells if cell.key == f"poller/{b}" for c in cell.throughput
                )
                for b in pollers
            }
            loop.run_until_complete(driver.close())
            for pp in pollers.values():
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
    memory = {"idle": rss_idle, "warm": rss_warm, "end": rss_end, "jobs": jobs_done}
    report = render(
        args, cells, walks, memory, load_start, load_end, time.monotonic() - started, backends
    )
    print()
    print(report)
    if not args.no_write:
        write_section(report)
        print(f"\nwritten to {DOC.relative_to(ROOT)} under '{HEADING}'")
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
    walk_job = {
        "v": 1,
        "id": "x",
        "kind": "snmp.walk",
        "target": {"host": host, "port": port},
        "auth": {"version": "2c", "community": "public"},
        "params": {"oids": [args.walk_root], "max_repetitions": 25, "max_varbinds": 200000},
        "timeout": 60.0,
    }
    out: dict[str, list[WalkSample]] = {"snmpbulkwalk": []}
    for backend in pollers:
        out[f"poller/{backend}"] = []
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
    for r in range(args.rounds):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
        elapsed = time.perf_counter() - t0
        lines = done.stdout.count(b"\n")
        out["snmpbulkwalk"].append(WalkSample(lines, elapsed))
        for backend in pollers:
            sid = f"bench-poller-{backend}"
            rr = bench.loop.run_until_complete(
                bench.driver.round(
                    poller_source(sid, walk_job), window=1, seconds=60, max_jobs=1, keep_bodies=True
                )
            )
            if not rr.bodies:
                sys.exit(f"poller/{backend}: no walk result")
            result = json.loads(rr.bodies[0])
            if result["status"] != "ok":
                sys.exit(f"poller/{backend}: walk failed: {result['error']}")
            n = len(result["data"]["varbinds"])
            out[f"poller/{backend}"].append(WalkSample(n, rr.elapsed, result["duration_ms"]))
        print(
            f"walk {r + 1}: "
            + ", ".join(
                f"{k} {v[-1].oids} OIDs in {v[-1].seconds * 1000:.0f} ms" for k, v in out.items()
            ),
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------
# Report


def _paired(a: list[Sample], b: list[Sample], f: Callable[[Sample, Sample], float]) -> list[float]:
    return [f(x, y) for x, y in zip(a, b, strict=False) if x.jobs and y.jobs]


def _ratio_line(name: str, values: list[float], target: float, higher: bool) -> str:
    if not values:
        return f"| {name} | - | {'>=' if higher else '<='} {target:g} | not measured |"
    med = statistics.median(values)
    ok = med >= target if higher else med <= target
    if ok:
        verdict = "met"
    elif higher:
        verdict = f"missed by {(1 - med / target) * 100:.0f}%"
    else:
        verdict = f"missed by {(med / target - 1) * 100:.0f}%"
    shown = f"{med:.2f}x ({min(values):.2f}-{max(values):.2f})"
    return f"| {name} | {shown} | {'>=' if higher else '<='} {target:g}x | {verdict} |"


def render(  # noqa: C901, PLR0912, PLR0915 - one report
    args: argparse.Namespace,
    cells: list[Cell],
    walks: dict[str, list[WalkSample]],
    memory: dict[str, dict[str, Any]],
    load_start: float,
    load_end: float,
    runtime: float,
    backends: list[str],
) -> str:
    v = versions()
    today = datetime.now(UTC).date().isoformat()
    lines = [
        HEADING,
        "",
        f"`bench/run.py` (`.venv/bin/python bench/run.py{' --quick' if args.quick else ''}`), "
        f"{today}, on {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}); "
        f"load average (1 min) {load_start:.2f} at the start and {load_end:.2f} at the end; "
        f"{runtime:.0f} s in all. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        f"Setup: RabbitMQ on loopback (a fresh vhost), Net-SNMP `snmpd` on loopback, everything on "
        f"the same {os.cpu_count()} cores: broker, driver, agent and the worker under test. Each "
        f"job is an `snmp.get` of sysName.0 (v2c). Every job queue is a {args.queue_type} queue "
        "with the poller's arguments; every worker publishes its result to `usm_poller.results` "
        "(quorum queue) with a publisher confirm and then acks the job. Throughput: window "
        f"{args.window} jobs in flight, {args.rounds} rounds of {args.seconds:g} s per cell, "
        f"interleaved; latency: window 1, {args.latency_jobs} jobs per round (publish to result "
        "received by the driver). Worker CPU per job: utime+stime of the worker's processes "
        "(Celery's prefork children included) over the round, divided by its jobs; broker CPU is "
        "RabbitMQ's `beam.smp`. Figures are medians with min-max over the rounds.",
        "",
        "Workers: **poller** = `poller run` with concurrency 64 and "
        "`USM_POLLER_PER_DEVICE_CONCURRENCY=64` (every job goes to the one agent; the default of "
        "4 would cap one device), JSON logs with one `job_finished` line per job at info. "
        "**bare** = `bench/snmp_workers.py bare`, a pika `AsyncioConnection` worker with only "
        "`json.loads`, the GET, a hand-built result of the same shape, confirm, ack (ezsnmp: "
        "sessions per thread, 4 threads; pysnmp: one engine), prefetch 64. **Celery** = prefork "
        f"x{args.celery_concurrency}, `acks_late`, prefetch multiplier 4, py-amqp with "
        "`confirm_publish`, log level WARNING (no per-task line); the task publishes the same "
        "result body to `usm_poller.results` itself and returns nothing (`ignore_result`), so "
        "its order is ours: execute, publish, confirm, ack. *our driver* = Celery protocol-2 "
        "messages published by the same driver as every other cell; *`apply_async`* = a client "
        "process calling `task.apply_async` with the same window (py-amqp waits for each "
        "publish's confirm) and reading the results with kombu.",
        "",
        "| worker | SNMP library | jobs/s | worker CPU/job | broker CPU/job | driver or client "
        "CPU/job | busy cores | p50 (window 1) | p99 (window 1) |",
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
    lines += ["", f"Errors or lost jobs over all rounds: {errors}.", ""]

    # Walks
    lines += [
        f"Walks of {args.walk_root} (GETBULK, max-repetitions 25, v2c), {args.rounds} rounds, "
        "interleaved. `snmpbulkwalk` is timed as a whole process (start-up included); the poller "
        "end to end (publish to result received, including the result's transfer) and by its own "
        "`duration_ms`.",
        "",
        "| walker | OIDs | seconds | OIDs/s end to end | OIDs/s in the worker |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, samples in walks.items():
        if not samples:
            continue
        rates = [s.oids / s.seconds for s in samples if s.seconds > 0]
        inner = [s.oids / (s.run_ms / 1000) for s in samples if s.run_ms]
        lines.append(
            f"| {key} | {spread([float(s.oids) for s in samples])} "
            f"| {spread([s.seconds for s in samples], '{:.3f}')} "
            f"| {spread(rates)} | {spread(inner) if inner else '-'} |"
        )

    # Targets (item 4 of issue 8)
    by = {c.key: c for c in cells}
    lines += [
        "",
        "Targets (issue 8, item 4), as medians of per-round ratios (min-max), same run:",
        "",
        "| target | measured | goal | verdict |",
        "| --- | ---: | ---: | --- |",
    ]
    for backend in backends:
        lib = {"pysnmp": "pysnmp", "netsnmp": "ezsnmp"}[backend]
        p = by.get(f"poller/{backend}")
        if p is None:
            continue
        bare, cel, cc = (
            by.get(f"bare/{lib}"),
            by.get(f"celery/{lib}"),
            by.get(f"celery-client/{lib}"),
        )

        def rate(a: Sample, b: Sample) -> float:
            return a.rate / b.rate

        def cpu(a: Sample, b: Sample) -> float:
            return a.per_job_ms(a.worker_cpu) / b.per_job_ms(b.worker_cpu)

        if bare:
            lines.append(
                _ratio_line(
                    f"{backend}: poller jobs/s vs bare floor",
                    _paired(p.throughput, bare.throughput, rate),
                    0.85,
                    True,
                )
            )
        if cel:
            lines.append(
                _ratio_line(
                    f"{backend}: poller jobs/s vs Celery, our driver",
                    _paired(p.throughput, cel.throughput, rate),
                    1.6,
                    True,
                )
            )
        if cc:
            lines.append(
                _ratio_line(
                    f"{backend}: poller jobs/s vs Celery, `apply_async`",
                    _paired(p.throughput, cc.throughput, rate),
                    2.0,
                    True,
                )
            )
        if cel:
            lines.append(
                _ratio_line(
                    f"{backend}: poller CPU/job vs Celery's (our driver)",
                    _paired(p.throughput, cel.throughput, cpu),
                    1 / 3,
                    False,
                )
            )
        if bare:
            lines.append(
                _ratio_line(
                    f"{backend}: poller CPU/job vs the bare floor's",
                    _paired(p.throughput, bare.throughput, cpu),
                    1.3,
                    False,
                )
            )
        pw, bw = walks.get(f"poller/{backend}", []), walks.get("snmpbulkwalk", [])
        walk_ratios = [
            (a.oids / a.seconds) / (b.oids / b.seconds) for a, b in zip(pw, bw, strict=False)
        ]
        lines.append(_ratio_line(f"{backend}: walk OIDs/s vs snmpbulkwalk", walk_ratios, 0.3, True))
    for backend, idle in memory["idle"].items():
        end, warm, jobs = memory["end"][backend], memory["warm"][backend], memory["jobs"][backend]
        ok = "met" if idle <= 80 else f"missed by {idle - 80:.0f} MB"
        lines.append(f"| {backend}: RSS of an idle replica | {idle:.1f} MB | <= 80 MB | {ok} |")
        growth = end - warm
        ok = "met" if abs(growth) <= 5 else f"missed by {abs(growth) - 5:.1f} MB"
        lines.append(
            f"| {backend}: RSS growth after warm-up, over {jobs:,} jobs (goal: 100k) "
            f"| {growth:+.1f} MB ({warm:.1f} to {end:.1f}) | +-5 MB | {ok} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) this benchmark's section of docs/performance.md; others stay."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
