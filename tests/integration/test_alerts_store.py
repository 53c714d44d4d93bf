"""Alerts on both databases: a state change is recorded and queued once across replicas,
silences keep it out of the outbox, and the sender delivers the outbox to real local HTTP
receivers (a webhook, a Telegram stand-in), retrying and archiving every attempt."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from satellite.service.alerts import (
    AlertEngine,
    AlertsConfig,
    Facts,
    add_silence,
    alert_states_list,
    apply_finding,
    archive_page,
    evaluate_row,
    parse_alerts,
)
from satellite.service.app import Core
from satellite.service.notify import FAILING_AFTER, Sender, SenderCollector, channel_report
from satellite.service.settings import DatabaseUrl, load_settings
from satellite.service.store import Store
from satellite.service.store.alert_tables import alert_outbox
from tests.support.rabbitmq import AmqpVhost
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(db_url: DatabaseUrl) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    yield opened
    await opened.close()


def facts(sid: str = "sat-a", *, consumers: int = 1, replicas: int = 1) -> Facts:
    return Facts(
        satellite_id=sid,
        replicas=replicas,
        consumers=consumers,
        oldest_age_s=None,
        ready=0,
        dead_letters=0,
        overdue=0,
        versions=("1.0",),
        skew=False,
        quarantined=0,
    )


def config(data: Any, base: Path | None = None) -> AlertsConfig:
    # No consumer counts at once (the default waits for 60 s of it).
    data = {"rules": {"satellite_down": {"after": 0}}} | data
    parsed, errors = parse_alerts(data, base=base)
    assert errors == []
    return parsed


HOOKS = {"channels": [{"name": "ops", "type": "webhook", "url": "http://127.0.0.1:9/x"}]}


async def outbox(store: Store) -> list[dict[str, object]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.select(alert_outbox).order_by(alert_outbox.c.id))
        return [dict(r._mapping) for r in rows]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 6, 12, 0, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_two_replicas_record_each_state_change_once(store: Store) -> None:
    seen = [facts(consumers=0)]

    async def source() -> list[Facts]:
        return list(seen)

    clock = Clock()
    cfg = config(HOOKS)
    engines = [
        AlertEngine(store.engine, cfg, source, replica=f"r{n}", interval=60, clock=clock)
        for n in range(2)
    ]
    for engine in engines:
        engine.started -= 120  # past the start-up grace
    # Both replicas tick in the same slot, at once: one of them evaluates.
    done = await asyncio.gather(*(e.tick() for e in engines))
    assert sorted(done) == [False, True]
    rows = await outbox(store)
    assert [(r["rule"], r["state"], r["channel"]) for r in rows] == [
        ("satellite_down", "firing", "ops")
    ]
    assert "no consumer" in str(rows[0]["summary"])
    # The next slot: still down, nothing new; the slot after: back, one `resolved`.
    clock.now += timedelta(seconds=60)
    assert sorted(await asyncio.gather(*(e.tick() for e in engines))) == [False, True]
    assert len(await outbox(store)) == 1
    seen[:] = [facts()]
    clock.now += timedelta(seconds=60)
    await asyncio.gather(*(e.tick() for e in engines))
    rows = await outbox(store)
    assert [(r["rule"], r["state"]) for r in rows] == [
        ("satellite_down", "firing"),
        ("satellite_down", "resolved"),
    ]
    states = {(s["rule"], s["satellite_id"]): s for s in await alert_states_list(store.engine)}
    assert states["satellite_down", "sat-a"]["state"] == "ok"
    assert states["satellite_down", "sat-a"]["seq"] == 2
    assert states["dlq", "sat-a"]["state"] == "ok"


async def test_one_stale_look_neither_fires_nor_undoes_a_newer_one(store: Store) -> None:
    """satellite_down (`after: 6`, evaluated every 2 s by two replicas in turn) fires only once
    consecutive evaluations have seen it for 6 s: a single look at a lagging consumer count or a
    missed heartbeat, between healthy ones, is `pending` and sends nothing; and a verdict older
    than the one recorded (a replica slow between its look and its write) changes nothing."""
    looks: list[Facts] = []

    async def source() -> list[Facts]:
        return [looks.pop(0)]

    clock = Clock()
    cfg = config(HOOKS | {"rules": {"satellite_down": {"after": 6}}})
    engines = [
        AlertEngine(store.engine, cfg, source, replica=f"r{n}", interval=2, clock=clock)
        for n in range(2)
    ]
    for engine in engines:
        engine.started -= 120

    async def look(n: int, seen: Facts) -> None:
        looks.append(seen)
        clock.now += timedelta(seconds=2)
        assert await engines[n % 2].tick()

    async def down() -> str:
        states = await alert_states_list(store.engine)
        return next(str(s["state"]) for s in states if s["rule"] == "satellite_down")

    # Healthy, one stale look each way (no consumer; no heartbeat), healthy again.
    for n, seen in enumerate([facts(), facts(consumers=0), facts(), facts(replicas=0), facts()]):
        await look(n, seen)
    assert await outbox(store) == []
    # Down for 4 consecutive evaluations (6 s from the first): pending, then firing once.
    seen_states = []
    for n in range(4):
        await look(n, facts(consumers=0))
        seen_states.append(await down())
    assert seen_states == ["pending", "pending", "pending", "firing"]
    rows = await outbox(store)
    assert [(r["rule"], r["state"]) for r in rows] == [("satellite_down", "firing")]
    assert "for 6 s" in str(rows[0]["summary"])
    # Back; then a slow replica writes the look it took before that: nothing changes.
    await look(0, facts())
    stale = clock.now - timedelta(seconds=1)
    (late,) = [f for f in evaluate_row(facts(consumers=0), cfg.rules) if f.rule == "satellite_down"]
    assert await apply_finding(store.engine, late, stale, ["ops"], mute=False) is None
    assert await down() == "ok"
    assert [r["state"] for r in await outbox(store)] == ["firing", "resolved"]


async def test_a_silenced_satellite_changes_state_without_a_notification(store: Store) -> None:
    clock = Clock()

    async def source() -> list[Facts]:
        return [facts("sat-a", consumers=0), facts("sat-b", consumers=0)]

    engine = AlertEngine(store.engine, config(HOOKS), source, replica="r", clock=clock)
    engine.started -= 120
    await add_silence(
        store.engine,
        "sat-a",
        rule=None,
        now=clock.now,
        ends_at=clock.now + timedelta(hours=2),
        reason="maintenance",
        created_by="test",
    )
    assert await engine.tick()
    assert [r["satellite_id"] for r in await outbox(store)] == ["sat-b"]
    states = {
        (s["rule"], s["satellite_id"]): s["state"] for s in await alert_states_list(store.engine)
    }
    assert states["satellite_down", "sat-a"] == "firing"


async def test_a_webhook_failing_three_times_gets_it_on_the_fourth_attempt(
    store: Store, tmp_path: Path
) -> None:
    secret = tmp_path / "hmac"
    secret.write_text("s3cret-key\n")
    answers = [(500, {}), (500, {}), (500, {}), (200, {"ok": True})]
    async with Receiver(answers) as hook:
        cfg = config(
            {
                "channels": [
                    {
                        "name": "ops",
                        "type": "webhook",
                        "url": hook.url + "/hook",
                        "secret_file": str(secret),
                    }
                ]
            }
        )
        engine = AlertEngine(store.engine, cfg, _down_source(), replica="r", clock=Clock())
        engine.started -= 120
        await engine.tick()
        sender = Sender(store.engine, cfg, replica="r", retry_base=0.05, poll=0.02)
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(200):
                await sender.pass_once(client)
                if len(hook.requests) >= 4 and (await outbox(store))[0]["sent_at"]:
                    break
                await asyncio.sleep(0.05)
            report = await channel_report(store.engine, cfg)
            # Nothing more is sent once it is delivered.
            await asyncio.sleep(0.3)
            await sender.pass_once(client)
    assert len(hook.requests) == 4
    first = hook.requests[0]
    body = first.json()
    assert body["alert"] == "satellite_down"
    assert body["satellite"] == "sat-a"
    assert body["state"] == "firing"
    assert datetime.fromisoformat(body["since"])
    assert body["summary"]
    expected = hmac.new(b"s3cret-key", first.body, hashlib.sha256).hexdigest()
    assert first.headers["x-satellite-signature"] == f"sha256={expected}"
    archive = list(reversed(await archive_page(store.engine)))
    assert [(a["attempt"], a["status"], a["http_status"]) for a in archive] == [
        (1, "failed", 500),
        (2, "failed", 500),
        (3, "failed", 500),
        (4, "sent", 200),
    ]
    assert archive[0]["error"] == "HTTP 500"
    assert report[0]["pending"] == 0


async def test_a_channel_that_keeps_failing_is_reported_and_kept(store: Store) -> None:
    async with Receiver([(503, {})]) as hook:
        cfg = config({"channels": [{"name": "ops", "type": "webhook", "url": hook.url}]})
        engine = AlertEngine(store.engine, cfg, _down_source(), replica="r", clock=Clock())
        engine.started -= 120
        await engine.tick()
        sender = Sender(store.engine, cfg, replica="r", retry_base=0.01, retry_cap=0.02)
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(200):
                await sender.pass_once(client)
                if len(hook.requests) >= FAILING_AFTER + 1:
                    break
                await asyncio.sleep(0.03)
    report = await channel_report(store.engine, cfg)
    assert report[0]["failing"] is True
    assert report[0]["pending"] == 1
    assert report[0]["last_error"] == "HTTP 503"
    rows = await outbox(store)
    assert rows[0]["sent_at"] is None  # still queued: never dropped
    sender.report = report
    registry = CollectorRegistry()
    registry.register(SenderCollector(sender))
    text = generate_latest(registry).decode()
    assert 'satellite_core_alert_channel_failing{channel="ops"} 1.0' in text
    assert 'satellite_core_alert_notifications_pending{channel="ops"} 1.0' in text
    assert 'satellite_core_alert_notifications_total{channel="ops",outcome="failed"}' in text
    # The retention keeps what is still waiting.
    sender.retention = timedelta(0)
    assert await sender.purge() >= FAILING_AFTER
    assert len(await outbox(store)) == 1


async def test_telegram_429_retry_after_is_waited_for(store: Store, tmp_path: Path) -> None:
    token = tmp_path / "bot"
    token.write_text("123456:SECRET-bot-token\n")
    answers = [
        (
            429,
            {
                "ok": False,
                "error_code": 429,
                "description": "Too Many Requests: retry after 2",
                "parameters": {"retry_after": 2},
            },
        ),
        (200, {"ok": True, "result": {"message_id": 1}}),
    ]
    async with Receiver(answers) as bot:
        cfg = config(
            {
                "channels": [
                    {
                        "name": "phone",
                        "type": "telegram",
                        "url": bot.url,
                        "bot_token_file": str(token),
                        "chat_id": -100123,
                    }
                ]
            }
        )
        engine = AlertEngine(store.engine, cfg, _down_source(), replica="r", clock=Clock())
        engine.started -= 120
        await engine.tick()
        sender = Sender(store.engine, cfg, replica="r", retry_base=0.01, poll=0.05)
        task = asyncio.create_task(sender.run())
        try:
            for _ in range(200):
                # Delivered, and the attempt archived (the answer is read after it arrives).
                if len(bot.requests) >= 2 and (await outbox(store))[0]["sent_at"]:
                    break
                await asyncio.sleep(0.05)
        finally:
            await _stopped(task)
    assert len(bot.requests) == 2
    assert bot.requests[0].path == "/bot123456:SECRET-bot-token/sendMessage"
    sent = bot.requests[0].json()
    assert sent["chat_id"] == "-100123"
    assert "satellite_down" in sent["text"]
    assert "sat-a" in sent["text"]
    assert bot.requests[1].at - bot.requests[0].at >= 2.0
    archive = list(reversed(await archive_page(store.engine)))
    assert [(a["status"], a["http_status"]) for a in archive] == [("failed", 429), ("sent", 200)]
    assert "SECRET" not in str(archive)


def _down_source(sid: str = "sat-a") -> Callable[[], Awaitable[list[Facts]]]:
    async def source() -> list[Facts]:
        return [facts(sid, consumers=0)]

    return source


async def _stopped(task: asyncio.Task[None]) -> None:
    """Cancel a sender and wait until it has ended, before the store closes under it (a task
    cancelled but not awaited could be left waiting on the closed store's thread for ever)."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=15)
    assert done, "the sender did not end within 15 s of its cancel"


async def _until(check: Callable[[], bool], seconds: float = 15.0) -> None:
    """Until `check()` (polled every 50 ms, at most `seconds`)."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)


async def test_the_sender_is_woken_by_its_replica_and_polls_for_the_others(store: Store) -> None:
    """No store poll each second: a replica's own notifications wake its sender at once (the
    fallback poll is an hour here); another replica's are found by the fallback poll."""
    async with Receiver([(200, {"ok": True})]) as hook:
        cfg = config({"channels": [{"name": "ops", "type": "webhook", "url": hook.url}]})
        wakeup = asyncio.Event()
        sender = Sender(store.engine, cfg, replica="r1", poll=3600, wakeup=wakeup)
        mine = AlertEngine(
            store.engine, cfg, _down_source(), replica="r1", clock=Clock(), on_queued=wakeup.set
        )
        mine.started -= 120
        task = asyncio.create_task(sender.run())
        try:
            await _until(lambda: bool(sender.report))  # the first pass found nothing: asleep
            assert hook.requests == []
            await mine.tick()
            await _until(lambda: len(hook.requests) == 1)
            assert len(hook.requests) == 1
        finally:
            await _stopped(task)
        # Another replica queues (its sender is down); this one's fallback poll finds it.
        later = Clock()
        later.now += timedelta(seconds=60)  # the next slot (r1 evaluated this one)
        other = AlertEngine(store.engine, cfg, _down_source("sat-b"), replica="r2", clock=later)
        other.started -= 120
        poller = Sender(store.engine, cfg, replica="r1", poll=0.2)
        task = asyncio.create_task(poller.run())
        try:
            await _until(lambda: bool(poller.report))
            await other.tick()
            await _until(lambda: len(hook.requests) == 2)
        finally:
            await _stopped(task)
    assert [r.json()["satellite"] for r in hook.requests] == ["sat-a", "sat-b"]


async def test_a_failed_attempt_is_retried_when_it_falls_due_not_at_the_poll(
    store: Store,
) -> None:
    async with Receiver([(500, {}), (200, {"ok": True})]) as hook:
        cfg = config({"channels": [{"name": "ops", "type": "webhook", "url": hook.url}]})
        wakeup = asyncio.Event()
        sender = Sender(store.engine, cfg, replica="r", retry_base=0.2, poll=3600, wakeup=wakeup)
        engine = AlertEngine(
            store.engine, cfg, _down_source(), replica="r", clock=Clock(), on_queued=wakeup.set
        )
        engine.started -= 120
        await engine.tick()
        task = asyncio.create_task(sender.run())
        try:
            await _until(lambda: len(hook.requests) == 2)
            for _ in range(150):  # an attempt is archived once its answer has arrived
                if len(await archive_page(store.engine)) == 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            await _stopped(task)
    assert len(hook.requests) == 2
    archive = list(reversed(await archive_page(store.engine)))
    assert [(a["status"], a["http_status"]) for a in archive] == [("failed", 500), ("sent", 200)]


async def test_a_stop_lets_the_attempt_under_way_be_archived_so_a_restart_does_not_resend(
    store: Store, db_url: DatabaseUrl, amqp_vhost: AmqpVhost, tmp_path: Path
) -> None:
    """A replica stopped while its webhook is answering waits (bounded) for the answer and
    archives it; cancelled between the answer and the archive row, it would send the
    notification again after a restart."""
    answer = asyncio.Event()
    async with Receiver([(200, {"ok": True})], hold=answer) as hook:
        alerts_file = tmp_path / "alerts.yaml"
        alerts_file.write_text(
            json.dumps({"channels": [{"name": "ops", "type": "webhook", "url": hook.url}]})
        )
        cfg = config({"channels": [{"name": "ops", "type": "webhook", "url": hook.url}]})
        engine = AlertEngine(store.engine, cfg, _down_source(), replica="r0", clock=Clock())
        engine.started -= 120
        await engine.tick()
        settings = load_settings(
            {
                "US_AMQP_DSN": amqp_vhost.dsn,
                "USM_CORE_DB": db_url.url.render_as_string(hide_password=False),
                "USM_CORE_ALERTS_FILE": str(alerts_file),
            }
        )
        core = await Core.start(settings)  # its sender's first pass takes the row
        stopping: asyncio.Task[None] | None = None
        try:
            await _until(lambda: len(hook.requests) == 1)
            assert len(hook.requests) == 1
            stopping = asyncio.create_task(core.stop())
            await asyncio.sleep(0.3)  # the stop is under way when the webhook answers
            answer.set()
        finally:
            answer.set()
            await (stopping if stopping is not None else core.stop())
        # The restarted replica (another name) has nothing left to send.
        again = Sender(store.engine, cfg, replica="r-restarted")
        async with httpx.AsyncClient(timeout=10) as client:
            assert await again.pass_once(client) == 0
    assert len(hook.requests) == 1
    archive = await archive_page(store.engine)
    assert [(a["status"], a["http_status"]) for a in archive] == [("sent", 200)]
    assert (await outbox(store))[0]["sent_at"] is not None


async def test_a_stopped_sender_releases_the_rows_it_claimed_but_did_not_attempt(
    store: Store,
) -> None:
    answer = asyncio.Event()
    async with Receiver([(200, {"ok": True})], hold=answer) as hook:
        channels = [{"name": n, "type": "webhook", "url": hook.url} for n in ("ops", "oncall")]
        cfg = config({"channels": channels})
        engine = AlertEngine(store.engine, cfg, _down_source(), replica="r0", clock=Clock())
        engine.started -= 120
        await engine.tick()
        assert len(await outbox(store)) == 2
        sender = Sender(store.engine, cfg, replica="r1")
        async with httpx.AsyncClient(timeout=10) as client:
            passing = asyncio.create_task(sender.pass_once(client))
            await _until(lambda: len(hook.requests) == 1)
            sender.stop()
            answer.set()
            assert await asyncio.wait_for(passing, 15) == 1
    rows = await outbox(store)
    assert [r["sent_at"] is not None for r in rows] == [True, False]
    assert [r["lease_owner"] for r in rows] == [None, None]
    assert len(hook.requests) == 1
