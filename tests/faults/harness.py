"""The core's side of a fault scenario: publish with confirms, collect results, read the DLQ,
and keep a fleet of real pollers running while the scenario kills them.

Everything here records into a `checker.Observation`; the scenario then calls `checker.check`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from poller import wire
from tests.faults.checker import Answer, DeadLetter, Observation, PublishedJob
from tests.faults.device import oid_for
from tests.support.poller_proc import PollerFactory, PollerProcess

__all__ = [
    "LONG",
    "Collector",
    "Fleet",
    "Publisher",
    "counting_job",
    "drain_dlq",
    "scale",
]

#: `USM_FAULTS_LONG=1` (set by `bench/faults.py --long`) runs the long versions.
LONG = os.environ.get("USM_FAULTS_LONG", "") not in ("", "0")


def scale(short: int, long: int) -> int:
    return long if LONG else short


def counting_job(
    sid: str, n: int, port: int, *, idempotent: bool = True, timeout: float = 10.0
) -> dict[str, Any]:
    """Job number `n` of a scenario: an SNMP GET of its own OID at the counting agent."""
    return {
        "v": 1,
        "id": f"{sid}-{n}",
        "kind": "snmp.get",
        "target": {"host": "127.0.0.1", "port": port},
        "auth": {"version": "2c", "community": "public"},
        "params": {"oids": [oid_for(n)]},
        "timeout": timeout,
        "idempotent": idempotent,
    }


def executions_by_job(sid: str, by_oid: dict[str, int]) -> dict[str, int]:
    """The counting agent's executions per OID, as executions per job id."""
    prefix = oid_for(0)[:-1]
    return {f"{sid}-{oid[len(prefix) :]}": n for oid, n in by_oid.items() if oid.startswith(prefix)}


def _connect(dsn: str) -> pika.BlockingConnection:
    params = pika.URLParameters(dsn)
    params.heartbeat = 30
    params.blocked_connection_timeout = 60
    params.connection_attempts = 3  # a broker loaded by other test runs can miss a handshake
    params.retry_delay = 1
    return pika.BlockingConnection(params)


class Publisher:
    """Publishes jobs with publisher confirms and records each with its confirm."""

    def __init__(self, dsn: str, sid: str, obs: Observation) -> None:
        self._dsn = dsn
        self._sid = sid
        self._obs = obs
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None

    def _channel(self) -> Any:
        if self._conn is None or not self._conn.is_open:
            self._conn = _connect(self._dsn)
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        return self._ch

    def publish(
        self,
        job_id: str,
        body: bytes,
        *,
        idempotent: bool = True,
        content_type: str = "application/json",
        **props: Any,
    ) -> bool:
        """Publish one job to the satellite's routing key; whether the broker confirmed it."""
        at = time.monotonic()
        confirmed = False
        try:
            self._channel().basic_publish(
                wire.jobs_exchange(),
                wire.jobs_routing_key(self._sid),
                body,
                pika.BasicProperties(
                    content_type=content_type, delivery_mode=2, message_id=job_id, **props
                ),
                mandatory=True,
            )
            confirmed = True
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
            pass
        except pika.exceptions.AMQPError:
            self._conn = None  # reconnect for the next one; this one counts as unconfirmed
        self._obs.published.append(PublishedJob(job_id, confirmed, at, idempotent))
        return confirmed

    def publish_job(self, job: dict[str, Any], **props: Any) -> bool:
        return self.publish(
            str(job["id"]),
            json.dumps(job).encode(),
            idempotent=job.get("idempotent", True),
            **props,
        )

    def stream(self, jobs: Iterable[dict[str, Any]], rate: float) -> threading.Thread:
        """Publish `jobs` at about `rate` per second from a thread (started; join it)."""

        def run() -> None:
            t0 = time.monotonic()
            for n, job in enumerate(jobs):
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.publish_job(job)

        thread = threading.Thread(target=run, name="publisher", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._conn.close()


class Collector:
    """Collects every result of one satellite from a queue of its own, in a thread."""

    def __init__(self, dsn: str, sid: str, obs: Observation) -> None:
        self._dsn = dsn
        self._sid = sid
        self._obs = obs
        self.queue = f"faults-{sid}-results"
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"collector did not start: {self.errors}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(pika.exceptions.AMQPError), _connect(self._dsn) as conn:
            conn.channel().queue_delete(self.queue)

    def _declare(self, ch: Any) -> None:
        ch.exchange_declare(wire.results_exchange(), "topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, wire.results_exchange(), f"result.{self._sid}.#")
        ch.queue_bind(self.queue, wire.results_exchange(), f"reply.{self._sid}.#")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with _connect(self._dsn) as conn:
                    ch = conn.channel()
                    self._declare(ch)
                    self._ready.set()
                    for method, _props, body in ch.consume(
                        self.queue, auto_ack=True, inactivity_timeout=0.2
                    ):
                        if self._stop.is_set():
                            break
                        if method is not None:
                            self._record(body)
                    ch.cancel()
            except pika.exceptions.AMQPError as exc:
                self.errors.append(exc)
                time.sleep(0.5)

    def _record(self, body: bytes) -> None:
        at = time.monotonic()
        raw = json.loads(body)
        error = raw.get("error") or {}
        answer = Answer(
            job_id=str(raw.get("job_id")),
            at=at,
            status=str(raw.get("status")),
            code=error.get("code"),
            attempt=int(raw.get("attempt") or 1),
            redelivered=bool(raw.get("redelivered")),
            worker=str(raw.get("worker")),
        )
        with self._lock:
            self._obs.answers.append(answer)

    def answered(self) -> set[str]:
        with self._lock:
            return {a.job_id for a in self._obs.answers}

    def wait_for(self, ids: Iterable[str], timeout: float, settle: float = 1.5) -> set[str]:
        """Wait until every id has an answer (at most `timeout` s), then `settle` s more for
        late duplicates; the ids still unanswered."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not wanted <= self.answered():
            time.sleep(0.1)
        time.sleep(settle)
        return wanted - self.answered()


def drain_dlq(dsn: str, sid: str, obs: Observation, *, expect: int = 0, wait: float = 5.0) -> None:
    """Move the satellite's DLQ into `obs.dead` (waiting up to `wait` s for `expect` messages)."""
    deadline = time.monotonic() + wait
    with contextlib.suppress(pika.exceptions.AMQPError):  # a loaded broker: callers look again
        _drain(dsn, sid, obs, expect, deadline)


def _drain(dsn: str, sid: str, obs: Observation, expect: int, deadline: float) -> None:
    with _connect(dsn) as conn:
        ch = conn.channel()
        while True:
            method, props, _body = ch.basic_get(wire.dead_letter_queue(sid), auto_ack=True)
            if method is not None:
                deaths = (props.headers or {}).get("x-death") or [{}]
                reason = deaths[0].get("reason", b"")
                reason = reason.decode() if isinstance(reason, bytes) else str(reason)
                obs.dead.append(DeadLetter(props.message_id, reason))
                continue
            if len(obs.dead) >= expect or time.monotonic() > deadline:
                return
            time.sleep(0.2)


@dataclass
class Fleet:
    """`size` real pollers of one satellite; `supervise()` restarts the ones that exited."""

    factory: PollerFactory
    sid: str
    size: int
    settings: dict[str, str | int | float] = field(default_factory=dict)
    slots: list[PollerProcess] = field(default_factory=list)
    #: (slot, exit code) of every poller that exited and was restarted.
    exits: list[tuple[int, int]] = field(default_factory=list)
    #: Monotonic times at which `supervise` found a poller exited.
    exit_times: list[float] = field(default_factory=list)

    def spawn(self) -> PollerProcess:
        """Start one more poller with the fleet's settings (not waiting until it is ready)."""
        settings: dict[str, Any] = dict(self.settings)
        return self.factory(self.sid, wait=False, **settings)

    def start(self) -> None:
        for _ in range(self.size):
            self.slots.append(self.spawn())
        for poller in self.slots:
            poller.wait_ready(60)

    def restart(self, slot: int) -> PollerProcess:
        poller = self.spawn()
        self.slots[slot] = poller
        return poller

    def supervise(self) -> int:
        """Restart every poller that has exited; how many were restarted."""
        restarted = 0
        for slot, poller in enumerate(self.slots):
            code = poller.proc.poll()
            if code is not None:
                self.exits.append((slot, code))
                self.exit_times.append(time.monotonic())
                self.restart(slot)
                restarted += 1
        return restarted

    def sigkill(self, slot: int) -> None:
        poller = self.slots[slot]
        if poller.proc.poll() is None:
            poller.proc.send_signal(signal.SIGKILL)
            poller.proc.wait(10)

    def run_while(
        self,
        busy: Callable[[], bool],
        *,
        every: float,
        fault: Callable[[int], None],
        faults: list[float],
        limit: float,
    ) -> None:
        """Until `busy()` is false (at most `limit` s): every `every` s call `fault(n)` and note
        its time in `faults`; restart exited pollers all along."""
        t0 = time.monotonic()
        next_fault = t0 + every
        n = 0
        while busy() and time.monotonic() - t0 < limit:
            now = time.monotonic()
            if now >= next_fault:
                faults.append(now)
                fault(n)
                n += 1
                next_fault = now + every
            self.supervise()
            time.sleep(0.05)

    def logs(self) -> Iterator[PollerProcess]:
        yield from self.factory.started

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log events `name` of every poller this fleet started (restarts included)."""
        return [e for p in self.factory.started for e in p.events(name)]

    def worker_name(self, poller: PollerProcess) -> str:
        return f"poller-{self.sid}-{self.factory.started.index(poller)}"

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM every running poller; their exit codes."""
        return [p.terminate(timeout) for p in self.slots]
