"""Dead-device circuit breaker: quarantine a device after consecutive timeouts (DESIGN §5).

A device is a target host address. After `after` consecutive `device_timeout` outcomes it is
quarantined for a cool-down; jobs for it are refused at once (`DeviceQuarantinedError`, code
`device_unreachable`, retryable) instead of waiting out their deadline. When the cool-down ends,
one probe job is let through while the others are still refused: a timeout doubles the
cool-down (up to `max_cooldown`), any sign of life releases the device. It also remembers which
devices answered last time (`trusted`): jobs for the others may hold only part of the run slots.

Pure bookkeeping: no I/O, no asyncio, and the clock (epoch seconds) is injected, so it is tested
without sleeping. The runner asks `admit` before a job, `check` again once the job holds its
per-device slot, and reports the outcome with `settle`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, NamedTuple

from pydantic import JsonValue

from poller.errors import DeviceQuarantinedError
from poller.wire import QuarantineEntry, format_timestamp

__all__ = [
    "SILENCE_EVIDENCE",
    "Change",
    "MirroredQuarantine",
    "Outcome",
    "Quarantine",
    "Ticket",
    "classify",
    "weigh",
]

#: Seconds of silence (at most; half the job's timeout when that is shorter) that make a timeout
#: count against a device that answered its last job. A job that got its slot just before its
#: deadline, behind the other jobs of its device, times out after a few milliseconds: that says
#: nothing about the device, and three of them in a row would quarantine a live but busy one.
#: Against a device that has not answered (never seen, or its last job timed out) every timeout
#: counts: its waiting jobs are the oldest ones, those that start with little time left, and a
#: dead device must still be quarantined after its first few jobs.
SILENCE_EVIDENCE = 1.0

#: Error codes that say nothing about the device: the job never reached it, or the poller
#: itself failed. They neither count as a timeout nor release a quarantine.
_NEUTRAL_CODES = frozenset(
    {
        "invalid_job",
        "unsupported_version",
        "unknown_kind",
        "expired",
        "outcome_unknown",
        "credential_not_found",
        "ping_not_permitted",
        "internal_error",
        "worker_crashed",
    }
)


class Outcome(Enum):
    """What one finished job says about its device."""

    TIMEOUT = "timeout"  # silence: counts towards (or extends) a quarantine
    ALIVE = "alive"  # the device answered something: its record is cleared
    NEUTRAL = "neutral"  # no evidence either way


class Change(Enum):
    """A transition worth a log line, returned by `Quarantine.settle`."""

    QUARANTINED = "quarantined"
    EXTENDED = "extended"  # the probe timed out too: a longer cool-down
    RELEASED = "released"


def classify(code: str | None, kind: str, data: Mapping[str, JsonValue] | None = None) -> Outcome:
    """The breaker's reading of a job's outcome: its error code (None when ok) and its data.

    A ping that got no reply at all is a normal result (packet loss 1.0), but it is no sign of
    life either, so it is neutral: it neither releases the device nor counts as a timeout.
    """
    if code is None:
        if kind == "icmp.ping" and data is not None and data.get("received") == 0:
            return Outcome.NEUTRAL
        return Outcome.ALIVE
    if code == "device_timeout":
        return Outcome.TIMEOUT
    if code in _NEUTRAL_CODES:
        return Outcome.NEUTRAL
    return Outcome.ALIVE


def weigh(outcome: Outcome, silent_for: float, timeout: float, *, trusted: bool) -> Outcome:
    """`outcome`, unless it is a timeout of a `trusted` device (one that answered its last job)
    after too short a wait to tell (`SILENCE_EVIDENCE`).

    `silent_for` is how long the job had the device (seconds, from its start against the
    device to its end); `timeout` is the job's whole deadline.
    """
    if trusted and outcome is Outcome.TIMEOUT and silent_for < min(SILENCE_EVIDENCE, timeout / 2):
        return Outcome.NEUTRAL
    return outcome


class Ticket(NamedTuple):
    """Permission for one job to run against `device`; `probe` when it tests a quarantine.

    A named tuple: one is made per job, in a fraction of a frozen dataclass's time."""

    device: str
    probe: bool = False


@dataclass(slots=True)
class _Record:
    timeouts: int = 0
    last_error: str = ""
    touched: float = 0.0
    since: float | None = None  # set while quarantined
    until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Quarantine:
    """Per-device consecutive-timeout counters and quarantines of one process."""

    def __init__(
        self,
        *,
        after: int = 3,
        cooldown: float = 30.0,
        max_cooldown: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_tracked: int = 100_000,
    ) -> None:
        """`after` = 0 turns the breaker off: every job is admitted, and only which devices
        answered is recorded (for `trusted`)."""
        if after < 0 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("need after >= 0 and 0 < cooldown <= max_cooldown")
        self.after = after
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._max_tracked = max_tracked
        self._records: dict[str, _Record] = {}
        #: Devices whose last telling outcome was a sign of life, oldest first.
        self._alive: dict[str, None] = {}

    def admit(self, device: str) -> Ticket:
        """A ticket to run a job for `device`, or `DeviceQuarantinedError` to answer at once."""
        record = self._records.get(device)
        if record is None or record.since is None:
            return Ticket(device)
        if record.probing or self._clock() < record.until:
            raise self._refusal(device, record)
        record.probing = True
        return Ticket(device, probe=True)

    def check(self, ticket: Ticket) -> None:
        """Refuse a job admitted earlier if its device was quarantined while it waited."""
        if ticket.probe:
            return
        refusal = self.refusal(ticket.device)
        if refusal is not None:
            raise refusal

    def refusal(self, device: str) -> DeviceQuarantinedError | None:
        """The answer for a job of `device` while it is quarantined; None when it is not."""
        record = self._records.get(device)
        if record is None or record.since is None:
            return None
        return self._refusal(device, record)

    def trusted(self, device: str) -> bool:
        """Whether the device's last telling outcome here was a sign of life.

        Devices never seen, and devices whose last job timed out, are untrusted: the runner
        lets their jobs hold only part of its run slots (`poller.admission`).
        """
        return device in self._alive

    def settle(
        self,
        ticket: Ticket,
        outcome: Outcome,
        error: str = "",
        *,
        silent_for: float = math.inf,
        timeout: float = math.inf,
    ) -> Change | None:
        """Record how the job of `ticket` ended; the resulting transition, if any.

        `silent_for`: how long the job had the device; `timeout`: its whole deadline (seconds).
        A timeout after too short a wait may not count (`weigh`).
        """
        record = self._records.get(ticket.device)
        if ticket.probe and record is not None:
            record.probing = False
        outcome = weigh(outcome, silent_for, timeout, trusted=ticket.device in self._alive)
        if outcome is Outcome.NEUTRAL:
            return None
        self._remember(ticket.device, alive=outcome is Outcome.ALIVE)
        if self.after == 0:
            return None
        if outcome is Outcome.ALIVE:
            if record is None:
                return None
            del self._records[ticket.device]
            return Change.RELEASED if record.since is not None else None
        if record is None:
            self._prune()
            record = self._records[ticket.device] = _Record()
        return self._timed_out(record, ticket, error)

    def _timed_out(self, record: _Record, ticket: Ticket, error: str) -> Change | None:
        now = self._clock()
        record.timeouts += 1
        record.last_error = error
        record.touched = now
        if record.since is None:
            if record.timeouts < self.after:
                return None
            record.since = now
            record.cooldown = self.cooldown
            record.until = now + self.cooldown
            return Change.QUARANTINED
        if not ticket.probe:
            return None  # a job that was already running when the quarantine began
        record.cooldown = min(record.cooldown * 2, self.max_cooldown)
        record.until = now + record.cooldown
        return Change.EXTENDED

    def timeouts(self, device: str) -> int:
        """The device's consecutive timeouts so far (0 when none are counted)."""
        record = self._records.get(device)
        return record.timeouts if record is not None else 0

    def is_quarantined(self, device: str) -> bool:
        record = self._records.get(device)
        return record is not None and record.since is not None

    def until(self, device: str) -> datetime | None:
        """End of the device's current cool-down (UTC), or None when it is not quarantined."""
        record = self._records.get(device)
        if record is None or record.since is None:
            return None
        return _utc(record.until)

    def entries(self, limit: int = 1000) -> list[QuarantineEntry]:
        """Quarantined devices, longest-quarantined first, for the heartbeat."""
        held = sorted(
            ((r.since, device, r) for device, r in self._records.items() if r.since is not None),
            key=lambda item: (item[0], item[1]),
        )
        return [
            QuarantineEntry(
                device=device,
                since=_utc(since),
                until=_utc(record.until),
                last_error=record.last_error[:500],
            )
            for since, device, record in held[:limit]
        ]

    def _refusal(self, device: str, record: _Record) -> DeviceQuarantinedError:
        until = format_timestamp(_utc(record.until))
        since = format_timestamp(_utc(record.since or record.until))
        if record.probing and self._clock() >= record.until:
            when = f"quarantined since {since}; its cool-down ended at {until} and a probe job "
            when += "is checking it now"
        else:
            when = f"quarantined until {until} (since {since})"
        return DeviceQuarantinedError(
            f"device {device} is {when} after {record.timeouts} consecutive timeouts; "
            "answered without contacting it"
        )

    def _remember(self, device: str, *, alive: bool) -> None:
        alive_set = self._alive
        alive_set.pop(device, None)
        if not alive:
            return
        if len(alive_set) >= self._max_tracked:
            for oldest in list(alive_set)[: max(1, len(alive_set) // 4)]:
                del alive_set[oldest]
        alive_set[device] = None

    def _prune(self) -> None:
        """Forget the oldest unquarantined counters when too many devices are tracked."""
        if len(self._records) < self._max_tracked:
            return
        idle = sorted((r.touched, device) for device, r in self._records.items() if r.since is None)
        for _touched, device in idle[: max(1, len(idle) // 2)]:
            del self._records[device]


class MirroredQuarantine(Quarantine):
    """A lane process's quarantine (poller/laneproc.py): its own, and the replica's as the
    replica reports it (`mirror`: one message of theirs).

    A device the replica holds in quarantine is refused here until the replica's cool-down ends;
    after that the lane's own bookkeeping decides (the replica's probe, or the lane's own jobs,
    will tell the replica whether the device answers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The replica's quarantined devices, as records of the replica's own kind.
        self._remote: dict[str, _Record] = {}

    def mirror(self, message: dict[str, Any]) -> None:
        device = str(message["device"])
        until = message.get("until")
        if until is None:
            self._remote.pop(device, None)
            return
        self._remote[device] = _Record(
            timeouts=int(message.get("timeouts") or 0),
            last_error=str(message.get("last_error") or "")[:500],
            since=float(message.get("since") or until),
            until=float(until),
        )

    def _remote_refusal(self, device: str) -> DeviceQuarantinedError | None:
        remote = self._remote.get(device)
        if remote is None or self._clock() >= remote.until:
            return None
        return self._refusal(device, remote)

    def admit(self, device: str) -> Ticket:
        refusal = self._remote_refusal(device)
        if refusal is not None:
            raise refusal
        return super().admit(device)

    def refusal(self, device: str) -> DeviceQuarantinedError | None:
        return self._remote_refusal(device) or super().refusal(device)
