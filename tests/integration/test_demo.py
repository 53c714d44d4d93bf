"""The README's first command, `bash scripts/demo.sh`, run for real in a vhost and dir of its own.

The demo starts snmpd, one `poller run` and `satellite serve` (SQLite in its state directory,
a unix socket there and loopback TCP), asks for SNMP data with `satellite call` and with curl over
the socket (`Prefer: wait=10`), finds the job again in the history, and stops everything it
started. `DEMO_SETUP=0` skips scripts/setup.sh (the test runs from a set-up checkout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.rabbitmq import AmqpVhost

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_answers_a_job_over_http_and_finds_it_in_the_history(
    amqp_vhost: AmqpVhost, tmp_path: Path
) -> None:
    snmpd = shutil.which("snmpd") or "/usr/sbin/snmpd"
    if not (Path(snmpd).exists() and shutil.which("curl")):
        if os.environ.get("CI"):
            pytest.fail("the demo needs snmpd and curl (scripts/setup.sh installs them)")
        pytest.skip("the demo needs snmpd and curl (scripts/setup.sh installs them)")
    demo = tmp_path / "demo"
    sid = f"demo-{uuid.uuid4().hex[:8]}"
    api_port = _free_port(socket.SOCK_STREAM)
    env = dict(os.environ) | {
        "US_AMQP_DSN": amqp_vhost.dsn,
        "USM_POLLER_SATELLITE_ID": sid,
        "DEMO_DIR": str(demo),
        "DEMO_SETUP": "0",
        "DEMO_SNMP_PORT": str(_free_port(socket.SOCK_DGRAM)),
        "DEMO_API_PORT": str(api_port),
    }
    for name in ("USM_CORE_DB", "USM_CORE_TOKENS_FILE", "USM_CORE_UNIX_AUTH", "USM_MANAGEMENT_URL"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out[-3000:]}\n{done.stderr[-3000:]}"

    # the job submitted over the unix socket came back within the wait, answered by the poller
    http = out[out.index("== HTTP over the unix socket") :]
    assert "curl --unix-socket" in http
    assert "-H 'Prefer: wait=10'" in http
    assert "HTTP 200" in http
    record = json.loads(http[http.index("\n{") : http.index("\n}\n") + 2])
    assert record["status"] == "ok"
    assert record["source"] == "api"
    assert record["result"]["data"]["varbinds"][0]["value"] == "demo-switch-1"
    job_id = record["id"]

    # found again in the history: by host, and by satellite with the `satellite call` jobs
    by_host = out[out.index("== the history, found again") : out.index("== the history of")]
    rows = re.findall(rf"^   ({UUID})  (\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", by_host, re.M)
    assert rows[0][:6] == (job_id, "api", "snmp.get", "127.0.0.1", env["DEMO_SNMP_PORT"], "ok")
    of_sid = out[out.index("== the history of") : out.index("== the same job over TCP")]
    rows = re.findall(rf"^   ({UUID})  (\S+)\s+(\S+)\s+\S+\s+\S+\s+(\S+)\s+(\S+)", of_sid, re.M)
    assert rows[0] == (job_id, "api", "snmp.get", "ok", "-")
    assert sorted(row[1:] for row in rows[1:]) == [
        ("cli", "snmp.get", "error", "device_timeout"),
        ("cli", "snmp.get", "ok", "-"),
        ("cli", "snmp.walk", "ok", "-"),
    ]
    # over TCP with the demo's read-only token, and refused without it
    tcp = out[out.index("== the same job over TCP") :]
    assert "   ok demo-switch-1" in tcp
    assert "without the token: HTTP 401" in tcp

    # everything it started is stopped: the service drained and removed its socket, the poller
    # stopped, snmpd is gone, nothing listens on the API port
    serve_log = [json.loads(line) for line in (demo / "serve.log").read_text().splitlines()]
    assert serve_log[-1]["event"] == "core_stopped"
    assert (demo / "core" / "history.sqlite3").is_file()
    assert not (demo / "core" / "api.sock").exists()
    poller_log = (demo / "poller.log").read_text().splitlines()
    assert json.loads(poller_log[-1])["event"] == "poller_stopped"
    assert not _pid_alive(int((demo / "snmpd" / "pid").read_text().split()[0]))
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", api_port))
