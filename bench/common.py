"""What every benchmark here needs: a throw-away vhost, a Net-SNMP agent, the docs section."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import snmpd as snmpd_support  # noqa: E402
from tests.support.rabbitmq import (  # noqa: E402
    AmqpVhost,
    rabbitmq_unavailable_reason,
    rabbitmqctl,
)

DOC = ROOT / "docs" / "performance.md"


@contextlib.contextmanager
def vhost() -> Iterator[AmqpVhost]:
    """A fresh vhost on the machine's RabbitMQ (guest), deleted afterwards."""
    reason = rabbitmq_unavailable_reason()
    if reason:
        sys.exit(f"RabbitMQ is needed: {reason}")
    name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield AmqpVhost(name, "127.0.0.1", 5672, "guest", "guest")
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def snmp_agent() -> Iterator[tuple[str, int, int]]:
    """(host, port, pid) of a Net-SNMP agent on loopback, running as nobody; stopped by PID."""
    binary = shutil.which("snmpd") or "/usr/sbin/snmpd"
    workdir = Path(tempfile.mkdtemp(prefix="bench-snmpd-"))
    workdir.chmod(0o755)
    port = snmpd_support._free_udp_port()
    proc = snmpd_support._start(binary, workdir, port)
    try:
        deadline = time.monotonic() + 10
        while not snmpd_support._answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("snmpd did not start")
            time.sleep(0.05)
        yield "127.0.0.1", port, proc.pid
    finally:
        snmpd_support._stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def write_section(heading: str, section: str) -> None:
    """Replace (or append) one benchmark's section of docs/performance.md; others stay."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")
