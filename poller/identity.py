"""This replica's name in results and heartbeats, unique per process start.

Replicas started with `network_mode: host` share the machine's hostname, and under `init: true`
each has the same PID in its own PID namespace: `<hostname>-<pid>` named three replicas alike,
and their heartbeats overwrote each other in `satellite status`. The default name is
`<hostname>-<container id or pid>-<random>`:

- the container id (its first 12 hex digits, as `docker ps` shows it) when one can be read from
  `/proc/self/mountinfo` (Docker and podman bind-mount `/etc/hostname` from a directory named
  after it) or `/proc/self/cgroup` (cgroup v1, or v2 without a private cgroup namespace); it is
  left out when the hostname already is that id (the default outside host networking);
- else the process id;
- and 4 random hex digits, so that two starts never share a name even when everything else
  matches (a restarted container, or a PID namespace with nothing readable in it).

`USM_POLLER_WORKER_NAME` overrides all of it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["container_id", "default_worker_name"]

#: The longest worker name (`USM_POLLER_WORKER_NAME` has the same limit).
MAX_NAME = 64
_SHORT_ID = 12
_MOUNT_ID = re.compile(r"containers/([0-9a-f]{64})/")
_CGROUP_ID = re.compile(r"[/-]([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id(
    mountinfo: Path = Path("/proc/self/mountinfo"), cgroup: Path = Path("/proc/self/cgroup")
) -> str | None:
    """The 64-hex-digit id of the container this process runs in, or None when none is readable."""
    try:
        for line in mountinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            # Field 4 is the mount's root in its file system, field 5 where it is mounted.
            if len(fields) > 4 and fields[4] in ("/etc/hostname", "/etc/hosts"):
                match = _MOUNT_ID.search(fields[3])
                if match:
                    return match.group(1)
    except OSError:
        pass
    try:
        for line in cgroup.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _CGROUP_ID.search(line.rpartition(":")[2])
            if match:
                return match.group(1)
    except OSError:
        pass
    return None


def default_worker_name(
    hostname: str | None = None,
    pid: int | None = None,
    container: str | None = None,
    suffix: str | None = None,
) -> str:
    """`<hostname>-<container id or pid>-<random>`, at most 64 characters.

    Every argument defaults to what this process reads (the seams exist for tests).
    """
    host = hostname if hostname is not None else socket.gethostname()
    host = host.split(".", 1)[0] or "poller"
    if container is None:
        container = container_id()
    tail = suffix if suffix is not None else secrets.token_hex(2)
    if container:
        short = container[:_SHORT_ID]
        ident = "" if host.startswith(short) else short
    else:
        ident = str(os.getpid() if pid is None else pid)
    rest = "-".join(part for part in (ident, tail) if part)
    return f"{host[: MAX_NAME - len(rest) - 1]}-{rest}"
