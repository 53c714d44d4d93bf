"""Recycling: the cgroup memory limit, the default RSS limit, the decision and the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poller.recycle import (
    MIB,
    MemoryUse,
    Recycler,
    RecycleRecord,
    cgroup_memory_limit,
    default_max_rss_mb,
    private_bytes,
    read_record,
    rss_bytes,
    write_record,
)

GIB = 1024 * MIB
MACHINE = 64 * GIB
V1_UNLIMITED = "9223372036854771712"


def cgroup_tree(root: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup under `root` with `files` (relative path -> content), and a fake
    /proc/self/cgroup holding `self_cgroup`."""
    mount = root / "cgroup"
    mount.mkdir()
    for name, content in files.items():
        path = mount / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    proc = root / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return mount, proc


def limit(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> int | None:
    mount, proc = cgroup_tree(tmp_path, files, self_cgroup)
    return cgroup_memory_limit(mount, proc, total_memory=MACHINE)


def test_v2_container_limit(tmp_path: Path) -> None:
    # A container with its own cgroup namespace sees its cgroup at the mount's root.
    assert limit(tmp_path, {"memory.max": "536870912"}) == 512 * MIB


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    assert limit(tmp_path, {"memory.max": "max", "memory.high": "max"}) is None


def test_v2_memory_high_below_max_wins(tmp_path: Path) -> None:
    files = {"memory.max": str(GIB), "memory.high": str(768 * MIB)}
    assert limit(tmp_path, files) == 768 * MIB


def test_v2_systemd_unit_and_its_slice(tmp_path: Path) -> None:
    # On a host: the process's cgroup from /proc/self/cgroup, and the lowest of its parents.
    files = {
        "system.slice/memory.max": str(2 * GIB),
        "system.slice/poller@1.service/memory.max": "max",
        "system.slice/poller@1.service/memory.high": "max",
        "user.slice/memory.max": str(MIB),  # another branch: never read
    }
    assert limit(tmp_path, files, "0::/system.slice/poller@1.service\n") == 2 * GIB


def test_v2_path_not_visible_reads_the_mount_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path, but the mount shows the container's own cgroup.
    files = {"memory.max": str(300 * MIB)}
    assert limit(tmp_path, files, "0::/system.slice/docker-abc.scope\n") == 300 * MIB


def test_v1_container_limit(tmp_path: Path) -> None:
    files = {"memory/memory.limit_in_bytes": str(256 * MIB)}
    self_cgroup = "12:pids:/\n4:memory:/\n1:name=systemd:/\n"
    assert limit(tmp_path, files, self_cgroup) == 256 * MIB


def test_v1_huge_value_is_no_limit(tmp_path: Path) -> None:
    files = {"memory/memory.limit_in_bytes": V1_UNLIMITED}
    assert limit(tmp_path, files, "4:memory:/\n") is None


def test_v1_process_path_and_parents(tmp_path: Path) -> None:
    # Hybrid hierarchy (v2 mounted elsewhere, no memory.max): the v1 memory controller's path.
    files = {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/memory.limit_in_bytes": str(GIB),
        "memory/docker/abc/memory.limit_in_bytes": V1_UNLIMITED,
    }
    self_cgroup = "4:memory:/docker/abc\n0::/\n"
    assert limit(tmp_path, files, self_cgroup) == GIB


@pytest.mark.parametrize(
    ("value", "expected"), [(MACHINE, None), (MACHINE + GIB, None), (MACHINE - MIB, MACHINE - MIB)]
)
def test_limit_at_or_above_the_machine_memory_is_no_limit(
    tmp_path: Path, value: int, expected: int | None
) -> None:
    assert limit(tmp_path, {"memory.max": str(value)}) == expected


@pytest.mark.parametrize("content", ["", "garbage", "-1", "0", "12.5"])
def test_unreadable_values_are_no_limit(tmp_path: Path, content: str) -> None:
    assert limit(tmp_path, {"memory.max": content}) is None


def test_nothing_readable_is_no_limit(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert cgroup_memory_limit(missing, missing / "cgroup", total_memory=MACHINE) is None


def test_default_is_80_percent_of_the_limit_or_off() -> None:
    assert default_max_rss_mb(512 * MIB) == 409
    assert default_max_rss_mb(GIB) == 819
    assert default_max_rss_mb(None) is None


def test_rss_counts_only_after_a_job() -> None:
    recycler = Recycler(max_rss_bytes=100 * MIB, max_jobs=None)
    assert recycler.reason(rss_bytes=150 * MIB, jobs=0) is None
    assert recycler.reason(rss_bytes=150 * MIB, jobs=1) == "rss"
    assert recycler.reason(rss_bytes=100 * MIB, jobs=1) is None


def test_the_lane_process_counts_with_the_replica() -> None:
    # The container's limit covers the replica and its lane process: each alone is below the
    # limit, together they are above it.
    recycler = Recycler(max_rss_bytes=100 * MIB, max_jobs=None)
    memory = MemoryUse(replica_bytes=70 * MIB, lane_bytes=40 * MIB)
    assert memory.total == 110 * MIB
    assert recycler.reason(rss_bytes=MemoryUse(70 * MIB).total, jobs=1) is None
    assert recycler.reason(rss_bytes=memory.total, jobs=1) == "rss"


def test_memory_log_fields_say_both_parts() -> None:
    memory = MemoryUse(replica_bytes=70 * MIB, lane_bytes=MIB * 41 // 2)
    assert memory.log_fields(lane=True) == {
        "rss_mb": 90.5,
        "replica_rss_mb": 70.0,
        "lane_private_mb": 20.5,
    }
    assert MemoryUse(70 * MIB).log_fields(lane=False) == {"rss_mb": 70.0}


STATUS = """Name:\tpython
VmRSS:\t   82676 kB
RssAnon:\t   50716 kB
RssFile:\t   31960 kB
RssShmem:\t     100 kB
Threads:\t4
"""


def fake_proc(tmp_path: Path, pid: int, status: str) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "status").write_text(status)
    return tmp_path


def test_private_bytes_are_anonymous_and_shared_memory_not_files(tmp_path: Path) -> None:
    # The lane's files (the interpreter, the libraries) are the replica's too, charged once.
    proc = fake_proc(tmp_path, 42, STATUS)
    assert private_bytes(42, proc) == (50716 + 100) * 1024


@pytest.mark.parametrize(
    "status",
    [
        "Name:\tpython\nState:\tZ (zombie)\n",  # a zombie has no Rss lines
        "RssAnon:\tlots kB\n",
        "",
    ],
)
def test_private_bytes_of_a_zombie_or_a_garbled_status_are_zero(
    tmp_path: Path, status: str
) -> None:
    assert private_bytes(7, fake_proc(tmp_path, 7, status)) == 0


def test_private_bytes_of_no_or_a_gone_process_are_zero(tmp_path: Path) -> None:
    assert private_bytes(None) == 0
    assert private_bytes(99, tmp_path) == 0  # no /proc/99


def test_private_bytes_and_rss_of_real_processes() -> None:
    assert 0 < private_bytes(os.getpid()) < rss_bytes()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert private_bytes(child.pid) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    assert private_bytes(child.pid) == 0  # reaped: gone
    assert rss_bytes(Path("/nonexistent")) == 0


def test_jobs_limit() -> None:
    recycler = Recycler(max_rss_bytes=None, max_jobs=10)
    assert recycler.enabled
    assert recycler.reason(rss_bytes=10**12, jobs=9) is None
    assert recycler.reason(rss_bytes=0, jobs=10) == "jobs"
    assert not Recycler(None, None).enabled
    assert Recycler(None, None).reason(rss_bytes=10**12, jobs=10**9) is None


def test_record_round_trip_and_count(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert read_record(state) is None
    first = RecycleRecord.next(None, "rss", 400 * MIB, 1234)
    write_record(state, first)
    assert read_record(state) == first
    second = RecycleRecord.next(read_record(state), "jobs", 100 * MIB, 50)
    assert (second.recycles, second.reason, second.jobs) == (2, "jobs", 50)
    assert second.at.endswith("Z")
    write_record(state, second)
    assert read_record(state) == second
    assert [p.name for p in state.iterdir()] == ["recycle.json"]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"recycles": 1}),
        json.dumps({"recycles": -1, "reason": "x", "at": "", "rss_bytes": 0, "jobs": 0}),
    ],
)
def test_bad_record_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "recycle.json").write_text(content)
    assert read_record(tmp_path) is None
