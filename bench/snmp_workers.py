"""The baselines of `bench/run.py`, each run as its own process by it.

    python bench/snmp_workers.py bare --dsn DSN --queue Q --sid SID --lib ezsnmp|pysnmp
    python bench/snmp_workers.py celery --dsn DSN --queue Q --sid SID --lib ... --concurrency N
    python bench/snmp_workers.py celery-client --dsn DSN --queue Q --sid SID --lib ...

- `bare`: the floor of our design. A pika `AsyncioConnection` worker with nothing but the job:
  `json.loads` the body, one SNMP GET with the same library as the poller's backend (ezsnmp
  sessions cached per thread in a small thread pool, or pysnmp's asyncio API on one engine),
  a result dict of the wire's shape `json.dumps`-ed, published to `usm_poller.results` with a
  publisher confirm, and the job acked when its own result is confirmed (DESIGN §5 order).
- `celery`: a Celery worker (prefork pool, `acks_late`, RabbitMQ through Celery's default py-amqp
  transport) with one task doing the same GET. The task publishes the same result body to the
  same exchange itself, on Celery's producer pool with `confirm_publish` (py-amqp waits for the
  confirm), and returns nothing (`ignore_result`); with `acks_late` Celery acks after the task
  returns, so the order is the same as ours: execute, publish, confirm, ack.
- `celery-client`: Celery's own client. Reads commands on stdin (`run WINDOW SECONDS MAX_JOBS`)
  and for each keeps WINDOW `task.apply_async` calls in flight, collecting the results from
  the results queue with kombu; prints one JSON line of figures per command.

All traffic goes to loopback: the broker of `--dsn` and the SNMP agent named in each job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

RESULTS_EXCHANGE = "usm_poller.results"  # poller.wire.results_exchange()
TASK_NAME = "bench.snmp_get"

# ------------------------------------------------------------------------------------------
# SNMP GET with either library, rendered the way the wire does (oid, SMI type, value, hex)

_EZ_TYPES = {
    "STRING": "OctetString",
    "OCTETSTR": "OctetString",
    "INTEGER": "Integer",
    "INTEGER32": "Integer",
    "TICKS": "TimeTicks",
    "TIMETICKS": "TimeTicks",
    "COUNTER": "Counter32",
    "COUNTER64": "Counter64",
    "GAUGE": "Gauge32",
    "UNSIGNED32": "Gauge32",
    "OBJECTID": "ObjectIdentifier",
    "IPADDR": "IpAddress",
    "OPAQUE": "Opaque",
    "NULL": "Null",
    "NOSUCHOBJECT": "noSuchObject",
    "NOSUCHINSTANCE": "noSuchInstance",
    "ENDOFMIBVIEW": "endOfMibView",
}
_NUMERIC = frozenset({"Integer", "TimeTicks", "Counter32", "Counter64", "Gauge32"})


def _vb(oid: str, smi: str, value: Any) -> dict[str, Any]:
    if smi in _NUMERIC:
        return {"oid": oid, "type": smi, "value": int(value)}
    if smi in ("OctetString", "Opaque"):
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {"oid": oid, "type": smi, "value": text, "hex": raw.hex()}
    if smi in ("ObjectIdentifier", "IpAddress"):
        return {"oid": oid, "type": smi, "value": str(value).lstrip(".")}
    return {"oid": oid, "type": smi, "value": None}


class EzsnmpGet:
    """ezsnmp GETs; one `Session` per thread and agent (a Session is not thread-safe)."""

    def __init__(self) -> None:
        from ezsnmp import Session  # noqa: PLC0415 - only the ezsnmp runs need it

        self._session_cls = Session
        self._local = threading.local()

    def get_sync(self, host: str, port: int, community: str, oids: list[str]) -> list[Any]:
        sessions: dict[tuple[str, int, str], Any] | None = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        key = (host, port, community)
        session = sessions.get(key)
        if session is None:
            session = self._session_cls(
                hostname=host,
                port_number=port,
                version=2,
                community=community,
                timeout=2,
                retries=1,
                print_oids_numerically=True,
            )
            sessions[key] = session
        out = []
        for item in session.get(oids):
            oid = item.oid.lstrip(".")
            if item.index:
                oid = f"{oid}.{item.index}"
            out.append(_vb(oid, _EZ_TYPES.get(item.type, "OctetString"), item.value))
        return out


class PysnmpGet:
    """pysnmp 7 GETs on one engine, MIB lookups off (as the poller's pysnmp backend)."""

    def __init__(self) -> None:
        from pysnmp.hlapi.v3arch import asyncio as hlapi  # noqa: PLC0415 - pysnmp runs only

        self._hlapi = hlapi
        self._engine: Any = None
        self._targets: dict[tuple[str, int], Any] = {}
        self._auth: dict[str, Any] = {}
        self._context = hlapi.ContextData()

    async def get(self, host: str, port: int, community: str, oids: list[str]) -> list[Any]:
        hl = self._hlapi
        if self._engine is None:
            self._engine = hl.SnmpEngine()
        target = self._targets.get((host, port))
        if target is None:
            target = await hl.UdpTransportTarget.create((host, port), timeout=2, retries=1)
            self._targets[(host, port)] = target
        auth = self._auth.get(community)
        if auth is None:
            auth = self._auth[community] = hl.CommunityData(community)
        objs = [hl.ObjectType(hl.ObjectIdentity(o)) for o in oids]
        err_ind, err_stat, _idx, vbs = await hl.get_cmd(
            self._engine, auth, target, self._context, *objs, lookupMib=False
        )
        if err_ind or err_stat:
            raise RuntimeError(str(err_ind or err_stat))
        out = []
        for name, value in vbs:
            smi = type(value).__name__
            smi = {"Integer32": "Integer", "Unsigned32": "Gauge32"}.get(smi, smi)
            if smi in _NUMERIC:
                out.append(_vb(str(name), smi, int(value)))
            elif smi in ("OctetString", "Opaque"):
                out.append(_vb(str(name), smi, bytes(value)))
            else:
                out.append(_vb(str(name), smi, value.prettyPrint()))
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_body(
    job: dict[str, Any], sid: str, worker: str, varbinds: list[Any] | None, error: str | None
) -> bytes:
    """A result of the wire's shape (DESIGN §4), built by hand."""
    started = job.get("_started", _now())
    return json.dumps(
        {
            "v": 1,
            "job_id": job["id"],
            "kind": job["kind"],
            "satellite_id": sid,
            "worker": worker,
            "status": "ok" if error is None else "error",
            "data": None if varbinds is None else {"varbinds": varbinds},
            "error": None
            if error is None
            else {"code": "snmp_error", "message": error, "retryable": False},
            "attempt": 1,
            "redelivered": False,
            "started_at": started,
            "finished_at": _now(),
            "duration_ms": 0.0,
            "meta": job.get("meta"),
        },
        separators=(",", ":"),
    ).encode()


def _job_args(job: dict[str, Any]) -> tuple[str, int, str, list[str]]:
    target = job["target"]
    return (
        target["host"],
        int(target.get("port") or 161),
        job["auth"]["community"],
        job["params"]["oids"],
    )


# ------------------------------------------------------------------------------------------
# bare pika asyncio worker


class BareWorker:
    """decode → GET → publish the result → on its confirm, ack the job."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sid = args.sid
        self.worker = f"bare-{os.getpid()}"
        self.lib = args.lib
        self.pool = ThreadPoolExecutor(max_workers=args.threads) if args.lib == "ezsnmp" else None
        self.ez = EzsnmpGet() if args.lib == "ezsnmp" else None
        self.py = PysnmpGet() if args.lib == "pysnmp" else None
        self.channel: Any = None
        self.seq = 0
        self.pending: dict[int, int] = {}  # publish sequence number → delivery tag
        self.routing_key = f"result.{self.sid}.snmp.get"

    async def main(self) -> None:
        import pika  # noqa: PLC0415 - keeps `celery` runs free of pika
        from pika.adapters.asyncio_connection import AsyncioConnection  # noqa: PLC0415

        self.pika = pika
        loop = asyncio.get_running_loop()
        self.loop = loop
        ready: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()

        def on_channel(channel: Any) -> None:
            self.channel = channel
            channel.confirm_delivery(ack_nack_callback=self.on_confirm)
            channel.basic_qos(
                prefetch_count=self.args.prefetch,
                callback=lambda _f: channel.basic_consume(
                    self.args.queue,
                    self.on_message,
                    callback=lambda _f: None if ready.done() else ready.set_result(None),
                ),
            )

        def on_close(_conn: Any, exc: BaseException) -> None:
            if not closed.done():
                closed.set_result(None)
            if not ready.done():
                ready.set_exception(RuntimeError(str(exc)))

        AsyncioConnection(
            pika.URLParameters(self.args.dsn),
            on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
            on_open_error_callback=on_close,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        await asyncio.wait_for(ready, 30)
        print("ready", flush=True)
        await closed

    def on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        job = json.loads(body)
        job["_started"] = _now()
        tag = method.delivery_tag
        host, port, community, oids = _job_args(job)
        if self.ez is not None:
            future = self.loop.run_in_executor(
                self.pool, self.ez.get_sync, host, port, community, oids
            )
        else:
            assert self.py is not None
            future = asyncio.ensure_future(self.py.get(host, port, community, oids))
        future.add_done_callback(lambda f: self.on_done(f, job, tag))

    def on_done(self, future: asyncio.Future[Any], job: dict[str, Any], tag: int) -> None:
        try:
            varbinds, error = future.result(), None
        except Exception as exc:  # noqa: BLE001 - a device failure is a result
            varbinds, error = None, type(exc).__name__
        props = self.pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=job["id"],
            type=job["kind"],
            headers={"x-satellite-id": self.sid},
        )
        body = result_body(job, self.sid, self.worker, varbinds, error)
        self.channel.basic_publish(RESULTS_EXCHANGE, self.routing_key, body, props, mandatory=True)
        self.seq += 1
        self.pending[self.seq] = tag

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, self.pika.spec.Basic.Ack)
        last = method.delivery_tag
        if method.multiple:
            seqs = []
            for seq in self.pending:
                if seq > last:
                    break
                seqs.append(seq)
        else:
            seqs = [last]
        for seq in seqs:
            tag = self.pending.pop(seq, None)
            if tag is None:
                continue
            if ok:
                self.channel.basic_ack(tag)
            else:
                self.channel.basic_nack(tag, requeue=True)


# ------------------------------------------------------------------------------------------
# Celery


def make_celery(args: argparse.Namespace) -> Any:
    import kombu  # noqa: PLC0415
    from celery import Celery  # noqa: PLC0415 - only the celery runs need it

    k: Any = kombu  # untyped

    app = Celery("bench_snmp", broker=args.dsn.replace("amqp://", "pyamqp://", 1))
    queue_args = json.loads(args.queue_arguments)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"confirm_publish": True},
        worker_prefetch_multiplier=args.prefetch_multiplier,
        task_queues=[
            k.Queue(
                args.queue,
                k.Exchange("usm_poller.jobs", type="direct", durable=True),
                routing_key=args.sid,
                queue_arguments=queue_args,
                durable=True,
            )
        ],
        task_default_queue=args.queue,
        task_routes={TASK_NAME: {"queue": args.queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
    )
    sid = args.sid
    routing_key = f"result.{sid}.snmp.get"
    lib = args.lib
    state: dict[str, Any] = {}

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def snmp_get(job: dict[str, Any]) -> None:
        job["_started"] = _now()
        host, port, community, oids = _job_args(job)
        try:
            if lib == "ezsnmp":
                getter = state.get("ez") or state.setdefault("ez", EzsnmpGet())
                varbinds, error = getter.get_sync(host, port, community, oids), None
            else:
                if "loop" not in state:
                    state["loop"] = asyncio.new_event_loop()
                    state["py"] = PysnmpGet()
                varbinds = state["loop"].run_until_complete(
                    state["py"].get(host, port, community, oids)
                )
                error = None
        except Exception as exc:  # noqa: BLE001 - a device failure is a result
            varbinds, error = None, type(exc).__name__
        body = result_body(job, sid, f"celery-{os.getpid()}", varbinds, error)
        with app.producer_pool.acquire(block=True) as producer:
            producer.publish(
                body,
                exchange=RESULTS_EXCHANGE,
                routing_key=routing_key,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=job["id"],
                type=job["kind"],
                headers={"x-satellite-id": sid},
                mandatory=True,
                retry=False,
            )

    app.bench_task = snmp_get
    return app


def run_celery_worker(args: argparse.Namespace) -> None:
    app = make_celery(args)
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={args.concurrency}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--queues={args.queue}",
            f"--hostname=bench-{os.getpid()}@localhost",
        ]
    )


def run_celery_client(args: argparse.Namespace) -> None:
    """Celery's own client: `apply_async` with a window; results read with kombu."""
    import kombu  # noqa: PLC0415

    k: Any = kombu  # untyped

    app = make_celery(args)
    task = app.bench_task
    template = json.loads(args.job_template)
    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=3)
    results = k.Queue(
        "usm_poller.results",
        no_declare=True,
    )
    state: dict[str, Any] = {"sent": {}, "lat": [], "errors": 0, "done": 0}

    def on_result(body: Any, message: Any) -> None:
        job_id = message.properties.get("message_id")
        sent = state["sent"].pop(job_id, None)
        if sent is None:
            return
        state["lat"].append(time.perf_counter() - sent)
        raw = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        if b'"status":"ok"' not in raw:
            state["errors"] += 1
        state["done"] += 1

    consumer = k.Consumer(
        conn.channel(), queues=[results], callbacks=[on_result], no_ack=True, accept=["json"]
    )
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "run":
            break
        state.update(sent={}, lat=[], errors=0, done=0)
        # Consume only during a round: the bench's driver reads the same queue otherwise.
        consumer.consume()
        try:
            figures = _client_round(
                conn,
                task,
                template,
                state,
                window=int(parts[1]),
                seconds=float(parts[2]),
                max_jobs=int(parts[3]),
            )
        finally:
            consumer.cancel()
        print(json.dumps(figures), flush=True)
    conn.release()


def _client_round(
    conn: Any,
    task: Any,
    template: dict[str, Any],
    state: dict[str, Any],
    *,
    window: int,
    seconds: float,
    max_jobs: int,
) -> dict[str, Any]:
    """`window` apply_async calls in flight until `max_jobs` or `seconds`; then the last ones."""
    published = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    last = t0
    while time.perf_counter() < end + 15:
        now = time.perf_counter()
        while len(state["sent"]) < window and published < max_jobs and now < end:
            state["counter"] = state.get("counter", 0) + 1
            job = dict(template, id=f"cc-{os.getpid()}-{state['counter']}")
            state["sent"][job["id"]] = time.perf_counter()
            task.apply_async((job,), task_id=job["id"])
            published += 1
        if not state["sent"]:
            break
        before = state["done"]
        try:
            conn.drain_events(timeout=1.0)
        except TimeoutError:
            continue
        if state["done"] != before:
            last = time.perf_counter()
    return {
        "jobs": state["done"],
        "errors": state["errors"],
        "lost": len(state["sent"]),
        "elapsed": last - t0,
        "latencies": state["lat"],
        "client_cpu": time.process_time() - cpu0,
    }


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["bare", "celery", "celery-client"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--sid", required=True)
    parser.add_argument("--lib", choices=["ezsnmp", "pysnmp"], default="ezsnmp")
    parser.add_argument("--threads", type=int, default=4, help="bare + ezsnmp: GET threads")
    parser.add_argument("--prefetch", type=int, default=64, help="bare: prefetch")
    parser.add_argument("--concurrency", type=int, default=4, help="celery: prefork children")
    parser.add_argument("--prefetch-multiplier", type=int, default=4, help="celery")
    parser.add_argument("--queue-arguments", default="{}", help="celery: JSON queue arguments")
    parser.add_argument("--job-template", default="{}", help="celery-client: job JSON")
    args = parser.parse_args(argv)
    modes: dict[str, Callable[[argparse.Namespace], None]] = {
        "bare": lambda a: asyncio.run(BareWorker(a).main()),
        "celery": run_celery_worker,
        "celery-client": run_celery_client,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()
