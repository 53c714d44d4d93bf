"""The interactive lane in a process of its own (`USM_POLLER_INTERACTIVE_PROCESS=true`).

Behind a saturating bulk backlog, a lane job in the same process waits for the event loop (a
turn full of bulk deliveries, results and confirms), for the GIL (tens of pool threads finishing
their SNMP calls) and for a thread to take its call: tens of milliseconds at p99 where an idle
poller answers in a few (docs/performance.md, "Interactive lane"). With this setting the replica
starts `poller lane`, a second process with its own broker connection, event loop, GIL and
driver pools, that consumes only the lane; the replica itself no longer consumes it.

What the two processes share goes over a socket pair, one JSON object per line:

* to the lane process, the replica's quarantine: every device it quarantines, extends or
  releases (`{"device", "until", "since", "timeouts", "last_error"}`, `until` null when
  released), and all of them whenever a lane process starts. A lane job for a quarantined
  device is answered at once, as in the replica (`poller.quarantine.MirroredQuarantine`).
* to the replica, how each lane job ended for its device (`{"device", "outcome", "error",
  "silent_for", "timeout"}`): the replica's quarantine counts the lane's timeouts and signs of
  life like its own jobs'; and once, `{"started": <pid>}` when the lane process has built its
  worker (its memory is then about what it keeps: the replica's recycling counts it,
  `poller.recycle.MemoryUse`).

The per-device limit (`USM_POLLER_PER_DEVICE_CONCURRENCY`) applies in each process to its own
jobs: an interactive job no longer waits for the bulk jobs already talking to its device (a
device can see up to that many of each at once).

The replica restarts a lane process that exits (1 s after, doubling to 30 s while it keeps
failing at start-up), stops it with SIGTERM when it stops itself (the lane drains like any
poller), and the lane process stops when the replica goes away (`PR_SET_PDEATHSIG`, and the end
of the socket pair). Its log lines go to the same output, with `worker` = the replica's name and
`-lane`; it sends no heartbeat of its own (the fleet counts replicas) and writes its health to
`lane-health.json` in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from poller.config import PollerSettings
from poller.logging import get_logger
from poller.quarantine import MirroredQuarantine, Outcome, Quarantine
from poller.wire import QuarantineEntry

__all__ = ["LaneLink", "LaneProcess", "lane_worker_name"]

log = get_logger("poller.laneproc")

#: Seconds before a lane process that exited is started again; doubled while it keeps
#: exiting within `_STEADY` seconds of its start, up to `_RESTART_MAX`.
_RESTART_FIRST = 1.0
_RESTART_MAX = 30.0
_STEADY = 60.0
#: A line of the socket pair is at most this long (a quarantine entry, an outcome).
_MAX_LINE = 64 * 1024
#: Seconds a stopping lane process gets beyond the shutdown grace before it is killed.
_STOP_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1


def lane_worker_name(name: str) -> str:
    """The lane process's worker name: the replica's with `-lane` (64 characters at most)."""
    return f"{name[:59]}-lane"


def _line(body: dict[str, Any]) -> bytes:
    """One message of the socket pair: a JSON object on a line of its own."""
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The lines the other end sends, until it closes its end (or an over-long line, a reset)."""
    while True:
        try:
            line = await reader.readline()
        except (ValueError, OSError):
            return
        if not line:
            return
        yield line


def _entry_message(device: str, entry: QuarantineEntry | None, timeouts: int = 0) -> bytes:
    body: dict[str, Any] = {"device": device, "until": None}
    if entry is not None:
        body |= {
            "until": entry.until.timestamp(),
            "since": entry.since.timestamp(),
            "timeouts": timeouts,
            "last_error": entry.last_error,
        }
    return _line(body)


class LaneProcess:
    """The replica's side: starts, watches and stops `poller lane`, and talks with it."""

    def __init__(
        self,
        settings: PollerSettings,
        *,
        worker_name: str,
        quarantine: Quarantine,
        on_outcome: Callable[[str, Outcome, str, float, float], None],
        on_started: Callable[[], None] | None = None,
    ) -> None:
        """`on_outcome(device, outcome, error, silent_for, timeout)`: a lane job ended;
        `on_started()`: a lane process has started its worker (after each start)."""
        self._settings = settings
        self._name = lane_worker_name(worker_name)
        self._quarantine = quarantine
        self._on_outcome = on_outcome
        self._on_started = on_started
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="lane-process")

    def quarantine_changed(self, device: str) -> None:
        """Tell the lane process what the replica's quarantine now says of `device`."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(self._state_of(device))

    def _state_of(self, device: str) -> bytes:
        q = self._quarantine
        entry = next((e for e in q.entries() if e.device == device), None)
        return _entry_message(device, entry, q.timeouts(device))

    async def stop(self) -> None:
        """SIGTERM the lane process and wait for it (the grace, then SIGKILL)."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._settings.shutdown_grace + _STOP_MARGIN):
                    await proc.wait()
            except TimeoutError:
                log.warning("interactive_process_killed", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _supervise(self) -> None:
        delay = _RESTART_FIRST
        while not self._stopping:
            started = time.monotonic()
            try:
                code = await self._run_once()
            except OSError as exc:
                code = None
                log.error("interactive_process_not_started", error=str(exc))
            if self._stopping:
                return
            if time.monotonic() - started >= _STEADY:
                delay = _RESTART_FIRST
            log.warning("interactive_process_exited", exit_code=code, restart_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX)

    async def _run_once(self) -> int:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = self._environment()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "poller",
                "lane",
                "--control-fd",
                str(theirs.fileno()),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        self.starts += 1
        log.info("interactive_process_started", pid=proc.pid, worker=self._name)
        reader, writer = await asyncio.open_connection(sock=mine, limit=_MAX_LINE)
        self._writer = writer
        quarantine = self._quarantine
        for entry in quarantine.entries():  # the whole quarantine, then each change
            writer.write(_entry_message(entry.device, entry, quarantine.timeouts(entry.device)))
        listening = asyncio.create_task(self._listen(reader), name="lane-process-outcomes")
        try:
            return await proc.wait()
        finally:
            self._writer = None
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            writer.close()

    def _environment(self) -> dict[str, str]:
        """The replica's environment, with what makes the second process a lane process."""
        s = self._settings
        slots = max(1, s.effective_interactive_slots)
        return os.environ | {
            "USM_POLLER_WORKER_NAME": self._name,
            "USM_POLLER_INTERACTIVE_PROCESS": "false",
            # Every job of its is interactive: its slots are all run slots it has.
            "USM_POLLER_CONCURRENCY": str(slots + 1),
            "USM_POLLER_INTERACTIVE_SLOTS": str(slots),
            "USM_POLLER_INTERACTIVE_PREFETCH": str(s.effective_interactive_prefetch),
            "USM_POLLER_HEALTH_FILE": str(s.state_dir / "lane-health.json"),
            # Recycling is the replica's: the lane process restarts with it.
            "USM_POLLER_MAX_RSS_MB": "0",
            "USM_POLLER_MAX_JOBS": "0",
        }

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        async for line in _lines(reader):  # until the process ends (it is then restarted)
            try:
                message = json.loads(line)
                if "started" in message:
                    if self._on_started is not None:
                        self._on_started()
                    continue
                device = str(message["device"])
                outcome = Outcome[str(message["outcome"])]
                error = str(message.get("error") or "")
                silent_for = _seconds(message.get("silent_for"))
                timeout = _seconds(message.get("timeout"))
            except (ValueError, KeyError, TypeError):
                log.warning("interactive_process_message_ignored")
                continue
            self._on_outcome(device, outcome, error, silent_for, timeout)


def _seconds(value: object) -> float:
    """A duration sent over the socket pair; None (infinite) is `math.inf`."""
    if value is None:
        return math.inf
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError("not a number")
    return float(value)


class LaneLink:
    """The lane process's side of the socket pair (`poller lane --control-fd N`)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        #: Where the replica's quarantine goes (set by the worker that uses this link).
        self.quarantine: MirroredQuarantine | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def usable(fd: int) -> bool:
        """Whether `fd` is an open socket (what `poller run` passes)."""
        try:
            return stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            return False

    @staticmethod
    def die_with_parent() -> None:
        """SIGTERM this process when the replica that started it dies (Linux; else a no-op:
        the end of the socket pair stops it too)."""
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    async def start(self, on_gone: Callable[[], None]) -> None:
        """Listen to the replica; `on_gone()` when it closes its end (it stopped or died)."""
        sock = socket.socket(fileno=self._fd)
        reader, self._writer = await asyncio.open_connection(sock=sock, limit=_MAX_LINE)
        self._writer.write(_line({"started": os.getpid()}))
        self._task = asyncio.create_task(self._listen(reader, on_gone), name="lane-link")

    async def _listen(self, reader: asyncio.StreamReader, on_gone: Callable[[], None]) -> None:
        async for line in _lines(reader):
            if self.quarantine is None:
                continue
            try:
                self.quarantine.mirror(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("replica_message_ignored")
        log.warning("replica_gone")
        on_gone()

    def outcome(
        self, device: str, outcome: Outcome, error: str, silent_for: float, timeout: float
    ) -> None:
        """Tell the replica how a lane job ended for its device (NEUTRAL ones are not sent)."""
        writer = self._writer
        if outcome is Outcome.NEUTRAL or writer is None or writer.is_closing():
            return
        body = {
            "device": device,
            "outcome": outcome.name,
            "error": error[:500],
            "silent_for": silent_for if math.isfinite(silent_for) else None,
            "timeout": timeout if math.isfinite(timeout) else None,
        }
        writer.write(_line(body))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
