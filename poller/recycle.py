"""Recycling: a replica that has grown too big (or done enough jobs) drains and exits 0.

Net-SNMP through ezsnmp grows by some 12-14 MB per 100,000 requests whatever the poller does
(docs/operations.md, "Memory and recycling"). A replica that passes `USM_POLLER_MAX_RSS_MB`, or
has answered `USM_POLLER_MAX_JOBS` jobs, stops taking jobs, drains as on SIGTERM and exits 0,
and its supervisor starts a fresh process. This module holds what does not need the event loop:

- the container's memory limit, read from its cgroup (v2 `memory.max` and `memory.high`, v1
  `memory.limit_in_bytes`), and the default RSS limit derived from it;
- what the decision counts (`MemoryUse`): the process's RSS, plus, when the replica runs the
  interactive lane in a process of its own (`USM_POLLER_INTERACTIVE_PROCESS`, the default),
  the memory that lane process holds for itself: both count against the container's limit;
- the decision, `Recycler.reason()`;
- the small record a recycling process leaves in the state dir, so that its successor can say
  in its heartbeats how many times this replica recycled and why the last time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_RSS_FRACTION",
    "MIB",
    "MemoryUse",
    "RecycleRecord",
    "Recycler",
    "cgroup_memory_limit",
    "default_max_rss_mb",
    "private_bytes",
    "read_record",
    "rss_bytes",
    "write_record",
]

#: Share of the container's memory limit at which a replica recycles by default. The rest is
#: the drain's headroom: running jobs go on for up to the shutdown grace (a walk's result takes
#: several MB while it is encoded), and the init process, the tmpfs files and the kernel's
#: socket buffers count against the same limit. At the limit itself the kernel kills the
#: process without a drain.
DEFAULT_RSS_FRACTION = 0.8
#: cgroup v1 writes "no limit" as the largest page-aligned 64-bit value; anything this large is
#: no limit.
_V1_UNLIMITED = 1 << 62
MIB = 1024 * 1024
#: The record's file name in `USM_POLLER_STATE_DIR`.
RECORD_NAME = "recycle.json"


def cgroup_memory_limit(
    root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
    total_memory: int | None = None,
) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when there is none.

    cgroup v2 first (the lower of `memory.max` and `memory.high`, on this process's cgroup and
    each parent that is visible), then v1 (`memory.limit_in_bytes`, the same way). "max", v1's
    huge "unlimited" value and a limit at or above the machine's memory (`total_memory`, by
    default the physical memory) are no limit. Unreadable files count as absent.
    """
    paths = _cgroup_paths(self_cgroup)
    limit = _lowest(root, paths.get("v2", "/"), ("memory.max", "memory.high"))
    if limit is None:
        limit = _lowest(root / "memory", paths.get("memory", "/"), ("memory.limit_in_bytes",))
    if limit is None:
        return None
    machine = _physical_memory() if total_memory is None else total_memory
    if machine and limit >= machine:
        return None
    return limit


def _cgroup_paths(self_cgroup: Path) -> dict[str, str]:
    """Controller -> path from /proc/self/cgroup; the v2 line ("0::/path") is under "v2"."""
    out: dict[str, str] = {}
    try:
        text = self_cgroup.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if hierarchy == "0" and not controllers:
            out["v2"] = path
        for name in controllers.split(","):
            if name:
                out[name] = path
    return out


def _lowest(mount: Path, path: str, names: tuple[str, ...]) -> int | None:
    """The lowest limit in `names` on the cgroup at `path` under `mount` and its parents.

    Inside a container with its own cgroup namespace the path is "/" and the mount is the
    container's own cgroup. Where the path is not visible under the mount (a container that
    shares the host's namespace sees its own cgroup at the mount's root), the root is read.
    """
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    directory = mount.joinpath(*parts)
    if not directory.is_dir():
        directory = mount
    found: list[int] = []
    while True:
        for name in names:
            value = _read_limit(directory / name)
            if value is not None:
                found.append(value)
        if directory == mount:
            break
        directory = directory.parent
    return min(found) if found else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    if value <= 0 or value >= _V1_UNLIMITED:
        return None
    return value


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def default_max_rss_mb(limit_bytes: int | None) -> int | None:
    """`USM_POLLER_MAX_RSS_MB` when it is not set: 80 % of the memory limit, or off (None)."""
    if limit_bytes is None:
        return None
    return max(1, int(limit_bytes * DEFAULT_RSS_FRACTION) // MIB)


def rss_bytes(proc: Path = Path("/proc/self")) -> int:
    """The resident memory of the process at `proc` (`statm`), 0 when it cannot be read."""
    try:
        text = (proc / "statm").read_text(encoding="ascii")
        return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def private_bytes(pid: int | None, proc: Path = Path("/proc")) -> int:
    """The resident memory process `pid` holds for itself: `RssAnon` + `RssShmem` of
    /proc/<pid>/status. 0 for None, a process that is gone (or a zombie) or an unreadable file.

    Its file-backed pages (`RssFile`: the interpreter, the libraries, the same files the
    replica maps) are in the page cache once and charged to the container once, so they are
    left out: the replica's own RSS counts them already.
    """
    if pid is None:
        return 0
    try:
        text = (proc / str(pid) / "status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssShmem"):
            number, _, unit = value.strip().partition(" ")
            try:
                total += int(number) * (1024 if unit.strip() == "kB" else 1)
            except ValueError:
                return 0
    return total


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """What a replica's recycling counts: its own RSS, and what its lane process (when it
    runs one) holds for itself (`private_bytes`)."""

    replica_bytes: int
    lane_bytes: int = 0

    @property
    def total(self) -> int:
        return self.replica_bytes + self.lane_bytes

    def log_fields(self, *, lane: bool) -> dict[str, float]:
        """`rss_mb` (what is compared with `USM_POLLER_MAX_RSS_MB`) and, with a lane process,
        the two parts: `replica_rss_mb` and `lane_private_mb`."""
        fields = {"rss_mb": round(self.total / MIB, 1)}
        if lane:
            fields["replica_rss_mb"] = round(self.replica_bytes / MIB, 1)
            fields["lane_private_mb"] = round(self.lane_bytes / MIB, 1)
        return fields


@dataclass(frozen=True, slots=True)
class Recycler:
    """When to recycle: memory (`MemoryUse.total`) above `max_rss_bytes` or `max_jobs` jobs
    answered (None: never)."""

    max_rss_bytes: int | None
    max_jobs: int | None

    @property
    def enabled(self) -> bool:
        return self.max_rss_bytes is not None or self.max_jobs is not None

    def jobs_reached(self, jobs: int) -> bool:
        return self.max_jobs is not None and jobs >= self.max_jobs

    def reason(self, *, rss_bytes: int, jobs: int) -> Literal["rss", "jobs"] | None:
        """Why this process should recycle now, or None.

        RSS counts only once the process has answered a job: one that has not would start
        again just as big, and recycling it could only loop.
        """
        if self.jobs_reached(jobs):
            return "jobs"
        if self.max_rss_bytes is not None and jobs > 0 and rss_bytes > self.max_rss_bytes:
            return "rss"
        return None


@dataclass(frozen=True, slots=True)
class RecycleRecord:
    """What the last recycling process of this state dir left for its successor."""

    recycles: int
    reason: str
    at: str
    rss_bytes: int
    jobs: int

    @classmethod
    def next(
        cls, previous: RecycleRecord | None, reason: str, rss: int, jobs: int
    ) -> RecycleRecord:
        return cls(
            recycles=(previous.recycles if previous else 0) + 1,
            reason=reason,
            at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            rss_bytes=rss,
            jobs=jobs,
        )


def read_record(state_dir: Path) -> RecycleRecord | None:
    """The record in `state_dir`, or None when there is none or it is unreadable (blocking)."""
    try:
        raw = json.loads((state_dir / RECORD_NAME).read_text(encoding="utf-8"))
        record = RecycleRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(record.recycles, int) or record.recycles < 0:
        return None
    return record


def write_record(state_dir: Path, record: RecycleRecord) -> None:
    """Atomically replace the record in `state_dir` (blocking: call it off the event loop)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record)), encoding="utf-8")
    tmp.replace(path)
