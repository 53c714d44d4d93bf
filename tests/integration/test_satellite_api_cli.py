"""`satellite call|submit|status|jobs|job --api`: the command line through a real `satellite
serve` process (with a real `poller run` and snmpd), over its unix socket and over TCP with a
token; a dead unix socket falls back to TCP; a wrong token, an unknown job, an unreachable or
silent service are one line on stderr with the exit code of docs/core.md."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from satellite.cli import main as satellite_cli
from satellite.service.tokens import TokensFile
from tests.support.netns import BlackHoleNetns
from tests.support.poller_proc import PollerFactory
from tests.support.rabbitmq import AmqpVhost
from tests.support.serve_proc import ServeFactory, ServeProcess
from tests.support.snmpd import Snmpd

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYS_NAME = "1.3.6.1.2.1.1.5.0"


@pytest.fixture
def serve(amqp_vhost: AmqpVhost, tmp_path: Path) -> Iterator[ServeFactory]:
    factory = ServeFactory(amqp_vhost, tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture(autouse=True)
def _no_core_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("USM_CORE_", "US_AMQP")):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = satellite_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, says: str) -> None:
    """`err` is one line on stderr, saying `says`."""
    assert err.count("\n") == 1, err
    assert says in err, err


def token_file(tmp_path: Path, name: str, scopes: list[str]) -> Path:
    token = TokensFile(tmp_path / "state" / "tokens.yaml").create(name, scopes)
    path = tmp_path / f"{name}.token"
    path.write_text(token + "\n")
    return path


def snmp_args(snmpd: Snmpd, community_file: Path) -> list[str]:
    community_file.write_text(snmpd.community)
    return [
        "snmp.get",
        "--host",
        snmpd.host,
        "--port",
        str(snmpd.port),
        "--community-file",
        str(community_file),
        SYS_NAME,
    ]


def addresses(serve: ServeProcess) -> dict[str, str]:
    return {"unix": f"unix:{serve.socket_path}", "tcp": f"http://127.0.0.1:{serve.tcp_port}"}


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_every_command_goes_through_the_api(
    *,
    over: str,
    serve: ServeFactory,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    sid: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = token_file(tmp_path, "cli", ["submit"])
    service = serve()
    start_poller(sid)
    api = ["--api", addresses(service)[over], "--token-file", str(token)]
    job = snmp_args(snmpd, tmp_path / "community")

    code, out, err = run(capsys, "call", sid, *job, *api, "--timeout", "30")
    assert (code, err) == (0, ""), err
    result = json.loads(out)
    assert result["status"] == "ok"
    assert result["data"]["varbinds"][0]["value"] == snmpd.sys_name
    called = result["job_id"]

    code, out, err = run(capsys, "submit", sid, *job, *api)
    assert (code, err) == (0, ""), err
    submitted = out.strip()
    code, out, err = run(capsys, "job", submitted, "--wait", "30", "--json", *api)
    assert (code, err) == (0, ""), err
    record = json.loads(out)
    assert (record["id"], record["status"], record["source"]) == (submitted, "ok", "api")
    assert record["result"]["data"]["varbinds"][0]["value"] == snmpd.sys_name
    code, out, _ = run(capsys, "job", submitted, *api)
    assert code == 0
    assert f"job:       {submitted}" in out
    assert snmpd.sys_name in out

    jobs_file = tmp_path / "jobs.jsonl"
    line = {
        "kind": "snmp.get",
        "target": {"host": snmpd.host, "port": snmpd.port},
        "auth": {"version": "2c", "community": snmpd.community},
        "params": {"oids": [SYS_NAME]},
    }
    jobs_file.write_text("\n".join(json.dumps(line) for _ in range(3)) + "\n")
    code, out, err = run(capsys, "submit", sid, "--file", str(jobs_file), "--json", *api)
    assert (code, err) == (0, ""), err
    assert json.loads(out)["submitted"] == 3

    # The history: all five, newest first; two pages of 3 + 2 by the printed cursor.
    deadline = time.monotonic() + 60
    while True:
        code, out, err = run(capsys, "jobs", "--satellite", sid, "--json", *api)
        assert code == 0, err
        items = json.loads(out)["items"]
        if len([r for r in items if r["status"] == "ok"]) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(items) == 5
    assert {r["status"] for r in items} == {"ok"}
    assert {called, submitted} <= {r["id"] for r in items}
    code, out, err = run(capsys, "jobs", "--satellite", sid, "--limit", "3", *api)
    assert code == 0, err
    more = [ln for ln in out.splitlines() if ln.startswith("more: --cursor ")]
    assert len(more) == 1
    assert "3 job(s)" in out
    cursor = more[0].removeprefix("more: --cursor ")
    code, out, err = run(
        capsys, "jobs", "--satellite", sid, "--limit", "3", "--cursor", cursor, "--json", *api
    )
    page = json.loads(out)
    assert (code, len(page["items"]), page["next_cursor"]) == (0, 2, None)
    seen = {r["id"] for r in page["items"]}
    assert not seen & {r["id"] for r in items[:3]}
    code, out, _ = run(capsys, "jobs", "--satellite", sid, "--status", "error", "--json", *api)
    assert (code, json.loads(out)["items"]) == (0, [])

    code, out, err = run(capsys, "status", sid, "--json", *api)
    assert code in (0, 1), err
    status = json.loads(out)["satellites"]
    assert [s["satellite_id"] for s in status] == [sid]
    code, out, err = run(capsys, "status", *api)
    assert code in (0, 1), err
    assert f"satellite {sid}" in out


def test_a_dead_unix_socket_falls_back_to_tcp(
    *,
    silent_udp_port: int,
    serve: ServeFactory,
    start_poller: PollerFactory,
    snmpd: Snmpd,
    sid: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = token_file(tmp_path, "cli", ["submit"])
    service = serve()
    start_poller(sid)
    dead = tmp_path / "dead.sock"  # a socket file nobody listens on: connection refused
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(dead))
    listener.close()
    api = f"unix:{dead},unix:{tmp_path}/missing.sock,{addresses(service)['tcp']}"
    job = snmp_args(snmpd, tmp_path / "community")

    code, out, err = run(capsys, "call", sid, *job, "--api", api, "--token-file", str(token))
    assert (code, err) == (0, ""), err
    assert json.loads(out)["data"]["varbinds"][0]["value"] == snmpd.sys_name

    # No result within --timeout: exit 3 naming the job, which the history still follows.
    silent = [*job[:3], "--port", str(silent_udp_port), *job[5:], "--job-timeout", "3"]
    code, out, err = run(
        capsys, "call", sid, *silent, "--timeout", "1", "--json", "--api", api,
        "--token-file", str(token),
    )  # fmt: skip
    assert code == 3
    one_line(err, "no result for job")
    failure = json.loads(out)["error"]
    assert failure["code"] == "no_result"
    code, out, err = run(
        capsys, "job", failure["job_id"], "--wait", "30", "--json", "--api", api,
        "--token-file", str(token),
    )  # fmt: skip
    assert code == 1, err
    assert (json.loads(out)["status"], json.loads(out)["error_code"]) == ("error", "device_timeout")

    # Without a token the TCP address answers 401: an answer, so no fallback past it.
    code, out, err = run(capsys, "jobs", "--api", f"unix:{dead},{addresses(service)['tcp']}")
    assert (code, out) == (4, "")
    assert "401 unauthorized" in err
    assert len(err.splitlines()) == 1


def test_refusals_are_one_line_with_the_code_and_the_exit_code(
    *, serve: ServeFactory, sid: str, snmpd: Snmpd, tmp_path: Path, capsys: Any
) -> None:
    service = serve()
    tcp = addresses(service)["tcp"]
    wrong = tmp_path / "wrong.token"
    secret = "usm_" + "x" * 40
    wrong.write_text(secret)
    job = snmp_args(snmpd, tmp_path / "community")

    for argv in (["jobs"], ["call", sid, *job], ["status"], ["submit", sid, *job]):
        code, out, err = run(capsys, *argv, "--api", tcp, "--token-file", str(wrong))
        assert code == 4, (argv, err)
        one_line(err, "401 unauthorized")
        assert secret not in err + out
    code, out, err = run(capsys, "jobs", "--api", tcp, "--token-file", str(wrong), "--json")
    assert json.loads(out)["error"]["problem"] == "unauthorized"

    reader = token_file(tmp_path, "reader", ["read"])
    code, out, err = run(capsys, "call", sid, *job, "--api", tcp, "--token-file", str(reader))
    assert code == 4
    one_line(err, "403 forbidden")

    unix = addresses(service)["unix"]  # trusted: no token needed
    code, out, err = run(capsys, "job", "no-such-job", "--api", unix)
    assert (code, out) == (1, "")
    assert "404 job_not_found" in err
    assert err.count("\n") == 1
    code, out, err = run(capsys, "jobs", "--cursor", "bogus", "--api", unix)
    assert code == 2
    assert "422 invalid_cursor" in err
    assert err.count("\n") == 1


def test_an_unreachable_service_is_one_line_within_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]  # bound, never listening: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts the connection; nobody ever answers
    try:
        api = f"unix:{tmp_path}/none.sock,http://127.0.0.1:{port}"
        code, out, err = run(capsys, "jobs", "--api", api, "--json")
        assert code == 4
        one_line(err, "Connection refused")
        assert json.loads(out)["error"]["code"] == "unreachable"

        started = time.monotonic()
        code, out, err = run(
            capsys,
            "jobs",
            "--api",
            f"http://127.0.0.1:{silent.getsockname()[1]},http://127.0.0.1:{port}",
            "--operation-timeout",
            "1",
        )
        assert time.monotonic() - started < 10
        assert (code, out) == (4, "")
        one_line(err, "no answer within 1 s")
    finally:
        closed.close()
        silent.close()


class _ProxyError(BaseHTTPRequestHandler):
    """What a reverse proxy in front of the service says when no replica answers."""

    def do_GET(self) -> None:
        body = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n"
        # A page that is not the service's: 502 for a job, a 200 "welcome" page for a search.
        self.send_response(200 if self.path.startswith("/v1/jobs?") else 502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_page_that_is_not_the_services_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _ProxyError)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}"
        code, out, err = run(capsys, "job", "x", "--api", api)
        assert (code, out) == (4, "")
        one_line(err, "502 http_502: Bad Gateway")
        code, out, err = run(capsys, "jobs", "--api", api)
        assert (code, out) == (4, "")
        one_line(err, "200 not_json: the answer is not a JSON object")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_address_that_never_answers_a_connect_gives_up_within_the_connect_timeout(
    blackhole_netns: BlackHoleNetns,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_CORE_", "US_AMQP"))}
    env["USM_CORE_API"] = f"http://{blackhole_netns.v4}:8480"
    cmd = ["ip", "netns", "exec", blackhole_netns.name, sys.executable, "-m", "satellite"]
    started = time.monotonic()
    done = subprocess.run(
        [*cmd, "job", "x", "--connect-timeout", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - started < 20
    assert (done.returncode, done.stdout) == (4, "")
    one_line(done.stderr, "timed out")
