"""The notification sender (issue 18): the outbox to the channels, every attempt archived.

Each replica runs `Sender.run()`. A due outbox row (not sent, `next_attempt_at` past, no live
lease) is claimed with a compare-and-set lease (`lease_owner`, `lease_until`), so one replica
delivers it at a time on SQLite and PostgreSQL alike. Each attempt, whatever its outcome, is a
row in `alert_archive` (time, channel, status, HTTP code, error); a failed one is retried with
capped exponential backoff (or after Telegram's `retry_after`) for as long as it takes: a row is
never dropped, and a channel whose oldest waiting row has failed `FAILING_AFTER` times is
`failing` in `GET /v1/alerts` and `satellite_core_alert_channel_failing` in `/metrics`.

The sender does not poll the store every second. After a pass it sleeps until the earliest of:
its `wakeup` event (set by this replica's alert engine once it has committed new
notifications), the moment the next waiting row becomes due (a retry's `next_attempt_at`, a
held Telegram chat, another replica's lease running out: all read from the rows the pass
loaded anyway), and the fallback `poll` (15 s): notifications another replica queued are
found then, when that replica's own sender (woken at once) has not taken them already.

Webhook: a JSON POST (`alert`, `satellite`, `state`, `since`, `summary`, `channel`, `event`),
with `X-Satellite-Signature: sha256=<hex HMAC-SHA256 of the body>` when the channel has a
`secret_file`. Telegram: the bot API's `sendMessage`, at most one message per second per chat
(per replica), and a 429's `retry_after` holds the chat until then. Secrets (the bot token is
part of Telegram's URL) never reach a log, the archive or an error: errors are an exception's
type or an HTTP status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from poller import __version__
from poller.logging import get_logger
from satellite.service.alerts import AlertsConfig, Channel
from satellite.service.store.alert_tables import alert_archive, alert_outbox

__all__ = ["FAILING_AFTER", "Attempt", "Sender", "SenderCollector", "channel_report"]

log = get_logger("satellite.service.notify")

#: A channel whose oldest undelivered notification failed this many times is `failing`.
FAILING_AFTER = 3
SIGNATURE_HEADER = "X-Satellite-Signature"
HTTP_TIMEOUT = 10.0
#: Telegram: at least this many seconds between two messages to one chat.
TELEGRAM_GAP = 1.0
#: Longest `retry_after` honoured as given (a larger one is capped).
RETRY_AFTER_CAP = 3600.0
#: The fallback poll: at most this long between two passes (other replicas' new rows).
POLL_SECONDS = 15.0
#: The shortest sleep between two passes that made no attempt (a row due "now" that this
#: replica could not claim must not spin the loop).
MIN_IDLE = 0.05


@dataclass(frozen=True, slots=True)
class Attempt:
    ok: bool
    http_status: int | None = None
    error: str | None = None
    retry_after: float | None = None


def webhook_body(row: dict[str, Any]) -> bytes:
    body = {
        "alert": row["rule"],
        "satellite": row["satellite_id"],
        "state": row["state"],
        "since": row["since"].isoformat(),
        "summary": row["summary"],
        "channel": row["channel"],
        "event": row["event"],
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def telegram_text(row: dict[str, Any]) -> str:
    mark = "FIRING" if row["state"] == "firing" else "RESOLVED"
    return f"[{mark}] {row['rule']} on {row['satellite_id']}\n{row['summary']}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = response.json().get("parameters", {}).get("retry_after")
    except (ValueError, AttributeError):
        value = None
    if value is None:
        value = response.headers.get("Retry-After")
    try:
        return min(RETRY_AFTER_CAP, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


class Sender:
    """Delivers the outbox (see the module doc)."""

    def __init__(
        self,
        engine: AsyncEngine,
        config: AlertsConfig,
        *,
        replica: str,
        retry_base: float = 5.0,
        retry_cap: float = 300.0,
        lease: float = 60.0,
        poll: float = POLL_SECONDS,
        retention_days: int = 7,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        wakeup: asyncio.Event | None = None,
    ) -> None:
        """`wakeup`: set it when this replica has queued notifications (`AlertEngine`'s
        `on_queued`); `poll`: the fallback between passes (see the module doc)."""
        self.engine = engine
        self.config = config
        self.replica = replica
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.lease = lease
        self.poll = poll
        self.retention = timedelta(days=retention_days)
        self.clock = clock
        self.wakeup = wakeup if wakeup is not None else asyncio.Event()
        self._chat_next: dict[str, float] = {}
        self.attempts: dict[tuple[str, bool], int] = {}
        """(channel, ok) -> attempts made by this replica (for /metrics)."""
        self.report: list[dict[str, Any]] = []
        """The channels' state as of the last pass (for /metrics)."""
        self._stopping = False

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_cap, self.retry_base * 2 ** max(0, attempts - 1)))

    async def claim(self, limit: int = 20) -> list[dict[str, Any]]:
        now = self.clock()
        free = alert_outbox.c.lease_until.is_(None) | (alert_outbox.c.lease_until < now)
        due = alert_outbox.c.sent_at.is_(None) & (alert_outbox.c.next_attempt_at <= now) & free
        claimed: list[dict[str, Any]] = []
        async with self.engine.connect() as conn:
            ids = (
                await conn.execute(
                    sa.select(alert_outbox.c.id).where(due).order_by(alert_outbox.c.id).limit(limit)
                )
            ).scalars()
            candidates = list(ids)
        for row_id in candidates:
            async with self.engine.begin() as conn:
                taken = await conn.execute(
                    alert_outbox.update()
                    .where((alert_outbox.c.id == row_id) & due)
                    .values(
                        lease_owner=self.replica, lease_until=now + timedelta(seconds=self.lease)
                    )
                )
                if taken.rowcount == 1:
                    row = (
                        await conn.execute(
                            sa.select(alert_outbox).where(alert_outbox.c.id == row_id)
                        )
                    ).one()
                    claimed.append(dict(row._mapping))
        return claimed

    async def _release(self, row: dict[str, Any], at: datetime) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                alert_outbox.update()
                .where(
                    (alert_outbox.c.id == row["id"]) & (alert_outbox.c.lease_owner == self.replica)
                )
                .values(lease_owner=None, lease_until=None, next_attempt_at=at)
            )

    async def record(self, row: dict[str, Any], attempt: Attempt) -> None:
        """Archive the attempt and settle the outbox row (sent, or due again after a backoff)."""
        now = self.clock()
        number = int(row["attempts"]) + 1
        wait = self.backoff(number)
        if attempt.retry_after is not None:
            wait = max(wait, attempt.retry_after)
        update: dict[str, Any] = {"attempts": number, "lease_owner": None, "lease_until": None}
        if attempt.ok:
            update |= {"sent_at": now, "last_error": None}
        else:
            error = attempt.error or f"HTTP {attempt.http_status}"
            update |= {"next_attempt_at": now + timedelta(seconds=wait), "last_error": error[:300]}
        async with self.engine.begin() as conn:
            await conn.execute(
                alert_archive.insert().values(
                    outbox_id=row["id"],
                    at=now,
                    channel=row["channel"],
                    rule=row["rule"],
                    satellite_id=row["satellite_id"],
                    state=row["state"],
                    attempt=number,
                    status="sent" if attempt.ok else "failed",
                    http_status=attempt.http_status,
                    error=None if attempt.error is None else attempt.error[:300],
                    replica=self.replica,
                    detail={"retry_in_s": None if attempt.ok else wait},
                )
            )
            await conn.execute(
                alert_outbox.update()
                .where(
                    (alert_outbox.c.id == row["id"]) & (alert_outbox.c.lease_owner == self.replica)
                )
                .values(**update)
            )
        key = (str(row["channel"]), attempt.ok)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        log.info(
            "notification_sent" if attempt.ok else "notification_failed",
            channel=row["channel"],
            rule=row["rule"],
            satellite=row["satellite_id"],
            state=row["state"],
            attempt=number,
            http_status=attempt.http_status,
            error=attempt.error,
            retry_in_s=None if attempt.ok else round(wait, 1),
        )

    async def deliver(self, client: httpx.AsyncClient, row: dict[str, Any]) -> Attempt | None:
        """One attempt; None when the chat is held (the row is released, not attempted)."""
        channel = next((c for c in self.config.channels if c.name == row["channel"]), None)
        if channel is None:
            return Attempt(False, error="channel not configured (USM_CORE_ALERTS_FILE)")
        try:
            if channel.type == "webhook":
                return await self._webhook(client, channel, row)
            return await self._telegram(client, channel, row)
        except OSError as exc:
            return Attempt(False, error=f"cannot read a secret file: {exc.strerror or 'error'}")
        except httpx.TimeoutException:
            return Attempt(False, error=f"no answer within {HTTP_TIMEOUT:g} s")
        except httpx.HTTPError as exc:
            # The message of an httpx error may hold the URL (Telegram's has the bot token).
            return Attempt(False, error=type(exc).__name__)

    async def _webhook(
        self, client: httpx.AsyncClient, channel: Channel, row: dict[str, Any]
    ) -> Attempt:
        assert channel.url is not None
        body = webhook_body(row)
        headers = {"Content-Type": "application/json", "User-Agent": f"satellite/{__version__}"}
        secret = await asyncio.to_thread(channel.secret)
        if secret:
            digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        response = await client.post(channel.url, content=body, headers=headers)
        if response.is_success:
            return Attempt(True, response.status_code)
        return Attempt(
            False,
            response.status_code,
            f"HTTP {response.status_code}",
            _retry_after(response) if response.status_code in (429, 503) else None,
        )

    async def _telegram(
        self, client: httpx.AsyncClient, channel: Channel, row: dict[str, Any]
    ) -> Attempt | None:
        assert channel.url is not None
        assert channel.chat_id is not None
        chat = f"{channel.url}|{channel.chat_id}"
        wait = self._chat_next.get(chat, 0.0) - time.monotonic()
        if wait > TELEGRAM_GAP:
            await self._release(row, self.clock() + timedelta(seconds=wait))
            return None
        if wait > 0:
            await asyncio.sleep(wait)
        token = await asyncio.to_thread(channel.bot_token)
        response = await client.post(
            f"{channel.url.rstrip('/')}/bot{token}/sendMessage",
            json={"chat_id": channel.chat_id, "text": telegram_text(row)},
        )
        self._chat_next[chat] = time.monotonic() + TELEGRAM_GAP
        if response.is_success:
            return Attempt(True, response.status_code)
        retry_after = _retry_after(response) if response.status_code == 429 else None
        if retry_after is not None:
            self._chat_next[chat] = time.monotonic() + retry_after
        try:
            described = str(response.json().get("description", ""))[:120]
        except (ValueError, AttributeError):
            described = ""
        error = f"HTTP {response.status_code}" + (f": {described}" if described else "")
        return Attempt(False, response.status_code, error.replace(token, "***"), retry_after)

    def stop(self) -> None:
        """End `run()` once the attempt under way (if any) is archived; claim nothing more.

        The caller waits for `run()` a bounded time and cancels it after that: an attempt
        cancelled between the channel's answer and its archive row would be made again after
        a restart (a duplicate notification).
        """
        self._stopping = True
        self.wakeup.set()

    async def pass_once(self, client: httpx.AsyncClient) -> int:
        """Deliver what is due now; how many attempts were made."""
        made = 0
        claimed = await self.claim()
        for n, row in enumerate(claimed):
            if self._stopping:  # the rest is left for the next replica, without a lease
                for left in claimed[n:]:
                    await self._release(left, left["next_attempt_at"])
                break
            attempt = await self.deliver(client, row)
            if attempt is not None:
                await self.record(row, attempt)
                made += 1
        return made

    async def purge(self) -> int:
        """Delete archived attempts and delivered outbox rows older than the retention."""
        cutoff = self.clock() - self.retention
        async with self.engine.begin() as conn:
            archived = await conn.execute(alert_archive.delete().where(alert_archive.c.at < cutoff))
            await conn.execute(
                alert_outbox.delete().where(
                    alert_outbox.c.sent_at.is_not(None) & (alert_outbox.c.sent_at < cutoff)
                )
            )
        return int(archived.rowcount or 0)

    async def run(self) -> None:
        timeout = httpx.Timeout(HTTP_TIMEOUT)
        next_purge = time.monotonic() + 60.0
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            while not self._stopping:
                # Cleared before the pass: a wake-up during the pass means "look again".
                self.wakeup.clear()
                due_in: float | None = None
                try:
                    async with asyncio.timeout(300.0):
                        made = await self.pass_once(client)
                        if self._stopping:
                            break
                        rows = await _waiting_rows(self.engine)
                        self.report = _report(rows, self.config)
                        due_in = self.due_in(rows)
                        if time.monotonic() >= next_purge:
                            next_purge = time.monotonic() + 3600.0
                            await self.purge()
                except Exception as exc:  # noqa: BLE001 - the sender must outlive a bad pass
                    made = 0
                    log.warning("notify_pass_failed", error=f"{type(exc).__name__}")
                if not made and not self._stopping:
                    await self.idle(due_in)

    def due_in(self, rows: list[dict[str, Any]]) -> float | None:
        """Seconds until the first of these waiting rows may be claimed; None for none."""
        due = [
            max(row["next_attempt_at"], row["lease_until"])
            if row["lease_until"] is not None
            else row["next_attempt_at"]
            for row in rows
        ]
        return (min(due) - self.clock()).total_seconds() if due else None

    async def idle(self, due_in: float | None) -> None:
        """Sleep until woken, until the next row is due, or for the fallback poll."""
        delay = self.poll if due_in is None else min(self.poll, max(MIN_IDLE, due_in))
        try:
            async with asyncio.timeout(delay):
                await self.wakeup.wait()
        except TimeoutError:
            pass


async def channel_report(engine: AsyncEngine, config: AlertsConfig) -> list[dict[str, Any]]:
    """Per channel: notifications waiting, the oldest one's attempts and error, `failing`."""
    return _report(await _waiting_rows(engine), config)


async def _waiting_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    """The outbox rows not delivered yet, oldest first (at most 1000)."""
    stmt = (
        sa.select(alert_outbox)
        .where(alert_outbox.c.sent_at.is_(None))
        .order_by(alert_outbox.c.id)
        .limit(1000)
    )
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]


def _report(rows: list[dict[str, Any]], config: AlertsConfig) -> list[dict[str, Any]]:
    names = [c.name for c in config.channels]
    names += sorted({str(r["channel"]) for r in rows} - set(names))
    kinds = {c.name: c.type for c in config.channels}
    out = []
    for name in names:
        waiting = [r for r in rows if r["channel"] == name]
        oldest = waiting[0] if waiting else None
        attempts = int(oldest["attempts"]) if oldest else 0
        out.append(
            {
                "name": name,
                "type": kinds.get(name),
                "configured": name in kinds,
                "pending": len(waiting),
                "oldest_pending_since": oldest["created_at"].isoformat() if oldest else None,
                "attempts": attempts,
                "last_error": oldest["last_error"] if oldest else None,
                "failing": attempts >= FAILING_AFTER or (bool(waiting) and name not in kinds),
            }
        )
    return out


class SenderCollector(Collector):
    """`/metrics`: attempts by channel and outcome; pending and failing per channel."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def collect(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "satellite_core_alert_notifications",
            "Notification attempts made by this replica, by channel and outcome",
            labels=["channel", "outcome"],
        )
        for (channel, ok), count in sorted(self.sender.attempts.items()):
            attempts.add_metric([channel, "sent" if ok else "failed"], count)
        yield attempts
        pending = GaugeMetricFamily(
            "satellite_core_alert_notifications_pending",
            "Notifications waiting for delivery (from the store, as of the sender's last pass)",
            labels=["channel"],
        )
        failing = GaugeMetricFamily(
            "satellite_core_alert_channel_failing",
            f"1 when a channel's oldest waiting notification failed {FAILING_AFTER}+ times",
            labels=["channel"],
        )
        for report in self.sender.report:
            pending.add_metric([report["name"]], report["pending"])
            failing.add_metric([report["name"]], 1 if report["failing"] else 0)
        yield pending
        yield failing
