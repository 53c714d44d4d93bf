"""`satellite serve`'s submit-and-wait round trip against `satellite call` over AMQP, same run.

One `poller run` for a fresh satellite and a Net-SNMP agent, a `satellite serve` process (SQLite
history), and three callers taking turns, one `snmp.get` at a time each, N round trips:

* HTTP over the unix socket: `POST /v1/satellites/{id}/jobs` with `Prefer: wait=30` (httpx,
  keep-alive);
* HTTP over TCP, the same with a bearer token;
* AMQP: `satellite.Client.call()` (kombu; an exclusive reply queue, kept open), what
  `satellite call` does without its process start-up.

Usage: `.venv/bin/python bench/core_submit.py [--calls N]`; writes `## Core service submit`
in docs/performance.md. Goal (issue 14): HTTP p50 at most 1.3x the AMQP call's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import py_spy, snmp_agent, start_serve, vhost, write_section  # noqa: E402

from satellite.client import Client  # noqa: E402
from satellite.dispatch import build_job  # noqa: E402
from satellite.service.tokens import TokensFile  # noqa: E402
from tests.support.poller_proc import PollerFactory  # noqa: E402


def timed(call: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        out.append((time.perf_counter() - started) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def round_ratios(samples: dict[str, list[float]], key: str) -> list[float]:
    """Each round's p50 over the same round's AMQP p50 (paired: same minute, same load)."""
    return [
        statistics.median(samples[key][i : i + 10]) / statistics.median(samples["amqp"][i : i + 10])
        for i in range(0, len(samples[key]), 10)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="OUT",
        help="py-spy the service during the measured rounds into OUT (.svg flame graph, .txt"
        " raw stacks); docs/performance.md is left alone",
    )
    args = parser.parse_args()
    n = max(20, min(args.calls, 5000))
    sid = f"bench{os.getpid()}"
    load_start = os.getloadavg()
    with vhost() as amqp, snmp_agent() as (host, port, _pid), tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pollers = PollerFactory(amqp, workdir)
        pollers(sid)
        proc, sock, tcp_port = start_serve(amqp.dsn, workdir)
        token = TokensFile(workdir / "state" / "tokens.yaml").create("bench", ["submit"])
        body = {
            "kind": "snmp.get",
            "target": {"host": host, "port": port},
            "auth": {"version": "2c", "community": "public"},
            "params": {"oids": ["1.3.6.1.2.1.1.5.0"]},
        }
        url = f"/v1/satellites/{sid}/jobs"
        wait = {"Prefer": "wait=30"}
        try:
            with (
                httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(sock)),
                    base_url="http://localhost",
                    timeout=60,
                ) as unix,
                httpx.Client(
                    base_url=f"http://127.0.0.1:{tcp_port}",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                ) as tcp,
                Client(amqp.dsn) as core,
            ):

                def over(client: httpx.Client) -> None:
                    response = client.post(url, json=body, headers=wait)
                    if response.status_code != 200:
                        sys.exit(f"HTTP {response.status_code}: {response.text[:300]}")

                def call() -> None:
                    job = build_job(
                        "snmp.get",
                        target={"host": host, "port": port},
                        auth={"version": "2c", "community": "public"},
                        params={"oids": ["1.3.6.1.2.1.1.5.0"]},
                    )
                    result = core.call(sid, job, timeout=30)
                    if result.status != "ok":
                        sys.exit(f"call: {json.dumps(result.model_dump(mode='json'))[:300]}")

                for fn in (lambda: over(unix), lambda: over(tcp), call):  # warm-up
                    timed(fn, 10)
                samples: dict[str, list[float]] = {"unix": [], "tcp": [], "amqp": []}
                spy = py_spy(proc.pid, n / 100 + 5, args.profile) if args.profile else None
                for _ in range(n // 10):  # interleaved rounds: load drifts hit all three
                    samples["unix"] += timed(lambda: over(unix), 10)
                    samples["tcp"] += timed(lambda: over(tcp), 10)
                    samples["amqp"] += timed(call, 10)
            if spy is not None:
                spy.wait(timeout=n + 120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)
            for poller in pollers.started:
                poller.kill()

    section = render(samples, n, load_start, os.getloadavg())
    print(section)
    if args.profile:
        print(f"profile: {args.profile}")
        return 0
    write_section("## Core service submit", section)
    return 0


def render(
    samples: dict[str, list[float]],
    n: int,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
) -> str:
    """The `## Core service submit` section of docs/performance.md."""
    amqp_p50 = statistics.median(samples["amqp"])
    rows = [
        ("HTTP over the unix socket (`Prefer: wait`)", "unix"),
        ("HTTP over TCP with a token (`Prefer: wait`)", "tcp"),
        ("AMQP: `Client.call()` (what `satellite call` does)", "amqp"),
    ]
    lines = [
        "## Core service submit",
        "",
        f"`bench/core_submit.py --calls {n}` ({datetime.now(UTC):%Y-%m-%d}, load average (1 min)"
        f" {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end;",
        "2 cores shared with other test runs): one `snmp.get` at a time to one `poller run` and",
        "snmpd, submit until",
        "the result is back, callers interleaved in rounds of 10. Per-round ratio: the round's",
        "p50 over the same round's AMQP p50, median (min-max) of the rounds.",
        "",
        "| caller | p50 ms | p99 ms | p50 / AMQP p50 | per-round ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, key in rows:
        values = samples[key]
        median = statistics.median(values)
        per_round = round_ratios(samples, key)
        lines.append(
            f"| {name} | {median:.2f} | {p(values, 0.99):.2f} | {median / amqp_p50:.2f}x"
            f" | {statistics.median(per_round):.2f}x"
            f" ({min(per_round):.2f}-{max(per_round):.2f}) |"
        )
    lines += [
        "",
        "Goal (issue 14): HTTP p50 at most 1.3x the AMQP call's: not met on this host. What was",
        "measured and changed (2026-12-06/07; `--profile OUT` records the service with py-spy):",
        "",
        "- Timers inside `JobService.submit` (200 submits, load 18-20): the `queued` commit",
        "  p50 32.6 ms, the publish and its confirm 17 ms, the wait for the reply 25 ms,",
        "  validation 0.3 ms; the AMQP call took 43 ms in all. The commit was the hand-over to",
        "  the SQLite writer thread and back: two wake-ups of threads that wait for one of 2",
        "  cores shared by ~20 runnable processes, plus the GIL. Now a `queued` row is committed",
        "  at once on the event loop when no other writer holds SQLite's lock (busy timeout 0,",
        "  no checkpoint on that connection; otherwise the writer thread as before): the commit",
        "  p50 fell to 1.5 ms in the same conditions. The statements are built once (building",
        "  the upsert cost more than running it: 42% of the writer's time for result groups).",
        "- Each job is validated once (`wire.validate_job` on the parsed body, the wire's own",
        "  rules and messages) and a record is serialised once (pydantic straight to bytes).",
        "- What is left is the service's extra hop (client -> service -> broker and back) and",
        "  its CPU on a host where every wake-up waits for a core: the publish confirm and the",
        "  reply cost the service what they cost the AMQP caller. Per-round ratios (unix / TCP)",
        "  of `--calls 200` runs with py-spy attached: before the change 2.53/2.96, 2.94/2.86,",
        "  2.60/3.15x (load 15-20), after it 2.51/2.67, 2.11/2.32x (load 16-25): better, but",
        "  within the spread of this host (httptools was installed for all but the first of",
        "  them: uvicorn uses it when present; it is not a dependency, and the table's run is",
        "  without it). A separate publisher channel was not tried: the confirm waits on the",
        "  quorum queue, as the AMQP caller's does.",
        "- Earlier (2026-12-06): the SQLite writer thread (`store/writer.py`, 3.68x -> 2.6x at",
        "  load 5); uvloop tried and not kept (a SIGTERM during a waiting request answered 503,",
        "  tests/integration/test_satellite_serve.py); FastAPI's layer is not the cause",
        "  (`GET /healthz` 0.7-0.9 ms at the client).",
        "- Seen in the profile, outside this path: the fleet page's collector builds a new",
        "  HTTP client (and TLS context) per pass, and the alert sender polls the store every",
        "  second; both cost the replica CPU that a submit then waits for on a busy host.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
