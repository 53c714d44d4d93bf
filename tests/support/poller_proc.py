"""Run the real `poller run` process in tests, and talk to it through the real broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pika
import pika.exceptions
import pytest

from poller import wire
from poller.health import check
from tests.support.rabbitmq import AmqpVhost


@dataclass
class PollerProcess:
    """One `python -m poller run` child process, its log file and its health file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    health_path: Path
    satellite_id: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        reason = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"poller exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            healthy, reason = check(self.health_path)
            if healthy:
                return
            time.sleep(0.1)
        raise AssertionError(f"poller not ready after {timeout} s ({reason}):\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "<unparsed>", "text": line})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        """Lines `name` of the replica and of its lane process (`poller lane`, started by
        default: the same output, `worker` ending in `-lane`)."""
        return [line for line in self.log_lines() if line.get("event") == name]

    def replica_events(self, name: str) -> list[dict[str, Any]]:
        """Lines `name` of the replica itself, not of its lane process."""
        return [e for e in self.events(name) if not str(e.get("worker", "")).endswith("-lane")]

    def lane_events(self, name: str) -> list[dict[str, Any]]:
        """Lines `name` of the replica's lane process."""
        return [e for e in self.events(name) if str(e.get("worker", "")).endswith("-lane")]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@dataclass
class PollerFactory:
    vhost: AmqpVhost
    tmp_path: Path
    started: list[PollerProcess] = field(default_factory=list)
    #: Settings every poller gets unless the call passes them (`poller_defaults` marker).
    defaults: dict[str, str | int | float] = field(default_factory=dict)

    def __call__(
        self,
        satellite_id: str,
        *,
        wait: bool = True,
        named: bool = True,
        wrap: Sequence[str] = (),
        **settings: str | int | float,
    ) -> PollerProcess:
        """Start `poller run`; `named=False` leaves the worker name to its default, and `wrap`
        is a command line to run it under (e.g. `unshare ... --`)."""
        n = len(self.started)
        health = self.tmp_path / f"health-{satellite_id}-{n}.json"
        log_path = self.tmp_path / f"poller-{satellite_id}-{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
        env |= {
            "US_AMQP_DSN": self.vhost.dsn,
            "USM_POLLER_SATELLITE_ID": satellite_id,
            "USM_POLLER_HEALTH_FILE": str(health),
            "USM_POLLER_STATE_DIR": str(self.tmp_path / "state"),
            "USM_POLLER_LOG_FORMAT": "json",
            "USM_POLLER_HEARTBEAT_INTERVAL": "1",
        }
        if named:
            env["USM_POLLER_WORKER_NAME"] = f"poller-{satellite_id}-{n}"
        if "amqp_dsn" in settings:
            env["US_AMQP_DSN"] = str(settings.pop("amqp_dsn"))
        env |= {f"USM_POLLER_{k.upper()}": str(v) for k, v in (self.defaults | settings).items()}
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [*wrap, sys.executable, "-m", "poller", "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        poller = PollerProcess(proc, log_path, health, satellite_id)
        self.started.append(poller)
        if wait:
            poller.wait_ready()
        return poller


#: Pin the in-process interactive lane (`pytestmark = IN_PROCESS_LANE`, or on one test): for
#: tests of what the lane does inside a replica (admission, the bulk pause, one log), and for
#: tests of the replica's bulk work, where a lane process beside it would only cost start-up
#: time. End-to-end tests (the CLI, the demo, the container tier) keep the default: the lane
#: process.
IN_PROCESS_LANE = pytest.mark.poller_defaults(interactive_process="false")


@pytest.fixture
def start_poller(
    amqp_vhost: AmqpVhost, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[PollerFactory]:
    """Start real poller processes; any still running at the end are killed (by PID). The
    `poller_defaults` marker nearest to the test gives settings for all of them."""
    marker = request.node.get_closest_marker("poller_defaults")
    factory = PollerFactory(amqp_vhost, tmp_path, defaults=dict(marker.kwargs) if marker else {})
    yield factory
    for poller in factory.started:
        poller.kill()


@pytest.fixture
def sid() -> str:
    """A satellite id of its own for each test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(amqp_vhost: AmqpVhost, sid: str) -> Iterator[JobClient]:
    """The core's side for the test's satellite, on the session's vhost."""
    c = JobClient(amqp_vhost.dsn, sid)
    yield c
    c.close()


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A UDP port where nothing ever answers (bound by the test, never read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@dataclass
class Received:
    routing_key: str
    props: pika.BasicProperties
    result: wire.JobResult


class JobClient:
    """The core's side in tests: publish jobs, collect results, read the dead-letter queue."""

    def __init__(self, dsn: str, satellite_id: str) -> None:
        self.sid = satellite_id
        self._conn = pika.BlockingConnection(pika.URLParameters(dsn))
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        for name, kind in (
            (wire.jobs_exchange(), "direct"),
            (wire.results_exchange(), "topic"),
            (wire.events_exchange(), "topic"),
        ):
            self._ch.exchange_declare(name, kind, durable=True)
        self.queue = self._ch.queue_declare("", exclusive=True).method.queue
        self._ch.queue_bind(self.queue, wire.results_exchange(), f"result.{satellite_id}.#")
        self._ch.queue_bind(self.queue, wire.results_exchange(), f"reply.{satellite_id}.#")
        self._seen: list[Received] = []

    def close(self) -> None:
        if self._conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._conn.close()

    def bind_heartbeats(self) -> str:
        q: str = self._ch.queue_declare("", exclusive=True).method.queue
        self._ch.queue_bind(q, wire.events_exchange(), wire.heartbeat_routing_key(self.sid))
        return q

    def get(self, queue: str) -> bytes | None:
        method, _props, body = self._ch.basic_get(queue, auto_ack=True)
        return body if method is not None else None

    def publish(
        self,
        job: dict[str, Any] | bytes,
        *,
        to_queue: bool = False,
        message_id: str | None = None,
        interactive: bool = False,
        **props: Any,
    ) -> None:
        body = job if isinstance(job, bytes) else json.dumps(job).encode()
        if message_id is None and isinstance(job, dict):
            message_id = str(job.get("id"))
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=message_id, **props
        )
        if to_queue:
            self._ch.basic_publish("", wire.jobs_queue(self.sid), body, properties)
        else:
            key = wire.lane_routing_key(self.sid, "interactive" if interactive else "bulk")
            self._ch.basic_publish(wire.jobs_exchange(), key, body, properties)

    def collect(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Wait until `count` results have arrived in total; return all of them."""
        deadline = time.monotonic() + timeout
        while len(self._seen) < count and time.monotonic() < deadline:
            method, props, body = self._ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                self._conn.sleep(0.05)
                continue
            self._seen.append(Received(method.routing_key, props, wire.decode_result(body)))
        return list(self._seen)

    def collect_ids(self, ids: list[str], timeout: float = 60.0) -> list[Received]:
        """Wait until a result for every id has arrived; return all results so far."""
        deadline = time.monotonic() + timeout
        wanted = set(ids)
        while time.monotonic() < deadline:
            seen = {r.result.job_id for r in self._seen}
            if wanted <= seen:
                break
            self.collect(len(self._seen) + 1, timeout=min(1.0, deadline - time.monotonic()))
        return list(self._seen)

    def by_id(self, count: int, timeout: float = 30.0) -> dict[str, wire.JobResult]:
        results = self.collect(count, timeout)
        return {r.result.job_id: r.result for r in results}

    def drain_dlq(self) -> list[tuple[pika.BasicProperties, bytes]]:
        out = []
        for _ in range(10_000):
            method, props, body = self._ch.basic_get(
                wire.dead_letter_queue(self.sid), auto_ack=True
            )
            if method is None:
                break
            out.append((props, body))
        return out

    def queue_depth(self, queue: str) -> int:
        depth: int = self._ch.queue_declare(queue, passive=True).method.message_count
        return depth


def data(result: wire.JobResult) -> dict[str, Any]:
    """The result's data, typed loosely for assertions."""
    return cast(dict[str, Any], result.data or {})


def snmp_job(
    host: str,
    port: int,
    *,
    kind: str = "snmp.get",
    oids: list[str] | None = None,
    community: str = "public",
    job_id: str | None = None,
    timeout: float = 5.0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "v": 1,
        "id": job_id or str(uuid.uuid4()),
        "kind": kind,
        "target": {"host": host, "port": port},
        "auth": {"version": "2c", "community": community},
        "params": {"oids": oids or ["1.3.6.1.2.1.1.5.0"]},
        "timeout": timeout,
        **extra,
    }
