"""A private RabbitMQ node with AMQPS and a throw-away CA, for real TLS tests of the poller.

`tls_broker` is a session fixture. It makes a CA, a server certificate (CN and SAN `localhost`,
SAN IP `127.0.0.1`) and a client certificate with `cryptography`, then starts one RabbitMQ node
(Debian's `rabbitmq-server`, as root) beside the machine's own node, never joined to it:

* its own HOME and Erlang cookie, its own `epmd` (started here, in the foreground, on a free port
  given to Erlang through `ERL_EPMD_PORT`), its own node name, mnesia, log and plugin files, and
  `RABBITMQ_CONF_ENV_FILE=/dev/null` so that `/etc/rabbitmq/rabbitmq-env.conf` is not read;
* free loopback ports: plain AMQP, AMQPS (`verify_peer` without `fail_if_no_peer_cert`, so both
  server-verified and mutual TLS work) and the distribution port.

It waits with `rabbitmqctl wait` (at most `START_TIMEOUT`; on failure the node's log tail is in
the message) and stops everything it started by PID at the end: SIGTERM, then SIGKILL after a
bounded wait. Without `rabbitmq-server` the tests are skipped with the reason, or fail when `CI`
is set. The start-up time is in `TlsBroker.startup_s` and printed to the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.rabbitmq import AmqpVhost

__all__ = ["START_TIMEOUT", "TlsBroker", "make_ca", "tls_broker"]

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"
LOOPBACK = "127.0.0.1"
UNNAMED_LOOPBACK = "127.0.0.2"
SERVER_NAME = "localhost"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class TlsBroker:
    """The running private node; paths are PEM files, readable by any test process."""

    host: str  # the name in the server certificate
    port: int  # AMQPS, on 127.0.0.1 (in the certificate) and on `unnamed_address` (not in it)
    unnamed_address: str
    plain_port: int  # AMQP without TLS, for the test's own publisher
    ca_file: Path
    client_cert: Path
    client_key: Path
    #: A second CA that signed nothing the broker presents.
    other_ca_file: Path
    username: str
    password: str
    node: str
    startup_s: float
    log_dir: Path
    #: The environment that reaches this node with `rabbitmqctl` (cookie, epmd port).
    ctl_env: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def log_text(self) -> str:
        """The node's own log so far, for diagnostics."""
        try:
            return (self.log_dir / f"{self.node}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS` against this node: its stdout (raises on failure)."""
        return _rabbitmqctl(self.node, self.ctl_env, args, timeout)

    def amqps_dsn(self, host: str | None = None, vhost: str = "/", **options: str) -> str:
        """`amqps://…` to this node; `options` become the URL's query (`cafile=…` etc.)."""
        query = "&".join(f"{key}={quote(value, safe='/')}" for key, value in options.items())
        url = (
            f"amqps://{self.username}:{self.password}@{host or self.host}:{self.port}"
            f"/{quote(vhost, safe='')}"
        )
        return f"{url}?{query}" if query else url

    @property
    def plain(self) -> AmqpVhost:
        """The default vhost over plain AMQP, for `JobClient` and `PollerFactory`."""
        return AmqpVhost(
            name="/",
            host=LOOPBACK,
            port=self.plain_port,
            username=self.username,
            password=self.password,
        )


# ------------------------------------------------------------------------------ certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )


def make_ca(
    directory: Path, stem: str, common_name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA; writes `<stem>.pem` (and its key, `<stem>.key`) into `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(directory / f"{stem}.pem", cert)
    _write_key(directory / f"{stem}.key", key)
    return cert, key


def _leaf(
    directory: Path,
    stem: str,
    common_name: str,
    *,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    _write_cert(directory / f"{stem}.pem", builder.sign(ca_key, hashes.SHA256()))
    _write_key(directory / f"{stem}.key", key)


def _make_certificates(directory: Path) -> None:
    directory.mkdir(parents=True)
    ca = make_ca(directory, "ca", "usm-test-ca")
    make_ca(directory, "other-ca", "usm-other-ca")
    san: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME),
        x509.IPAddress(ipaddress.IPv4Address(LOOPBACK)),
    ]
    _leaf(directory, "server", SERVER_NAME, ca=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    _leaf(directory, "client", "usm-poller", ca=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    for path in directory.iterdir():
        path.chmod(0o644)


# ------------------------------------------------------------------------------ the node


def _rabbitmqctl(node: str, env: dict[str, str], args: tuple[str, ...], timeout: float) -> str:
    """`rabbitmqctl -n NODE ARGS`: its stdout; a RuntimeError with its output when it fails."""
    done = subprocess.run(
        [str(RABBITMQCTL), "-n", node, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[:500]}"
        )
    return done.stdout


def _free_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path.name}: missing)"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop(procs: list[subprocess.Popen[bytes]], pids: list[int], timeout: float) -> None:
    """SIGTERM every PID, wait at most `timeout` in total, then SIGKILL whatever is left."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()  # reap our own children
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _epmd_pids(port: int) -> list[int]:
    """PIDs listening on our epmd port (the one we started, or one Erlang started itself)."""
    done = subprocess.run(
        ["ss", "-Hlntp", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    pids = set()
    for field in done.stdout.replace(",", " ").split():
        if field.startswith("pid="):
            with contextlib.suppress(ValueError):
                pids.add(int(field.removeprefix("pid=")))
    return sorted(pids)


#: What `rabbitmqctl` (and, unless told otherwise, the node) gives Erlang: loopback only.
LOOPBACK_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"


def _private_env(
    root: Path, epmd_port: int, server_erl_args: str = LOOPBACK_ERL_ARGS
) -> dict[str, str]:
    """The environment shared by a private node's processes: a HOME with a fresh Erlang cookie
    under `root`, our epmd's port, and nothing from the machine's own RABBITMQ_/ERL_ variables
    or /etc/rabbitmq/rabbitmq-env.conf."""
    home = root / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    return env | {
        "HOME": str(home),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": LOOPBACK,
        "RABBITMQ_CONF_ENV_FILE": "/dev/null",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": server_erl_args,
        "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_ERL_ARGS,
    }


def _node_env(
    root: Path, name: str, port: int, dist_port: int, plugins_file: Path
) -> dict[str, str]:
    """One node's own variables: its name, ports, and files under `root`."""
    return {
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins_file),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(root / "plugins-expand"),
    }


def _start_epmd(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Our own epmd in the foreground, listening within 10 s (else it is stopped, and an error).

    We own its PID, and Erlang finds it on ERL_EPMD_PORT instead of starting a daemon of its own.
    """
    epmd = subprocess.Popen(
        ["epmd", "-port", str(port), "-address", LOOPBACK],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not _listening(port):
        if epmd.poll() is not None or time.monotonic() > deadline:
            _stop([epmd], [epmd.pid], 5.0)
            raise RuntimeError(f"epmd did not listen on {LOOPBACK}:{port}")
        time.sleep(0.05)
    return epmd


def _spawn_server(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`rabbitmq-server` in `root`, its own session; its output appended to log/stdout.log."""
    (root / "log").mkdir(parents=True, exist_ok=True)
    with (root / "log" / "stdout.log").open("ab") as out:
        return subprocess.Popen(
            [str(RABBITMQ_SERVER)],
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _config(tls: Path, plain_port: int, amqps_port: int) -> str:
    return "\n".join(
        [
            f"listeners.tcp.default = {LOOPBACK}:{plain_port}",
            f"listeners.ssl.default = {LOOPBACK}:{amqps_port}",
            # The same listener on an address the server certificate does not name.
            f"listeners.ssl.unnamed = {UNNAMED_LOOPBACK}:{amqps_port}",
            f"ssl_options.cacertfile = {tls / 'ca.pem'}",
            f"ssl_options.certfile = {tls / 'server.pem'}",
            f"ssl_options.keyfile = {tls / 'server.key'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "log.console = false",
            "log.file.level = info",
            "",
        ]
    )


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the private RabbitMQ node is started as root (Debian's package layout)"
    for path in (RABBITMQ_SERVER, RABBITMQCTL):
        if not path.exists():
            return f"{path} is missing (apt-get install rabbitmq-server)"
    if shutil.which("epmd") is None:
        return "epmd is not on PATH"
    if shutil.which("ss") is None:
        return "ss (iproute2) is not on PATH"
    return None


def _start(root: Path) -> tuple[TlsBroker, list[subprocess.Popen[bytes]]]:
    tls = root / "tls"
    _make_certificates(tls)
    plain_port, amqps_port, dist_port, epmd_port = _free_ports(4)
    node = f"usm-tls-{os.getpid()}@localhost"
    (root / "log").mkdir()
    (root / "rabbitmq.conf").write_text(_config(tls, plain_port, amqps_port))
    (root / "advanced.config").write_text("[].\n")
    (root / "enabled_plugins").write_text("[].\n")
    env = _private_env(root, epmd_port)
    env |= _node_env(root, node, plain_port, dist_port, root / "enabled_plugins")
    epmd = _start_epmd(env, epmd_port)
    procs: list[subprocess.Popen[bytes]] = [epmd]
    started = time.monotonic()
    server = _spawn_server(root, env)
    procs.append(server)
    broker = TlsBroker(
        host=SERVER_NAME,
        port=amqps_port,
        unnamed_address=UNNAMED_LOOPBACK,
        plain_port=plain_port,
        ca_file=tls / "ca.pem",
        client_cert=tls / "client.pem",
        client_key=tls / "client.key",
        other_ca_file=tls / "other-ca.pem",
        username="guest",
        password="guest",
        node=node,
        startup_s=0.0,
        log_dir=root / "log",
        ctl_env=env,
    )
    try:
        _wait_started(root, env, server, broker, started)
    except BaseException:
        _teardown(root, procs, epmd_port)
        raise
    elapsed = time.monotonic() - started
    return dataclasses.replace(broker, startup_s=round(elapsed, 2)), procs


def _wait_started(
    root: Path,
    env: dict[str, str],
    server: subprocess.Popen[bytes],
    broker: TlsBroker,
    started: float,
) -> None:
    """`rabbitmqctl wait` plus both listeners, within START_TIMEOUT; else fail with the logs."""
    deadline = started + START_TIMEOUT
    waiter = subprocess.Popen(
        [
            str(RABBITMQCTL),
            "-n",
            broker.node,
            "wait",
            "--timeout",
            str(int(START_TIMEOUT)),
            str(root / "rabbitmq.pid"),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        problem = ""
        while time.monotonic() < deadline:
            if server.poll() is not None:
                problem = f"rabbitmq-server exited with {server.returncode}"
                break
            code = waiter.poll()
            if code is not None and code != 0:
                out = waiter.stdout.read().decode(errors="replace") if waiter.stdout else ""
                problem = f"rabbitmqctl wait exited {code}: {out.strip()[-500:]}"
                break
            if code == 0 and _listening(broker.plain_port) and _listening(broker.port):
                return
            time.sleep(0.1)
        else:
            problem = f"not up after {START_TIMEOUT:g} s"
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait(timeout=10)
        if waiter.stdout:
            waiter.stdout.close()
    logs = [_tail(path) for path in sorted((root / "log").glob("*.log"))]
    pytest.fail(f"private RabbitMQ node {broker.node}: {problem}\n" + "\n".join(logs))


def _teardown(root: Path, procs: list[subprocess.Popen[bytes]], epmd_port: int) -> None:
    epmd, *rest = procs
    server_pids = [proc.pid for proc in rest]
    beam = _pid_from(root / "rabbitmq.pid")  # read first: a stopping node deletes it
    if beam is not None:
        server_pids.append(beam)
    _stop(rest, server_pids, STOP_TIMEOUT)
    # Then epmd: ours, and any other listener on our private port (by PID, never by name).
    epmd_pids = sorted({epmd.pid, *_epmd_pids(epmd_port)})
    _stop([epmd], epmd_pids, 5.0)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_broker(request: pytest.FixtureRequest) -> Iterator[TlsBroker]:
    """One private RabbitMQ node with AMQPS for the whole session (see the module docstring)."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the TLS broker is required in CI: {reason}")
        pytest.skip(f"no private TLS broker: {reason}")
    root = Path(tempfile.mkdtemp(prefix="usm-tls-rmq-"))
    try:
        broker, procs = _start(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"tls_broker: {broker.node} up in {broker.startup_s:.1f} s "
            f"(amqps {broker.port}, amqp {broker.plain_port})"
        )
    try:
        yield broker
    finally:
        _teardown(root, procs, int(broker.ctl_env["ERL_EPMD_PORT"]))
