"""`satellite serve`'s submit-and-wait round trip against `satellite call` over AMQP, same run.

One `poller run` for a fresh satellite and a Net-SNMP agent, a `satellite serve` process (SQLite
history), and three callers taking turns, one `snmp.get` at a time each, N round trips:

* HTTP over the unix socket: `POST /v1/satellites/{id}/jobs` with `Prefer: wait=30`
  (`satellite.apiclient.ApiClient`, what `satellite --api` uses; keep-alive);
* HTTP over TCP, the same with a bearer token;
* HTTP over the unix socket with the standard library's `http.client` (one kept-alive
  connection): the same requests with a client that costs less per request than httpx, to
  tell the client's share of the round trip from the service's;
* AMQP: `satellite.Client.call()` (kombu; an exclusive reply queue, kept open), what
  `satellite call` does without its process start-up.

These are the strict comparison (the goal's verdict). Then, as an operator runs them, one
command per round trip, interleaved (`--operator-calls N`, default 20 each): `curl
--unix-socket` against the service, and the `satellite call` command over AMQP (its process
start-up included), timed from the start of the process to its exit.

`--base-source DIR` adds a second `satellite serve` run from another copy of the sources (for
example `git archive <commit> | tar -x -C DIR`), asked over its unix socket in the same rounds:
a before/after of a change to the service in one run (its row is labelled with DIR).

`--trace DIR` runs every process with bench/trace/ on `PYTHONPATH` (its sitecustomize.py
timestamps each step of a round trip on one clock) and prints, per caller, where the time goes:
the medians of each step's offset in the calls and of the per-call segments between the steps
(docs/performance.md leaves them to the section's text).

Usage: `.venv/bin/python bench/core_submit.py [--calls N]`; writes `## Core service submit`
in docs/performance.md. Goal (issue 14): HTTP p50 at most 1.3x the AMQP call's.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import py_spy, snmp_agent, start_serve, vhost, write_section  # noqa: E402

from satellite.apiclient import ApiClient, parse_addresses  # noqa: E402
from satellite.client import Client  # noqa: E402
from satellite.dispatch import build_job  # noqa: E402
from satellite.service.tokens import TokensFile  # noqa: E402
from tests.support.poller_proc import PollerFactory  # noqa: E402


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client` over a unix socket (kept alive between requests, as httpx's pool does)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def plain_caller(
    lean: http.client.HTTPConnection, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Callable[[], None]:
    """One submit-and-wait with `http.client` per call; exits on anything but 200."""
    raw = json.dumps(body).encode()
    sent = headers | {"Content-Type": "application/json"}

    def plain() -> None:
        lean.request("POST", url, body=raw, headers=sent)
        response = lean.getresponse()
        text = response.read()
        if response.status != 200:
            sys.exit(f"HTTP {response.status}: {text[:300]!r}")

    return plain


@dataclass(frozen=True)
class Scene:
    """What the callers need: the satellite, the agent, the service's addresses."""

    sid: str
    host: str
    port: int
    dsn: str
    sock: Path
    tcp_port: int
    token: str
    base_sock: Path | None

    @property
    def url(self) -> str:
        return f"/v1/satellites/{self.sid}/jobs"

    @property
    def body(self) -> dict[str, Any]:
        return {
            "kind": "snmp.get",
            "target": {"host": self.host, "port": self.port},
            "auth": {"version": "2c", "community": "public"},
            "params": {"oids": ["1.3.6.1.2.1.1.5.0"]},
        }


def operator_commands(scene: Scene) -> dict[str, list[str]]:
    """The two commands an operator would type: curl over the unix socket, `satellite call`."""
    return {
        "curl": [
            "curl", "-sS", "--fail", "-o", "/dev/null", "--max-time", "60",
            "--unix-socket", str(scene.sock),
            "-H", "Content-Type: application/json", "-H", "Prefer: wait=30",
            "--data-binary", json.dumps(scene.body), f"http://localhost{scene.url}",
        ],
        "cli": [
            sys.executable, "-m", "satellite", "call", scene.sid, "snmp.get",
            "--host", scene.host, "--port", str(scene.port), "--community", "public",
            "1.3.6.1.2.1.1.5.0", "--timeout", "30", "--dsn", scene.dsn,
        ],
    }  # fmt: skip


def command_caller(argv: list[str]) -> Callable[[], None]:
    """Run the command to its exit; exits the bench on a failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}

    def run() -> None:
        done = subprocess.run(argv, capture_output=True, env=env, timeout=90, check=False)
        if done.returncode != 0:
            sys.exit(f"{argv[0]}: exit {done.returncode}: {done.stderr[-300:]!r}")

    return run


def timed(
    call: object, n: int, calls: list[tuple[str, int, int]] | None = None, key: str = ""
) -> list[float]:
    """`n` calls, each one's ms; `calls` gets `(key, start, end)` of each (perf_counter_ns)."""
    out = []
    for _ in range(n):
        started = time.perf_counter_ns()
        call()  # type: ignore[operator]
        ended = time.perf_counter_ns()
        out.append((ended - started) / 1e6)
        if calls is not None:
            calls.append((key, started, ended))
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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="OUT",
        help="py-spy the service during the measured rounds into OUT (.svg flame graph, .txt"
        " raw stacks); docs/performance.md is left alone",
    )
    parser.add_argument("--operator-calls", type=int, default=20, metavar="N")
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="timestamp each step of the round trips in every process (bench/trace/) into DIR"
        " and print where the time goes; docs/performance.md is left alone",
    )
    parser.add_argument(
        "--base-source",
        type=Path,
        metavar="DIR",
        help="also run a `satellite serve` from the sources in DIR (a before/after row)",
    )
    return parser.parse_args()


def main() -> int:
    args = arguments()
    n = max(20, min(args.calls, 5000))
    sid = f"bench{os.getpid()}"
    load_start = os.getloadavg()
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_SUBMIT_TRACE"] = str(args.trace.resolve())
        paths = [str(ROOT / "bench" / "trace"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    with vhost() as amqp, snmp_agent() as (host, port, _pid), tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pollers = PollerFactory(amqp, workdir)
        served: list[tuple[subprocess.Popen[bytes], Path, int]] = []
        # Everything started is stopped, also when a later start fails (`sys.exit`).
        try:
            pollers(sid)
            served.append(start_serve(amqp.dsn, workdir))
            if args.base_source is not None:
                (workdir / "base").mkdir()
                # Its sources first; then this run's PYTHONPATH (bench/trace/ with --trace).
                paths = [str(args.base_source.resolve()), os.environ.get("PYTHONPATH", "")]
                source = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
                base = workdir / "base"
                served.append(start_serve(amqp.dsn, base, extra_env=source, cwd=base))
            token = TokensFile(workdir / "state" / "tokens.yaml").create("bench", ["submit"])
            proc, sock, tcp_port = served[0]
            scene = Scene(
                sid,
                host,
                port,
                amqp.dsn,
                sock,
                tcp_port,
                token,
                served[1][1] if args.base_source else None,
            )
            spy = py_spy(proc.pid, n / 100 + 5, args.profile) if args.profile else None
            calls: list[tuple[str, int, int]] | None = [] if args.trace else None
            samples = strict_rounds(scene, n, calls, args.trace)
            if args.trace is None:
                samples |= operator_rounds(scene, max(0, min(args.operator_calls, 500)))
            if spy is not None:
                spy.wait(timeout=n + 120)
        finally:
            for process, _, _ in served:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=40)
            for poller in pollers.started:
                if args.trace is None:
                    poller.kill()
                else:
                    poller.terminate(timeout=40)  # its events are written at exit

    if args.trace is not None and calls is not None:
        print(trace_report(args.trace, calls))
        return 0
    section = render(samples, n, load_start, os.getloadavg(), base=args.base_source)
    print(section)
    if args.profile:
        print(f"profile: {args.profile}")
        return 0
    write_section("## Core service submit", section)
    return 0


def mark_publishes(core: Client, marks: list[tuple[int, str]]) -> None:
    """Record when `core` publishes a job and when the broker has confirmed it."""
    publish = core._publish

    def marked(*args: Any, **kwargs: Any) -> None:
        marks.append((time.perf_counter_ns(), "publish"))
        try:
            publish(*args, **kwargs)
        finally:
            marks.append((time.perf_counter_ns(), "confirmed"))

    core._publish = marked  # type: ignore[method-assign]


def strict_rounds(
    scene: Scene,
    n: int,
    calls: list[tuple[str, int, int]] | None = None,
    trace: Path | None = None,
) -> dict[str, list[float]]:
    """The in-process callers, interleaved in rounds of 10 (load drifts hit all of them);
    `calls` gets each measured call's caller, start and end (perf_counter_ns) when given, and
    `trace/client.tsv` the AMQP caller's publishes (sent, confirmed)."""
    wait = {"Prefer": "wait=30"}
    with contextlib.ExitStack() as stack:
        unix = stack.enter_context(
            ApiClient(parse_addresses(f"unix:{scene.sock}"), timeout=60, connect_timeout=10)
        )
        tcp = stack.enter_context(
            ApiClient(
                parse_addresses(f"http://127.0.0.1:{scene.tcp_port}"),
                token=scene.token,
                timeout=60,
                connect_timeout=10,
            )
        )
        core = stack.enter_context(Client(scene.dsn))
        client_marks: list[tuple[int, str]] = []
        if trace is not None:
            mark_publishes(core, client_marks)
        lean = stack.enter_context(contextlib.closing(UnixHTTPConnection(scene.sock)))

        def over(api: ApiClient) -> None:
            response = api.request("POST", scene.url, json_body=scene.body, headers=wait, wait=30)
            if response.status_code != 200:
                sys.exit(f"HTTP {response.status_code}: {response.text[:300]}")

        def call() -> None:
            job = build_job(
                "snmp.get",
                target={"host": scene.host, "port": scene.port},
                auth={"version": "2c", "community": "public"},
                params={"oids": ["1.3.6.1.2.1.1.5.0"]},
            )
            result = core.call(scene.sid, job, timeout=30)
            if result.status != "ok":
                sys.exit(f"call: {json.dumps(result.model_dump(mode='json'))[:300]}")

        callers: dict[str, Callable[[], None]] = {
            "unix": lambda: over(unix),
            "tcp": lambda: over(tcp),
            "plain": plain_caller(lean, scene.url, scene.body, wait),
            "amqp": call,
        }
        if scene.base_sock is not None:
            before = stack.enter_context(
                ApiClient(
                    parse_addresses(f"unix:{scene.base_sock}"), timeout=60, connect_timeout=10
                )
            )
            callers["base"] = lambda: over(before)
        for fn in callers.values():  # warm-up
            timed(fn, 10)
        samples: dict[str, list[float]] = {key: [] for key in callers}
        for _ in range(n // 10):
            for key, fn in callers.items():
                samples[key] += timed(fn, 10, calls, key)
    if trace is not None:
        lines = "".join(f"{t}\t{name}\n" for t, name in client_marks)
        (trace / "client.tsv").write_text(lines)
    return samples


#: The steps of a round trip, in order, that `trace_report` measures from one to the next.
TRACE_CHAIN = (
    "serve http_read",
    "serve submit",
    "serve queued_write",
    "serve queued_committed",
    "serve amqp_send",
    "client publish",
    "poller job_delivered",
    "poller result_publish",
    "serve reply",
    "serve submitted",
)


def trace_report(trace: Path, calls: list[tuple[str, int, int]]) -> str:
    """Where each caller's round trips go (bench/trace/sitecustomize.py): for each process's
    step, the median of its first time inside a call's window (ms from the call's start), then
    the medians of the per-call segments between the steps of `TRACE_CHAIN` the caller passes."""
    processes: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(trace.glob("*.tsv")):
        events: list[tuple[int, str]] = []
        for line in path.read_text().splitlines():
            text, name = line.split("\t")
            events.append((int(text), name))
        events.sort()
        names = {name for _, name in events}
        role = (
            "client"
            if path.stem == "client"
            else "serve"
            if "submit" in names
            else "poller"
            if "job_delivered" in names
            else "other"
        )
        processes[f"{role}:{path.stem}"] = events
    out = []
    for key in dict.fromkeys(k for k, _, _ in calls):
        windows = [(s, e) for k, s, e in calls if k == key]
        offsets: dict[str, list[float]] = {}
        per_call: list[dict[str, float]] = []
        for start, end in windows:
            firsts: dict[str, float] = {}
            for proc, events in processes.items():
                role = proc.split(":")[0]
                for stamp, name in events:
                    step = f"{role} {name}"
                    if start <= stamp <= end and step not in firsts:
                        firsts[step] = (stamp - start) / 1e6
            for step, ms in firsts.items():
                offsets.setdefault(step, []).append(ms)
            per_call.append(firsts | {"end": (end - start) / 1e6})
        total = statistics.median((e - s) / 1e6 for s, e in windows)
        out.append(f"{key}: {len(windows)} calls, p50 {total:.3f} ms")
        rows = sorted((statistics.median(v), len(v), step) for step, v in offsets.items())
        out += [f"  {m:7.3f} ms  {step} (in {c} calls)" for m, c, step in rows]
        # The steps seen in (nearly) every call of this caller; a call that misses one of
        # them (an event flushed late, a step skipped) counts from the step before it.
        chain = [s for s in TRACE_CHAIN if len(offsets.get(s, ())) >= 0.9 * len(windows)]
        segments: dict[str, list[float]] = {}
        for firsts in per_call:
            previous, at = "start", 0.0
            for step in [*chain, "end"]:
                if step in firsts and firsts[step] >= at:
                    segments.setdefault(f"{previous} -> {step}", []).append(firsts[step] - at)
                    previous, at = step, firsts[step]
        out.append("  segments (median of the calls, ms):")
        out += [
            f"    {statistics.median(v):7.3f}  {name} ({len(v)} calls)"
            for name, v in segments.items()
        ]
    return "\n".join(out)


def operator_rounds(scene: Scene, n: int) -> dict[str, list[float]]:
    """`curl` and `satellite call`, one process per round trip, alternately."""
    if n == 0:
        return {}
    ops = {key: command_caller(argv) for key, argv in operator_commands(scene).items()}
    for fn in ops.values():  # warm-up (the page cache)
        timed(fn, 1)
    samples: dict[str, list[float]] = {key: [] for key in ops}
    for _ in range(n):
        for key, fn in ops.items():
            samples[key] += timed(fn, 1)
    return samples


def render(
    samples: dict[str, list[float]],
    n: int,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
    *,
    base: Path | None = None,
) -> str:
    """The `## Core service submit` section of docs/performance.md."""
    amqp_p50 = statistics.median(samples["amqp"])
    rows = [
        ("HTTP over the unix socket, `ApiClient` (`Prefer: wait`)", "unix"),
        ("HTTP over TCP with a token, `ApiClient` (`Prefer: wait`)", "tcp"),
        ("HTTP over the unix socket, `http.client` (`Prefer: wait`)", "plain"),
        ("AMQP: `Client.call()` (what `satellite call` does)", "amqp"),
    ]
    if base is not None:
        rows.insert(1, ("… the service from the commit before (`--base-source`)", "base"))
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
    lines += operator_rows(samples)
    lines += [
        "",
        "The toolkit's own HTTP client for the HTTP rows but one: `ApiClient`",
        "(satellite/apiclient.py, what `satellite --api` uses: a kept-alive connection of its",
        "own to a unix socket or a proxy-less `http://` address, each request in one write),",
        "the standard library's `http.client` on one kept-alive unix connection for that one.",
        "The AMQP row uses the toolkit's own client (kombu).",
        "",
        *verdict(samples),
        "",
        "The toolkit's client, third pass (2026-12-07): `ApiClient` speaks to a unix socket",
        "and to a proxy-less `http://` address over a kept-alive connection of its own, each",
        "request in one write, the answer read by `http.client` (https and proxies still go",
        "through httpx, whose requests now also leave in one write). In process against a",
        "socket that answers at once (2,000 requests, load 2.4): 112-122 µs of CPU per request,",
        "as `http.client` (114-124), against 407 µs through httpx (500 before its URLs were",
        "parsed once and its cookie jar dropped). In a `--trace` run (`--calls 300`, load 2.4):",
        "the client's send to the service reading the request 0.13 ms (0.45 ms with httpx in",
        "a run an hour before), the answer ready to the client having it 0.29 ms (0.55); the",
        "round trip's p50 1.26x the AMQP call's in that run (`http.client`, which writes a",
        "request's head and body apart: 1.21x). On a quiet host, two `--calls 400` runs (load",
        "0.2-0.8): `ApiClient` over the unix socket 1.21x and 1.27x the AMQP call's p50, over TCP",
        "1.22x and 1.24x, `http.client` 1.22x and 1.23x (rounds' medians 1.20-1.25x); the same day",
        "at load 1.3-1.6, with httpx still in `ApiClient`: 1.45x / 1.48x / 1.27x.",
        "",
        "Where the time goes (`--trace DIR`: bench/trace/sitecustomize.py timestamps each step",
        "in every process, on one clock; `--calls 300 --base-source` of the commit before this",
        "round, 2026-12-07, load average 3.6 at the start, 3.9 at the end; medians of the",
        "calls' own segments, ms; the marks themselves cost a few µs a step):",
        "",
        "| segment | unix, httpx | unix, `http.client` | AMQP `Client.call()` |"
        " before, unix, httpx |",
        "| --- | --- | --- | --- | --- |",
        "| client sends -> the service reads the request | 1.17 | 0.40 | - | 1.30 |",
        "| request -> `JobService.submit` (uvicorn, routing, auth, body) | 0.57 | 0.47 | - |"
        " 0.81 |",
        "| validation, the `queued` row built | 0.28 | 0.27 | - | 0.29 |",
        "| the `queued` row committed (SQLite) | 0.54 | 0.54 | - | 0.62 |",
        "| publish written to the broker's socket | 0.22 | 0.21 | - | 0.39 |",
        "| broker -> the poller has the job | 1.97 | 1.89 | 3.11 (from the client's publish,"
        " kombu's own send and confirm wait in it) | 2.01 |",
        "| the poller runs the job (snmpd) | 1.89 | 1.92 | 1.81 | 1.75 |",
        "| result published -> the service's reply consumer has it | 1.46 | 1.47 | - | 1.49 |",
        "| reply -> the request's answer ready | 0.38 | 0.37 | - | 0.41 |",
        "| answer ready -> the client has the response | 1.76 | 1.03 | - | 1.84 |",
        "| result published -> the client has it | - | - | 1.67 | - |",
        "| whole round trip, p50 | 12.06 | 10.16 | 7.71 | 12.92 |",
        "",
        "The broker and poller legs are the AMQP call's: the same broker, queue and poller,",
        "as slow for either caller in the same run. What HTTP adds is its hop: the client's",
        "request and response (1.43 ms with `http.client`, 2.93 ms with httpx in this trace:",
        "httpx costs about as much again as `http.client` per request on this host), the",
        "service's Python before the publish (1.5-1.6 ms here: uvicorn, routing and auth,",
        "validation, the `queued` commit, the publish; 2.1 ms before this round) and after",
        "the reply (about 0.4 ms), and two more wake-ups of processes per round trip (client",
        "-> service -> broker and back), each of which waits for one of the 2 cores behind the",
        "other test runs. The medians of the segments add up to less than the p50 of the",
        "whole: the wake-ups' waits make a long tail in every segment, and the more segments a",
        "path has, the more of that tail it collects; this is why the ratio grows with the",
        "load average. In process, without the other processes, the same steps take a",
        "fraction of these times (a submit's CPU before the publish is 0.2-0.3 ms): on a",
        "busy host the service's steps run with cold caches and wait for a core.",
        "",
        "Runs of this round with `--base-source` (p50 over the AMQP p50; unix with httpx / the",
        "commit before / TCP with httpx / unix with `http.client`): the trace above, load",
        "3.6-3.9: 1.56x / 1.68x / 1.63x / 1.32x; `--calls 400`, load 4.1-4.7: 1.91x / 1.86x /",
        "1.88x / 1.49x; `--calls 400`, load 3.7-4.5: 1.73x / 1.76x / 1.74x / 1.39x. Round by",
        "round, this round's unix p50 over the commit before's in the same round: 0.96x and",
        "0.95x in the two `--calls 400` runs (medians of the rounds; 0.50-2.28 and 0.71-1.44",
        "between rounds). The service's own steps gained about 0.4 ms per round trip in the",
        "trace (request to submit -0.24, the commit -0.08, the publish's write -0.17); at",
        "this load the round trips' spread between rounds and runs is larger than that.",
        "",
        "Changed in this round (issue 14 item 9, 2026-12-07, second pass):",
        "",
        "- The submit is served in front of FastAPI's stack: the service's application",
        "  (`LeanSubmitApp`, satellite/service/api/jobs.py) hands a request the router would",
        "  give to the lean submit route (the first route: its path and method) to the same",
        "  work inside only Starlette's `ServerErrorMiddleware` (the same 500) and `AccessLog`",
        "  (the same `request_finished` line), its refusals rendered by the app's own",
        "  exception handlers: no FastAPI telemetry check, exception middleware, exit stack,",
        "  router or route wrapper per submit. In process (ASGI calls, a submit refused after",
        "  the scope check, the body and the satellite check; 8 alternating rounds of 2,000,",
        "  load 2): 70 µs of CPU per request against 108 through the stack (medians of the",
        "  rounds). In the trace: request -> `JobService.submit` 0.81 -> 0.57 ms.",
        "  tests/integration/test_service_api.py compares its answers with FastAPI's route's",
        "  (refusals, headers, records, log line, OpenAPI, an unexpected error's 500).",
        "- The job leaves in the call that publishes it: the service's publishing connection",
        "  (`BrokerOptions.write_through`) sends the first write of a loop turn at once when",
        "  nothing is queued before it, where pika queued every write until the next loop turn",
        "  found the socket writable (a turn and two `epoll_ctl`); the turn's later writes are",
        "  queued and joined as before (a batch is still a few send()s), and what a send cannot",
        "  take (a full socket, an error) is queued for pika, which meets an error at the",
        "  writable socket and aborts there, as before (tests/integration/test_broker_writes.py).",
        "  Only `satellite serve`'s connection: the pollers' are unchanged. In the trace: the",
        "  `queued` commit -> the job's send() 0.39 -> 0.22 ms.",
        "- The `queued` row's times are written with `isoformat` (the text SQLAlchemy's",
        "  `strftime` writes, for the years it writes with four digits; the others still by",
        "  `strftime`), and its record is built from the row's values without validating",
        "  them again: `sqlite_queued_params` 34 -> 14 µs and `queued_record` 26 -> 10 µs in",
        "  isolation (load 3.8). In the trace: the commit step 0.62 -> 0.54 ms.",
        *base_note(samples, base),
        "- Checked and left: between the reply and the answer, decoding the result (4 µs in",
        "  isolation), `merged` (13 µs) and the response's rendering (19 µs) are small beside",
        "  the loop turn and the write to the client; the validation (16 µs), the job id",
        "  (`uuid4`, 3-9 µs) and the kept request (5 µs) likewise. py-spy on the service (this",
        "  bench, 400 calls): its busiest single line is the publish's send() (about a fifth of",
        "  the event loop's busy samples; a send() that wakes RabbitMQ often hands it the",
        "  core), then the response's send() to the client and SQLite's execute and commit:",
        "  wake-ups and a write that must stay, not work to cut. FastAPI's native",
        "  OpenTelemetry does not see the submit any more (it is on only when an OpenTelemetry",
        "  SDK is configured in the process, which the service does not do).",
        "- The `queued` commit and the publish stay serial (the contract records `queued`",
        "  before publishing, and a publish that is not confirmed turns the row into",
        "  `not_published`); a single caller has nothing to group-commit with.",
        "",
        "Earlier rounds (2026-12-06/07):",
        "",
        "- Issue 14 item 9, first pass (trace then, load 6.2-7.2: unix with httpx 6.84 ms,",
        "  `http.client` 4.49 ms, AMQP 2.78 ms): the `queued` row on SQLite goes through the",
        "  driver (`SQLITE_QUEUED_UPSERT` with `sqlite_queued_params`, the same row, byte for",
        "  byte, as SQLAlchemy's upsert writes; tests/integration/test_service_store.py",
        "  compares them), on the connection kept for the event loop, and on the writer thread",
        "  for a group: `Store.record_queued` in isolation 132 -> 80 µs, the commit step 0.40",
        "  -> 0.18-0.22 ms in that trace. A response's status line and headers leave with its",
        "  first body bytes in one send() (uvicorn wrote them in two: two wake-ups of the",
        "  client): uvicorn's httptools protocol with a transport per response that holds the",
        "  head until the body's first write or the response's end (HEAD, an empty body, a",
        "  close); `100 Continue` is never held (tests/unit/test_service_listen.py); the last",
        "  segment 0.63 -> 0.56 ms with httpx. A `Prefer: wait` request awaits its own future",
        "  (no `asyncio.shield`): one loop turn less between the reply and the answer. Checked",
        "  then: the lane (a waited-for job goes to the interactive lane in both paths,",
        "  `Client.call()` too); uvicorn runs httptools without its access log; the waiter is",
        "  woken by the replica's reply queue, not by ingest; ingest's group commits (50 ms",
        "  linger) fall in one call in about fifteen.",
        *lean_route_note(),
        "- Found while profiling the submit in process (ASGI calls, cProfile on): a replica",
        "  started before the `usm_poller.events` exchange existed (no poller and no `satellite",
        "  declare` yet) ran its heartbeat thread in a busy loop for its whole life (about 70% of",
        "  a core while idle, and deaf to heartbeats once the exchange came), and the event loop",
        "  waited for the GIL behind it at each socket write and SQLite commit: a submit (202,",
        "  publish confirmed) took 13.7 ms of CPU and 26.6 ms of wall time; with the thread fixed",
        "  (it looks for the exchange again every 5 s) 2.0 and 6.6 ms. This bench starts its",
        "  service after its poller (the exchange exists), so its figures were not affected; a",
        "  service started before its first poller was.",
        "- Timers inside the service then (`--calls 200`, load 11-13, medians, ms): request to",
        "  `JobService.submit` 0.53 (routing, auth, body), validation 0.18, the `queued` commit",
        "  0.74, publish to confirm 2.87, confirm to reply 2.49, the response 0.35: 9.2 in the",
        "  service, against 5.25 for the whole AMQP call in the same run. py-spy on the same",
        "  bench: a third of the event loop's busy samples were inside pika's `send()` to the",
        "  broker (a write that wakes RabbitMQ often hands it the core).",
        "- The reply reaches the waiting request straight from the replica's reply queue (the",
        "  consumer sets the request's future): no store read, no poll, no commit on that path.",
        "- pika wrote each message as three `send()`s (method, header and body frames: three",
        "  TCP segments, three wake-ups of the broker); `poller.broker` now joins them (one",
        "  write per message), for the service's publishes and the poller's results alike:",
        "  with it the AMQP call fell from 6.5 to 4.0 ms and the HTTP submit from 11.5 to",
        "  7.7 ms (unix socket; one `--calls 100` run before and one after, load 4-5); the",
        "  ratio stayed (both paths gained).",
        "- The reply queue is consumed without acks (a reply only wakes a request; the history",
        "  keeps its own copy): one frame less to the broker per request.",
        "- uvicorn runs with httptools (now in the `core` extra) instead of h11: `GET /healthz`",
        "  with `http.client` 0.98 -> 0.58 ms at the client (one run each, load 4-6).",
        "- Tried and not kept: the reply consumer on a channel of its own (publishes alone on",
        "  theirs): four alternating runs, no difference beyond this host's spread; a shorter",
        "  GIL switch interval: no difference either.",
        "- Seen in the service's profile, off this path, and gone: the fleet collector built an",
        "  httpx client (and TLS context) per pass (now one per replica, closed at stop), and",
        "  the alert sender read the store every second (now woken by its replica's new",
        "  notifications, a row falling due, or a 15 s fallback poll).",
        "- The SQLite writer thread and the `queued` row committed on the event loop when",
        "  SQLite's lock is free (the commit p50 32.6 -> 1.5 ms at load 18-20); each job",
        "  validated once, a record serialised once; uvloop tried and not kept (a SIGTERM",
        "  during a waiting request answered 503).",
        "",
    ]
    return "\n".join(lines)


def verdict(samples: dict[str, list[float]]) -> list[str]:
    """The goal's verdict for each HTTP caller of this run."""
    amqp_p50 = statistics.median(samples["amqp"])
    parts = []
    for name, key in (
        ("over the unix socket with `ApiClient`", "unix"),
        ("over TCP with `ApiClient`", "tcp"),
        ("over the unix socket with `http.client`", "plain"),
    ):
        ratio = statistics.median(samples[key]) / amqp_p50
        per_round = statistics.median(round_ratios(samples, key))
        met = "met" if ratio <= 1.3 and per_round <= 1.3 else "not met"
        parts.append(f"{name} {ratio:.2f}x (rounds {per_round:.2f}x): {met}")
    text = (
        "Goal (issue 14): HTTP p50 at most 1.3x the AMQP call's (met: both the p50 ratio and"
        " the median of the rounds' ratios at most 1.3x). In this run: " + "; ".join(parts) + "."
    )
    return textwrap.wrap(text, 88)


def lean_route_note() -> list[str]:
    """The bullet on the lean submit route (an earlier round)."""
    return [
        "- The submit (`POST /v1/satellites/{id}/jobs`) is served by a plain Starlette route",
        "  ahead of FastAPI's (the same functions for the scope check, the body, the submit and",
        "  the response, errors raised to the same problem handlers; FastAPI's route stays for",
        "  the OpenAPI document; tests/integration/test_service_api.py compares the answers of",
        "  both): no dependency solving or parameter validation per request. In process (ASGI",
        "  calls without a socket, a submit refused after the scope check, the body and the",
        "  satellite check; logs at warning; 8 alternating rounds of 2,000, load 4.5-5.7): 109",
        "  µs of CPU per request against 312 through FastAPI's route (medians of the rounds).",
    ]


def base_note(samples: dict[str, list[float]], base: Path | None) -> list[str]:
    """This run's before/after (`--base-source`): each round's unix p50 over the same round's
    p50 of the service from the commit before."""
    if base is None or not samples.get("base"):
        return []
    new, old = statistics.median(samples["unix"]), statistics.median(samples["base"])
    paired = [
        statistics.median(samples["unix"][i : i + 10])
        / statistics.median(samples["base"][i : i + 10])
        for i in range(0, len(samples["unix"]), 10)
    ]
    text = (
        "In the table's run, the service from the commit before this round (`--base-source`)"
        f" in the same rounds: p50 {new:.2f} ms against {old:.2f} ms over the unix socket"
        f" ({new - old:+.2f} ms); this round's p50 over the one before, round by round:"
        f" {statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}). The steps"
        " above move by tenths of a ms; the whole round trip, by more than that between"
        " rounds of one run."
    )
    return textwrap.wrap(text, 88, initial_indent="- ", subsequent_indent="  ")


def operator_rows(samples: dict[str, list[float]]) -> list[str]:
    """The second table: one command per round trip, as an operator runs them (not the goal's
    comparison: the processes' start-up is in it)."""
    if not samples.get("cli") or not samples.get("curl"):
        return []
    cli_p50 = statistics.median(samples["cli"])
    lines = [
        "",
        f"As an operator runs them ({len(samples['cli'])} of each, interleaved; wall time of the"
        " command, process start-up included; not the goal's comparison):",
        "",
        "| command | p50 ms | p99 ms | p50 / `satellite call` p50 |",
        "| --- | --- | --- | --- |",
    ]
    for name, key in (
        ("`curl --unix-socket ... -H 'Prefer: wait=30'` (HTTP)", "curl"),
        ("`satellite call ID snmp.get ...` (AMQP)", "cli"),
    ):
        values = samples[key]
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {p(values, 0.99):.2f} | {median / cli_p50:.2f}x |")
    lines += [
        "",
        "`satellite call` starts a Python process for each job (imports, a broker connection,",
        "its reply queue) before it publishes; curl over the unix socket starts in a few ms and",
        "the service is already connected. What an operator at a shell sees, not the cost of",
        "the service: the goal's verdict stays on the table above.",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
