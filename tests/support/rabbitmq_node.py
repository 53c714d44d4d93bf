"""One private RabbitMQ node (plain AMQP on loopback), for tests that change broker-wide settings.

A memory alarm (`set_vm_memory_high_watermark`) or a `consumer_timeout` applies to a whole
node: tests that set them must never touch the machine's broker, which other tests share.
`private_node()` starts a node of its own the way `tests/support/tls_broker.py` and
`tests/support/rabbitmq_cluster.py` do (their helpers: a private HOME and cookie, its own `epmd`
on a free port, `RABBITMQ_CONF_ENV_FILE=/dev/null`, free loopback ports, no plugins) and stops
everything it started, by PID, when the `with` block ends. `advanced` is the node's
`advanced.config` (Erlang terms), for settings `rabbitmq.conf` cannot hold.

Use it from a module-scoped fixture so that one node serves every test of the module (a start
costs 5-10 s). Without `rabbitmq-server` (or not as root) the caller skips, or fails in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.rabbitmq import AmqpVhost
from tests.support.tls_broker import (
    LOOPBACK,
    _epmd_pids,
    _free_ports,
    _listening,
    _node_env,
    _pid_from,
    _private_env,
    _rabbitmqctl,
    _spawn_server,
    _start_epmd,
    _stop,
    _tail,
    _unavailable,
)

__all__ = ["PrivateNode", "private_node", "require_private_node"]

START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
#: Schedulers that sleep when idle instead of spinning (the test machine's cores are shared).
ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none"


@dataclasses.dataclass(slots=True)
class PrivateNode:
    name: str
    port: int
    root: Path
    env: dict[str, str]
    startup_s: float = 0.0

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/{quote(vhost, safe='')}"

    @property
    def vhost(self) -> AmqpVhost:
        """The default vhost, for `PollerFactory` and the fault harness."""
        return AmqpVhost("/", LOOPBACK, self.port, "guest", "guest")

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        return _rabbitmqctl(self.name, self.env, args, timeout)

    def eval(self, *expressions: str) -> str:
        """`rabbitmqctl eval` of the expressions, in one call (each call starts an Erlang VM:
        seconds on a loaded machine)."""
        return self.rabbitmqctl("eval", ", ".join(e.rstrip(".") for e in expressions) + ".")

    @staticmethod
    def set_env(key: str, value: int | str) -> str:
        """The expression that sets `rabbit`'s KEY at runtime (channels opened later read it)."""
        return f"application:set_env(rabbit, {key}, {value})"

    @staticmethod
    def watermark(fraction: float) -> str:
        """The expression that sets the memory high watermark (near 0: a memory alarm)."""
        return f"vm_memory_monitor:set_vm_memory_high_watermark({fraction})"

    def log_text(self) -> str:
        try:
            return (self.root / "log" / f"{self.name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def require_private_node() -> None:
    """Skip (fail in CI) when a private node cannot be started here."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"a private RabbitMQ node is required in CI: {reason}")
        pytest.skip(f"no private RabbitMQ node: {reason}")


@contextlib.contextmanager
def private_node(advanced: str = "[].") -> Iterator[PrivateNode]:
    """Start one private node, yield it, stop it (see the module docstring)."""
    require_private_node()
    root = Path(tempfile.mkdtemp(prefix="usm-rmq-node-"))
    port, dist_port, epmd_port = _free_ports(3)
    name = f"usm-n-{os.getpid()}-{port}@localhost"
    (root / "log").mkdir()
    (root / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = {LOOPBACK}:{port}\nlog.console = false\nlog.file.level = info\n"
    )
    (root / "advanced.config").write_text(advanced.strip() + "\n")
    (root / "enabled_plugins").write_text("[].\n")
    env = _private_env(root, epmd_port, server_erl_args=ERL_ARGS)
    env |= _node_env(root, name, port, dist_port, root / "enabled_plugins")
    epmd = _start_epmd(env, epmd_port)
    server: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        server = _spawn_server(root, env)
        deadline = started + START_TIMEOUT
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(_tail(p) for p in sorted((root / "log").glob("*.log")))
                pytest.fail(f"private RabbitMQ node {name} did not start:\n{logs}")
            time.sleep(0.1)
        node = PrivateNode(name, port, root, env, round(time.monotonic() - started, 1))
        yield node
    finally:
        pids = [p for p in (_pid_from(root / "rabbitmq.pid"),) if p is not None]
        procs = [server] if server is not None else []
        pids += [p.pid for p in procs]
        _stop(procs, pids, STOP_TIMEOUT)
        _stop([epmd], sorted({epmd.pid, *_epmd_pids(epmd_port)}), 5.0)
        shutil.rmtree(root, ignore_errors=True)
