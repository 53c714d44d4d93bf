"""What every benchmark here needs: a throw-away vhost, a Net-SNMP agent, a `satellite serve`
process, a py-spy recording of a process, the docs section."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller import wire  # noqa: E402
from tests.support import snmpd as snmpd_support  # noqa: E402
from tests.support.database import throwaway_database  # noqa: E402
from tests.support.rabbitmq import (  # noqa: E402
    AmqpVhost,
    rabbitmq_unavailable_reason,
    rabbitmqctl,
)

DOC = ROOT / "docs" / "performance.md"

#: A PostgreSQL database of its own (a URL), dropped afterwards: the history benchmarks'.
pg_database = throwaway_database


@contextlib.contextmanager
def vhost() -> Iterator[AmqpVhost]:
    """A fresh vhost on the machine's RabbitMQ (guest), deleted afterwards."""
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


def sample_results(n: int, tag: str) -> list[wire.JobResult]:
    """`n` ok `snmp.get` results of satellite `bench`, job ids `<tag>-<i>`."""
    now = datetime.now(UTC)
    return [
        wire.JobResult(
            job_id=f"{tag}-{i}",
            kind="snmp.get",
            satellite_id="bench",
            worker="poller-bench",
            status="ok",
            data={"varbinds": [{"oid": "1.3.6.1.2.1.1.5.0", "type": "OctetString", "value": "sw"}]},
            attempt=1,
            redelivered=False,
            started_at=now,
            finished_at=now,
            duration_ms=1.0,
        )
        for i in range(n)
    ]


@contextlib.contextmanager
def snmp_agent() -> Iterator[tuple[str, int, int]]:
    """(host, port, pid) of a Net-SNMP agent on loopback, running as nobody; stopped by PID."""
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


def start_serve(
    dsn: str, workdir: Path, *, extra_env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A `satellite serve` (SQLite history under `workdir`) on a unix socket and a loopback TCP
    port the kernel picks: (process, socket path, TCP port). Stop it with SIGTERM by its PID.
    `cwd`: its working directory (`python -m` looks there first: not a checkout when
    `PYTHONPATH` in `extra_env` names other sources)."""
    sock = workdir / "api.sock"
    log = (workdir / "serve.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
    env |= {
        "US_AMQP_DSN": dsn,
        "USM_CORE_STATE_DIR": str(workdir / "state"),
        "USM_CORE_LISTEN": f"unix:{sock},tcp:127.0.0.1:0",
        "USM_CORE_LOG_FORMAT": "json",
        "USM_CORE_LOG_LEVEL": "warning",
    } | (extra_env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "satellite", "serve"], env=env, stdout=log, stderr=log, cwd=cwd
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sock.exists():
            break
        time.sleep(0.1)
    else:
        proc.kill()
        sys.exit("satellite serve did not start")
    _wait_ready(proc, sock, deadline)
    # The TCP port: ask the kernel which port the process listens on (ss), loopback only.
    out = subprocess.run(
        ["ss", "-Hltnp"], capture_output=True, text=True, check=False, timeout=10
    ).stdout
    port = 0
    for line in out.splitlines():
        if f"pid={proc.pid}," in line:
            port = int(line.split()[3].rsplit(":", 1)[1])
    if not port:
        proc.kill()
        sys.exit("could not find satellite serve's TCP port")
    return proc, sock, port


def _wait_ready(proc: subprocess.Popen[bytes], sock: Path, deadline: float) -> None:
    """Until `GET /readyz` answers 200 over the unix socket (broker and store reachable)."""
    import httpx  # noqa: PLC0415 - the `core` extra; only the service benchmarks need it

    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=5
    ) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    proc.kill()
    sys.exit("satellite serve did not become ready")


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into `out` (flame graph SVG, or raw stacks for a
    `.txt`), all threads, idle frames left out; wait for the returned process."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is needed: .venv/bin/pip install py-spy")
    fmt = "raw" if out.suffix == ".txt" else "flamegraph"
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            "500",
            "--format",
            fmt,
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def write_section(heading: str, section: str) -> None:
    """Replace (or append) one benchmark's section of docs/performance.md; others stay."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")
