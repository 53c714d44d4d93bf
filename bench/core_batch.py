"""`satellite serve`'s batch submit against `satellite submit --file` over AMQP, same run.

A `satellite serve` process (SQLite history) and a satellite whose queues are declared (no
poller: the jobs stay queued, and the queue is purged after each cell). Three submitters take
turns, each submitting the same N `snmp.get` jobs per round:

* HTTP over the unix socket: `POST /v1/satellites/{id}/jobs:batch`, JSON arrays of up to 1,000
  jobs (the limit per request), one request after the other (httpx, keep-alive);
* HTTP over TCP, the same with a bearer token;
* AMQP: `satellite submit ID --file JOBS.jsonl --json` (a new process each round: its wall time,
  and the jobs/s it reports itself, which leaves out its start-up).

Every job is confirmed by the broker before it counts (the service: recorded `queued` in its
history first). For the HTTP cells the service's CPU time per job is read from /proc too.
Usage: `.venv/bin/python bench/core_batch.py [--jobs N] [--rounds R]`; writes
`## Core service batch submit` in docs/performance.md. Goal (issue 14): batch jobs/s at least
0.5x `satellite submit --file`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import start_serve, vhost, write_section  # noqa: E402

from poller import wire  # noqa: E402
from satellite.service.jobs import MAX_BATCH_JOBS  # noqa: E402
from satellite.service.tokens import TokensFile  # noqa: E402


def jobs(n: int) -> list[dict[str, object]]:
    return [
        {
            "v": wire.PROTOCOL_VERSION,
            "id": str(uuid.uuid4()),
            "kind": "snmp.get",
            "target": {"host": "127.0.0.1", "port": 161},
            "auth": {"version": "2c", "community": "public"},
            "params": {"oids": ["1.3.6.1.2.1.1.5.0"]},
        }
        for _ in range(n)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_cell(client: httpx.Client, sid: str, n: int, pid: int) -> tuple[float, float]:
    """(jobs/s, the service's CPU µs per job) of N jobs posted in batches of the limit, one
    request at a time."""
    batch = jobs(n)
    bodies = [
        json.dumps(batch[i : i + MAX_BATCH_JOBS]).encode() for i in range(0, n, MAX_BATCH_JOBS)
    ]
    headers = {"Content-Type": "application/json"}
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    for body in bodies:
        response = client.post(f"/v1/satellites/{sid}/jobs:batch", content=body, headers=headers)
        if response.status_code != 202:
            sys.exit(f"HTTP {response.status_code}: {response.text[:300]}")
    return n / (time.perf_counter() - started), (cpu_seconds(pid) - cpu) / n * 1e6


def cli_cell(dsn: str, sid: str, n: int, workdir: Path) -> tuple[float, float]:
    """(jobs/s over the process's wall time, jobs/s it reports) of `satellite submit --file`."""
    path = workdir / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs(n)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
    started = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "satellite",
            "submit",
            sid,
            "--file",
            str(path),
            "--json",
            "--dsn",
            dsn,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"satellite submit: {run.stderr[-300:]}")
    report = json.loads(run.stdout)
    return n / wall, float(report["jobs_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = max(100, min(args.jobs, 50_000))
    rounds = max(1, min(args.rounds, 50))
    sid = f"batch{os.getpid()}"
    load_start = os.getloadavg()
    with vhost() as amqp, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "satellite", "declare", sid, "--dsn", amqp.dsn],
            check=True,
            capture_output=True,
            timeout=60,
        )
        proc, sock, tcp_port = start_serve(amqp.dsn, workdir)
        token = TokensFile(workdir / "state" / "tokens.yaml").create("bench", ["submit"])
        samples: dict[str, list[float]] = {"unix": [], "tcp": [], "cli": [], "cli_own": []}
        cpu: dict[str, list[float]] = {"unix": [], "tcp": []}
        try:
            with (
                httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(sock)),
                    base_url="http://localhost",
                    timeout=120,
                ) as unix,
                httpx.Client(
                    base_url=f"http://127.0.0.1:{tcp_port}",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=120,
                ) as tcp,
                contextlib.closing(pika.BlockingConnection(pika.URLParameters(amqp.dsn))) as conn,
            ):
                channel = conn.channel()

                def purge() -> None:
                    channel.queue_purge(wire.jobs_queue(sid))

                http_cell(unix, sid, min(n, MAX_BATCH_JOBS), proc.pid)  # warm-up
                cli_cell(amqp.dsn, sid, min(n, MAX_BATCH_JOBS), workdir)
                purge()
                for _ in range(rounds):  # interleaved: load drifts hit all three
                    for key, client in (("unix", unix), ("tcp", tcp)):
                        rate, per_job = http_cell(client, sid, n, proc.pid)
                        samples[key].append(rate)
                        cpu[key].append(per_job)
                        purge()
                    wall, own = cli_cell(amqp.dsn, sid, n, workdir)
                    samples["cli"].append(wall)
                    samples["cli_own"].append(own)
                    purge()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)
    load_end = os.getloadavg()

    def spread(values: list[float], fmt: str = ",.0f") -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    def ratios(key: str, against: str) -> list[float]:
        return [a / b for a, b in zip(samples[key], samples[against], strict=True)]

    rows = [
        ("HTTP `jobs:batch` over the unix socket", "unix"),
        ("HTTP `jobs:batch` over TCP with a token", "tcp"),
        ("`satellite submit --file` (process wall time)", "cli"),
        ("`satellite submit --file` (its own jobs/s, no start-up)", "cli_own"),
    ]
    lines = [
        "## Core service batch submit",
        "",
        f"`bench/core_batch.py --jobs {n} --rounds {rounds}` ({datetime.now(UTC):%Y-%m-%d},"
        f" load average (1 min) {load_start[0]:.1f} at the start,",
        f"{load_end[0]:.1f} at the end; 2 cores shared with other test runs): the same",
        f"{n} `snmp.get` jobs per round to a declared satellite (no poller), every job confirmed",
        "by the broker (the service's recorded `queued` in SQLite first); HTTP in requests of",
        f"{MAX_BATCH_JOBS} jobs one after the other; submitters interleaved, each round's ratio",
        "against the same round's `satellite submit --file`. Medians (min-max) of the rounds.",
        "",
        "| submitter | jobs/s | / `submit --file` wall | / `submit --file` own"
        " | service CPU per job |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, key in rows:
        cpu_cell = f"{spread(cpu[key])} µs" if key in cpu else "-"
        lines.append(
            f"| {name} | {spread(samples[key])} | {spread(ratios(key, 'cli'), '.2f')}x"
            f" | {spread(ratios(key, 'cli_own'), '.2f')}x | {cpu_cell} |"
        )
    lines += [
        "",
        "Goal (issue 14): batch jobs/s at least 0.5x `satellite submit --file`'s.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section("## Core service batch submit", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
