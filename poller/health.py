"""Readiness state shared with `poller check`, through a small file instead of a port.

The worker rewrites the file whenever its broker state changes (connected, consuming, lost) and
every couple of seconds besides; `poller check` (the container's
HEALTHCHECK) exits 0 only when the file is fresh, names a live process and says it is connected
and consuming. No listening socket is ever opened.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["HealthState", "check", "health_path_from_env", "write_state"]

#: The state is rewritten this often; `check` accepts it for a few periods.
WRITE_INTERVAL = 2.0
MAX_AGE = 15.0


@dataclass(frozen=True, slots=True)
class HealthState:
    pid: int
    connected: bool
    consuming: bool
    updated: float  # time.time()
    in_flight: int = 0
    tasks: int = 0
    """asyncio tasks alive in the replica (a task that outlives its job would show here)."""
    lane_pid: int | None = None
    """The replica's lane process while it runs (`USM_POLLER_INTERACTIVE_PROCESS`)."""
    broker_error: str | None = None
    """While not connected: why the last attempt failed (what the broker refused, or the
    network error), so that `poller check` says it without a look at the logs."""


def write_state(path: Path, state: HealthState) -> None:
    """Atomically replace the state file (blocking: call it off the event loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{state.pid}.tmp")
    tmp.write_text(json.dumps(asdict(state)), encoding="utf-8")
    tmp.replace(path)


#: The variables that say where the health file is (`poller check` reads them too).
HEALTH_FILE_ENV = "USM_POLLER_HEALTH_FILE"
STATE_DIR_ENV = "USM_POLLER_STATE_DIR"
DEFAULT_STATE_DIR = "/tmp/usm-poller"  # noqa: S108 - a tmpfs in the container; see docs


def health_path_from_env(environ: dict[str, str] | None = None) -> Path:
    env = dict(os.environ if environ is None else environ)
    explicit = env.get(HEALTH_FILE_ENV)
    if explicit:
        return Path(explicit)
    return Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR) / "health.json"


def check(path: Path, *, max_age: float = MAX_AGE) -> tuple[bool, str]:  # noqa: PLR0911
    """(healthy, reason) for the poller whose state file is `path`; the reason names the file.

    A file written by another poller (or long ago) is the usual surprise when `poller check`
    runs from another shell than the poller's: every reason says which file it read and how old
    it is, and a stale file or a gone process says which variables point at another one.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = HealthState(**raw)
    except FileNotFoundError:
        full = _full(path)
        if full:
            return False, f"no health file at {path}: {full}"
        return False, f"no health file at {path}: poller not running or not started yet{_HINT}"
    except (OSError, ValueError, TypeError):
        return False, f"health file {path} is unreadable"
    age = time.time() - state.updated
    written = "just now" if age < 1 else f"{_duration(age)} ago"
    where = f"(health file {path}, written {written})"
    if age > max_age:
        full = _full(path)
        if full:
            return False, f"health file {path} is {_duration(age)} old: {full}"
        return (
            False,
            f"health file {path} is {_duration(age)} old: the poller is stuck or gone{_HINT}",
        )
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False, f"process {state.pid} is gone {where}{_HINT}"
    except PermissionError:
        pass  # exists, owned by someone else
    if not state.connected:
        why = f": {state.broker_error}" if state.broker_error else ""
        return False, f"not connected to the broker {where}{why}"
    if not state.consuming:
        return False, f"connected but not consuming {where}"
    return True, f"ok: connected and consuming, {state.in_flight} jobs in flight {where}"


_HINT = (
    f"; a poller started with {HEALTH_FILE_ENV} or {STATE_DIR_ENV} writes elsewhere: "
    "set the same here"
)


#: Below this many free bytes the health file's file system counts as full (a rewrite of the
#: file needs a few hundred).
FULL_BELOW = 4096


def _full(path: Path) -> str:
    """Why the poller cannot write `path` when its file system is full; "" otherwise."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent  # the state dir itself could not be made on a full disk
    try:
        stat = os.statvfs(where)
    except OSError:
        return ""
    free = stat.f_bavail * stat.f_frsize
    if free >= FULL_BELOW and stat.f_favail != 0:
        return ""
    return (
        f"its file system is full ({free} bytes free in {where}): the poller cannot write "
        f"it; free space there (the state dir, {STATE_DIR_ENV}; a tmpfs in the container)"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0.0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
