"""SIGTERM/SIGINT during start-up: recorded, not fatal (docs/operations.md, "Signals").

Python's default SIGTERM kills the process (exit -15, 143 in a shell) and SIGINT raises
`KeyboardInterrupt` wherever the interpreter happens to be. `poller run` and `satellite serve`
spend a while before their event loop installs its own handlers (imports, settings, the
sandbox fork, migrations), and a rolling restart or `docker compose restart` that lands there
must still see a requested stop: exit 0. So the command installs `install()` first thing; the
handler only records the signal, and start-up looks at `requested()` at its checkpoints (and
the event loop, once up, treats a recorded request like one that arrives then).

Only the standard library here: it is imported before anything heavy.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

__all__ = ["hold", "install", "requested"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []


def _record(signum: int, _frame: FrameType | None) -> None:
    if not _requested:
        _requested.append(signum)


def install() -> None:
    """Record SIGTERM/SIGINT from now on instead of dying of them (main thread only)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _record)


def requested() -> str | None:
    """The name of the first stop signal received since `install()`, else None."""
    return signal.Signals(_requested[0]).name if _requested else None


def hold(seconds: float) -> None:
    """Sleep up to `seconds`, less if a stop is requested (the start-up test hook)."""
    deadline = time.monotonic() + seconds
    while not _requested and time.monotonic() < deadline:
        time.sleep(0.02)
