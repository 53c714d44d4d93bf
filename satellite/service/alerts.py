"""Alerts (issue 18): rules over the fleet page's data, state changes claimed once in the store.

Every replica runs `AlertEngine.run()`: each `interval` (60 s; `USM_CORE_ALERT_INTERVAL`) it
builds the fleet page's rows (`web.overview.collect` over `FleetWatch` and the history), and
tries to claim the evaluation slot (`floor(epoch / interval)`, a primary key in
`alert_evaluations`); the replica that inserts the slot evaluates every rule for every satellite.
A state change (`ok` -> `pending` -> `firing` -> `ok`) is a compare-and-set on
`alert_states.seq`; `satellite_down` passes through `pending` until consecutive evaluations
(whichever replica made them) have seen it for `after` seconds, so that one stale look does not
fire it. On `firing` and on its end, in the same transaction, one outbox row per channel is
inserted (unique per change and channel), unless a silence covers the satellite. The sender
(notify.py) delivers the outbox.

`USM_CORE_ALERTS_FILE` (YAML) names the channels and may override the rules:

```yaml
channels:
  - {name: ops, type: webhook, url: "https://hooks.example/alerts", secret_file: /etc/s/hmac}
  - {name: phone, type: telegram, bot_token_file: /etc/s/bot, chat_id: "-100123"}
rules:                      # optional; omitted rules keep their defaults
  backlog: {age: 600}
  quarantine: {enabled: true, above: 3}
  dlq: {enabled: false}
  satellite_down: {channels: [phone]}
```
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import yaml
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from poller.errors import ConfigError
from poller.logging import get_logger
from satellite.service.fleet import FleetWatch
from satellite.service.store.alert_tables import (
    alert_archive,
    alert_evaluations,
    alert_outbox,
    alert_silences,
    alert_states,
)
from satellite.service.web.history import fleet_history
from satellite.service.web.overview import collect

__all__ = [
    "RULES",
    "AlertEngine",
    "AlertsConfig",
    "Channel",
    "Finding",
    "Rule",
    "evaluate_row",
    "fleet_facts",
    "load_alerts_file",
]

log = get_logger("satellite.service.alerts")

RULES = ("satellite_down", "backlog", "dlq", "overdue", "version_skew", "quarantine")
ChannelType = Literal["webhook", "telegram"]
TELEGRAM_API = "https://api.telegram.org"
#: Evaluations older than this are deleted (one row per interval).
EVALUATIONS_KEPT = timedelta(days=2)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule's settings; `channels` None: every channel."""

    name: str
    enabled: bool = True
    after: float = 60.0
    """satellite_down: seconds without a heartbeat."""
    age: float = 300.0
    """backlog: seconds the oldest queued job may wait."""
    growing_for: float = 300.0
    """backlog: seconds of a queue that only grows."""
    above: int = 0
    """quarantine: devices quarantined above this; dlq: messages above this."""
    channels: tuple[str, ...] | None = None


DEFAULT_RULES: dict[str, Rule] = {
    "satellite_down": Rule("satellite_down"),
    "backlog": Rule("backlog"),
    "dlq": Rule("dlq"),
    "overdue": Rule("overdue"),
    "version_skew": Rule("version_skew"),
    "quarantine": Rule("quarantine", enabled=False, above=0),
}


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    type: ChannelType
    url: str | None = None
    chat_id: str | None = None
    bot_token_file: Path | None = None
    secret_file: Path | None = None

    def secret(self) -> bytes | None:
        """The webhook's HMAC key (read when needed, never kept in a log or a repr)."""
        return None if self.secret_file is None else self.secret_file.read_bytes().strip()

    def bot_token(self) -> str:
        assert self.bot_token_file is not None
        return self.bot_token_file.read_text(encoding="utf-8").strip()


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    channels: tuple[Channel, ...] = ()
    rules: dict[str, Rule] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def channels_for(self, rule: str) -> list[Channel]:
        wanted = self.rules[rule].channels
        return [c for c in self.channels if wanted is None or c.name in wanted]


_CHANNEL_KEYS = {"name", "type", "url", "bot_token_file", "chat_id", "secret_file"}
_RULE_KEYS = {"enabled", "after", "age", "growing_for", "above", "channels"}


class _Reader:
    """Reads the alerts file's mapping, collecting one line per problem."""

    def __init__(self, base: Path | None) -> None:
        self.base = base
        self.errors: list[str] = []

    def unknown(self, where: str, keys: Iterable[str], known: Iterable[str]) -> None:
        self.errors.extend(
            f"{where}{key}: unknown key ({', '.join(sorted(known))})"
            for key in sorted(set(keys) - set(known))
        )

    def path(self, value: Any, where: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.errors.append(f"{where}: must be a file path")
            return None
        found = Path(value)
        if not found.is_absolute() and self.base is not None:
            found = self.base / found
        if not found.is_file():
            self.errors.append(f"{where}: {found} is not a readable file")
        return found

    def channel(self, item: Any, where: str, taken: set[str]) -> Channel | None:
        if not isinstance(item, dict):
            self.errors.append(f"{where}: must be a mapping")
            return None
        self.unknown(f"{where}.", item, _CHANNEL_KEYS)
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            self.errors.append(f"{where}.name: required, 1-64 characters")
            name = where
        elif name in taken:
            self.errors.append(f"{where}.name: {name!r} is used twice")
        url = item.get("url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            self.errors.append(f"{where}.url: must be an http:// or https:// URL")
            url = None
        kind = item.get("type")
        if kind == "webhook":
            if url is None:
                self.errors.append(f"{where}.url: a webhook needs a url")
            secret = self.path(item.get("secret_file"), f"{where}.secret_file")
            return Channel(name, "webhook", url=url, secret_file=secret)
        if kind == "telegram":
            if item.get("bot_token_file") is None:
                self.errors.append(f"{where}.bot_token_file: a telegram channel needs one")
            token = self.path(item.get("bot_token_file"), f"{where}.bot_token_file")
            chat = item.get("chat_id")
            if not isinstance(chat, (str, int)) or isinstance(chat, bool) or str(chat) == "":
                self.errors.append(f"{where}.chat_id: a telegram channel needs one")
                chat = ""
            base_url = url or TELEGRAM_API
            return Channel(name, "telegram", url=base_url, chat_id=str(chat), bot_token_file=token)
        self.errors.append(f"{where}.type: must be webhook or telegram")
        return None

    def rule(self, rule: Rule, settings: Any, where: str, names: set[str]) -> Rule:
        if settings is None:
            return rule
        if not isinstance(settings, dict):
            self.errors.append(f"{where}: must be a mapping")
            return rule
        self.unknown(f"{where}.", settings, _RULE_KEYS)
        if "enabled" in settings:
            if isinstance(settings["enabled"], bool):
                rule = replace(rule, enabled=settings["enabled"])
            else:
                self.errors.append(f"{where}.enabled: must be true or false")
        if "channels" in settings:
            value = settings["channels"]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                self.errors.extend(
                    f"{where}.channels: no channel named {unknown!r}"
                    for unknown in sorted(set(value) - names)
                )
                rule = replace(rule, channels=tuple(value))
            else:
                self.errors.append(f"{where}.channels: must be a list of channel names")
        return self.numbers(rule, settings, where)

    def numbers(self, rule: Rule, settings: dict[str, Any], where: str) -> Rule:
        for key in ("after", "age", "growing_for", "above"):
            value = settings.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                self.errors.append(f"{where}.{key}: must be a number >= 0")
            elif key == "above":
                rule = replace(rule, above=int(value))
            else:
                rule = replace(rule, **{key: float(value)})  # type: ignore[arg-type]
        return rule


def parse_alerts(data: Any, *, base: Path | None = None) -> tuple[AlertsConfig, list[str]]:
    """The configuration and every problem found, one line each (paths relative to `base`)."""
    reader = _Reader(base)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return AlertsConfig(), ["the file must be a mapping with channels: and rules:"]
    reader.unknown("", data, ("channels", "rules"))
    channels: list[Channel] = []
    raw_channels = data.get("channels") or []
    if not isinstance(raw_channels, list):
        reader.errors.append("channels: must be a list")
        raw_channels = []
    for n, item in enumerate(raw_channels):
        channel = reader.channel(item, f"channels[{n}]", {c.name for c in channels})
        if channel is not None:
            channels.append(channel)
    rules = dict(DEFAULT_RULES)
    raw_rules = data.get("rules") or {}
    if not isinstance(raw_rules, dict):
        reader.errors.append("rules: must be a mapping of rule name to settings")
        raw_rules = {}
    names = {c.name for c in channels}
    for name, settings in raw_rules.items():
        if name not in DEFAULT_RULES:
            reader.errors.append(f"rules.{name}: unknown rule ({', '.join(RULES)})")
        else:
            rules[name] = reader.rule(rules[name], settings, f"rules.{name}", names)
    return AlertsConfig(tuple(channels), rules), reader.errors


def load_alerts_file(path: Path | None) -> AlertsConfig:
    """`USM_CORE_ALERTS_FILE`, or the defaults without channels; `ConfigError`: every problem,
    one line each, prefixed with the variable."""
    if path is None:
        return AlertsConfig()
    label = f"USM_CORE_ALERTS_FILE ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{label}: cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{label}: not YAML{where}") from None
    config, errors = parse_alerts(data, base=path.parent)
    if errors:
        raise ConfigError("\n".join(f"{label}: {e}" for e in errors))
    return config


# ---------------------------------------------------------------------------- rule evaluation


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rules look at for one satellite (from the fleet page's row)."""

    satellite_id: str
    replicas: int
    """Replicas with a heartbeat younger than satellite_down's `after`."""
    consumers: int | None
    """Consumers on the bulk queue (None: no queue)."""
    oldest_age_s: float | None
    ready: int
    dead_letters: int
    overdue: int
    versions: tuple[str, ...]
    skew: bool
    quarantined: int


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    satellite_id: str
    firing: bool
    summary: str
    hold: float = 0.0
    """Seconds the condition must last (seen by consecutive evaluations) before it fires."""


def evaluate_row(
    facts: Facts,
    rules: dict[str, Rule],
    *,
    growing_since: float | None = None,
    now_mono: float | None = None,
) -> list[Finding]:
    """Every enabled rule's verdict on one look at one satellite (firing or not, and why).

    `growing_since`: since when (monotonic) the queue has only grown, as this replica observed;
    `now_mono` the time of this evaluation. `satellite_down` is this look's verdict with its
    `hold` (`after`): it fires only once the store has seen it in consecutive evaluations
    spanning `after` seconds (`apply_finding`), so one stale look (the management API's lagging
    consumer count, a heartbeat this replica missed) does not fire it.
    """
    out: list[Finding] = []
    sid = facts.satellite_id

    def add(rule: str, firing: bool, summary: str, hold: float = 0.0) -> None:
        if rules[rule].enabled:
            out.append(Finding(rule, sid, firing, summary if firing else "back to normal", hold))

    down = rules["satellite_down"]
    if facts.consumers == 0:
        why = f"{sid}: no consumer on its job queue"
    elif facts.replicas == 0:
        why = f"{sid}: no poller heartbeat for {down.after:g} s"
    else:
        why = ""
    add("satellite_down", bool(why), why, down.after)
    backlog = rules["backlog"]
    growing = (
        growing_since is not None
        and now_mono is not None
        and now_mono - growing_since >= backlog.growing_for
    )
    if facts.oldest_age_s is not None and facts.oldest_age_s > backlog.age:
        add("backlog", True, f"{sid}: the oldest queued job waits {facts.oldest_age_s:.0f} s")
    elif growing:
        add(
            "backlog",
            True,
            f"{sid}: the queue has grown for {backlog.growing_for:g} s ({facts.ready} ready)",
        )
    else:
        add("backlog", False, "")
    dlq = rules["dlq"]
    add(
        "dlq",
        facts.dead_letters > dlq.above,
        f"{sid}: {facts.dead_letters} message(s) in the dead-letter queue",
    )
    add("overdue", facts.overdue > 0, f"{sid}: {facts.overdue} job(s) overdue")
    add(
        "version_skew",
        facts.skew,
        f"{sid}: pollers run {', '.join(facts.versions)}, not the core's version",
    )
    quarantine = rules["quarantine"]
    add(
        "quarantine",
        facts.quarantined > quarantine.above,
        f"{sid}: {facts.quarantined} device(s) quarantined",
    )
    return out


class Growth:
    """Per satellite: since when (monotonic) its ready count has only grown (in memory)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float]] = {}
        self._since: dict[str, float] = {}
        self._samples: dict[str, deque[int]] = {}

    def sample(self, satellite_id: str, ready: int, now: float) -> float | None:
        last = self._last.get(satellite_id)
        self._last[satellite_id] = (ready, now)
        if last is None or ready <= last[0] or ready == 0:
            self._since.pop(satellite_id, None)
            if last is not None and ready > last[0]:
                self._since[satellite_id] = last[1]
            return self._since.get(satellite_id)
        self._since.setdefault(satellite_id, last[1])
        return self._since[satellite_id]


# ---------------------------------------------------------------------------- the store's part


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


async def claim_slot(engine: AsyncEngine, slot: int, replica: str, now: datetime) -> bool:
    """Whether this replica evaluates `slot` (one replica per slot)."""
    async with engine.begin() as conn:
        stmt = _insert(conn, alert_evaluations).values(slot=slot, replica=replica, at=now)
        result = await conn.execute(stmt.on_conflict_do_nothing(index_elements=["slot"]))
        if slot % 60 == 0:
            await conn.execute(
                alert_evaluations.delete().where(alert_evaluations.c.at < now - EVALUATIONS_KEPT)
            )
        return bool(result.rowcount)


async def active_silences(engine: AsyncEngine, now: datetime) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(alert_silences)
            .where(alert_silences.c.ends_at > now)
            .order_by(alert_silences.c.ends_at)
        )
        return [dict(r._mapping) for r in rows]


def silenced(silences: Iterable[dict[str, Any]], satellite_id: str, rule: str) -> bool:
    return any(s["satellite_id"] == satellite_id and s["rule"] in (None, rule) for s in silences)


def _next_state(
    state: str, since: datetime, finding: Finding, now: datetime
) -> tuple[str, datetime]:
    """The state after this verdict and since when: `pending` until the condition has been
    seen for the finding's `hold`, then `firing` since it was first seen."""
    if not finding.firing:
        return "ok", now
    if state == "firing":
        return "firing", since
    if finding.hold <= 0:
        return "firing", now
    if state == "pending":
        if (now - since).total_seconds() >= finding.hold:
            return "firing", since
        return "pending", since
    return "pending", now


async def apply_finding(
    engine: AsyncEngine,
    finding: Finding,
    now: datetime,
    channels: Sequence[str],
    *,
    mute: bool,
    on_queued: Callable[[], None] | None = None,
) -> str | None:
    """Record the verdict; on a state change (claimed once) queue it per channel. The new
    state when it changed, else None. `on_queued` is called once notifications were queued
    and committed (this replica's sender wakes up for them).

    States: `ok`, `pending` (the condition was seen, for less than the finding's `hold`;
    nothing is sent), `firing`. A verdict older than the one last recorded (a replica that
    was slow between its look and this write) is ignored: a stale look never undoes a newer
    one."""
    async with engine.begin() as conn:
        new, queued = await _record_finding(conn, finding, now, channels, mute=mute)
    if queued and on_queued is not None:
        on_queued()
    return new


async def _record_finding(
    conn: AsyncConnection,
    finding: Finding,
    now: datetime,
    channels: Sequence[str],
    *,
    mute: bool,
) -> tuple[str | None, bool]:
    """`apply_finding` in the caller's transaction: (the new state or None, whether
    notifications were queued)."""
    key = {"rule": finding.rule, "satellite_id": finding.satellite_id}
    where = (alert_states.c.rule == finding.rule) & (
        alert_states.c.satellite_id == finding.satellite_id
    )
    row = (await conn.execute(sa.select(alert_states).where(where))).first()
    if row is None:
        stmt = _insert(conn, alert_states).values(
            **key, state="ok", since=now, summary="", seq=0, evaluated_at=now
        )
        await conn.execute(stmt.on_conflict_do_nothing())
        if not finding.firing:
            return None, False
        row = (await conn.execute(sa.select(alert_states).where(where))).one()
    if row.evaluated_at > now:
        return None, False  # a newer evaluation is recorded already
    new, since = _next_state(row.state, row.since, finding, now)
    summary = finding.summary
    if new == "firing" and finding.hold > 0:
        summary += f" (for {(now - since).total_seconds():.0f} s)"
    if row.state == new:
        await conn.execute(
            alert_states.update()
            .where(where & (alert_states.c.seq == row.seq))
            .values(
                evaluated_at=now,
                summary=summary[:500] if finding.firing else row.summary,
            )
        )
        return None, False
    changed = await conn.execute(
        alert_states.update()
        .where(where & (alert_states.c.seq == row.seq))
        .values(
            state=new,
            since=since,
            seq=row.seq + 1,
            evaluated_at=now,
            summary=(summary if finding.firing else row.summary)[:500],
        )
    )
    if changed.rowcount != 1:
        return None, False  # another replica recorded this change
    # Only firing and leaving `firing` are news (`pending` and back are not).
    news = (new == "firing") or (row.state == "firing")
    if not news or mute or not channels:
        return new, False
    event = f"{finding.rule}/{finding.satellite_id}/{row.seq + 1}"
    summary = summary if finding.firing else f"resolved: {row.summary}"
    for channel in channels:
        stmt = _insert(conn, alert_outbox).values(
            event=event,
            channel=channel,
            rule=finding.rule,
            satellite_id=finding.satellite_id,
            state="firing" if finding.firing else "resolved",
            since=since,
            summary=summary[:500],
            created_at=now,
            next_attempt_at=now,
            attempts=0,
        )
        await conn.execute(stmt.on_conflict_do_nothing(index_elements=["event", "channel"]))
    return new, True


async def alert_states_list(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(alert_states).order_by(alert_states.c.satellite_id, alert_states.c.rule)
        )
        return [dict(r._mapping) for r in rows]


async def add_silence(
    engine: AsyncEngine,
    satellite_id: str,
    *,
    rule: str | None,
    now: datetime,
    ends_at: datetime,
    reason: str,
    created_by: str | None,
) -> dict[str, Any]:
    values = {
        "satellite_id": satellite_id,
        "rule": rule,
        "starts_at": now,
        "ends_at": ends_at,
        "reason": reason,
        "created_by": created_by,
    }
    async with engine.begin() as conn:
        result = await conn.execute(alert_silences.insert().values(**values))
        key = result.inserted_primary_key
        return {"id": key[0] if key else None, **values}


async def archive_page(
    engine: AsyncEngine, *, limit: int = 100, satellite_id: str | None = None
) -> list[dict[str, Any]]:
    stmt = sa.select(alert_archive).order_by(alert_archive.c.id.desc()).limit(limit)
    if satellite_id is not None:
        stmt = stmt.where(alert_archive.c.satellite_id == satellite_id)
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]


async def pending_outbox(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Notifications not delivered yet (each still being retried), oldest first."""
    stmt = (
        sa.select(alert_outbox)
        .where(alert_outbox.c.sent_at.is_(None))
        .order_by(alert_outbox.c.id)
        .limit(500)
    )
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]


# ---------------------------------------------------------------------------- the loop


class AlertEngine:
    """Evaluates the rules each interval and records what changed (see the module doc)."""

    def __init__(
        self,
        engine: AsyncEngine,
        config: AlertsConfig,
        facts: Callable[[], Awaitable[list[Facts]]],
        *,
        replica: str,
        interval: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        """`on_queued`: called when this replica queued notifications (wakes its sender)."""
        self.engine = engine
        self.config = config
        self.facts = facts
        self.on_queued = on_queued
        self.replica = replica
        self.interval = interval
        self.clock = clock
        self.growth = Growth()
        self.started = time.monotonic()
        self.evaluations = 0
        self.changes = 0

    async def tick(self) -> bool:
        """One evaluation if this replica claims the current slot; whether it did."""
        now = self.clock()
        found = await self.facts()
        mono = time.monotonic()
        since = {f.satellite_id: self.growth.sample(f.satellite_id, f.ready, mono) for f in found}
        slot = math.floor(now.timestamp() / self.interval)
        if not await claim_slot(self.engine, slot, self.replica, now):
            return False
        self.evaluations += 1
        silences = await active_silences(self.engine, now)
        # Just started: no heartbeat seen yet is not "no heartbeat for `after` s".
        young = mono - self.started < self.config.rules["satellite_down"].after
        for facts in found:
            for finding in evaluate_row(
                facts,
                self.config.rules,
                growing_since=since[facts.satellite_id],
                now_mono=mono,
            ):
                if young and finding.rule == "satellite_down":
                    continue
                channels = [c.name for c in self.config.channels_for(finding.rule)]
                mute = silenced(silences, finding.satellite_id, finding.rule)
                new = await apply_finding(
                    self.engine, finding, now, channels, mute=mute, on_queued=self.on_queued
                )
                if new is not None:
                    self.changes += 1
                    log.info(
                        "alert_state_changed",
                        rule=finding.rule,
                        satellite=finding.satellite_id,
                        state=new,
                        silenced=mute,
                    )
        return True

    async def run(self) -> None:
        while True:
            now = self.clock().timestamp()
            # Wake just after the next slot starts (all replicas race for it).
            await asyncio.sleep(self.interval - (now % self.interval) + 0.2)
            try:
                async with asyncio.timeout(max(30.0, self.interval)):
                    await self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a bad minute
                log.warning("alert_evaluation_failed", error=f"{type(exc).__name__}: {exc}"[:300])


def fleet_facts(
    fleet: FleetWatch, engine: AsyncEngine, rules: dict[str, Rule]
) -> Callable[[], Awaitable[list[Facts]]]:
    """The rules' facts from what the fleet page shows (`web.overview.collect`)."""
    after = rules["satellite_down"].after

    async def facts() -> list[Facts]:
        now = datetime.now(UTC)
        history = await fleet_history(engine, now)
        rows = await collect(fleet, history, now)
        out = []
        for row in rows:
            queue = row.status.queue
            out.append(
                Facts(
                    satellite_id=row.satellite_id,
                    replicas=len(fleet.fleet.replicas(row.satellite_id, max_age=after)),
                    consumers=None if queue is None else queue.consumers,
                    oldest_age_s=row.oldest_age_s,
                    ready=sum(q.ready for q in (queue, row.interactive) if q is not None),
                    dead_letters=row.dead_letters,
                    overdue=row.history.overdue,
                    versions=tuple(row.versions),
                    skew=row.skew,
                    quarantined=len(row.quarantined),
                )
            )
        return out

    return facts
