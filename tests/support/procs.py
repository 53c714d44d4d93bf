"""Processes a test started: what /proc says of them (command line, ended or not); stopping them.

A child that has exited but is not reaped yet (a zombie) still has its `/proc/<pid>` directory;
its `cmdline` reads as empty, as it does for a moment before, while the exiting process has
already given back its memory. Both mean "ended", not "started with no arguments".
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["has_ended", "process_state", "read_cmdline", "stop_process"]

#: How long `read_cmdline` waits for a process whose command line reads empty to be a zombie.
_EXITING_WAIT = 2.0


def process_state(pid: int) -> str | None:
    """The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The name in parentheses may hold spaces and ')': the state follows the last ')'.
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else None


def has_ended(pid: int) -> bool:
    """True when `pid` is gone, a zombie (`Z`) or dead (`X`): reaped or not, it runs no more."""
    return process_state(pid) in (None, "Z", "X")


def read_cmdline(pid: int) -> list[str] | None:
    """The argument vector of a running process, or None when it has ended.

    An empty `cmdline` is waited on (at most 2 s) until the process shows as ended; a running
    process whose command line stays empty gives `[]`, for the caller's assertion to report.
    """
    deadline = time.monotonic() + _EXITING_WAIT
    while True:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return None
        if raw:
            parts = raw.decode(errors="replace").split("\0")
            return parts[:-1] if raw.endswith(b"\0") else parts
        if has_ended(pid):
            return None
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """Stop a process this program started, by its PID: SIGTERM, `grace` seconds, then SIGKILL.

    A process that has already exited is only reaped. Returns its exit status (negative: the
    signal that ended it).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)
