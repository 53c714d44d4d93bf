"""FastAPI against bare Starlette for `satellite serve`'s request shape, same uvicorn, same run.

Each framework serves `GET /v1/jobs/{job_id}` returning a job-record-sized JSON document (no
database, no broker: the framework's own cost), in a uvicorn process of its own on a loopback
port; a small asyncio client keeps C keep-alive connections busy for S seconds and counts
requests and latencies. FastAPI runs the route as the service does: a path parameter, a
dependency (as the auth check is), a `JSONResponse`.

Usage: `.venv/bin/python bench/http_framework.py [--seconds S] [--connections C]`; writes
`## HTTP framework` in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_section  # noqa: E402

RECORD = {
    "id": "0b5c2e1e-6a1f-4f8e-9d7e-1f2a3b4c5d6e",
    "satellite_id": "7",
    "kind": "snmp.get",
    "host": "10.0.0.5",
    "port": None,
    "source": "api",
    "status": "ok",
    "error_code": None,
    "created_at": "2026-12-06T20:41:03.120Z",
    "answers": 1,
    "result": {"v": 1, "status": "ok", "data": {"varbinds": [{"oid": "1.3.6.1.2.1.1.5.0"}]}},
}

FASTAPI_APP = """
from typing import Annotated
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
RECORD = {record!r}
app = FastAPI(openapi_url="/v1/openapi.json")
async def who(request: Request) -> str:
    return request.headers.get("authorization", "unix")
@app.get("/v1/jobs/{{job_id}}")
async def get_job(job_id: str, caller: Annotated[str, Depends(who)]) -> JSONResponse:
    return JSONResponse(dict(RECORD, id=job_id))
"""

STARLETTE_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
RECORD = {record!r}
async def get_job(request):
    request.headers.get("authorization", "unix")
    return JSONResponse(dict(RECORD, id=request.path_params["job_id"]))
app = Starlette(routes=[Route("/v1/jobs/{{job_id}}", get_job)])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(source: str, workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    (workdir / f"{name}.py").write_text(source.format(record=RECORD))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{name}:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=str(workdir)),
    )
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"{name} did not start")


async def one_connection(port: int, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    request = b"GET /v1/jobs/j-1 HTTP/1.1\r\nHost: bench\r\n\r\n"
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), 10)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def load(port: int, seconds: float, connections: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    until = asyncio.get_running_loop().time() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(one_connection(port, until, latencies) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    seconds = max(1.0, min(args.seconds, 60.0))
    connections = max(1, min(args.connections, 256))
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-http-{os.getpid()}"
    workdir.mkdir()
    figures = {}
    for name, source in (("fastapi_app", FASTAPI_APP), ("starlette_app", STARLETTE_APP)):
        proc, port = start(source, workdir, name)
        try:
            asyncio.run(load(port, 1.0, connections))  # warm-up
            figures[name] = asyncio.run(load(port, seconds, connections))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    fastapi, starlette = figures["fastapi_app"], figures["starlette_app"]
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = "\n".join(
        [
            "## HTTP framework",
            "",
            f"`bench/http_framework.py --seconds {seconds:g} --connections {connections}` "
            f"({datetime.now(UTC):%Y-%m-%d}, one uvicorn process each, loopback TCP, "
            f"load average {load_avg}): `GET /v1/jobs/{{id}}` with a job-record-sized JSON body.",
            "",
            "| framework | requests/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- |",
            f"| FastAPI (path parameter, dependency, JSONResponse) | {fastapi[0]:,.0f} | "
            f"{fastapi[1]:.2f} | {fastapi[2]:.2f} |",
            f"| Starlette (the same route by hand) | {starlette[0]:,.0f} | {starlette[1]:.2f} | "
            f"{starlette[2]:.2f} |",
            "",
            f"FastAPI serves {fastapi[0] / starlette[0]:.2f}x Starlette's requests/s. The service",
            "expects hundreds of requests a second, so FastAPI stays: its OpenAPI document and",
            "its pydantic models shared with the wire are worth the difference.",
            "",
        ]
    )
    print(section)
    write_section("## HTTP framework", section)
    for path in workdir.iterdir():
        path.unlink()
    workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
