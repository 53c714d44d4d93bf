"""The default worker name: unique per process start, container id where one can be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from poller.identity import MAX_NAME, container_id, default_worker_name

CID = "3f4e9a1c2b7d" + "0" * 52
DOCKER_MOUNTINFO = (
    "601 580 0:52 / / rw,relatime master:301 - overlay overlay rw,lowerdir=/x\n"
    f"625 601 8:1 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/sda1 rw\n"  # noqa: E501
    f"626 601 8:1 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n"
)
PODMAN_MOUNTINFO = (
    f"700 650 0:60 /storage/overlay-containers/{CID}/userdata/hostname /etc/hostname ro - "
    "tmpfs tmpfs rw\n"
)
# cgroup v2 with a private cgroup namespace: nothing to read. v1 and systemd scopes name it.
CGROUP_V2_PRIVATE = "0::/\n"
CGROUP_V1 = f"12:memory:/docker/{CID}\n11:pids:/docker/{CID}\n"
CGROUP_SCOPE = f"0::/system.slice/docker-{CID}.scope\n"
CGROUP_LIBPOD = f"0::/machine.slice/libpod-{CID}.scope/container\n"
# What this kind of machine has: a 32-digit id that is not a container's.
CGROUP_NOT_A_CONTAINER = "4:memory:/process_api/07c921a9783570316cb6094e7a03d6e7\n0::/\n"


@pytest.mark.parametrize(
    ("mountinfo", "cgroup", "expected"),
    [
        (DOCKER_MOUNTINFO, CGROUP_V2_PRIVATE, CID),
        (PODMAN_MOUNTINFO, CGROUP_V2_PRIVATE, CID),
        ("", CGROUP_V1, CID),
        ("", CGROUP_SCOPE, CID),
        ("", CGROUP_LIBPOD, CID),
        ("", CGROUP_NOT_A_CONTAINER, None),
        (None, None, None),
    ],
)
def test_container_id_is_read_where_the_runtime_leaves_it(
    tmp_path: Path, mountinfo: str | None, cgroup: str | None, expected: str | None
) -> None:
    m, c = tmp_path / "mountinfo", tmp_path / "cgroup"
    for path, text in ((m, mountinfo), (c, cgroup)):
        if text is not None:
            path.write_text(text)
    assert container_id(m, c) == expected


def test_same_host_pid_and_container_still_differ() -> None:
    names = {default_worker_name("vm-7", 7, container="") for _ in range(20)}
    assert len(names) == 20
    assert all(n.startswith("vm-7-7-") for n in names)


def test_host_network_replica_is_named_by_host_and_container() -> None:
    assert default_worker_name("vm-7", 7, container=CID, suffix="ab12") == "vm-7-3f4e9a1c2b7d-ab12"


def test_container_id_is_not_repeated_when_it_is_the_hostname() -> None:
    assert default_worker_name("3f4e9a1c2b7d", 7, container=CID, suffix="ab12") == (
        "3f4e9a1c2b7d-ab12"
    )


def test_long_or_qualified_hostnames_are_cut_to_the_limit() -> None:
    assert default_worker_name("poller.site7.example.net", 42, suffix="ab12") == "poller-42-ab12"
    long = default_worker_name("h" * 63, 4_194_304, container="", suffix="ab12")
    assert len(long) == MAX_NAME
    assert long.endswith("-4194304-ab12")
