"""Where `satellite serve` listens: `USM_CORE_LISTEN`, binding, and serving one app on every socket.

```python
addresses = parse_listen(environ.get(LISTEN_ENV, DEFAULT_LISTEN))  # ListenError: exit 2
sockets = bind_all(addresses)                                     # ListenError: exit 2
server = ApiServer(app, sockets, shutdown_timeout=30.0)
loop.add_signal_handler(signal.SIGTERM, server.stop)               # the caller owns signals
await server.serve(ready=ready)                                    # returns after a graceful stop
```

`ListenError` is a `ConfigError`: its message is one line naming `USM_CORE_LISTEN` and the item.
`bind_all` is synchronous (it may resolve a host name): call it before serving, or in a thread.

A unix socket file is created with mode 0660 (owner and group read/write, where group is the
process's primary group, or the directory's group when the directory is set-group-ID); its
directory must exist. A socket file nobody answers on (a crashed replica's) is replaced; one
another process answers on is an error, and so is any other kind of file at that path, which is
never removed. On a graceful stop the socket files this server was given are removed (only while
they are still the files it bound: a successor's socket at the same path is left alone).

`transport(scope)` tells a request over a unix socket from one over TCP. It relies on what the
ASGI spec defines for `scope["server"]`: `[path, None]` for a unix socket, `[host, port]` for
TCP; uvicorn fills it from the listening socket's own name (`getsockname()`), so no client
header can change it. Anything else, including a missing `server`, counts as TCP: the
transport that needs a token (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn

from poller.errors import ConfigError
from poller.logging import get_logger

__all__ = [
    "BACKLOG",
    "DEFAULT_LISTEN",
    "LISTEN_ENV",
    "UNIX_SOCKET_MODE",
    "ApiServer",
    "ListenAddress",
    "ListenError",
    "ServeError",
    "TcpAddress",
    "Transport",
    "UnixAddress",
    "bind_all",
    "close_all",
    "parse_listen",
    "serve",
    "transport",
]

LISTEN_ENV = "USM_CORE_LISTEN"
DEFAULT_LISTEN = "unix:/run/satellite/api.sock,tcp:127.0.0.1:8480"
UNIX_SOCKET_MODE = 0o660
BACKLOG = 2048
"""Pending connections per socket (the kernel caps it at `net.core.somaxconn`); uvicorn's own."""
STALE_PROBE_TIMEOUT = 1.0
"""Seconds a connect to an existing socket file may take before it counts as live (backlog full)."""
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path on Linux, less the terminating NUL
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")

Transport = Literal["unix", "tcp"]
Scope = MutableMapping[str, Any]
Receive = Any
Send = Any

log = get_logger(__name__)


class ListenError(ConfigError):
    """`USM_CORE_LISTEN` is invalid or one of its addresses cannot be listened on (one line)."""


class ServeError(RuntimeError):
    """The server could not start (the application's lifespan start-up failed)."""


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """`unix:/path`: a unix stream socket file at an absolute path."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """`tcp:HOST:PORT`, `tcp:[IPv6]:PORT`; port 0 picks a free port (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


ListenAddress = UnixAddress | TcpAddress


# ----------------------------------------------------------------------------------- parsing


def parse_listen(value: str, *, env: str = LISTEN_ENV) -> list[ListenAddress]:
    """Parse a comma-separated list of `unix:/path` and `tcp:HOST:PORT`; raise `ListenError`."""
    if not value.strip():
        raise ListenError(f"{env}: is empty; give unix:/path and/or tcp:HOST:PORT")
    addresses: list[ListenAddress] = []
    for raw in value.split(","):
        item = raw.strip()
        try:
            address = _parse_item(item)
        except ValueError as exc:
            raise ListenError(f"{env}: {item!r}: {exc}") from None
        if address in addresses:
            raise ListenError(f"{env}: {item!r}: is listed twice")
        addresses.append(address)
    return addresses


def _parse_item(item: str) -> ListenAddress:
    if not item:
        raise ValueError("empty item (a stray comma?)")
    kind, sep, rest = item.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ValueError("expected unix:/path or tcp:HOST:PORT")
    if kind == "unix":
        return UnixAddress(_parse_unix_path(rest))
    return _parse_tcp(rest)


def _parse_unix_path(path: str) -> str:
    if path.startswith("@"):
        raise ValueError("abstract unix sockets are not supported; give a file path")
    if not path.startswith("/"):
        raise ValueError("the socket path must be absolute (unix:/run/satellite/api.sock)")
    if "\0" in path or path.endswith("/"):
        raise ValueError("not a valid socket file path")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(f"the socket path is longer than {_SUN_PATH_MAX} bytes")
    return os.path.normpath(path)


def _parse_tcp(rest: str) -> TcpAddress:
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError("expected tcp:[IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError("expected tcp:HOST:PORT (0.0.0.0 for every IPv4 address)")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: tcp:[::1]:8480")
        if not _is_ipv4(host) and not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not an IP address or host name")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"the port must be a number 0-65535, not {port!r}")
    return TcpAddress(host, int(port))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------- binding


def bind_all(addresses: Sequence[ListenAddress], *, env: str = LISTEN_ENV) -> list[socket.socket]:
    """Bind and listen on every address (a host name may give several); raise `ListenError`.

    On failure, every socket already bound is closed (and its socket file removed) first.
    """
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            if isinstance(address, UnixAddress):
                sockets.append(_bind_unix(address, env))
            else:
                sockets.extend(_bind_tcp(address, env))
    except BaseException:
        _close_all(sockets, remove_files=True)
        raise
    return sockets


def _bind_unix(address: UnixAddress, env: str) -> socket.socket:
    path = address.path
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ListenError(
            f"{env}: {address}: the directory {directory} does not exist (create it first)"
        )
    _clear_stale_socket(address, env)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        # Before listen(): until then every connect is refused, whatever the umask gave the file.
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise ListenError(f"{env}: {address}: cannot listen: {_reason(exc)}") from None
    return sock


def _clear_stale_socket(address: UnixAddress, env: str) -> None:
    """Remove a socket file nobody answers on; refuse a live socket or any other file."""
    path = address.path
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"{env}: {address}: cannot inspect the path: {_reason(exc)}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"{env}: {address}: exists and is not a socket (left as it is)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: nothing listens on it any more
    except FileNotFoundError:
        return  # removed meanwhile
    except (TimeoutError, BlockingIOError):
        # A full backlog: somebody listens but does not accept fast enough.
        raise ListenError(
            f"{env}: {address}: another process is listening on it (stop it, or listen elsewhere)"
        ) from None
    except OSError as exc:
        raise ListenError(
            f"{env}: {address}: an existing socket file cannot be probed ({_reason(exc)});"
            " left as it is"
        ) from None
    else:
        raise ListenError(
            f"{env}: {address}: another process is listening on it (stop it, or listen elsewhere)"
        )
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.warning("stale_socket_replaced", path=path)


def _bind_tcp(address: TcpAddress, env: str) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            address.host,
            address.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV,
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"{env}: {address}: cannot resolve {address.host}: {exc.strerror}"
        ) from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            key = (int(family), str(sockaddr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # `[::]` and `0.0.0.0` can then both be listed without colliding.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError as exc:
        _close_all(sockets, remove_files=False)
        raise ListenError(f"{env}: {address}: cannot listen: {_reason(exc)}") from None
    return sockets


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def close_all(sockets: Sequence[socket.socket]) -> None:
    """Close sockets from `bind_all` that will not be served, removing their socket files."""
    _close_all(sockets, remove_files=True)


def _close_all(sockets: Sequence[socket.socket], *, remove_files: bool) -> None:
    files = _unix_files(sockets) if remove_files else {}
    for sock in sockets:
        sock.close()
    _remove_files(files)


def _unix_files(sockets: Sequence[socket.socket]) -> dict[str, tuple[int, int]]:
    """The socket files of the unix sockets, with the (device, inode) each has now."""
    files: dict[str, tuple[int, int]] = {}
    for sock in sockets:
        if sock.family != socket.AF_UNIX or sock.fileno() < 0:
            continue
        name = sock.getsockname()
        if isinstance(name, str) and name.startswith("/"):
            with contextlib.suppress(OSError):
                info = os.lstat(name)
                if stat.S_ISSOCK(info.st_mode):
                    files[name] = (info.st_dev, info.st_ino)
    return files


def _remove_files(files: dict[str, tuple[int, int]]) -> None:
    """Unlink each socket file that is still the same file (not a successor's socket)."""
    for path, identity in files.items():
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == identity:
                os.unlink(path)


# ----------------------------------------------------------------------------------- serving


def transport(scope: Scope) -> Transport:
    """`unix` when the request came in on a unix socket, else `tcp` (see the module docstring)."""
    server = scope.get("server")
    if (
        isinstance(server, list | tuple)
        and len(server) == 2
        and isinstance(server[0], str)
        and server[1] is None
    ):
        return "unix"
    return "tcp"


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handlers, with start and stop hooks."""

    def __init__(self, config: uvicorn.Config, owner: ApiServer) -> None:
        super().__init__(config)
        self._owner = owner

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install SIGINT/SIGTERM handlers and re-raise the signal on exit; the
        # caller owns the signals and calls `ApiServer.stop()` instead.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._owner._started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._owner._stopping()
        await super().shutdown(sockets=sockets)


class _OneWriteTransport:
    """A response's transport that sends its status line and headers with its first body
    bytes: one send() per small response, so one wake-up of the client, not two.

    uvicorn writes the head (at `http.response.start`) and the body (at `http.response.body`)
    in two `transport.write()` calls, and asyncio sends each at once. Here the head waits for
    the next write of the same response, or for its end (a HEAD request, an empty body, a
    `close()`), whichever comes first; everything else goes through as it is, in order. An
    interim `100 Continue` is never held (the client waits for it before sending its body).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._seen_head = False

    def write(self, data: bytes) -> None:
        if not self._seen_head and data.startswith(b"HTTP/") and data[9:12] != b"100":
            self._seen_head = True
            self._head = data
            return
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self._transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _one_write_protocol() -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with `_OneWriteTransport` for each response; None without
    httptools (uvicorn's own choice then) or with a uvicorn whose internals differ."""
    try:
        from uvicorn.protocols.http.httptools_impl import (  # noqa: PLC0415 - optional
            HttpToolsProtocol,
            RequestResponseCycle,
        )
    except ImportError:
        return None
    if not hasattr(HttpToolsProtocol, "_start_asgi_task"):
        return None

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):
        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            transport = cycle.transport
            if not isinstance(transport, _OneWriteTransport):
                held = _OneWriteTransport(transport)
                # It writes, flushes, closes and hands every other call to the transport.
                cycle.transport = held  # type: ignore[assignment]
                done = cycle.on_response

                def on_response() -> None:
                    held.flush()  # a response that ended without a write after its head
                    done()

                cycle.on_response = on_response
            super()._start_asgi_task(cycle, app)

    return OneWriteHttpToolsProtocol


class ApiServer:
    """Serves one ASGI app with uvicorn on pre-bound sockets until `stop()` is called.

    `stop()` (safe from a signal handler or another thread: it only sets a flag uvicorn polls
    every 0.1 s) starts a graceful shutdown: the socket files are removed and the sockets
    closed, idle keep-alive connections are closed, requests in flight get up to
    `shutdown_timeout` seconds to finish (then they are cancelled), the app's lifespan shutdown
    runs, and `serve()` returns. Cancelling `serve()` instead stops at once, without draining.
    Proxy headers (`X-Forwarded-For`, `-Proto`) are ignored unless `proxy_headers` is set;
    uvicorn's access log is off (the app logs its own requests) and so is its logging set-up.
    """

    def __init__(
        self,
        app: Any,
        sockets: Sequence[socket.socket],
        *,
        shutdown_timeout: float = 30.0,
        proxy_headers: bool = False,
        forwarded_allow_ips: str | None = None,
        lifespan: Literal["auto", "on", "off"] = "auto",
        timeout_keep_alive: int = 5,
    ) -> None:
        if not sockets:
            raise ValueError("no sockets to serve on")
        self._sockets = list(sockets)
        self._ready: asyncio.Event | None = None
        self._files: dict[str, tuple[int, int]] = {}
        self._served = False
        config = uvicorn.Config(
            app,
            http=_one_write_protocol() or "auto",
            lifespan=lifespan,
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=proxy_headers,
            forwarded_allow_ips=forwarded_allow_ips,
            backlog=BACKLOG,
            timeout_keep_alive=timeout_keep_alive,
            # uvicorn types it as int but only hands it to asyncio.timeout().
            timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
        )
        self._server = _Server(config, self)

    @property
    def started(self) -> bool:
        """True once every socket accepts connections (and until `serve()` returns)."""
        return self._server.started and not self._server.should_exit

    def stop(self) -> None:
        """Begin the graceful shutdown (see the class docstring); idempotent."""
        self._server.should_exit = True

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop()`, setting `ready` once listening; `ServeError` if start-up fails."""
        if self._served:
            raise RuntimeError("an ApiServer serves once")
        self._served = True
        self._ready = ready
        self._files = _unix_files(self._sockets)
        try:
            await self._server.serve(sockets=self._sockets)
        except SystemExit:
            # uvicorn calls sys.exit() when the app's lifespan start-up fails.
            raise ServeError("the application's start-up failed (see the log above)") from None
        finally:
            self._stopping()
            # After a graceful stop these are closed already; after a cancellation they are not.
            for listener in getattr(self._server, "servers", []):
                listener.close()
            for sock in self._sockets:
                sock.close()

    def _started(self) -> None:
        log.info("listening", addresses=[_describe(sock) for sock in self._sockets])
        if self._ready is not None:
            self._ready.set()

    def _stopping(self) -> None:
        # First thing on the way out: new clients get "no such file" at once, and a successor
        # replica may bind the same path while this one drains.
        _remove_files(self._files)
        self._files = {}


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[0], name[1]
    return str(TcpAddress(str(host), int(port)))


async def serve(
    app: Any,
    sockets: Sequence[socket.socket],
    *,
    shutdown_timeout: float = 30.0,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    proxy_headers: bool = False,
    forwarded_allow_ips: str | None = None,
    lifespan: Literal["auto", "on", "off"] = "auto",
) -> None:
    """Serve `app` on `sockets` until `stop` is set, then shut down gracefully (see `ApiServer`).

    Without `stop` it serves until cancelled (no draining then); use `ApiServer` to call
    `stop()` from a signal handler.
    """
    server = ApiServer(
        app,
        sockets,
        shutdown_timeout=shutdown_timeout,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        lifespan=lifespan,
    )
    if stop is None:
        await server.serve(ready)
        return

    async def stop_on_event() -> None:
        await stop.wait()
        server.stop()

    watcher = asyncio.create_task(stop_on_event())
    try:
        await server.serve(ready)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
