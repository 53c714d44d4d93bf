"""A private 3-node RabbitMQ cluster on loopback, for tests that lose a broker node for real.

`rabbitmq_cluster` is a session fixture (tests that use it carry the `cluster` marker). It starts
three RabbitMQ nodes (Debian's `rabbitmq-server`, as root) beside the machine's own node and never
joined to it, the way `tests/support/tls_broker.py` starts its single node:

* one private HOME and Erlang cookie for the three nodes, one private `epmd` (started here, in the
  foreground, on a free port given to Erlang through `ERL_EPMD_PORT`), node names of their own
  (`usm-c<N>-<pid>@localhost`), mnesia, log and plugin files of their own, and
  `RABBITMQ_CONF_ENV_FILE=/dev/null` so that `/etc/rabbitmq/rabbitmq-env.conf` is not read;
* free loopback ports for AMQP and the distribution (never 5672/15672/25672 or epmd's 4369);
* no plugins (the management API is not needed), and Erlang schedulers that do not busy-wait,
  because the test machine's cores are shared.

Node 1 starts first; nodes 2 and 3 start together and join it on their first boot through
`cluster_formation.classic_config`, so no `rabbitmqctl join_cluster` round trips are needed.
Every node is waited for by its AMQP listener (a node opens it at the end of its boot, after it
has joined), then one `rabbitmqctl cluster_status` checks that all three run as one cluster.

`Cluster.kill(node)` SIGKILLs a node's Erlang VM (its PID from the node's PID file);
`Cluster.start(node)` starts it again (it rejoins with its old data). The function fixture
`cluster` restarts any node an earlier test left dead, so each test begins with three nodes.
Everything started here is stopped by PID at the end of the session, failures included: SIGTERM,
then SIGKILL after a bounded wait. Without `rabbitmq-server` (or not as root) the tests are
skipped with the reason, or fail when `CI` is set. Start-up time is printed to the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
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
    _alive,
    _epmd_pids,
    _free_ports,
    _listening,
    _node_env,
    _pid_from,
    _private_env,
    _rabbitmqctl,
    _signal,
    _spawn_server,
    _start_epmd,
    _stop,
    _tail,
    _unavailable,
)

__all__ = ["Cluster", "ClusterNode", "cluster", "private_broker", "rabbitmq_cluster"]

NODES = 3
#: Each start (node 1 alone, then nodes 2 and 3 together) must be up within this many seconds.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: Erlang flags: schedulers that sleep when idle instead of spinning (the cores are shared).
ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none"
USERNAME = "guest"
PASSWORD = "guest"


@dataclasses.dataclass(slots=True)
class ClusterNode:
    index: int
    name: str  # the Erlang node name, `usm-cN-<pid>@localhost`
    port: int  # AMQP on 127.0.0.1
    dist_port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.root / "rabbitmq.pid"

    @property
    def beam_pid(self) -> int | None:
        """The PID of the node's Erlang VM (what dies when the node is killed)."""
        return _pid_from(self.pid_file)

    def url(self, vhost: str = "/") -> str:
        return f"amqp://{USERNAME}:{PASSWORD}@{LOOPBACK}:{self.port}/{quote(vhost, safe='')}"

    @property
    def vhost(self) -> AmqpVhost:
        """The default vhost of this node, for `JobClient` and `PollerFactory`."""
        return AmqpVhost("/", LOOPBACK, self.port, USERNAME, PASSWORD)


@dataclasses.dataclass(slots=True)
class Cluster:
    """The running cluster: its nodes, and what tests do to them."""

    root: Path
    nodes: list[ClusterNode]
    epmd: subprocess.Popen[bytes]
    epmd_port: int
    env: dict[str, str]
    startup_s: float = 0.0
    killed: set[int] = dataclasses.field(default_factory=set)

    def node(self, index: int) -> ClusterNode:
        return self.nodes[index - 1]

    def dsn(self, *order: int) -> str:
        """A DSN that lists the nodes in this order (default: all, in index order)."""
        return ",".join(self.node(i).url() for i in order or range(1, len(self.nodes) + 1))

    def node_env(self, node: ClusterNode) -> dict[str, str]:
        return self.env | _node_env(
            node.root, node.name, node.port, node.dist_port, self.root / "enabled_plugins"
        )

    def rabbitmqctl(self, *args: str, node: int | None = None, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS` (default: the first node still running); its stdout."""
        target = self.node(node) if node else self.running()[0]
        return _rabbitmqctl(target.name, self.env, args, timeout)

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.index not in self.killed]

    def queue_nodes(self, vhost: str = "/") -> dict[str, str]:
        """{queue: the node that holds it}: a quorum queue's leader, a classic queue's home."""
        held = {}
        for node in self.running():
            out = self.rabbitmqctl(
                "list_queues", "-p", vhost, "--local", "name", "type", "leader",
                "--formatter", "json", "-q", node=node.index,
            )  # fmt: skip
            for row in json.loads(out or "[]"):
                held[row["name"]] = str(row.get("leader") or node.name)
        return held

    def owner(self, node_name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == node_name:
                return node
        raise KeyError(node_name)

    def kill(self, index: int) -> None:
        """SIGKILL node `index`'s Erlang VM, as a crash would; wait until it is gone."""
        node = self.node(index)
        pid = node.beam_pid
        assert pid is not None, f"{node.name} has no PID file"
        self.killed.add(index)
        _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"{node.name} (pid {pid}) survived SIGKILL"
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
        node.pid_file.unlink(missing_ok=True)

    def start(self, *indexes: int) -> None:
        """Start these nodes (they join or rejoin the cluster) and wait until they serve AMQP."""
        nodes = [self.node(i) for i in indexes]
        for node in nodes:
            self._spawn(node)
        self._wait(nodes)
        self.killed.difference_update(indexes)

    def heal(self) -> None:
        """Start again every node a test killed."""
        if self.killed:
            self.start(*sorted(self.killed))

    def _spawn(self, node: ClusterNode) -> None:
        node.proc = _spawn_server(node.root, self.node_env(node))

    def _wait(self, nodes: list[ClusterNode]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            for node in list(waiting):
                if node.proc is not None and node.proc.poll() is not None:
                    self._fail(node, f"rabbitmq-server exited with {node.proc.returncode}")
                if _listening(node.port):
                    waiting.remove(node)
            time.sleep(0.1)
        if waiting:
            self._fail(waiting[0], f"no AMQP listener after {START_TIMEOUT:g} s")

    def _fail(self, node: ClusterNode, problem: str) -> None:
        logs = [_tail(path) for path in sorted((node.root / "log").glob("*.log"))]
        pytest.fail(f"private RabbitMQ cluster node {node.name}: {problem}\n" + "\n".join(logs))

    def log_text(self, index: int) -> str:
        node = self.node(index)
        try:
            return (node.root / "log" / f"{node.name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop every node, then epmd, by PID; remove the state directory."""
        pids = [pid for node in self.nodes if (pid := node.beam_pid) is not None]
        pids += [node.proc.pid for node in self.nodes if node.proc is not None]
        procs = [node.proc for node in self.nodes if node.proc is not None]
        _stop(procs, pids, STOP_TIMEOUT)
        epmd_pids = sorted({self.epmd.pid, *_epmd_pids(self.epmd_port)})
        _stop([self.epmd], epmd_pids, 5.0)
        shutil.rmtree(self.root, ignore_errors=True)


def _config(cluster: Cluster, node: ClusterNode) -> str:
    lines = [
        f"listeners.tcp.default = {LOOPBACK}:{node.port}",
        "log.console = false",
        "log.file.level = info",
        # Nodes 2 and 3 find node 1 on their first boot and join it.
        "cluster_formation.peer_discovery_backend = classic_config",
        f"cluster_formation.classic_config.nodes.1 = {cluster.node(1).name}",
        "",
    ]
    return "\n".join(lines)


def _start_cluster(root: Path, size: int = NODES, advanced: str = "[].") -> Cluster:
    ports = _free_ports(2 * size + 1)
    epmd_port = ports.pop()
    env = _private_env(root, epmd_port, server_erl_args=ERL_ARGS)
    nodes = [
        ClusterNode(
            index=i,
            name=f"usm-c{i}-{os.getpid()}@localhost"
            if size == NODES
            else f"usm-s{size}n{i}-{os.getpid()}@localhost",
            port=ports[2 * (i - 1)],
            dist_port=ports[2 * (i - 1) + 1],
            root=root / f"node{i}",
        )
        for i in range(1, size + 1)
    ]
    (root / "enabled_plugins").write_text("[].\n")
    epmd = _start_epmd(env, epmd_port)
    cluster = Cluster(root=root, nodes=nodes, epmd=epmd, epmd_port=epmd_port, env=env)
    try:
        _boot(cluster, advanced)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _boot(cluster: Cluster, advanced: str = "[].") -> None:
    """Write the nodes' files (`advanced`: each node's `advanced.config`, Erlang terms), start
    node 1, then the others; check the cluster."""
    for node in cluster.nodes:
        (node.root / "log").mkdir(parents=True)
        (node.root / "rabbitmq.conf").write_text(_config(cluster, node))
        (node.root / "advanced.config").write_text(advanced.strip() + "\n")
    started = time.monotonic()
    cluster.start(1)
    if len(cluster.nodes) > 1:
        cluster.start(*range(2, len(cluster.nodes) + 1))
    status = json.loads(cluster.rabbitmqctl("cluster_status", "--formatter", "json", node=1))
    running = sorted(status.get("running_nodes", []))
    if running != sorted(node.name for node in cluster.nodes):
        raise RuntimeError(f"the nodes did not form one cluster: running {running}")
    cluster.startup_s = round(time.monotonic() - started, 1)


@contextlib.contextmanager
def private_broker(size: int = 1, advanced: str = "[].") -> Iterator[Cluster]:
    """`size` private nodes in one cluster (one: a lone node), stopped on exit; for a fixture
    of a narrower scope than the session's cluster. `advanced` is every node's
    `advanced.config` (Erlang terms). Skips (or fails in CI) like it."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the private RabbitMQ node is required in CI: {reason}")
        pytest.skip(f"no private RabbitMQ node: {reason}")
    root = Path(tempfile.mkdtemp(prefix=f"usm-rmq-{size}n-"))
    try:
        broker = _start_cluster(root, size, advanced)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def rabbitmq_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three private RabbitMQ nodes in one cluster, for the whole session (module docstring)."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the private RabbitMQ cluster is required in CI: {reason}")
        pytest.skip(f"no private RabbitMQ cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="usm-rmq-cluster-"))
    try:
        cluster = _start_cluster(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        ports = ", ".join(str(node.port) for node in cluster.nodes)
        reporter.write_line(
            f"rabbitmq_cluster: {NODES} nodes up in {cluster.startup_s:.1f} s (amqp {ports})"
        )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(rabbitmq_cluster: Cluster) -> Cluster:
    """The session's cluster with all its nodes running (restarts those a test killed)."""
    rabbitmq_cluster.heal()
    return rabbitmq_cluster
