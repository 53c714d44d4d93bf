"""The schedules file of `satellite serve` (`USM_CORE_SCHEDULES_FILE`, DESIGN §11): parse, check.

A YAML file with one key, `schedules`, a list of schedules::

    schedules:
      - name: iftable
        satellite: pop-a
        every: 300                 # seconds; or  cron: "*/5 * * * *"  (+ tz: Europe/Paris)
        kind: snmp.walk
        params: {oids: [1.3.6.1.2.1.2.2]}
        credential_ref: snmp-ro    # or auth: {...}
        timeout: 30
        targets: [{host: 192.0.2.1}, {host: 192.0.2.2, port: 1161}]
        targets_file: switches.csv # host[,port] per line, relative to this file
        spread: true               # each target at a stable offset inside the interval
        overlap: skip              # or queue
        catch_up: skip             # or latest
        enabled: true

`load_schedules()` checks everything at once, including that every schedule builds a job the
wire (and so a poller) accepts, and raises `ScheduleFileError` with one line per problem:
`<file>: schedule <name>: <field>: <what is wrong>`. Secrets of `auth` never appear in a line.

A schedule's slots are aligned to the epoch (`every`: multiples of it since 1970-01-01T00:00Z)
or are the cron expression's fire times in its time zone; a slot lasts until the next one.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter

from poller import wire
from poller.errors import WireError

__all__ = [
    "MAX_EVERY_SECONDS",
    "Schedule",
    "ScheduleFileError",
    "ScheduleSet",
    "Slot",
    "Target",
    "load_schedules",
    "parse_schedules",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_EVERY_SECONDS = 7 * 86400
MAX_TARGETS = 100_000
FIELDS = frozenset(
    {
        "name",
        "satellite",
        "every",
        "cron",
        "tz",
        "kind",
        "params",
        "auth",
        "credential_ref",
        "timeout",
        "targets",
        "targets_file",
        "spread",
        "overlap",
        "catch_up",
        "enabled",
    }
)


class ScheduleFileError(Exception):
    """The schedules file cannot be used; `lines` says why, one problem per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int | None = None
    frac: float = 0.0
    """The target's offset inside an interval, as a fraction of it (0 without `spread`)."""

    @property
    def key(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Slot:
    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Schedule:
    name: str
    satellite: str
    kind: str
    timeout: float
    targets: tuple[Target, ...]
    """Sorted by offset (then key)."""
    every: int | None = None
    cron: str | None = None
    tz: str = "UTC"
    params: Mapping[str, Any] | None = None
    auth: Mapping[str, Any] | None = field(default=None, repr=False)
    credential_ref: str | None = None
    spread: bool = True
    overlap: Literal["skip", "queue"] = "skip"
    catch_up: Literal["skip", "latest"] = "skip"
    enabled: bool = True

    @property
    def source(self) -> str:
        return f"schedule:{self.name}"

    def slot_at(self, t: float) -> Slot:
        """The slot holding the instant `t` (epoch seconds)."""
        if self.every is not None:
            start = math.floor(t / self.every) * self.every
            return Slot(float(start), float(start + self.every))
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        after = croniter(self.cron, datetime.fromtimestamp(t, zone)).get_next(float)
        start = croniter(self.cron, datetime.fromtimestamp(after, zone)).get_prev(float)
        return Slot(float(start), float(after))

    def next_slot(self, slot: Slot) -> Slot:
        return self.slot_at(slot.end)

    def slots(self, after: float, until: float, *, limit: int = 10_000) -> Iterator[Slot]:
        """The slots that hold an instant of (after, until], oldest first (at most `limit`)."""
        slot = self.slot_at(after)
        for _ in range(limit):
            if slot.start > until:
                return
            yield slot
            slot = self.next_slot(slot)

    def due_at(self, slot: Slot, target: Target) -> float:
        return slot.start + target.frac * slot.length

    @cached_property
    def fracs(self) -> tuple[float, ...]:
        """The targets' offsets, in the order of `targets` (ascending)."""
        return tuple(t.frac for t in self.targets)

    def due_in(self, slot: Slot, after: float, until: float) -> Iterator[tuple[float, Target]]:
        """(due time, target) of `slot` with a due time in (after, until], by bisection."""
        length = slot.length
        lo = bisect.bisect_left(self.fracs, (after - slot.start) / length - 1e-9)
        hi = bisect.bisect_right(self.fracs, (until - slot.start) / length + 1e-9)
        for target in self.targets[lo:hi]:
            due = slot.start + target.frac * length
            if after < due <= until:
                yield due, target

    def job_id(self, slot_start: float | str, target: Target) -> str:
        stamp = slot_start if isinstance(slot_start, str) else str(int(slot_start))
        return f"{self.name}:{stamp}:{target.key}"

    def job(self, job_id: str, target: Target, not_after: float, *, auth: bool) -> dict[str, Any]:
        """The wire v1 job; `auth=False` leaves inline credentials out (what the store keeps)."""
        body: dict[str, Any] = {
            "v": wire.PROTOCOL_VERSION,
            "id": job_id,
            "kind": self.kind,
            "target": {"host": target.host}
            | ({} if target.port is None else {"port": target.port}),
            "timeout": self.timeout,
            "not_after": datetime.fromtimestamp(not_after, UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.params is not None:
            body["params"] = dict(self.params)
        if self.credential_ref is not None:
            body["credential_ref"] = self.credential_ref
        if auth and self.auth is not None:
            body["auth"] = dict(self.auth)
        return body


@dataclass(frozen=True)
class ScheduleSet:
    schedules: dict[str, Schedule]
    digest: str
    """A hash of the file and its targets files (to see a change)."""


def offset_fraction(name: str, target_key: str) -> float:
    """A stable fraction in [0, 1) for the schedule and target (same on every replica)."""
    digest = hashlib.blake2b(f"{name}\0{target_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def load_schedules(path: Path) -> ScheduleSet:
    """Read and check `path` (and its targets files); `ScheduleFileError` with every problem."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ScheduleFileError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    return parse_schedules(text, path)


def parse_schedules(text: bytes, path: Path) -> ScheduleSet:
    hasher = hashlib.sha256(text)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ScheduleFileError([f"{path}: is not valid YAML{at}"]) from None
    if doc is None:
        doc = {"schedules": []}
    if not isinstance(doc, dict) or set(doc) - {"schedules"}:
        raise ScheduleFileError([f"{path}: must be a mapping with one key, `schedules`"])
    items = doc.get("schedules") or []
    if not isinstance(items, list):
        raise ScheduleFileError([f"{path}: schedules: must be a list"])
    errors: list[str] = []
    schedules: dict[str, Schedule] = {}
    for index, item in enumerate(items):
        checker = _Checker(path, index, item)
        schedule = checker.build(hasher)
        errors.extend(checker.errors)
        if schedule is None:
            continue
        if schedule.name in schedules:
            errors.append(f"{path}: schedule {schedule.name}: name: appears twice")
            continue
        schedules[schedule.name] = schedule
    if errors:
        raise ScheduleFileError(errors)
    return ScheduleSet(schedules, hasher.hexdigest())


class _Checker:
    def __init__(self, path: Path, index: int, item: object) -> None:
        self.path = path
        self.item: dict[str, Any] = item if isinstance(item, dict) else {}
        name = self.item.get("name")
        self.label = (
            f"schedule {name}" if isinstance(name, str) and name else f"schedule #{index + 1}"
        )
        self.errors: list[str] = []
        if not isinstance(item, dict):
            self.fail("", "must be a mapping")

    def fail(self, key: str, message: str) -> None:
        where = f"{key}: " if key else ""
        self.errors.append(f"{self.path}: {self.label}: {where}{message}")

    def build(self, hasher: Any) -> Schedule | None:  # noqa: C901, PLR0912 - one check per field
        item = self.item
        if not item:
            return None
        for key in sorted(set(item) - FIELDS):
            self.fail(key, "is not a schedule field")
        name = item.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            self.fail("name", "is required: 1-64 letters, digits, '_', '.', '-'")
        satellite = item.get("satellite")
        try:
            wire.validate_satellite_id(satellite if isinstance(satellite, str) else "")
        except (ValueError, TypeError) as exc:
            self.fail("satellite", f"is required and must be a satellite id ({exc})")
        every, cron, tz = self._clock()
        timeout = item.get("timeout", wire.DEFAULT_TIMEOUT_SECONDS)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            self.fail("timeout", "must be a positive number of seconds")
            timeout = wire.DEFAULT_TIMEOUT_SECONDS
        flags = {}
        for key, default in (("spread", True), ("enabled", True)):
            value = item.get(key, default)
            if not isinstance(value, bool):
                self.fail(key, "must be true or false")
                value = default
            flags[key] = value
        overlap = item.get("overlap", "skip")
        if overlap not in ("skip", "queue"):
            self.fail("overlap", "must be skip or queue")
            overlap = "skip"
        catch_up = item.get("catch_up", "skip")
        if catch_up not in ("skip", "latest"):
            self.fail("catch_up", "must be skip or latest")
            catch_up = "skip"
        params = item.get("params")
        if params is not None and not isinstance(params, dict):
            self.fail("params", "must be a mapping")
        auth = item.get("auth")
        if auth is not None and not isinstance(auth, dict):
            self.fail("auth", "must be a mapping")
        ref = item.get("credential_ref")
        if ref is not None and not isinstance(ref, str):
            self.fail("credential_ref", "must be a string")
        kind = item.get("kind")
        if not isinstance(kind, str):
            self.fail("kind", "is required")
        targets = self._targets(str(name), hasher, spread=flags["spread"])
        if self.errors:
            return None
        schedule = Schedule(
            name=str(name),
            satellite=str(satellite),
            kind=str(kind),
            timeout=float(timeout),
            targets=tuple(sorted(targets, key=lambda t: (t.frac, t.key))),
            every=every,
            cron=cron,
            tz=tz,
            params=params,
            auth=auth,
            credential_ref=ref,
            spread=flags["spread"],
            overlap=overlap,
            catch_up=catch_up,
            enabled=flags["enabled"],
        )
        self._check_job(schedule)
        return None if self.errors else schedule

    def _clock(self) -> tuple[int | None, str | None, str]:  # noqa: PLR0911
        item = self.item
        every, cron, tz = item.get("every"), item.get("cron"), item.get("tz", "UTC")
        if (every is None) == (cron is None):
            self.fail("every", "give exactly one of every (seconds) and cron")
            return None, None, "UTC"
        if every is not None:
            if (
                isinstance(every, bool)
                or not isinstance(every, int)
                or not 1 <= every <= MAX_EVERY_SECONDS
            ):
                self.fail("every", f"must be a whole number of seconds, 1 to {MAX_EVERY_SECONDS}")
                return None, None, "UTC"
            if "tz" in item:
                self.fail("tz", "goes with cron only (every is aligned to the epoch, in UTC)")
            return every, None, "UTC"
        if not isinstance(tz, str):
            self.fail("tz", "must be a time zone name such as UTC or Europe/Paris")
            return None, None, "UTC"
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail("tz", f"unknown time zone {tz!r}")
            return None, None, "UTC"
        if not isinstance(cron, str) or len(cron.split()) != 5:
            self.fail("cron", "must be a 5-field cron expression such as '*/5 * * * *'")
            return None, None, tz
        try:
            croniter(cron, datetime.now(zone)).get_next(float)
        except (ValueError, KeyError, TypeError) as exc:
            self.fail("cron", f"is not a valid cron expression ({exc})")
            return None, None, tz
        return None, cron, tz

    def _targets(  # noqa: C901, PLR0912 - one check per way to list targets
        self, name: str, hasher: Any, *, spread: bool
    ) -> list[Target]:
        item = self.item
        raw: list[tuple[str, object, object]] = []
        given = item.get("targets")
        if given is not None:
            if not isinstance(given, list):
                self.fail("targets", "must be a list of {host, port}")
            else:
                for n, entry in enumerate(given):
                    where = f"targets[{n}]"
                    if isinstance(entry, str):
                        raw.append((where, entry, None))
                    elif isinstance(entry, dict) and set(entry) <= {"host", "port"}:
                        raw.append((where, entry.get("host"), entry.get("port")))
                    else:
                        self.fail(where, "must be {host, port?}")
        file_name = item.get("targets_file")
        if file_name is not None:
            raw.extend(self._targets_file(file_name, hasher))
        if given is None and file_name is None:
            self.fail("targets", "give targets or targets_file (or both)")
        targets: list[Target] = []
        seen: set[str] = set()
        for where, host, port in raw:
            try:
                checked = wire.Target.model_validate({"host": host, "port": port})
            except ValueError:
                self.fail(where, "needs a host (no spaces or '/') and a port of 1-65535")
                continue
            target = Target(checked.host, checked.port)
            if target.key in seen:
                self.fail(where, f"{target.key} appears twice")
                continue
            seen.add(target.key)
            targets.append(target)
        if spread:
            # Each target's offset is its rank in hash order: stable while the list is, and
            # evenly spaced (a hash alone bunches: 50 targets in 10 s gave 2 to 8 a second).
            ranked = sorted(targets, key=lambda t: (offset_fraction(name, t.key), t.key))
            targets = [Target(t.host, t.port, n / len(ranked)) for n, t in enumerate(ranked)]
        if raw and not targets and not self.errors:
            self.fail("targets", "is empty")
        if len(targets) > MAX_TARGETS:
            self.fail("targets", f"{len(targets)} targets; the limit is {MAX_TARGETS}")
        return targets

    def _targets_file(self, file_name: object, hasher: Any) -> list[tuple[str, object, object]]:
        if not isinstance(file_name, str) or not file_name:
            self.fail("targets_file", "must be a file name")
            return []
        path = Path(file_name)
        if not path.is_absolute():
            path = self.path.parent / path
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.fail("targets_file", f"{path}: cannot be read: {exc.strerror or exc}")
            return []
        hasher.update(data)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.fail("targets_file", f"{path}: is not UTF-8")
            return []
        out: list[tuple[str, object, object]] = []
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            where = f"targets_file: {path}: line {n}"
            if len(cells) > 2 or (n == 1 and cells[0].lower() == "host"):
                if n == 1 and cells[0].lower() == "host":
                    continue
                self.fail("", f"{where}: must be host[,port]")
                continue
            port: object = None
            if len(cells) == 2 and cells[1]:
                port = int(cells[1]) if cells[1].isdigit() else cells[1]
            out.append((where, cells[0], port))
        return out

    def _check_job(self, schedule: Schedule) -> None:
        """The wire accepts the job this schedule builds (kind, params, auth, timeout)."""
        sample = schedule.targets[0]
        longest = max(schedule.targets, key=lambda t: len(t.key))
        if len(schedule.job_id(9_999_999_999, longest)) > wire.MAX_JOB_ID_CHARS:
            self.fail(
                "targets",
                f"{longest.key}: the job id would exceed {wire.MAX_JOB_ID_CHARS} characters",
            )
        body = schedule.job(schedule.job_id(0, sample), sample, 0.0, auth=True)
        try:
            wire.decode_job(json.dumps(body).encode())
        except WireError as exc:
            self.fail("kind/params/auth", f"the job would be refused: {exc.message}")
