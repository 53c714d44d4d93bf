"""`ssh.exec` over asyncssh: pooled connections, one channel per command, and the host-key policy.

This is the only module that imports asyncssh. `cli.py` gets its SSH connection options (host-key
check, credentials) from `SshHostKeys.connect_kwargs` and maps SSH failures with
`map_connect_error`, so both SSH kinds follow one policy:

- a pinned `auth.host_key` wins; else an entry for the host in `USM_POLLER_KNOWN_HOSTS`; else
  trust-on-first-use in `USM_POLLER_SSH_TOFU_FILE` (first-seen keys are reported in the result);
- the key is checked during key exchange, before any credential is sent;
- asyncssh's host-key check is never switched off.

Connections are pooled per (host, port, user, credential digest, host-key expectation): jobs
share one connection per key, each command on its own channel, at most
`USM_POLLER_SSH_SESSIONS_PER_DEVICE` channels at once per host, at most
`USM_POLLER_SSH_MAX_CONNECTIONS` open connections per process (idle ones are closed first), and
a connection idle for `USM_POLLER_SSH_IDLE_TIMEOUT` seconds is closed. A pooled connection found
dead when a command is started is replaced once, transparently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, TypedDict

import asyncssh
import structlog

from poller.drivers.base import Auth, Data, JobContext
from poller.errors import (
    DeviceAuthError,
    DeviceTimeoutError,
    DeviceUnreachableError,
    HostKeyMismatchError,
    InternalJobError,
    JobError,
    OutputTooLargeError,
)
from poller.wire import CliAuth, JobKind, JobRequest, SshExecJob

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from pydantic import JsonValue, SecretStr

    from poller.config import PollerSettings

__all__ = [
    "DEADLINE_MARGIN",
    "SSH_ERRORS",
    "HostKeyCheck",
    "SshConnectKwargs",
    "SshExecDriver",
    "SshHostKeys",
    "map_connect_error",
    "shared_host_keys",
]

log = structlog.get_logger(__name__)

#: Seconds kept back from the job deadline, so that the driver (with partial data) rather than
#: the runner's own timer reports the timeout.
DEADLINE_MARGIN = 0.05
SSH_PORT = 22
_READ_CHUNK = 65536
#: How often the known_hosts file is checked for changes.
_KNOWN_HOSTS_RECHECK = 5.0

HostKeySource = Literal["pinned", "known_hosts", "tofu"]


# --------------------------------------------------------------------------------------------
# Host keys


def host_spec(host: str, port: int) -> str:
    """The OpenSSH known_hosts name of a host: `host`, or `[host]:port` off port 22."""
    return host if port == SSH_PORT else f"[{host}]:{port}"


def _public_line(key: asyncssh.SSHKey) -> str:
    """`type base64` of a public key, without its comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def parse_public_key(text: str) -> asyncssh.SSHKey:
    """An OpenSSH public key (`type base64 [comment]`), also accepted with a leading host field."""
    text = text.strip()
    try:
        return asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError):
        parts = text.split()
        if len(parts) >= 3:
            with contextlib.suppress(asyncssh.KeyImportError, ValueError):
                return asyncssh.import_public_key(" ".join(parts[1:3]))
    raise HostKeyMismatchError("auth.host_key is not an OpenSSH public key") from None


class TofuStore:
    """Trust-on-first-use host keys, in OpenSSH known_hosts format, one file per satellite.

    Lookups and first-seen decisions happen on the event loop (asyncssh asks synchronously during
    key exchange); file reads and appends run in a thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, list[asyncssh.SSHKey]] | None = None
        self._pending: list[str] = []
        #: Serialises appends (they run in worker threads); no asyncio primitive, so one store
        #: can serve the drivers of a process whatever loop they run on.
        self._file_lock = threading.Lock()

    async def load(self) -> None:
        if self._keys is not None:
            return
        keys = await asyncio.to_thread(self._read)
        if self._keys is None:  # another job may have loaded it meanwhile
            self._keys = keys

    def _read(self) -> dict[str, list[asyncssh.SSHKey]]:
        return _parse_known_hosts(_read_optional(self.path), str(self.path))

    def lookup(self, spec: str) -> list[asyncssh.SSHKey]:
        assert self._keys is not None, "load() first"
        return list(self._keys.get(spec, ()))

    def accept(self, spec: str, key: asyncssh.SSHKey) -> Literal["new", "known", "mismatch"]:
        """Whether `key` may be trusted for `spec`; records it when the host is new."""
        assert self._keys is not None, "load() first"
        known = self._keys.get(spec)
        if known:
            return "known" if key in known else "mismatch"
        self._keys[spec] = [key]
        self._pending.append(f"{spec} {_public_line(key)}\n")
        return "new"

    async def flush(self) -> None:
        """Append the keys recorded since the last flush to the file."""
        lines, self._pending = self._pending, []
        if lines:
            await asyncio.to_thread(self._append, lines)
            log.info("ssh_host_key_recorded", file=str(self.path), entries=len(lines))

    def _append(self, lines: list[str]) -> None:
        with self._file_lock:
            _append_lines(self.path, lines)


def _read_optional(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())


def _parse_known_hosts(text: str, where: str) -> dict[str, list[asyncssh.SSHKey]]:
    keys: dict[str, list[asyncssh.SSHKey]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            key = asyncssh.import_public_key(" ".join(parts[1:3]))
        except (asyncssh.KeyImportError, ValueError, IndexError):
            log.warning("ssh_tofu_line_ignored", file=where, line=number)
            continue
        for name in parts[0].split(","):
            keys.setdefault(name, []).append(key)
    return keys


@dataclass(slots=True)
class HostKeyCheck:
    """The host-key expectation of one connection attempt, and what it saw."""

    source: HostKeySource
    spec: str
    trusted: list[asyncssh.SSHKey] = field(default_factory=list)
    known_hosts: asyncssh.SSHKnownHosts | None = None
    tofu: TofuStore | None = None
    first_seen: bool = False

    def known_hosts_arg(self) -> object:
        """asyncssh's `known_hosts`: the file's entries, or exactly the trusted keys (maybe none).

        Never None: with no trusted key every key goes through `validate`.
        """
        if self.known_hosts is not None:
            return self.known_hosts
        return (self.trusted, [], [], [], [], [], [])

    def validate(self, key: asyncssh.SSHKey) -> bool:
        """Called for a key that is not already trusted: only TOFU of a new host accepts it."""
        if self.source != "tofu" or self.tofu is None or self.trusted:
            return False
        verdict = self.tofu.accept(self.spec, key)
        self.first_seen = verdict == "new"
        return verdict != "mismatch"

    def report(
        self, conn: asyncssh.SSHClientConnection | None, *, opened_here: bool = True
    ) -> dict[str, JsonValue]:
        """What the result says about the host key: source, fingerprint, and the key if new."""
        first_seen = self.first_seen and opened_here
        out: dict[str, JsonValue] = {"source": self.source, "first_seen": first_seen}
        key = conn.get_server_host_key() if conn is not None else None
        if key is not None:
            out["fingerprint"] = key.get_fingerprint("sha256")
            if first_seen:
                out["key"] = _public_line(key)
        return out


class _CheckingClient(asyncssh.SSHClient):
    """An asyncssh client that asks a `HostKeyCheck` about keys known_hosts did not vouch for."""

    def __init__(self, check: HostKeyCheck) -> None:
        self._check = check

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        return self._check.validate(key)


class _RevealOnCall:
    """A password for asyncssh, which calls a callable password once when it authenticates.

    Its repr is masked, so the secret stays out of reprs of option dicts, scrapli's driver repr
    and rendered tracebacks.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: SecretStr) -> None:
        self._secret = secret

    def __call__(self) -> str:
        return self._secret.get_secret_value()

    def __repr__(self) -> str:
        return "'**********'"


class SshConnectKwargs(TypedDict):
    """Keyword arguments for `asyncssh.connect` (also passed to scrapli's asyncssh transport)."""

    username: str
    password: _RevealOnCall | None
    client_keys: list[asyncssh.SSHKey] | None
    known_hosts: object
    client_factory: object
    config: list[str]
    agent_path: None
    gss_auth: bool
    gss_kex: bool
    x509_trusted_certs: None
    host_based_auth: bool
    preferred_auth: str


class SshHostKeys:
    """The host-key policy, shared by `ssh.exec` and `ssh.cli` of one process."""

    def __init__(self, *, known_hosts_file: Path | None, tofu_path: Path) -> None:
        self._known_db_path = known_hosts_file
        self._known_db: asyncssh.SSHKnownHosts | None = None
        self._known_db_mtime: float | None = None
        self._known_db_checked = float("-inf")
        self.tofu = TofuStore(tofu_path)

    async def _current_known_hosts(self) -> asyncssh.SSHKnownHosts | None:
        path = self._known_db_path
        if path is None:
            return None
        now = time.monotonic()
        if now - self._known_db_checked < _KNOWN_HOSTS_RECHECK:
            return self._known_db
        self._known_db_checked = now
        try:
            mtime = (await asyncio.to_thread(path.stat)).st_mtime
        except OSError:
            log.warning("ssh_known_hosts_unreadable", file=str(path))
            self._known_db, self._known_db_mtime = None, None
            return None
        if mtime != self._known_db_mtime:
            try:
                self._known_db = await asyncio.to_thread(_load_known_hosts, path)
            except (ValueError, asyncssh.KeyImportError):
                log.warning("ssh_known_hosts_invalid", file=str(path))
                self._known_db = None
            self._known_db_mtime = mtime
        return self._known_db

    async def check_for(self, host: str, port: int, pinned: str | None) -> HostKeyCheck:
        """The expectation for a connection to host:port: pinned, known_hosts or TOFU."""
        spec = host_spec(host, port)
        if pinned:
            return HostKeyCheck("pinned", spec, trusted=[parse_public_key(pinned)])
        known = await self._current_known_hosts()
        if known is not None:
            addr = host if _is_ip(host) else ""
            matched = known.match(host, addr, None if port == SSH_PORT else port)
            if matched[0] or matched[1]:
                return HostKeyCheck("known_hosts", spec, known_hosts=known)
        await self.tofu.load()
        return HostKeyCheck("tofu", spec, trusted=self.tofu.lookup(spec), tofu=self.tofu)

    async def connect_kwargs(
        self, host: str, port: int, auth: CliAuth
    ) -> tuple[SshConnectKwargs, HostKeyCheck]:
        """Options for one connection to host:port with `auth`, and its host-key check."""
        check = await self.check_for(host, port, auth.host_key)
        if not auth.username:
            raise DeviceAuthError("SSH needs auth.username")
        password = _RevealOnCall(auth.password) if auth.password else None
        keys = (
            [_load_private_key(auth.private_key.get_secret_value())] if auth.private_key else None
        )
        if password is None and keys is None:
            raise DeviceAuthError("SSH needs auth.password or auth.private_key")
        kwargs = SshConnectKwargs(
            username=auth.username,
            password=password,
            client_keys=keys,
            known_hosts=check.known_hosts_arg(),
            client_factory=lambda: _CheckingClient(check),
            # Nothing from the poller host's own ~/.ssh: no config, agent, default keys or CAs.
            config=[],
            agent_path=None,
            gss_auth=False,
            gss_kex=False,
            x509_trusted_certs=None,
            host_based_auth=False,
            preferred_auth="publickey,keyboard-interactive,password",
        )
        return kwargs, check

    async def flush(self) -> None:
        await self.tofu.flush()


def _load_known_hosts(path: Path) -> asyncssh.SSHKnownHosts:
    return asyncssh.import_known_hosts(_read_optional(path))


#: One host-key policy per (known_hosts, TOFU file) in a process: ssh.exec and ssh.cli share it,
#: so both see a key the other recorded first.
_SHARED: dict[tuple[Path | None, Path], SshHostKeys] = {}


def shared_host_keys(settings: PollerSettings) -> SshHostKeys:
    """The process's `SshHostKeys` for these settings."""
    key = (settings.known_hosts, settings.tofu_path)
    if key not in _SHARED:
        _SHARED[key] = SshHostKeys(known_hosts_file=key[0], tofu_path=key[1])
    return _SHARED[key]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _load_private_key(text: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_private_key(text)
    except (asyncssh.KeyImportError, ValueError):
        raise DeviceAuthError(
            "auth.private_key could not be read (PEM or OpenSSH format, without a passphrase)"
        ) from None


def map_connect_error(exc: BaseException, target: str) -> JobError | None:
    """The job error for a failure to open an SSH connection, or None if it is not one."""
    if isinstance(exc, JobError):
        return exc
    for kind, make in _CONNECT_ERRORS:
        if isinstance(exc, kind):
            return make(exc, target)
    return None


def _os_error(exc: BaseException, target: str) -> JobError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return DeviceUnreachableError(f"{target} cannot be reached: {reason}")


def _disconnect(exc: BaseException, target: str) -> JobError:
    reason = exc.reason if isinstance(exc, asyncssh.DisconnectError) else str(exc)
    return DeviceUnreachableError(f"{target} ended SSH setup: {reason}")


#: Checked in order: the first matching class wins (TimeoutError is also an OSError).
_CONNECT_ERRORS: list[tuple[type[BaseException], Callable[[BaseException, str], JobError]]] = [
    (
        asyncssh.HostKeyNotVerifiable,
        lambda _, t: HostKeyMismatchError(
            f"the host key of {t} does not match the expected key; no credentials were sent"
        ),
    ),
    (asyncssh.PermissionDenied, lambda _, t: DeviceAuthError(f"{t} rejected the credentials")),
    (TimeoutError, lambda _, t: DeviceTimeoutError(f"{t} did not answer in time")),
    (
        ConnectionRefusedError,
        lambda _, t: DeviceUnreachableError(f"{t} refused the connection"),
    ),
    (
        asyncssh.ConnectionLost,
        lambda _, t: DeviceUnreachableError(f"{t} closed the connection during SSH setup"),
    ),
    (asyncssh.DisconnectError, _disconnect),
    (OSError, _os_error),
]


# --------------------------------------------------------------------------------------------
# Connection pool


@dataclass(frozen=True, slots=True)
class PoolKey:
    host: str
    port: int
    username: str
    #: Keyed digest of the credentials: a job never rides on a connection another secret opened.
    credentials: str
    #: "" under the shared policy, else the pinned key: a job pinning another key opens its own.
    host_key: str


@dataclass(slots=True)
class _Entry:
    key: PoolKey
    conn: asyncssh.SSHClientConnection
    check: HostKeyCheck
    users: int = 0
    idle_timer: asyncio.TimerHandle | None = None
    closed: bool = False

    @property
    def alive(self) -> bool:
        return not self.closed and not self.conn.is_closed()


@dataclass(slots=True)
class _Lease:
    entry: _Entry
    #: True when this job opened the connection (nothing to replace if it fails).
    fresh: bool


class _KeyedLimiter:
    """At most `limit` holders at once per key; keys with no holder are forgotten."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        sem, refs = self._slots.setdefault(key, (asyncio.Semaphore(self._limit), [0]))
        refs[0] += 1
        try:
            async with sem:
                yield
        finally:
            refs[0] -= 1
            if refs[0] == 0:
                del self._slots[key]


class SshPool:
    """Open SSH connections shared by jobs; see the module docstring for the limits."""

    def __init__(
        self, host_keys: SshHostKeys, *, idle_timeout: float, max_connections: int
    ) -> None:
        self._host_keys = host_keys
        self._idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._entries: dict[PoolKey, _Entry] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._digest_key = secrets.token_bytes(32)
        #: Connections opened since start (for tests and the benchmark).
        self.opened = 0

    def key_for(self, host: str, port: int, auth: CliAuth) -> PoolKey:
        digest = hmac.new(self._digest_key, digestmod=hashlib.sha256)
        for secret in (auth.password, auth.private_key):
            digest.update(b"\0" + (secret.get_secret_value().encode() if secret else b"-"))
        return PoolKey(
            host, port, auth.username or "", digest.hexdigest()[:32], (auth.host_key or "").strip()
        )

    @property
    def open_connections(self) -> int:
        return len(self._entries)

    async def acquire(self, key: PoolKey, auth: CliAuth) -> _Lease:
        """A live connection for `key`: the pooled one, or a new one (single-flight per key)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and entry.alive:
                self._use(entry)
                return _Lease(entry, fresh=False)
            if entry is not None:
                self._discard(entry)
            entry = await self._open(key, auth)
            self._use(entry)
            return _Lease(entry, fresh=True)

    async def replace(self, lease: _Lease, auth: CliAuth) -> None:
        """Swap a lease's dead connection for a new one."""
        old = lease.entry
        self.release(old)
        self._discard(old)
        lease.entry = (await self.acquire(old.key, auth)).entry
        lease.fresh = True

    def release(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users > 0 or entry.closed:
            return
        if self._idle_timeout <= 0 or not entry.alive:
            self._discard(entry)
            return
        loop = asyncio.get_running_loop()
        entry.idle_timer = loop.call_later(self._idle_timeout, self._expire, entry)

    def _use(self, entry: _Entry) -> None:
        entry.users += 1
        if entry.idle_timer is not None:
            entry.idle_timer.cancel()
            entry.idle_timer = None

    def _expire(self, entry: _Entry) -> None:
        if entry.users == 0:
            log.debug("ssh_connection_idle_closed", host=entry.key.host, port=entry.key.port)
            self._discard(entry)

    def _discard(self, entry: _Entry) -> None:
        if entry.closed:
            return
        entry.closed = True
        if entry.idle_timer is not None:
            entry.idle_timer.cancel()
            entry.idle_timer = None
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            lock = self._locks.get(entry.key)
            if lock is not None and not lock.locked():
                del self._locks[entry.key]
        entry.conn.close()
        self._slots.release()

    async def _reserve_slot(self) -> None:
        while self._slots.locked():
            idle = [e for e in self._entries.values() if e.users == 0]
            if not idle:
                break
            self._discard(idle[0])  # dicts keep insertion order: the oldest idle one goes
        await self._slots.acquire()

    async def _open(self, key: PoolKey, auth: CliAuth) -> _Entry:
        await self._reserve_slot()
        try:
            kwargs, check = await self._host_keys.connect_kwargs(key.host, key.port, auth)
            try:
                conn = await asyncssh.connect(key.host, key.port, **kwargs)
            finally:
                await self._host_keys.flush()
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        entry = _Entry(key, conn, check)
        self._entries[key] = entry
        log.debug("ssh_connection_opened", host=key.host, port=key.port, source=check.source)
        return entry

    async def aclose(self) -> None:
        entries = list(self._entries.values())
        for entry in entries:
            self._discard(entry)
        for entry in entries:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.conn.wait_closed(), timeout=5.0)


# --------------------------------------------------------------------------------------------
# ssh.exec


class _Budget:
    """What is left of the job's output cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> int:
        """How many of `size` more bytes fit; the rest is over the cap."""
        fits = max(0, min(size, self.limit - self.used))
        self.used += size
        return fits


class _OverCapError(Exception):
    """Raised inside a command's readers when the output cap is reached."""


@dataclass(slots=True)
class _CommandOutput:
    command: str
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit_status: int | None = None

    def to_data(self) -> dict[str, JsonValue]:
        return {
            "command": self.command,
            "exit_status": self.exit_status,
            "stdout": self.stdout.decode("utf-8", errors="replace"),
            "stderr": self.stderr.decode("utf-8", errors="replace"),
        }


#: What opening or using an SSH connection raises besides `JobError`s (for `map_connect_error`).
SSH_ERRORS: tuple[type[Exception], ...] = (asyncssh.Error, OSError)


def _setup_error(exc: BaseException, target: str) -> JobError:
    return map_connect_error(exc, target) or _disconnect(exc, target)


_DEAD_CONNECTION_ERRORS = (asyncssh.DisconnectError, ConnectionError, BrokenPipeError, EOFError)


class SshExecDriver:
    """Runs `ssh.exec`: each command on its own channel of a pooled connection."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.SSH_EXEC})

    def __init__(
        self,
        host_keys: SshHostKeys,
        *,
        idle_timeout: float = 60.0,
        max_connections: int = 256,
        sessions_per_device: int = 4,
    ) -> None:
        self.host_keys = host_keys
        self.pool = SshPool(host_keys, idle_timeout=idle_timeout, max_connections=max_connections)
        self._sessions = _KeyedLimiter(sessions_per_device)

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> SshExecDriver:
        return cls(
            shared_host_keys(settings),
            idle_timeout=settings.ssh_idle_timeout,
            max_connections=settings.ssh_max_connections,
            sessions_per_device=settings.ssh_sessions_per_device,
        )

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        if not isinstance(job, SshExecJob):
            raise InternalJobError(f"{type(self).__name__} cannot run {job.kind}")
        if not isinstance(auth, CliAuth):
            raise DeviceAuthError("ssh.exec needs SSH credentials (auth.username and a secret)")
        port = job.target.port or SSH_PORT
        target = f"{job.target.host}:{port}"
        outputs: list[_CommandOutput] = []
        lease: _Lease | None = None
        budget = _Budget(ctx.max_output_bytes)
        try:
            async with asyncio.timeout_at(ctx.deadline - DEADLINE_MARGIN):
                key = self.pool.key_for(job.target.host, port, auth)
                try:
                    lease = await self.pool.acquire(key, auth)
                except SSH_ERRORS as exc:
                    raise _setup_error(exc, target) from None
                for command in job.params.commands:
                    output = _CommandOutput(command)
                    outputs.append(output)
                    await self._run_command(lease, auth, output, budget, target)
        except TimeoutError:
            raise DeviceTimeoutError(
                f"{target} did not finish in time", data=_data(outputs, lease)
            ) from None
        except _OverCapError:
            raise OutputTooLargeError(
                f"output exceeds the cap of {budget.limit} bytes", data=_data(outputs, lease)
            ) from None
        except JobError as exc:
            exc.data = exc.data or (_data(outputs, lease) if outputs else None)
            raise
        finally:
            if lease is not None:
                self.pool.release(lease.entry)
        return _data(outputs, lease)

    async def _run_command(
        self, lease: _Lease, auth: CliAuth, output: _CommandOutput, budget: _Budget, target: str
    ) -> None:
        async with self._sessions.hold(lease.entry.key.host):
            process = await self._start(lease, auth, output.command, target)
            try:
                await _collect(process, output, budget)
            finally:
                process.close()
            status = process.exit_status
            output.exit_status = status if status is not None and status >= 0 else None

    async def _start(
        self, lease: _Lease, auth: CliAuth, command: str, target: str
    ) -> asyncssh.SSHClientProcess[bytes]:
        """Open a channel running `command`; replace a dead pooled connection once."""
        for attempt in (1, 2):
            try:
                return await lease.entry.conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                if lease.entry.alive:
                    raise DeviceUnreachableError(
                        f"{target} refused an SSH channel: {exc.reason}"
                    ) from None
                error: Exception = exc
            except _DEAD_CONNECTION_ERRORS as exc:
                error = exc
            if lease.fresh or attempt == 2:
                raise DeviceUnreachableError(
                    f"{target} closed the SSH connection ({type(error).__name__})"
                ) from None
            log.info(
                "ssh_connection_replaced", host=lease.entry.key.host, port=lease.entry.key.port
            )
            try:
                await self.pool.replace(lease, auth)
            except SSH_ERRORS as exc:
                raise _setup_error(exc, target) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.pool.aclose()


async def _collect(
    process: asyncssh.SSHClientProcess[bytes], output: _CommandOutput, budget: _Budget
) -> None:
    """Read stdout and stderr together (one could block the other) under the output cap."""
    process.stdin.write_eof()

    async def pump(stream: asyncssh.SSHReader[bytes], sink: bytearray) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            fits = budget.take(len(chunk))
            sink += chunk[:fits]
            if fits < len(chunk):
                raise _OverCapError

    readers = [
        asyncio.ensure_future(pump(process.stdout, output.stdout)),
        asyncio.ensure_future(pump(process.stderr, output.stderr)),
    ]
    try:
        done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        await process.wait_closed()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _data(outputs: list[_CommandOutput], lease: _Lease | None) -> Data:
    data: Data = {"results": [o.to_data() for o in outputs]}
    if lease is not None:
        data["host_key"] = lease.entry.check.report(lease.entry.conn, opened_here=lease.fresh)
        data["connection"] = {"reused": not lease.fresh}
    return data
