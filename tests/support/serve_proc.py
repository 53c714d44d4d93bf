"""`satellite serve` as a real process for tests: `ServeFactory(vhost, tmp_path)(**env)` starts one
on a unix socket and an ephemeral TCP port (JSON logs in tmp_path) and waits until it listens;
`ServeFactory.kill_all()` kills, by PID, those still running at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.rabbitmq import AmqpVhost

__all__ = ["ServeFactory", "ServeProcess"]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    socket_path: Path
    tcp_port: int = 0

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "<unparsed>", "text": line})
        return lines

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log_text()}")
            for line in self.log_lines():
                if line.get("event") == "listening":
                    tcp = [a for a in line["addresses"] if a.startswith("tcp:")]
                    self.tcp_port = int(tcp[0].rsplit(":", 1)[1])
                    return
            time.sleep(0.1)
        raise AssertionError(f"serve not listening after {timeout} s:\n{self.log_text()}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until `/readyz` says 200: the service listens before its broker connection is up,
        and a submit in between is 503 `broker_unavailable` (with Retry-After)."""
        deadline = time.monotonic() + timeout
        last = ""
        with self.unix() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log_text()}")
                try:
                    response = http.get("/readyz", timeout=5)
                except httpx.HTTPError as exc:
                    last = repr(exc)
                else:
                    if response.status_code == 200:
                        return
                    last = response.text
                time.sleep(0.1)
        raise AssertionError(f"serve not ready after {timeout} s: {last}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 40.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def tcp(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.tcp_port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=90,
        )

    def unix(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, base_url="http://localhost", timeout=90)


@dataclass
class ServeFactory:
    vhost: AmqpVhost
    tmp_path: Path
    started: list[ServeProcess] = field(default_factory=list)

    def __call__(
        self, *, wait: bool = True, env: dict[str, str] | None = None, **more: str
    ) -> ServeProcess:
        env = (env or {}) | more
        n = len(self.started)
        log_path = self.tmp_path / f"serve-{n}.log"
        socket_path = self.tmp_path / "run" / f"api-{n}.sock"
        socket_path.parent.mkdir(exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
        base |= {
            "US_AMQP_DSN": self.vhost.dsn,
            "USM_CORE_STATE_DIR": str(self.tmp_path / "state"),
            "USM_CORE_LISTEN": f"unix:{socket_path},tcp:127.0.0.1:0",
            "USM_CORE_LOG_FORMAT": "json",
        }
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "satellite", "serve"],
                env=base | env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        serve = ServeProcess(proc, log_path, socket_path)
        self.started.append(serve)
        if wait:
            serve.wait_listening()
        return serve

    def kill_all(self) -> None:
        """Kill (by PID) every service this factory started that still runs."""
        for serve in self.started:
            if serve.proc.poll() is None:
                serve.proc.kill()
                serve.proc.wait(timeout=10)
