"""Readiness state shared with `poller check`, through a small file instead of a port.

The worker rewrites the file every couple of seconds; `poller check` (the container's
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


def write_state(path: Path, state: HealthState) -> None:
    """Atomically replace the state file (blocking: call it off the event loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{state.pid}.tmp")
    tmp.write_text(json.dumps(asdict(state)), encoding="utf-8")
    tmp.replace(path)


def health_path_from_env(environ: dict[str, str] | None = None) -> Path:
    env = dict(os.environ if environ is None else environ)
    explicit = env.get("USM_POLLER_HEALTH_FILE")
    if explicit:
        return Path(explicit)
    return Path(env.get("USM_POLLER_STATE_DIR") or "/tmp/usm-poller") / "health.json"  # noqa: S108


def check(path: Path, *, max_age: float = MAX_AGE) -> tuple[bool, str]:  # noqa: PLR0911
    """(healthy, reason) for the poller whose state file is `path`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = HealthState(**raw)
    except FileNotFoundError:
        return False, f"no health file at {path}: poller not running or not started yet"
    except (OSError, ValueError, TypeError):
        return False, f"health file {path} is unreadable"
    age = time.time() - state.updated
    if age > max_age:
        return False, f"health file is {age:.0f} s old: the poller is stuck or gone"
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False, f"process {state.pid} is gone"
    except PermissionError:
        pass  # exists, owned by someone else
    if not state.connected:
        return False, "not connected to the broker"
    if not state.consuming:
        return False, "connected but not consuming"
    return True, f"ok: connected and consuming, {state.in_flight} jobs in flight"
