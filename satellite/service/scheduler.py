"""The scheduler of `satellite serve` (DESIGN §11): every replica runs it, none is special.

Exactly once per (schedule, slot, target), whatever replicas run or die:

* **Claim.** Each schedule has a row in `schedule_state` whose `claimed_until` is a cursor on the
  database clock: every due time up to it was claimed (or skipped) by some replica. A tick takes
  that row (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so a replica never waits for another; SQLite:
  a write first, i.e. an immediate transaction), reads the clock (`now`), and in the same
  transaction inserts a `queued` history row (source `schedule:<name>`) and an outbox row for
  every target due in (cursor, now], then moves the cursor to `now`. Job ids are
  `<schedule>:<slot epoch>:<host>[:<port>]`, the primary key of both tables, so even a cursor
  gone wrong could not send a slot's job twice. The lock is held for that one claim only.
* **Publish.** The claimer publishes its rows with publisher confirms and deletes each outbox row
  right after its confirm (one DELETE for the batch). A replica killed in between leaves rows
  with a lease (`lease_until`, `LEASE_SECONDS`); once it expires, any replica takes the rows over
  (PostgreSQL: `FOR UPDATE SKIP LOCKED`) and, before publishing one, looks in the history for an
  answer to its id (an answered job is not sent again). AMQP has no exactly-once publish: a
  replica killed between the broker's confirm and the DELETE's commit (one database round trip)
  leaves a row that is published a second time; that is the only duplicate.
* **Spread.** Each target's offset inside the interval is its rank among the schedule's targets
  ordered by a hash of (schedule, target): stable while the target list is, and as even as it
  can be (a 300 s schedule of 3,000 targets publishes 10 jobs a second).
* **No pile-up.** A job carries `not_after` = its due time + the interval, and the AMQP
  expiration of the interval: a queue never holds more than one interval of a schedule.
  `overlap: skip` skips a target whose previous job of the schedule is still `queued` within its
  deadline (submitted + timeout). `catch_up`: due times more than `late_grace()` old (the service
  was down) are skipped (`skip`) or, per target, only the latest is sent (`latest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from poller import testhooks, wire
from poller.broker import Broker, UnroutableError, properties
from poller.errors import BrokerError
from poller.logging import get_logger
from satellite.service.schedules import (
    Schedule,
    ScheduleFileError,
    ScheduleSet,
    Target,
    load_schedules,
)
from satellite.service.store.queries import NOT_PUBLISHED
from satellite.service.store.tables import jobs, schedule_outbox, schedule_skips, schedule_state

__all__ = [
    "LEASE_SECONDS",
    "Claimed",
    "ScheduleFile",
    "ScheduleStats",
    "Scheduler",
    "UnknownScheduleError",
    "db_now",
]

log = get_logger("satellite.service.scheduler")

#: Seconds a claimer has to publish its rows before another replica takes them over.
LEASE_SECONDS = 5.0
#: Seconds to wait for the broker's confirms of one batch (below the lease).
CONFIRM_TIMEOUT = 3.0
#: A row is published only while its lease has at least this many seconds left.
LEASE_MARGIN = 1.0
#: Seconds between claim ticks, and between looks for rows a dead replica left.
TICK_SECONDS = 0.25
TAKEOVER_EVERY = 1.0
#: Seconds between looks at the schedules file's modification time.
WATCH_EVERY = 2.0
TAKEOVER_BATCH = 1000
TAKEOVER_ROUNDS = 20
#: Jobs published (and their rows checked and deleted) per batch of confirms.
PUBLISH_CHUNK = 5000
#: Rows per INSERT statement (PostgreSQL takes at most 32,767 parameters in one).
INSERT_CHUNK = 1000
MIN_GRACE = 5.0
#: Seconds between deletions of skip counts older than `SKIPS_KEPT` seconds.
PRUNE_EVERY = 600.0
SKIPS_KEPT = 7 * 86400.0
#: Milliseconds a claim transaction may sit idle before PostgreSQL ends it (a stalled replica).
STALLED_TX_MS = 2000
#: Longest window one claim looks back over (in intervals) after the service was down.
MAX_LOOKBACK_INTERVALS = 2


class UnknownScheduleError(LookupError):
    """No schedule of that name in the schedules file."""


def late_grace(schedule: Schedule, length: float) -> float:
    """How late a due time may be claimed before it counts as missed (the service was down).

    One interval, at least `MIN_GRACE` s (a replica stalled while it held the claim lock delays
    the others by up to `STALLED_TX_MS`: that is late, not missed), at most 30 s.
    """
    return min(max(length, MIN_GRACE), 30.0)


async def db_now(conn: AsyncConnection) -> float:
    """The database's clock, in epoch seconds (the same for every replica)."""
    if conn.dialect.name == "postgresql":
        sql = "SELECT extract(epoch FROM clock_timestamp())::float8"
    else:
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    return float((await conn.execute(sa.text(sql))).scalar_one())


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


@dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed job, ready to publish."""

    id: str
    schedule: str
    satellite_id: str
    body: dict[str, Any]
    """The job without inline credentials."""
    not_after: float
    resent: bool = False
    """Taken over from a replica that died or stalled after its claim: whether that replica
    published it is unknown, so it goes out with `x-usm-resent` (run twice, it is answered
    `redelivered: true`)."""


@dataclass
class ScheduleStats:
    name: str
    paused: bool
    enabled: bool
    every: int | None
    cron: str | None
    targets: int
    next_fire: datetime | None
    last_fire: datetime | None
    sent: int = 0
    answered: int = 0
    failed: int = 0
    pending: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    interval: float = 0.0


class ScheduleFile:
    """The schedules file as last loaded well; `check()` reloads it after a change or SIGHUP."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: ScheduleSet | None = None
        self._stamp: tuple[int, int] | None = None
        self.hangup = False
        self.refused = 0
        self.problems: list[str] = []

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> bool:
        """Load now; True when the file was taken, False (logged, one line each) when refused."""
        stamp = self._stat()
        try:
            loaded = load_schedules(self.path)
        except ScheduleFileError as exc:
            self._stamp = stamp
            self.refused += 1
            self.problems = exc.lines
            for line in exc.lines:
                log.error("schedules_refused", problem=line[:500])
            log.error(
                "schedules_file_refused",
                file=str(self.path),
                problems=len(exc.lines),
                kept=len(self.current.schedules) if self.current else 0,
            )
            return False
        self._stamp = stamp
        # A file fixed after a refusal is said to be taken, even when it is the last good one
        # again: else the newest line in the log would still be `schedules_file_refused`.
        changed = (
            self.current is None or loaded.digest != self.current.digest or bool(self.problems)
        )
        self.problems = []
        self.current = loaded
        if changed:
            log.info(
                "schedules_loaded",
                file=str(self.path),
                schedules=len(loaded.schedules),
                targets=sum(len(s.targets) for s in loaded.schedules.values()),
            )
        return True

    def check(self) -> None:
        """Reload after SIGHUP or when the file's time or size changed (run in a thread)."""
        if self.hangup or self._stat() != self._stamp:
            self.hangup = False
            self.load()

    @property
    def schedules(self) -> dict[str, Schedule]:
        return {} if self.current is None else self.current.schedules


class Scheduler:
    """Claims and publishes the jobs of the schedules file; one per replica."""

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Broker,
        schedules: ScheduleFile,
        *,
        replica: str,
        on_published: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.file = schedules
        self.replica = replica
        self.on_published = on_published
        self.postgres = engine.dialect.name == "postgresql"
        self._known: set[str] = set()
        self.published = 0
        self.taken_over = 0

    # ---------------------------------------------------------------------------- the loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_watch = loop.time() + WATCH_EVERY
        next_takeover = loop.time()
        next_prune = loop.time() + 60.0
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
        try:
            while True:
                now = loop.time()
                if now >= next_watch or self.file.hangup:
                    next_watch = now + WATCH_EVERY
                    await asyncio.to_thread(self.file.check)
                for schedule in list(self.file.schedules.values()):
                    await self._guarded(self.tick(schedule), "schedule_claim_failed")
                if now >= next_takeover:
                    next_takeover = now + TAKEOVER_EVERY
                    await self._guarded(self.take_over(), "schedule_takeover_failed")
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY
                    await self._guarded(self.prune(), "schedule_prune_failed")
                await asyncio.sleep(TICK_SECONDS)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)

    def _hangup(self) -> None:
        self.file.hangup = True

    async def _guarded(self, step: Any, event: str) -> None:
        try:
            async with asyncio.timeout(30.0):
                await step
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the scheduler outlives a bad moment
            log.warning(event, error=f"{type(exc).__name__}: {exc}"[:300])

    # ---------------------------------------------------------------------------- claims

    async def _ensure_state(self, conn: AsyncConnection, name: str) -> None:
        if name in self._known:
            return
        now = await db_now(conn)
        await conn.execute(
            _insert(conn, schedule_state)
            .values(name=name, paused=False, claimed_until=now, updated_at=_at(now))
            .on_conflict_do_nothing(index_elements=["name"])
        )
        await conn.commit()
        self._known.add(name)

    async def _short_lock(self, conn: AsyncConnection) -> None:
        """PostgreSQL ends this transaction if its replica stalls in it (SIGSTOP, a long GC).

        The claim's lock is never held for longer than `STALLED_TX_MS`: the server ends the
        session, the stalled replica's claim is rolled back (it had published nothing yet),
        and the other replicas claim in its place.
        """
        if self.postgres:
            await conn.execute(
                sa.text(f"SET LOCAL idle_in_transaction_session_timeout = {STALLED_TX_MS}")
            )

    async def _lock_state(self, conn: AsyncConnection, name: str) -> Any:
        """The schedule's state row, locked for this claim; None when another replica has it."""
        await self._short_lock(conn)
        query = sa.select(
            schedule_state.c.claimed_until, schedule_state.c.paused, schedule_state.c.last_slot
        ).where(schedule_state.c.name == name)
        if self.postgres:
            return (await conn.execute(query.with_for_update(skip_locked=True))).first()
        # SQLite: a write first takes the database's write lock for the whole transaction.
        await conn.execute(
            schedule_state.update()
            .where(schedule_state.c.name == name)
            .values(claimed_until=schedule_state.c.claimed_until)
        )
        return (await conn.execute(query)).first()

    async def tick(self, schedule: Schedule) -> int:
        """Claim what is due of `schedule` and publish it; how many jobs were published."""
        async with self.engine.connect() as conn:
            await self._ensure_state(conn, schedule.name)
            claimed = await self._claim_due(conn, schedule)
        return await self.publish(claimed) if claimed else 0

    async def _claim_due(self, conn: AsyncConnection, schedule: Schedule) -> list[Claimed]:
        async with conn.begin():
            state = await self._lock_state(conn, schedule.name)
            if state is None:
                return []
            now = await db_now(conn)
            after = float(state.claimed_until)
            if now <= after:
                return []
            if state.paused or not schedule.enabled:
                await self._advance(conn, schedule.name, now, state.last_slot)
                return []
            due, skipped, last_slot = self.due(schedule, after, now)
            if schedule.overlap == "skip" and due:
                busy = await self._busy_targets(conn, schedule, now)
                kept = [d for d in due if d[1].key not in busy]
                if len(kept) < len(due):
                    skipped["overlap"] = skipped.get("overlap", 0) + len(due) - len(kept)
                due = kept
            claimed = await self._record(conn, schedule, due, now)
            await self._count_skips(conn, schedule.name, now, skipped)
            slot = max(last_slot, state.last_slot or 0.0) if last_slot else state.last_slot
            await self._advance(conn, schedule.name, now, slot)
        if any(skipped.values()):
            log.info("schedule_skipped", schedule=schedule.name, **skipped)
        return claimed

    @staticmethod
    def due(
        schedule: Schedule, after: float, now: float
    ) -> tuple[list[tuple[float, Target, float]], dict[str, int], float | None]:
        """(due, target, slot start) in (after, now] that are sent; skip counts; newest slot."""
        current = schedule.slot_at(now)
        grace = late_grace(schedule, current.length)
        lookback = now - MAX_LOOKBACK_INTERVALS * current.length - grace
        skipped: dict[str, int] = {}
        if after < lookback:
            skipped["missed"] = Scheduler._missed_estimate(schedule, after, lookback)
            after = lookback
        sent: list[tuple[float, Target, float]] = []
        late: dict[str, tuple[float, Target, float]] = {}
        missed = 0
        last_slot: float | None = None
        for slot in schedule.slots(after, now):
            for due, target in schedule.due_in(slot, after, now):
                if now - due <= grace:
                    sent.append((due, target, slot.start))
                    last_slot = slot.start
                    continue
                if schedule.catch_up == "latest":
                    previous = late.get(target.key)
                    if previous is not None:
                        missed += 1
                    late[target.key] = (due, target, slot.start)
                else:
                    missed += 1
        fresh = {target.key for _, target, _ in sent}
        for item in late.values():
            if item[1].key in fresh:
                missed += 1
            else:
                sent.append(item)
                last_slot = max(last_slot or item[2], item[2])
        if missed:
            skipped["missed"] = skipped.get("missed", 0) + missed
        return sent, skipped, last_slot

    @staticmethod
    def _missed_estimate(schedule: Schedule, after: float, until: float) -> int:
        """Jobs of the slots starting in (after, until]: what a long outage missed.

        Exact without spread; with it, a slot that starts just before `until` may have some of
        its due times after it (claimed or counted again by the window that follows).
        """
        if schedule.every is not None:
            slots = int(until // schedule.every) - int(after // schedule.every)
        else:
            slots = sum(1 for slot in schedule.slots(after, until) if slot.start > after)
        return max(0, slots) * len(schedule.targets)

    async def _busy_targets(
        self, conn: AsyncConnection, schedule: Schedule, now: float
    ) -> set[str]:
        """Targets whose previous job of this schedule is still queued within its deadline."""
        rows = await conn.execute(
            sa.select(jobs.c.host, jobs.c.port).where(
                (jobs.c.status == "queued")
                & (jobs.c.deadline_at > _at(now))
                & (jobs.c.source == schedule.source)
            )
        )
        return {host if port is None else f"{host}:{port}" for host, port in rows}

    async def _record(
        self,
        conn: AsyncConnection,
        schedule: Schedule,
        due: Sequence[tuple[float, Target, float | str]],
        now: float,
    ) -> list[Claimed]:
        """Insert the history rows and the outbox rows of `due`, in the caller's transaction."""
        if not due:
            return []
        length = schedule.slot_at(now).length
        rows: dict[str, tuple[dict[str, Any], Claimed]] = {}
        at = _at(now)
        for when, target, slot in due:
            job_id = schedule.job_id(slot, target)
            not_after = max(when, now) + length
            body = schedule.job(job_id, target, not_after, auth=False)
            history = {
                "id": job_id,
                "satellite_id": schedule.satellite,
                "kind": schedule.kind,
                "host": target.host,
                "port": target.port,
                "source": schedule.source,
                "status": "queued",
                "created_at": at,
                "submitted_at": at,
                "deadline_at": _at(now + schedule.timeout),
                "updated_at": at,
                "answers": 0,
                "lane": "bulk",
                "request": body,
            }
            rows[job_id] = (
                history,
                Claimed(job_id, schedule.name, schedule.satellite, body, not_after),
            )
        histories = [history for history, _ in rows.values()]
        new_ids: set[str] = set()
        for i in range(0, len(histories), INSERT_CHUNK):
            inserted = await conn.execute(
                _insert(conn, jobs)
                .values(histories[i : i + INSERT_CHUNK])
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(jobs.c.id)
            )
            new_ids.update(inserted.scalars())
        claimed = [c for job_id, (_, c) in rows.items() if job_id in new_ids]
        # The lease counts from now, not from the claim's start: inserting many rows takes
        # time (10,000: seconds), and the outbox rows take about as long again.
        inserted_at = await db_now(conn)
        lease = inserted_at + (inserted_at - now) + LEASE_SECONDS
        outbox = [
            {
                "id": c.id,
                "schedule": c.schedule,
                "satellite_id": c.satellite_id,
                "body": c.body,
                "not_after": c.not_after,
                "owner": self.replica[:128],
                "lease_until": lease,
            }
            for c in claimed
        ]
        for i in range(0, len(outbox), INSERT_CHUNK):
            await conn.execute(
                _insert(conn, schedule_outbox)
                .values(outbox[i : i + INSERT_CHUNK])
                .on_conflict_do_nothing(index_elements=["id"])
            )
        return claimed

    async def _count_skips(
        self, conn: AsyncConnection, name: str, now: float, skipped: dict[str, int]
    ) -> None:
        values = [
            {"schedule": name, "at": now, "reason": reason, "count": count}
            for reason, count in skipped.items()
            if count
        ]
        if values:
            insert = _insert(conn, schedule_skips)
            await conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["schedule", "at", "reason"],
                    set_={"count": schedule_skips.c.count + insert.excluded.count},
                ),
                values,
            )

    async def _advance(
        self, conn: AsyncConnection, name: str, now: float, last_slot: float | None
    ) -> None:
        await conn.execute(
            schedule_state.update()
            .where(schedule_state.c.name == name)
            .values(claimed_until=now, last_slot=last_slot, updated_at=_at(now))
        )

    # ---------------------------------------------------------------------------- publish

    async def publish(self, claimed: Sequence[Claimed]) -> int:
        """Publish with confirms, `PUBLISH_CHUNK` at a time; how many were confirmed."""
        done = 0
        for i in range(0, len(claimed), PUBLISH_CHUNK):
            done += await self._publish(claimed[i : i + PUBLISH_CHUNK])
        return done

    async def _publish(self, claimed: Sequence[Claimed]) -> int:  # noqa: C901, PLR0912
        """Publish with confirms; delete each confirmed row; how many were confirmed.

        Only rows whose lease this replica still holds are sent: a replica that stalled (SIGSTOP)
        after its claim finds its rows taken over, and does not send them a second time.
        """
        claimed = await self._still_held(claimed)
        schedules = self.file.schedules
        futures: dict[str, asyncio.Future[None]] = {}
        gone: list[str] = []
        now = time.time()
        for item in claimed:
            schedule = schedules.get(item.schedule)
            body = dict(item.body)
            if schedule is not None and schedule.auth is not None:
                body["auth"] = dict(schedule.auth)
            elif schedule is None and body.get("credential_ref") is None:
                gone.append(item.id)  # its inline credentials left with the schedule
                continue
            ttl = max(1, int(min(item.not_after - now, self._interval(item, schedule)) * 1000))
            try:
                futures[item.id] = self.publisher.publish_nowait(
                    wire.jobs_exchange(),
                    wire.jobs_routing_key(item.satellite_id),
                    json.dumps(body, separators=(",", ":")).encode(),
                    properties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=item.id,
                        type=str(body.get("kind", "")),
                        expiration=str(ttl),
                        headers={wire.RESENT_HEADER: True} if item.resent else None,
                    ),
                )
            except BrokerError:
                continue  # left to the lease: retried once it expires
        if futures:
            await asyncio.wait(futures.values(), timeout=CONFIRM_TIMEOUT)
        confirmed: list[str] = []
        unroutable: list[str] = list(gone)
        for job_id, future in futures.items():
            if not future.done():
                future.cancel()
            elif future.cancelled():
                continue
            elif future.exception() is None:
                confirmed.append(job_id)
            elif isinstance(future.exception(), UnroutableError):
                unroutable.append(job_id)
        if confirmed:
            hook = testhooks.SERVE_CRASH_AFTER_CONFIRM
            if hook and random.random() < hook:  # noqa: S311 - a test hook's coin
                testhooks.crash("schedule_after_confirm", confirmed[0])
            async with self.engine.begin() as conn:
                await conn.execute(
                    schedule_outbox.delete().where(schedule_outbox.c.id.in_(confirmed))
                )
        if unroutable:
            await self._not_published(unroutable)
        self.published += len(confirmed)
        if self.on_published is not None:
            for item in claimed:
                if item.id in confirmed:
                    self.on_published(item.schedule, 1)
        left = len(claimed) - len(confirmed) - len(unroutable)
        if left or unroutable:
            log.warning(
                "schedule_jobs_not_confirmed",
                retried_later=left,
                not_published=len(unroutable),
                of=len(claimed),
            )
        return len(confirmed)

    async def _still_held(self, claimed: Sequence[Claimed]) -> list[Claimed]:
        if not claimed:
            return []
        async with self.engine.connect() as conn:
            now = await db_now(conn)
            held = set(
                (
                    await conn.scalars(
                        sa.select(schedule_outbox.c.id).where(
                            schedule_outbox.c.id.in_([c.id for c in claimed])
                            & (schedule_outbox.c.owner == self.replica[:128])
                            & (schedule_outbox.c.lease_until > now + LEASE_MARGIN)
                            & (schedule_outbox.c.not_after > now)
                        )
                    )
                ).all()
            )
        if len(held) < len(claimed):
            log.warning("schedule_lease_lost", rows=len(claimed) - len(held), of=len(claimed))
        return [c for c in claimed if c.id in held]

    @staticmethod
    def _interval(item: Claimed, schedule: Schedule | None) -> float:
        if schedule is None:
            return item.not_after - time.time()
        return schedule.slot_at(time.time()).length

    async def _not_published(self, ids: list[str]) -> None:
        async with self.engine.begin() as conn:
            now = await db_now(conn)
            await conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(ids) & (jobs.c.status == "queued") & (jobs.c.answers == 0))
                .values(status="error", error_code=NOT_PUBLISHED, updated_at=_at(now))
            )
            await conn.execute(schedule_outbox.delete().where(schedule_outbox.c.id.in_(ids)))

    # ---------------------------------------------------------------------------- takeover

    async def take_over(self) -> int:
        """Publish outbox rows whose lease expired, `TAKEOVER_BATCH` at a time until none is left
        (at most `TAKEOVER_ROUNDS` batches per call)."""
        published = 0
        for _ in range(TAKEOVER_ROUNDS):
            done, taken = await self._take_over_batch()
            published += done
            if taken < TAKEOVER_BATCH:
                break
        return published

    async def _take_over_batch(self) -> tuple[int, int]:
        """One batch of rows taken over: (published, taken)."""
        async with self.engine.begin() as conn:
            await self._short_lock(conn)
            now = await db_now(conn)
            pick = (
                sa.select(schedule_outbox.c.id)
                .where(schedule_outbox.c.lease_until < now)
                .order_by(schedule_outbox.c.lease_until)
                .limit(TAKEOVER_BATCH)
            )
            if self.postgres:
                pick = pick.with_for_update(skip_locked=True)
            rows = (
                await conn.execute(
                    schedule_outbox.update()
                    .where(schedule_outbox.c.id.in_(pick.scalar_subquery()))
                    .values(owner=self.replica[:128], lease_until=now + LEASE_SECONDS)
                    .returning(
                        schedule_outbox.c.id,
                        schedule_outbox.c.schedule,
                        schedule_outbox.c.satellite_id,
                        schedule_outbox.c.body,
                        schedule_outbox.c.not_after,
                        schedule_outbox.c.owner,
                    )
                )
            ).all()
            if not rows:
                return 0, 0
            ids = [row.id for row in rows]
            answered = set(
                (
                    await conn.scalars(
                        sa.select(jobs.c.id).where(
                            jobs.c.id.in_(ids)
                            & ((jobs.c.answers > 0) | (jobs.c.status != "queued"))
                        )
                    )
                ).all()
            )
            expired = {row.id for row in rows if row.not_after <= now}
            done = answered | expired
            if done:
                await conn.execute(schedule_outbox.delete().where(schedule_outbox.c.id.in_(done)))
            late: dict[str, int] = {}
            for row in rows:
                if row.id in expired - answered:
                    late[row.schedule] = late.get(row.schedule, 0) + 1
            for name, count in late.items():
                await self._count_skips(conn, name, now, {"expired": count})
        todo = [
            Claimed(
                row.id,
                row.schedule,
                row.satellite_id,
                dict(row.body),
                float(row.not_after),
                resent=True,
            )
            for row in rows
            if row.id not in done
        ]
        log.info(
            "schedule_outbox_taken_over",
            rows=len(rows),
            answered=len(answered),
            expired=len(expired - answered),
            publishing=len(todo),
        )
        self.taken_over += len(todo)
        return (await self.publish(todo) if todo else 0), len(rows)

    async def prune(self) -> int:
        """Delete skip counts older than `SKIPS_KEPT` (the API shows the last interval)."""
        async with self.engine.begin() as conn:
            now = await db_now(conn)
            done = await conn.execute(
                schedule_skips.delete().where(schedule_skips.c.at < now - SKIPS_KEPT)
            )
        return done.rowcount

    # ---------------------------------------------------------------------------- operators

    def get(self, name: str) -> Schedule:
        schedule = self.file.schedules.get(name)
        if schedule is None:
            raise UnknownScheduleError(name)
        return schedule

    async def set_paused(self, name: str, paused: bool) -> None:
        self.get(name)
        async with self.engine.connect() as conn:
            await self._ensure_state(conn, name)
            async with conn.begin():
                now = await db_now(conn)
                await conn.execute(
                    schedule_state.update()
                    .where(schedule_state.c.name == name)
                    .values(paused=paused, updated_at=_at(now))
                )
        log.info("schedule_paused" if paused else "schedule_resumed", schedule=name)

    async def run_now(self, name: str, target: str | None = None) -> list[str]:
        """Claim and publish the schedule's jobs now, outside its clock; the confirmed ids."""
        schedule = self.get(name)
        targets = [t for t in schedule.targets if target is None or target in (t.key, t.host)]
        if not targets:
            raise UnknownScheduleError(f"{name}: no target {target!r}")
        async with self.engine.begin() as conn:
            now = await db_now(conn)
            stamp = f"run{int(now * 1000)}"
            claimed = await self._record(conn, schedule, [(now, t, stamp) for t in targets], now)
        await self.publish(claimed)
        async with self.engine.connect() as conn:
            left = set(
                (
                    await conn.scalars(
                        sa.select(schedule_outbox.c.id).where(
                            schedule_outbox.c.id.in_([c.id for c in claimed])
                        )
                    )
                ).all()
            )
        log.info("schedule_run", schedule=name, jobs=len(claimed))
        return [c.id for c in claimed if c.id not in left]

    async def stats(self, name: str) -> ScheduleStats:
        schedule = self.get(name)
        async with self.engine.connect() as conn:
            now = await db_now(conn)
            state = (
                await conn.execute(sa.select(schedule_state).where(schedule_state.c.name == name))
            ).first()
            length = schedule.slot_at(now).length
            since = now - length
            counts: dict[str, int] = dict(
                (
                    await conn.execute(
                        sa.select(jobs.c.status, sa.func.count())
                        .where(
                            (jobs.c.source == schedule.source) & (jobs.c.created_at >= _at(since))
                        )
                        .group_by(jobs.c.status)
                    )
                ).all()
            )
            not_published = int(
                (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            (jobs.c.source == schedule.source)
                            & (jobs.c.created_at >= _at(since))
                            & (jobs.c.error_code == NOT_PUBLISHED)
                        )
                    )
                ).scalar_one()
            )
            skips: dict[str, int] = dict(
                (
                    await conn.execute(
                        sa.select(schedule_skips.c.reason, sa.func.sum(schedule_skips.c.count))
                        .where((schedule_skips.c.schedule == name) & (schedule_skips.c.at >= since))
                        .group_by(schedule_skips.c.reason)
                    )
                ).all()
            )
        paused = bool(state.paused) if state is not None else False
        active = schedule.enabled and not paused
        total = sum(int(v) for v in counts.values())
        return ScheduleStats(
            name=name,
            paused=paused,
            enabled=schedule.enabled,
            every=schedule.every,
            cron=schedule.cron,
            targets=len(schedule.targets),
            next_fire=_at(schedule.slot_at(now).end) if active else None,
            last_fire=_at(state.last_slot) if state is not None and state.last_slot else None,
            sent=total - not_published,
            answered=int(counts.get("ok", 0)),
            failed=int(counts.get("error", 0)) - not_published + int(counts.get("overdue", 0)),
            pending=int(counts.get("queued", 0)),
            skipped={str(k): int(v) for k, v in skips.items()} | {"not_published": not_published},
            interval=length,
        )
