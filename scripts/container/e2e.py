"""CI container tier: the real image under the real `docker compose`, against the real broker.

Run by scripts/container/e2e.sh after scripts/container/setup.sh (podman behind the `docker`
CLI) with the project's virtualenv: `.venv/bin/python scripts/container/e2e.py`.

What it does, in order, failing loudly (with `docker compose logs`) at the first broken promise:

1. `docker compose config -q` of compose.yaml (and that it refuses to run without the two
   required variables) and of compose.demo.yaml; compose.yaml's image tag is the version.
2. `docker compose build`; the image runs as uid 10001, has the version label, a HEALTHCHECK
   running `poller check`, and no exposed port.
3. A fresh vhost on the machine's RabbitMQ (127.0.0.1:5672), a Net-SNMP `snmpd` on
   127.0.0.1 and a UDP port there that never answers (a dead device); `docker compose up -d`
   with 3 replicas (scripts/container/compose.ci.yaml: slirp4netns, where 10.0.2.2 is the
   host's loopback).
4. 3 consumers on the satellite queue; 30 `snmp.get` jobs answered, by at least 2 replicas.
5. In every container: `poller check` exits 0, the processes (all of them: the init, `poller
   run`, its lane process `poller lane` and the sandboxes) run as uid 10001 without
   capabilities and with no-new-privileges, the root is read-only, nothing listens on TCP; one
   `poller lane` process runs and the replica logged `interactive_process_started` (the
   default; `USM_E2E_INTERACTIVE_PROCESS=false bash scripts/container/e2e.sh` runs the whole
   tier with the in-process lane, and then checks there is no lane process).
6. One container's main process SIGKILLed from the host while it runs a job (for a device that
   never answers, so the job lasts its whole deadline) and others flow: it is restarted by the
   restart policy and consumes again, its job is redelivered and answered by another replica,
   and every job gets its result (none lost, none dead-lettered).
7. Recycling: the replicas recreated with `USM_POLLER_MAX_JOBS`; their default
   `USM_POLLER_MAX_RSS_MB` is 80 % of the CI file's `mem_limit`, read from the container's
   cgroup. Under a burst of jobs each one recycles (one `recycling` line), exits 0 and is
   started again by the restart policy (its state dir, a tmpfs, comes back empty); every job is
   answered exactly once and none is dead-lettered.
8. `docker compose down` while every replica runs such a job: each one finishes its job,
   publishes the result and exits 0 on SIGTERM, well within the grace period.

The core service's image and compose.core.yaml (RabbitMQ, PostgreSQL, two `satellite serve`
replicas, nginx): compose.core.yaml is validated in step 1 (its rabbitmq, postgres and nginx
images cannot be pulled here, so it is never started); its `core-1` image is built with
`docker compose build` after step 2 and checked (uid 10001, version label, /readyz
HEALTHCHECK, port 8480); after step 4 one container of it runs on the host's network against
the run's vhost with SQLite: /healthz and /readyz answer, a job submitted over TCP with a token
and `Prefer: wait=10` comes back 200 from the poller replicas and is found again in
`/v1/jobs?host=...`, and SIGTERM (`docker stop`) ends it with exit 0 and `core_stopped`.

Everything it starts (containers, the vhost, snmpd, the log follower) is removed at the end,
by name or PID.
"""

# ruff: noqa: S603, S108 - a CI driver: it runs fixed tools, and /tmp is the container's tmpfs
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from poller import __version__, wire  # noqa: E402 - after the path set-up above

COMPOSE_FILES = ("compose.yaml", "scripts/container/compose.ci.yaml")
REPLICAS = 3
UID = 10001
HOST_FROM_CONTAINER = "10.0.2.2"  # slirp4netns: the host's 127.0.0.1
SYS_NAME = "e2e-device"
SYS_NAME_OID = "1.3.6.1.2.1.1.5.0"
SILENT_JOB_TIMEOUT = 3.0
#: scripts/container/compose.ci.yaml: `mem_limit`, and the recycling step's USM_POLLER_MAX_JOBS.
MEMORY_LIMIT_MB = 256
RECYCLE_AFTER = 40
PREFIX = "usm-e2e-"
#: compose.core.yaml: its required variables (placeholders: it is validated and built, never up)
CORE_COMPOSE = "compose.core.yaml"
CORE_PLACEHOLDERS = {"RABBITMQ_PASSWORD": "ci-rabbit", "POSTGRES_PASSWORD": "ci-postgres"}
CORE_IMAGE = f"satellite-core:{__version__}"
t0 = time.monotonic()


class TierError(AssertionError):
    """A broken promise of the container tier."""


def say(message: str) -> None:
    print(f"[container-tier +{time.monotonic() - t0:5.1f}s] {message}", flush=True)


PASSED: list[str] = []


def passed(message: str) -> None:
    """One of the tier's checks passed."""
    PASSED.append(message)
    say(f"PASS {message}")


def check(condition: object, message: str) -> None:
    if not condition:
        raise TierError(message)


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    ok: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (never through a shell); by default fail when it exits non-zero."""
    try:
        done = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise TierError(f"`{' '.join(args)}` took more than {timeout} s") from None
    if ok and done.returncode != 0:
        raise TierError(
            f"`{' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}".rstrip()
        )
    return done


def wait_for(what: str, probe: Any, timeout: float, interval: float = 0.25) -> Any:
    """Call `probe()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TierError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------ services


def rabbitmqctl(*args: str) -> str:
    return run(["rabbitmqctl", "-q", *args], timeout=60).stdout


@contextlib.contextmanager
def fresh_vhost() -> Iterator[str]:
    """A vhost for this run, guest with full permissions; deleted afterwards."""
    for line in rabbitmqctl("list_vhosts", "name").split():
        match = re.fullmatch(rf"{PREFIX}(\d+)-[0-9a-f]{{6}}", line)
        if match and not pid_alive(int(match.group(1))):
            rabbitmqctl("delete_vhost", line)  # left by a run that was killed
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)
        say(f"deleted vhost {name}")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def snmp_agent() -> Iterator[int]:
    """Net-SNMP `snmpd` on 127.0.0.1 (v2c community `public`), as nobody; stopped by PID."""
    binary = shutil.which("snmpd") or "/usr/sbin/snmpd"
    check(Path(binary).exists(), "snmpd is not installed (apt-get install snmpd snmp)")
    workdir = Path(tempfile.mkdtemp(prefix="usm-e2e-snmpd-"))
    workdir.chmod(0o755)
    port = free_udp_port()
    (workdir / "snmpd.conf").write_text(
        f"agentAddress udp:127.0.0.1:{port}\nrocommunity public 127.0.0.1\nsysName {SYS_NAME}\n"
    )
    persist = workdir / "persist"
    persist.mkdir()
    cmd = [binary, "-f", "-Lf", str(workdir / "snmpd.log"), "-I", "-smux", "-C"]
    cmd += ["-c", str(workdir / "snmpd.conf")]
    if os.geteuid() == 0:
        shutil.chown(persist, "nobody", "nogroup")
        cmd += ["-u", "nobody", "-g", "nogroup"]
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "MIBS": ":", "SNMP_PERSISTENT_DIR": str(persist)}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        snmpget = shutil.which("snmpget")
        if snmpget:
            probe = [snmpget, "-v2c", "-c", "public", "-t", "0.3", "-r", "0"]
            probe += [f"127.0.0.1:{port}", SYS_NAME_OID]
            wait_for(
                "snmpd to answer",
                lambda: run(probe, ok=False, env=env).returncode == 0,
                timeout=15,
            )
        else:
            time.sleep(1)
        check(proc.poll() is None, f"snmpd exited {proc.returncode}")
        yield port
    finally:
        stop_process(proc, grace=5)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def silent_udp_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that takes datagrams and never answers: a device that is down.

    An SNMP job against it runs for its whole deadline (`SILENT_JOB_TIMEOUT`), which makes it
    reliably in flight when a replica is killed or stopped.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


# ------------------------------------------------------------------------------------ compose


@dataclass
class Compose:
    project: str
    env: dict[str, str]
    files: Sequence[str] = COMPOSE_FILES
    seen: set[str] = field(default_factory=set)

    def argv(self, *args: str) -> list[str]:
        out = ["docker", "compose", "-p", self.project]
        for f in self.files:
            out += ["-f", f]
        return [*out, *args]

    def __call__(
        self, *args: str, timeout: float = 300, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), timeout=timeout, ok=ok, env=self.env)

    def container_ids(self) -> list[str]:
        ids: list[str] = self("ps", "-q").stdout.split()
        self.seen.update(ids)
        return ids

    def stop_exec_monitors(self) -> None:
        """Stop the `conmon` monitors that podman leaves after `docker exec` in a container
        that was restarted (they would linger for 5 minutes): by PID, ours only."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv[0].endswith(b"conmon") or b"--exec" not in argv or b"-c" not in argv:
                continue
            container = argv[argv.index(b"-c") + 1].decode(errors="replace")
            if container in self.seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGTERM)

    @contextlib.contextmanager
    def following_logs(self) -> Iterator[Path]:
        """`docker compose logs -f` of the project into a file, for as long as the block runs.

        Followed rather than read at the end, so that the logs of replicas removed by
        `docker compose down` are kept too.
        """
        with tempfile.NamedTemporaryFile(prefix="usm-e2e-logs-", suffix=".log") as out:
            proc = subprocess.Popen(
                self.argv("logs", "--follow", "--no-color", "--timestamps"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=self.env,
            )
            try:
                yield Path(out.name)
            finally:
                stop_process(proc, grace=5)  # the PID we started


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM a process this script started (by its PID); SIGKILL it after `grace` seconds.

    tests/support/procs.py has the same for the tests and benchmarks; this script stands alone.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=10)


def inspect(container: str, template: str) -> str:
    return run(["docker", "inspect", "-f", template, container], timeout=30).stdout.strip()


def podman_json(*args: str) -> Any:
    return json.loads(run(["podman", *args, "--format", "json"], timeout=30).stdout or "null")


def remove_stale_projects() -> None:
    """Containers of tier runs that were killed before they could clean up."""
    rows = podman_json("ps", "-a", "--filter", "label=com.docker.compose.project")
    stale = set()
    for row in rows or []:
        project = (row.get("Labels") or {}).get("com.docker.compose.project", "")
        match = re.fullmatch(rf"{PREFIX}(\d+)", project)
        if match and not pid_alive(int(match.group(1))):
            stale.add(row["Id"])
    # the core service's container (`docker run`, no compose label): usm-e2e-core-<pid>
    for row in podman_json("ps", "-a", "--filter", f"name={PREFIX}core-") or []:
        for name in row.get("Names") or []:
            match = re.fullmatch(rf"{PREFIX}core-(\d+)", name)
            if match and not pid_alive(int(match.group(1))):
                stale.add(row["Id"])
    if stale:
        say(f"removing {len(stale)} container(s) left by killed runs")
        run(["podman", "rm", "-f", "-t", "2", *sorted(stale)], timeout=120, ok=False)


# ------------------------------------------------------------------------------------ the core


@dataclass
class Core:
    """The core's side: publish jobs to the satellite, collect their results."""

    dsn: str
    satellite_id: str
    results: dict[str, list[wire.JobResult]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = pika.URLParameters(self.dsn)
        params.connection_attempts = 3
        self._conn = pika.BlockingConnection(params)
        self._ch = self._conn.channel()

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self._conn.close()

    def consumers(self) -> int:
        """Consumers on the satellite queue (0 while the queue does not exist yet)."""
        try:
            ch = self._conn.channel()
            ok = ch.queue_declare(wire.jobs_queue(self.satellite_id), passive=True)
            count: int = ok.method.consumer_count
            ch.close()
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        return count

    def depth(self, queue: str) -> int:
        ok = self._ch.queue_declare(queue, passive=True)
        depth: int = ok.method.message_count
        return depth

    def listen(self) -> None:
        """Bind a private queue to this satellite's results (the pollers declared the exchange)."""
        self._ch.confirm_delivery()
        self._queue = self._ch.queue_declare("", exclusive=True).method.queue
        key = f"result.{self.satellite_id}.#"
        self._ch.queue_bind(self._queue, wire.results_exchange(), key)

    def publish_snmp_get(self, host: str, port: int) -> str:
        return self.publish(host, port, "snmp.get", {"oids": [SYS_NAME_OID]}, timeout=10)

    def publish_silent(self, host: str, port: int) -> str:
        """An `snmp.get` of a device that never answers: a `device_timeout` after its deadline."""
        params = {"oids": [SYS_NAME_OID]}
        return self.publish(host, port, "snmp.get", params, timeout=SILENT_JOB_TIMEOUT)

    def publish(
        self, host: str, port: int, kind: str, params: dict[str, Any], *, timeout: float
    ) -> str:
        job_id = str(uuid.uuid4())
        job = {
            "v": 1,
            "id": job_id,
            "kind": kind,
            "target": {"host": host, "port": port},
            "auth": {"version": "2c", "community": "public"},
            "params": params,
            "timeout": timeout,
        }
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=job_id
        )
        self._ch.basic_publish(
            wire.jobs_exchange(),
            wire.jobs_routing_key(self.satellite_id),
            json.dumps(job).encode(),
            props,
            mandatory=True,
        )
        return job_id

    def drain(self) -> None:
        while True:
            method, _props, body = self._ch.basic_get(self._queue, auto_ack=True)
            if method is None:
                return
            result = wire.decode_result(body)
            self.results.setdefault(result.job_id, []).append(result)

    def wait_results(self, ids: Sequence[str], timeout: float) -> dict[str, wire.JobResult]:
        """The first result of every job in `ids`; fail naming the missing ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if all(i in self.results for i in ids):
                return {i: self.results[i][0] for i in ids}
            self._conn.sleep(0.1)
        missing = [i for i in ids if i not in self.results]
        raise TierError(f"{len(missing)} of {len(ids)} jobs got no result in {timeout} s")


def assert_ok(results: dict[str, wire.JobResult], silent: Sequence[str] = ()) -> Counter[str]:
    """Every result is the expected one; the number of jobs each worker answered.

    Jobs in `silent` went to the device that never answers: `device_timeout`. The others read
    sysName from snmpd: `ok`.
    """
    for result in results.values():
        if result.job_id in silent:
            code = result.error.code if result.error else None
            check(
                result.status == "error" and code == "device_timeout",
                f"job {result.job_id} to the silent device answered {result.status}/{code}",
            )
            continue
        check(
            result.status == "ok",
            f"job {result.job_id} answered {result.status}: {result.error}",
        )
        data: dict[str, Any] = result.model_dump(mode="json")["data"] or {}
        varbinds = data.get("varbinds") or [{}]
        check(
            varbinds[0].get("value") == SYS_NAME,
            f"job {result.job_id}: unexpected data {result.data}",
        )
    return Counter(r.worker for r in results.values())


# ------------------------------------------------------------------------------------ the tier


def validate_compose_files(env: dict[str, str]) -> None:
    base = {k: v for k, v in env.items() if k not in ("US_AMQP_DSN", "USM_POLLER_SATELLITE_ID")}
    refused = run(["docker", "compose", "-f", "compose.yaml", "config", "-q"], ok=False, env=base)
    check(
        refused.returncode != 0 and "required variable US" in refused.stderr,
        "compose.yaml must refuse to run without US_AMQP_DSN and USM_POLLER_SATELLITE_ID",
    )
    env = base | {"US_AMQP_DSN": "amqp://u:p@broker:5672/%2f", "USM_POLLER_SATELLITE_ID": "ci"}
    for files in (("compose.yaml",), COMPOSE_FILES, ("compose.demo.yaml",)):
        argv = ["docker", "compose"] + [a for f in files for a in ("-f", f)]
        run([*argv, "config", "-q"], env=env)
    config = json.loads(
        run(
            ["docker", "compose", "-f", "compose.yaml", "config", "--format", "json"], env=env
        ).stdout
    )
    poller = config["services"]["poller"]
    image = poller["image"]
    check(
        image.endswith(f":{__version__}"),
        f"compose.yaml's image {image} is not tagged with the version {__version__}",
    )
    check("ports" not in poller, "compose.yaml must not publish ports")
    # The documented host-network override (docs/deploy.md): no sysctl left, the rest kept.
    merge = ["docker", "compose", "-f", "compose.yaml", "-f", "compose.host-network.yaml"]
    host = json.loads(run([*merge, "config", "--format", "json"], env=env).stdout)
    host = host["services"]["poller"]
    check(
        host.get("network_mode") == "host" and not host.get("sysctls"),
        f"compose.host-network.yaml: network_mode {host.get('network_mode')!r}, "
        f"sysctls {host.get('sysctls')!r} (want host and none)",
    )
    check(host.get("cap_drop") == ["ALL"], "compose.host-network.yaml must keep cap_drop")
    passed(
        "compose files valid (compose.yaml, CI override, compose.demo.yaml, "
        f"compose.host-network.yaml without sysctls); image {image}"
    )
    validate_core_compose(base)


def validate_core_compose(env: dict[str, str]) -> None:
    """compose.core.yaml: refuses to run without its passwords; two replicas behind nginx."""
    argv = ["docker", "compose", "-f", CORE_COMPOSE]
    refused = run([*argv, "config", "-q"], ok=False, env=env)
    check(
        refused.returncode != 0 and "required variable" in refused.stderr,
        f"{CORE_COMPOSE} must refuse to run without RABBITMQ_PASSWORD and POSTGRES_PASSWORD",
    )
    env = env | CORE_PLACEHOLDERS
    config = json.loads(run([*argv, "config", "--format", "json"], env=env).stdout)
    services = config["services"]
    check(
        set(services) == {"rabbitmq", "postgres", "core-1", "core-2", "nginx"},
        f"{CORE_COMPOSE} services: {sorted(services)}",
    )
    sockets: set[str] = set()
    for name in ("core-1", "core-2"):
        core = services[name]
        check(core["image"] == CORE_IMAGE, f"{name}: image {core['image']}, want {CORE_IMAGE}")
        check(core["build"].get("target") == "core", f"{name}: build target {core['build']}")
        environment = core["environment"]
        check(
            environment["USM_CORE_DB"].startswith("postgresql://")
            and "@rabbitmq:5672/" in environment["US_AMQP_DSN"],
            f"{name}: USM_CORE_DB and US_AMQP_DSN must point at postgres and rabbitmq",
        )
        listen = environment["USM_CORE_LISTEN"].split(",")
        check("tcp:0.0.0.0:8480" in listen, f"{name}: USM_CORE_LISTEN {listen}")
        sockets.update(item for item in listen if item.startswith("unix:/run/satellite/"))
        check("/readyz" in " ".join(core["healthcheck"]["test"]), f"{name}: no /readyz check")
        check("ports" not in core, f"{name} must not publish ports (nginx is the way in)")
    check(len(sockets) == 2, f"the replicas need a unix socket each: {sorted(sockets)}")
    nginx = services["nginx"]
    mount = next(v for v in nginx["volumes"] if v["target"].startswith("/etc/nginx/"))
    conf = Path(mount["source"]).read_text(encoding="utf-8")
    upstream = re.findall(r"^\s*server (core-\d):8480 ", conf, flags=re.MULTILINE)
    check(upstream == ["core-1", "core-2"], f"nginx upstream servers: {upstream}")
    check(
        [p["target"] for p in nginx["ports"]] == [8080] and "listen 8080;" in conf,
        "nginx: the API on one published port (8080 in the container)",
    )
    passed(f"{CORE_COMPOSE} valid: rabbitmq, postgres, core-1 and core-2 ({CORE_IMAGE}), nginx")


def check_image(image: str) -> None:
    info = podman_json("image", "inspect", image)[0]
    config = info.get("Config") or {}
    labels = info.get("Labels") or config.get("Labels") or {}
    version = labels.get("org.opencontainers.image.version")
    check(version == __version__, f"image version label {version!r}, expected {__version__}")
    check(config.get("User") == f"{UID}:{UID}", f"image user is {config.get('User')!r}")
    check(not config.get("ExposedPorts"), f"image exposes {config.get('ExposedPorts')}")
    health = (info.get("Healthcheck") or info.get("HealthCheck") or {}).get("Test") or []
    check(health[1:3] == ["poller", "check"], f"image HEALTHCHECK is {health!r}")
    passed(f"image {image}: {info['Size'] / 1e6:.0f} MB, user {UID}, HEALTHCHECK {health[1:]}")


#: `USM_E2E_INTERACTIVE_PROCESS=false` runs the tier with the in-process lane (compose.ci.yaml);
#: by default each replica runs its lane process, as USM_POLLER_INTERACTIVE_PROCESS's default.
LANE_PROCESS = os.environ.get("USM_E2E_INTERACTIVE_PROCESS", "true") != "false"


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (the init, the poller, its lane process, sandboxes)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 100:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
    return found


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_lane(pid: int) -> bool:
    return command_line(pid)[-3:-1] == ["lane", "--control-fd"]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def check_container(container: str) -> None:
    short = container[:12]
    pid = int(inspect(container, "{{.State.Pid}}"))
    check(pid > 0, f"{short} is not running")

    # the health file is rewritten every 2 s: a fresh start gets a few periods to pass
    def healthy() -> bool:
        done = run(["docker", "exec", container, "poller", "check"], ok=False, timeout=30)
        return done.returncode == 0

    wait_for(f"`poller check` to exit 0 in {short}", healthy, timeout=20, interval=1)
    uid = run(["docker", "exec", container, "id", "-u"], timeout=30).stdout.strip()
    check(uid == str(UID), f"{short} runs as uid {uid}")
    tree = descendants(pid)
    for p in tree:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
        )
        uids = set(status["Uid"].split())
        check(uids == {str(UID)}, f"{short}: process {p} has uids {uids}")
        check(int(status["CapEff"], 16) == 0, f"{short}: process {p} has capabilities")
        check(status["NoNewPrivs"].strip() == "1", f"{short}: process {p} may gain privileges")
    check(inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true", f"{short}: root rw")
    wrote = run(["docker", "exec", container, "touch", "/probe"], ok=False, timeout=30)
    check(wrote.returncode != 0 and "Read-only" in wrote.stderr, f"{short}: / is writable")
    tmp = run(["docker", "exec", container, "touch", "/tmp/probe"], ok=False, timeout=30)
    check(tmp.returncode == 0, f"{short}: /tmp is not writable: {tmp.stderr}")
    ping = run(["docker", "exec", container, "cat", "/proc/sys/net/ipv4/ping_group_range"])
    check(ping.stdout.split() == ["0", "2147483647"], f"{short}: ping_group_range {ping.stdout}")
    logs = run(["docker", "logs", container], timeout=30)
    check(
        "ping_not_permitted" not in logs.stdout + logs.stderr,
        f"{short}: the poller says icmp.ping is not permitted",
    )
    # `poller lane` processes; their sandbox children (forks) have the same command line
    lanes = [p for p in tree if is_lane(p) and not is_lane(parent(p))]
    started = '"interactive_process_started"' in logs.stdout + logs.stderr
    if LANE_PROCESS:  # the default
        check(started, f"{short}: no lane process started (USM_POLLER_INTERACTIVE_PROCESS)")
        check(len(lanes) == 1, f"{short}: {len(lanes)} `poller lane` processes, not 1")
    else:
        check(not started and not lanes, f"{short}: a lane process with it off")
    tcp = run(["nsenter", "-t", str(pid), "-n", "ss", "-Hltn"], timeout=30).stdout.strip()
    check(not tcp, f"{short}: TCP sockets listening inside the container:\n{tcp}")
    established = run(["nsenter", "-t", str(pid), "-n", "ss", "-Htn"], timeout=30).stdout
    check(
        f"{HOST_FROM_CONTAINER}:5672" in established,
        f"{short}: no connection to the broker:\n{established}",
    )


@dataclass(frozen=True)
class Targets:
    """Where the replicas send their SNMP jobs (the host's loopback, seen through slirp)."""

    snmp_port: int  # snmpd: answers at once
    silent_port: int  # nothing answers: a job runs for its whole deadline

    def gets(self, core: Core, n: int) -> list[str]:
        return [core.publish_snmp_get(HOST_FROM_CONTAINER, self.snmp_port) for _ in range(n)]

    def silent(self, core: Core, n: int) -> list[str]:
        return [core.publish_silent(HOST_FROM_CONTAINER, self.silent_port) for _ in range(n)]


def crash_one(compose: Compose, core: Core, targets: Targets) -> None:
    """SIGKILL one container's main process while jobs flow; it must come back, none lost."""
    victim = compose.container_ids()[0]
    short = victim[:12]
    # Round-robin gives every replica one job for the silent device, which runs for
    # SILENT_JOB_TIMEOUT: the victim is in the middle of its job when it is killed, so that job
    # must be redelivered and answered by another replica.
    silent = targets.silent(core, REPLICAS)
    ids = silent + targets.gets(core, 30)
    pid = int(inspect(victim, "{{.State.Pid}}"))
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    say(f"SIGKILLed {short}'s main process (host PID {pid}) with a job in flight")
    ids += targets.gets(core, 30)

    def restarted() -> str | None:
        state = inspect(victim, "{{.RestartCount}} {{.State.Status}} {{.State.Pid}}").split()
        if int(state[0]) >= 1 and state[1] == "running" and int(state[2]) not in (0, pid):
            return state[2]
        return None

    new_pid = wait_for(f"{short} to be restarted", restarted, timeout=60)
    say(f"{short} restarted by its restart policy (host PID {new_pid})")
    wait_for(f"{REPLICAS} consumers again", lambda: core.consumers() == REPLICAS, timeout=60)
    check_container(victim)
    ids += targets.gets(core, 60)
    results = core.wait_results(ids, timeout=60)
    workers = assert_ok(results, silent)
    after = [
        r
        for r in results.values()
        if r.worker.startswith(short) and r.finished_at.timestamp() > killed_at
    ]
    check(after, f"the restarted {short} answered no job after its restart: {dict(workers)}")
    redelivered = [r for r in results.values() if r.redelivered]
    check(
        any(r.job_id in silent for r in redelivered),
        "the job the killed replica was running was not redelivered",
    )
    check(
        all(
            not r.worker.startswith(short) or r.finished_at.timestamp() > killed_at
            for r in redelivered
        ),
        "a redelivered job was answered by the killed replica before it died",
    )
    dlq = core.depth(wire.dead_letter_queue(core.satellite_id))
    check(dlq == 0, f"{dlq} job(s) dead-lettered")
    passed(
        f"crash: all {len(ids)} jobs answered, {len(redelivered)} of them redelivered from "
        f"the killed replica, none dead-lettered; the restarted replica answered {len(after)} "
        f"after its restart; by worker {dict(workers)}"
    )


def recycle_all(compose: Compose, core: Core, targets: Targets) -> None:
    """Every replica recycles after `RECYCLE_AFTER` jobs, is started again, and no job is lost."""
    compose.env = compose.env | {"USM_E2E_MAX_JOBS": str(RECYCLE_AFTER)}
    compose("up", "-d", "--no-build", timeout=300)  # recreates the replicas with the setting
    ids = compose.container_ids()
    check(len(ids) == REPLICAS, f"{len(ids)} containers running, expected {REPLICAS}")
    wait_for(f"{REPLICAS} consumers", lambda: core.consumers() == REPLICAS, timeout=60)
    shown = json.loads(run(["docker", "exec", ids[0], "poller", "config", "show", "--json"]).stdout)
    expected = int(MEMORY_LIMIT_MB * 0.8)
    check(
        shown["USM_POLLER_MAX_RSS_MB"] == expected
        and shown["USM_POLLER_MAX_JOBS"] == RECYCLE_AFTER,
        f"settings in the container: MAX_RSS_MB {shown['USM_POLLER_MAX_RSS_MB']} (expected "
        f"{expected}, 80 % of mem_limit), MAX_JOBS {shown['USM_POLLER_MAX_JOBS']}",
    )
    since = str(int(time.time()) - 1)
    jobs = targets.gets(core, REPLICAS * RECYCLE_AFTER * 3)

    def all_restarted() -> dict[str, int] | None:
        counts = {c[:12]: int(inspect(c, "{{.RestartCount}}")) for c in ids}
        return counts if all(n >= 1 for n in counts.values()) else None

    results = core.wait_results(jobs, timeout=180)
    workers = assert_ok(results)
    counts = wait_for("every replica recycled and restarted", all_restarted, timeout=60)
    wait_for(f"{REPLICAS} consumers again", lambda: core.consumers() == REPLICAS, timeout=60)
    time.sleep(1.0)  # duplicates, if any, would be on their way
    core.drain()
    twice = {i: len(core.results[i]) for i in jobs if len(core.results[i]) > 1}
    check(not twice, f"jobs answered more than once: {twice}")
    names = {inspect(c, "{{.Name}}").lstrip("/") for c in ids}
    codes = died_exit_codes(since)
    check(
        names <= set(codes) and all(codes[n] == "0" for n in names),
        f"exit codes of the recycled replicas: {codes} (expected 0 for each of {sorted(names)})",
    )
    for container in ids:
        log = run(["docker", "logs", container], timeout=30)
        lines = [
            json.loads(line)
            for line in (log.stdout + log.stderr).splitlines()
            if '"recycling"' in line
        ]
        check(
            lines and all(line.get("reason") == "jobs" for line in lines),
            f"{container[:12]}: no `recycling` line with reason jobs",
        )
        state = run(["docker", "exec", container, "ls", "-a", "/tmp/usm-poller"], timeout=30)
        check(
            "recycle.json" not in state.stdout,
            f"{container[:12]}: the state dir kept its record across the restart",
        )
    dlq = core.depth(wire.dead_letter_queue(core.satellite_id))
    check(dlq == 0, f"{dlq} job(s) dead-lettered")
    passed(
        f"recycling: MAX_RSS_MB {expected} from mem_limit {MEMORY_LIMIT_MB}m; {len(jobs)} jobs "
        f"answered once each by {dict(workers)}; restarts {counts}, every exit 0"
    )


def died_exit_codes(since: str) -> dict[str, str]:
    """{container name: exit code} of the containers that stopped since `since` (podman)."""
    argv = ["podman", "events", "--stream=false", "--since", since, "--filter", "event=died"]
    out = run([*argv, "--format", "{{.Name}} {{.ContainerExitCode}}"], timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def stop_all(compose: Compose, names: list[str], core: Core, targets: Targets) -> None:
    """`docker compose down` while every replica runs a job: each finishes it and exits 0."""
    running = targets.silent(core, REPLICAS)
    time.sleep(0.5)
    since = str(int(time.time()) - 1)
    started = time.monotonic()
    compose("down", timeout=120)
    took = time.monotonic() - started
    results = core.wait_results(running, timeout=10)
    assert_ok(results, running)
    check(
        not any(r.redelivered for r in results.values()),
        "a job running at SIGTERM was not finished by its replica (redelivered)",
    )
    codes = died_exit_codes(since)
    check(
        all(codes.get(n) == "0" for n in names),
        f"exit codes after SIGTERM: {codes} (expected 0 for each of {names})",
    )
    check(took < 30, f"`docker compose down` took {took:.0f} s: SIGTERM not handled?")
    left = podman_json(
        "ps", "-a", "--filter", f"label=com.docker.compose.project={compose.project}"
    )
    check(not left, f"containers left after down: {[c['Names'] for c in left]}")
    passed(
        f"`docker compose down` in {took:.1f} s with a {SILENT_JOB_TIMEOUT:.0f} s job running in "
        f"each replica: each finished and answered its job, then exited 0 on SIGTERM "
        f"({len(names)} replicas)"
    )


def build(env: dict[str, str]) -> Compose:
    """`docker compose build` (the layers of earlier builds are kept as a cache)."""
    # the build needs the two required variables set, not their real values
    placeholders = {"US_AMQP_DSN": "amqp://build:build@build/", "USM_POLLER_SATELLITE_ID": "build"}
    compose = Compose(f"{PREFIX}{os.getpid()}", env | placeholders)
    started = time.monotonic()
    compose("build", "--quiet", timeout=900)
    say(f"docker compose build: {time.monotonic() - started:.0f} s")
    check_image(f"satellite-poller:{__version__}")
    return compose


def prune_images(since: str) -> None:
    """Images and stages of earlier builds that this run's builds did not reuse (after both
    builds, so that the core image's stages stay cached too): keeps the cache bounded."""
    run(["podman", "image", "prune", "-f", "--filter", f"until={since}"], timeout=120)


def build_core(env: dict[str, str]) -> None:
    """The core service's image, as compose.core.yaml builds it (the Dockerfile's `core`)."""
    started = time.monotonic()
    argv = ["docker", "compose", "-p", f"{PREFIX}{os.getpid()}", "-f", CORE_COMPOSE]
    run([*argv, "build", "--quiet", "core-1"], env=env | CORE_PLACEHOLDERS, timeout=900)
    say(f"docker compose -f {CORE_COMPOSE} build core-1: {time.monotonic() - started:.0f} s")
    info = podman_json("image", "inspect", CORE_IMAGE)[0]
    config = info.get("Config") or {}
    labels = info.get("Labels") or config.get("Labels") or {}
    check(
        labels.get("org.opencontainers.image.version") == __version__,
        f"{CORE_IMAGE}: version label {labels.get('org.opencontainers.image.version')!r}",
    )
    check(config.get("User") == f"{UID}:{UID}", f"{CORE_IMAGE}: user {config.get('User')!r}")
    check("8480/tcp" in (config.get("ExposedPorts") or {}), f"{CORE_IMAGE}: no port 8480")
    health = (info.get("Healthcheck") or info.get("HealthCheck") or {}).get("Test") or []
    check("/readyz" in " ".join(health), f"{CORE_IMAGE}: HEALTHCHECK is {health!r}")
    check(config.get("Cmd") == ["satellite", "serve"], f"{CORE_IMAGE}: CMD {config.get('Cmd')}")
    passed(f"image {CORE_IMAGE}: {info['Size'] / 1e6:.0f} MB, user {UID}, HEALTHCHECK /readyz")


def http(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One HTTP request to the core container (loopback); its status and JSON body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310 - http://127.0.0.1 only
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, repr(exc)


def core_service_serves(compose: Compose, vhost: str, sid: str, targets: Targets) -> None:
    """`satellite serve` in its image: ready, a job answered by the replicas, SIGTERM exit 0."""
    name = f"{PREFIX}core-{os.getpid()}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    argv = ["docker", "run", "-d", "--name", name, "--network", "host", "--read-only"]
    argv += ["--tmpfs", "/tmp", "-e", "USM_CORE_STATE_DIR=/tmp/state"]  # SQLite here
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges:true"]
    argv += ["-e", f"US_AMQP_DSN=amqp://guest:guest@127.0.0.1:5672/{vhost}"]
    argv += ["-e", f"USM_CORE_LISTEN=unix:/tmp/api.sock,tcp:127.0.0.1:{port}"]
    argv += ["-e", "USM_CORE_TOKENS_FILE=/tmp/tokens.yaml", "-e", "USM_CORE_LOG_FORMAT=json"]
    # its `docker exec` monitors are stopped with the replicas' (Compose.stop_exec_monitors)
    compose.seen.add(run([*argv, CORE_IMAGE], timeout=120).stdout.strip())
    try:
        wait_for("the core's /readyz", lambda: http("GET", f"{base}/readyz")[0] == 200, 60)
        check(http("GET", f"{base}/healthz")[0] == 200, "the core's /healthz")
        create = ["docker", "exec", name, "satellite", "token", "create", "e2e"]
        token = json.loads(run([*create, "--scope", "submit", "--json"], timeout=60).stdout)
        token = token["token"]
        auth = {"Authorization": f"Bearer {token}"}
        job = {
            "kind": "snmp.get",
            "target": {"host": HOST_FROM_CONTAINER, "port": targets.snmp_port},
            "auth": {"version": "2c", "community": "public"},
            "params": {"oids": [SYS_NAME_OID]},
        }
        url = f"{base}/v1/satellites/{sid}/jobs"
        check(http("POST", url, job)[0] == 401, "a submit over TCP without a token must be 401")
        status, record = http("POST", url, job, auth | {"Prefer": "wait=10"})
        check(status == 200, f"POST {url} with Prefer: wait=10: {status} {record}")
        value = record["result"]["data"]["varbinds"][0]["value"]
        check(
            record["status"] == "ok" and value == SYS_NAME,
            f"the job record: {record['status']} {value!r}",
        )
        status, page = http("GET", f"{base}/v1/jobs?host={HOST_FROM_CONTAINER}", None, auth)
        ids = [item["id"] for item in page["items"]] if status == 200 else page
        check(ids == [record["id"]], f"GET /v1/jobs?host=: {status} {ids}")
        started = time.monotonic()
        run(["docker", "stop", "-t", "40", name], timeout=60)
        code = inspect(name, "{{.State.ExitCode}}")
        logs = run(["docker", "logs", name], timeout=30).stderr
        check(code == "0", f"the core exited {code} on SIGTERM:\n{logs[-2000:]}")
        check('"core_stopped"' in logs, "the core did not log core_stopped")
        passed(
            f"{CORE_IMAGE} serves: /readyz, a job answered by the replicas with Prefer: wait=10 "
            f"and found by host, 401 without a token, SIGTERM exit 0 in "
            f"{time.monotonic() - started:.1f} s"
        )
    except BaseException:
        print(run(["docker", "logs", name], ok=False, timeout=30).stderr[-4000:], flush=True)
        raise
    finally:
        removed = run(["docker", "rm", "-f", name], ok=False, timeout=60)
        if removed.returncode != 0:
            say(f"could not remove {name}: {removed.stderr.strip()}")


def replicas_serve(compose: Compose, core: Core, targets: Targets) -> list[str]:
    """3 consumers, 30 jobs answered by several replicas, each replica confined: their names."""
    ids = compose.container_ids()
    check(len(ids) == REPLICAS, f"{len(ids)} containers running, expected {REPLICAS}")
    names = [inspect(c, "{{.Name}}").lstrip("/") for c in ids]
    queue = wire.jobs_queue(core.satellite_id)
    wait_for(f"{REPLICAS} consumers on {queue}", lambda: core.consumers() == REPLICAS, timeout=60)
    passed(f"{REPLICAS} consumers on {queue}: {', '.join(names)}")
    core.listen()
    workers = assert_ok(core.wait_results(targets.gets(core, 30), timeout=60))
    check(len(workers) >= 2, f"30 jobs answered by {dict(workers)}: expected >= 2 replicas")
    passed(f"30 snmp.get jobs answered ok by {len(workers)} replicas: {dict(workers)}")
    for container in ids:
        check_container(container)
    passed(
        f"every replica: `poller check` 0, uid {UID}, no capabilities, "
        "no-new-privileges, read-only root, unprivileged ICMP, no TCP listener, "
        + ("its lane process running" if LANE_PROCESS else "no lane process (in-process lane)")
    )
    return names


def print_logs(logs: Path) -> None:
    time.sleep(1)  # the follower's last lines
    tail = logs.read_text(errors="replace").splitlines()[-400:]
    print("\n===== docker compose logs (last 400 lines) =====", flush=True)
    print("\n".join(tail), flush=True)
    ps = run(["podman", "ps", "-a"], ok=False, timeout=30)
    print(f"===== podman ps -a =====\n{ps.stdout}", flush=True)


def tier(env: dict[str, str]) -> None:
    validate_compose_files(env)
    remove_stale_projects()
    build_start = str(int(time.time()) - 1)
    compose = build(env)
    build_core(env)
    prune_images(build_start)
    sid = f"e2e-{os.getpid()}"
    with (
        fresh_vhost() as vhost,
        snmp_agent() as snmp_port,
        silent_udp_port() as silent_port,
        contextlib.ExitStack() as stack,
    ):
        targets = Targets(snmp_port, silent_port)
        say(f"vhost {vhost}, snmpd on 127.0.0.1:{snmp_port}, silent device on :{silent_port}")
        compose.env = env | {
            "US_AMQP_DSN": f"amqp://guest:guest@{HOST_FROM_CONTAINER}:5672/{vhost}",
            "USM_POLLER_SATELLITE_ID": sid,
        }
        core = Core(f"amqp://guest:guest@127.0.0.1:5672/{vhost}", sid)
        stack.callback(core.close)
        logs: Path | None = None
        up = False
        try:
            compose("up", "-d", "--no-build", timeout=300)
            up = True
            logs = stack.enter_context(compose.following_logs())
            names = replicas_serve(compose, core, targets)
            core_service_serves(compose, vhost, sid, targets)
            crash_one(compose, core, targets)
            recycle_all(compose, core, targets)
            stop_all(compose, names, core, targets)
            up = False
        except BaseException:
            if logs is not None:
                print_logs(logs)
            raise
        finally:
            if up:
                compose("down", "--timeout", "5", timeout=120, ok=False)
            compose.stop_exec_monitors()


def main() -> int:
    env = dict(os.environ)
    check(env.get("DOCKER_HOST"), "source scripts/container/env.sh first (DOCKER_HOST unset)")
    try:
        tier(env)
    except Exception as exc:  # noqa: BLE001 - any failure fails the tier, with its reason
        reason = str(exc) if isinstance(exc, TierError) else repr(exc)
        print(f"\ncontainer tier FAILED: {reason}", file=sys.stderr, flush=True)
        if not isinstance(exc, TierError):
            traceback.print_exc()
        print(f"container-tier: {len(PASSED)} passed, 1 failed", flush=True)
        return 1
    print(f"container-tier: {len(PASSED)} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
