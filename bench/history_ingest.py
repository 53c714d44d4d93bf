"""History ingest of `satellite serve`: results/s into SQLite and PostgreSQL, against a bare loop.

For each database, in the same run:

* **bare loop**: plain `INSERT`s of the same rows, 200 per transaction (executemany), through
  the same SQLAlchemy engine: the ceiling of writing rows at all;
* **store**: `Store.apply_results` in groups of 200 (the ingest's upsert: answers counted, a
  later result wins), including the result → row conversion;
* **ingest**: the whole path: N results wait in `usm_poller.history` on a fresh vhost; one
  `Ingest` (one replica) consumes them through `poller.broker`, decodes, group-commits and
  acks each group with one `multiple` ack; timed from start to the last row;
* **ingest, one ack per result**: the same with the group's acks sent one by one (as before
  `Broker.ack_many`), run alternately with the previous one (`--rounds` of each; best of each).

Usage: `.venv/bin/python bench/history_ingest.py [--results N]` (default 20,000). Needs
RabbitMQ and PostgreSQL (127.0.0.1:5432, user postgres) on loopback; writes
`## History ingest` in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pika
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import pg_database, sample_results, vhost, write_section  # noqa: E402

from poller import wire  # noqa: E402
from poller.broker import BrokerOptions  # noqa: E402
from poller.config import parse_dsn  # noqa: E402
from satellite.service.ingest import Ingest  # noqa: E402
from satellite.service.settings import DatabaseUrl, parse_database_url  # noqa: E402
from satellite.service.store import Store  # noqa: E402
from satellite.service.store.queries import _result_row  # noqa: E402
from satellite.service.store.tables import jobs  # noqa: E402

BATCH = 200


class Timer:
    """Wall time and this process's CPU time (what the service spends) of a phase."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def figures(self, n: int) -> tuple[float, float]:
        """Results/s and CPU microseconds per result."""
        return n / self.wall, self.cpu / n * 1e6


async def bare_loop(store: Store, items: list[wire.JobResult]) -> tuple[float, float]:
    now = datetime.now(UTC)
    rows = [_result_row(r, 1, now, "amqp") for r in items]
    with Timer() as timer:
        for i in range(0, len(rows), BATCH):
            async with store.engine.begin() as conn:
                await conn.execute(jobs.insert(), rows[i : i + BATCH])
    return timer.figures(len(rows))


async def store_groups(store: Store, items: list[wire.JobResult]) -> tuple[float, float]:
    with Timer() as timer:
        for i in range(0, len(items), BATCH):
            await store.apply_results(items[i : i + BATCH])
    return timer.figures(len(items))


def fill_queue(dsn: str, items: list[wire.JobResult]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        key = wire.result_routing_key("bench", "snmp.get")
        for item in items:
            channel.basic_publish(wire.results_exchange(), key, wire.encode(item), props)
    finally:
        conn.close()


async def whole_ingest(
    store: Store, dsn: str, items: list[wire.JobResult], *, group_acks: bool = True
) -> tuple[float, float]:
    ingest = Ingest(
        store,
        parse_dsn(dsn),
        BrokerOptions(connection_name="bench ingest", prefetch=2 * BATCH),
        batch=BATCH,
        linger=0.05,
    )
    # The queue and its bindings first, then the results, then the timed run.
    task = asyncio.create_task(ingest.run())
    await ingest.broker.wait_ready(30)
    await ingest.stop()
    await task
    await ingest.close()
    await asyncio.to_thread(fill_queue, dsn, items)
    ingest = Ingest(
        store,
        parse_dsn(dsn),
        BrokerOptions(connection_name="bench ingest", prefetch=2 * BATCH),
        batch=BATCH,
        linger=0.05,
    )
    if not group_acks:  # the A/B: `ack_many` without the tracking acks one by one
        ingest.broker._opts = dataclasses.replace(ingest.broker._opts, group_acks=False)
    with Timer() as timer:
        task = asyncio.create_task(ingest.run())
        for _ in range(12000):
            if ingest.stats.results >= len(items):
                break
            await asyncio.sleep(0.01)
    await ingest.stop()
    await task
    await ingest.close()
    return timer.figures(ingest.stats.results)


async def measure(db: DatabaseUrl, dsn: str, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    store = await Store.open(db)
    try:
        out = {
            "bare": await bare_loop(store, sample_results(n, f"bare-{uuid.uuid4().hex[:6]}")),
            "store": await store_groups(store, sample_results(n, f"store-{uuid.uuid4().hex[:6]}")),
        }
        runs: dict[str, list[tuple[float, float]]] = {"ingest": [], "single": []}
        for _ in range(rounds):  # alternately: load drifts hit both
            for key, group_acks in (("ingest", True), ("single", False)):
                items = sample_results(n, f"{key}-{uuid.uuid4().hex[:6]}")
                runs[key].append(await whole_ingest(store, dsn, items, group_acks=group_acks))
        for key, figures in runs.items():
            out[key] = max(figures)
        async with store.engine.connect() as conn:
            rows = float(await conn.scalar(sa.select(sa.func.count()).select_from(jobs)) or 0)
        out["rows"] = (rows, 0.0)
        return out
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    n = max(1000, min(args.results, 200_000))
    rounds = max(1, min(args.rounds, 10))
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    figures: dict[str, dict[str, tuple[float, float]]] = {}
    with vhost() as amqp, tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        sqlite = parse_database_url(f"sqlite:///{Path(tmp) / 'history.sqlite3'}")
        figures["SQLite (WAL)"] = asyncio.run(measure(sqlite, amqp.dsn, n, rounds))
        with pg_database("bench_history") as url:
            figures["PostgreSQL 15"] = asyncio.run(
                measure(parse_database_url(url), amqp.dsn, n, rounds)
            )
    lines = [
        "## History ingest",
        "",
        f"`bench/history_ingest.py --results {n} --rounds {rounds}`"
        f" ({datetime.now(UTC):%Y-%m-%d}, 2 shared cores):",
        f"results/s written into the history, groups of {BATCH}, one replica; in brackets the",
        "CPU time of the bench's own process (the replica's share) per result. The whole ingest",
        "acks each committed group with one `multiple` ack; the column after it is the same run",
        "with one ack per result (as before), alternately, best of each.",
        "",
        "| database | bare INSERT loop | `Store.apply_results` (upsert) "
        "| whole ingest (AMQP → row, acked) | … one ack per result | ingest / loop |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in figures.items():
        cells = " | ".join(
            f"{f[k][0]:,.0f} ({f[k][1]:,.0f} µs CPU)" for k in ("bare", "store", "ingest", "single")
        )
        lines.append(f"| {name} | {cells} | {f['ingest'][0] / f['bare'][0]:.2f}x |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        "",
        "Goal (issue 14): at least 5,000 results/s per replica and at least 0.5x the bare loop.",
        f"Load average at the start {load_start}, at the end {load} (2 cores shared; the",
        "whole-ingest figure, which also waits on RabbitMQ's quorum queue, has varied about 2x",
        "between runs minutes apart: repeat the run before reading much into one figure).",
        "Under a load average well above the 2 cores the wall-clock figures are a fraction of",
        "what a quiet host does; the CPU time per result is the replica's own cost and moves",
        "much less with the load (1,000,000 / µs per result = results/s one core could write).",
        "",
        "How the ingest gets there: on PostgreSQL a group is one `INSERT … SELECT FROM",
        "unnest(…) ON CONFLICT (id) DO UPDATE` with one array per column. Its text does not",
        "depend on the group's size, so each connection prepares it once, and no value is",
        "processed row by row in Python (SQLAlchemy's executemany of the same upsert spent about",
        "twice the CPU per result, decode included: 149 against 81 µs in one A/B run); the",
        "result's JSON is encoded once, by pydantic's serializer. Every replica commits one group",
        "while it gathers and decodes the next (one commit in flight, groups in order, each",
        "group acked after its own commit, with one `basic.ack` with `multiple=True`: a group's",
        "deliveries are the oldest unacked ones of the channel, which `Broker.ack_many` checks",
        "before it acks that way). SQLite's groups go through the store's writer thread",
        "(docs/core-service.md) as one `executemany` of a fixed statement through the driver,",
        "the times as the text SQLAlchemy would store and the JSON encoded once (124 against",
        "73 µs CPU per result for the store part, one A/B run).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section("## History ingest", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
