"""`USM_CORE_LISTEN`: parsing, binding unix and TCP sockets, serving both with one uvicorn."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from poller.errors import ConfigError
from satellite.service.listen import (
    DEFAULT_LISTEN,
    UNIX_SOCKET_MODE,
    ApiServer,
    ListenError,
    ServeError,
    TcpAddress,
    UnixAddress,
    bind_all,
    parse_listen,
    serve,
    transport,
)

WAIT = 10.0  # generous bound on anything that should happen at once (CPU is shared)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for socket files (a unix socket path is at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------- parsing


def test_default_value_parses() -> None:
    assert parse_listen(DEFAULT_LISTEN) == [
        UnixAddress("/run/satellite/api.sock"),
        TcpAddress("127.0.0.1", 8480),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp:[::1]:8480", [TcpAddress("::1", 8480)]),
        ("tcp:0.0.0.0:80, tcp:[::]:80", [TcpAddress("0.0.0.0", 80), TcpAddress("::", 80)]),
        ("tcp:localhost:0", [TcpAddress("localhost", 0)]),
        ("unix:/run/x/../y/api.sock", [UnixAddress("/run/y/api.sock")]),
    ],
)
def test_good_values(value: str, expected: list[object]) -> None:
    assert parse_listen(value) == expected


def test_addresses_print_as_they_are_written() -> None:
    assert [str(a) for a in parse_listen("unix:/a/b.sock,tcp:[::1]:1,tcp:h:2")] == [
        "unix:/a/b.sock",
        "tcp:[::1]:1",
        "tcp:h:2",
    ]


@pytest.mark.parametrize(
    ("value", "item", "reason"),
    [
        ("", None, "is empty"),
        ("unix:/a.sock,", "", "empty item"),
        ("http://x:1", "http://x:1", "expected unix:/path or tcp:HOST:PORT"),
        ("unix:run/api.sock", "unix:run/api.sock", "must be absolute"),
        ("unix:@abstract", "unix:@abstract", "abstract unix sockets are not supported"),
        ("unix:/" + "x" * 120, "unix:/" + "x" * 120, "longer than 107 bytes"),
        ("tcp:127.0.0.1", "tcp:127.0.0.1", "expected tcp:HOST:PORT"),
        ("tcp::8480", "tcp::8480", "expected tcp:HOST:PORT"),
        ("tcp:::1:8480", "tcp:::1:8480", "an IPv6 address goes in brackets"),
        ("tcp:[::1]8480", "tcp:[::1]8480", "expected tcp:[IPv6]:PORT"),
        ("tcp:[1.2.3.4]:80", "tcp:[1.2.3.4]:80", "is not an IPv6 address"),
        ("tcp:127.0.0.1:65536", "tcp:127.0.0.1:65536", "the port must be a number 0-65535"),
        ("tcp:127.0.0.1:http", "tcp:127.0.0.1:http", "the port must be a number 0-65535"),
        ("tcp:bad_host!:80", "tcp:bad_host!:80", "is not an IP address or host name"),
        ("tcp:h:1,tcp:h:1", "tcp:h:1", "is listed twice"),
    ],
)
def test_bad_values_name_the_variable_and_the_item(
    value: str, item: str | None, reason: str
) -> None:
    with pytest.raises(ListenError) as caught:
        parse_listen(value)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI's exit-2 path
    assert message.startswith("USM_CORE_LISTEN: ")
    assert "\n" not in message
    if item is not None:
        assert f"{item!r}" in message
    assert reason in message


# ----------------------------------------------------------------------------------- binding


def test_unix_socket_is_0660_and_listening(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    old_umask = os.umask(0o022)  # the usual umask would take the group's write bit away
    try:
        [sock] = bind_all([UnixAddress(str(path))])
    finally:
        os.umask(old_umask)
    try:
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == UNIX_SOCKET_MODE == 0o660
        assert info.st_gid == os.getegid()
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # listening already: the connection waits in the backlog
        client.close()
    finally:
        sock.close()


def test_missing_directory_is_named(sock_dir: Path) -> None:
    path = sock_dir / "nope" / "api.sock"
    with pytest.raises(ListenError) as caught:
        bind_all([UnixAddress(str(path))])
    assert str(caught.value) == (
        f"USM_CORE_LISTEN: unix:{path}: the directory {path.parent} does not exist"
        " (create it first)"
    )


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays behind, as after a crash
    path.chmod(0o600)  # to tell it from the new one (the inode number may be reused)
    with capture_logs() as logs:
        [sock] = bind_all([UnixAddress(str(path))])
    try:
        assert logs == [
            {"event": "stale_socket_replaced", "path": str(path), "log_level": "warning"}
        ]
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
    finally:
        sock.close()


def test_live_socket_is_refused_and_kept(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.listen(5)
    try:
        inode = path.lstat().st_ino
        with pytest.raises(ListenError) as caught:
            bind_all([UnixAddress(str(path))])
        assert str(caught.value) == (
            f"USM_CORE_LISTEN: unix:{path}: another process is listening on it"
            " (stop it, or listen elsewhere)"
        )
        assert path.lstat().st_ino == inode
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # still the other process's
        client.close()
    finally:
        other.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_other_files_are_refused_and_never_deleted(sock_dir: Path, kind: str) -> None:
    path = sock_dir / "api.sock"
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(sock_dir / "elsewhere")
    with pytest.raises(ListenError) as caught:
        bind_all([UnixAddress(str(path))])
    assert str(caught.value) == (
        f"USM_CORE_LISTEN: unix:{path}: exists and is not a socket (left as it is)"
    )
    if kind == "file":
        assert path.read_text() == "precious\n"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink()


def test_tcp_socket_reuses_address_and_listens() -> None:
    [sock] = bind_all([TcpAddress("127.0.0.1", 0)])
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        client = socket.create_connection(sock.getsockname(), timeout=WAIT)
        client.close()
    finally:
        sock.close()


def test_ipv6_socket_is_v6_only() -> None:
    try:
        [sock] = bind_all([TcpAddress("::1", 0)])
    except ListenError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


def test_a_failure_closes_and_removes_what_was_bound(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ListenError) as caught:
            bind_all([UnixAddress(str(path)), TcpAddress("127.0.0.1", port)])
        assert str(caught.value) == (
            f"USM_CORE_LISTEN: tcp:127.0.0.1:{port}: cannot listen: Address already in use"
        )
        assert not path.exists()  # the unix socket bound first is gone again
    finally:
        taken.close()


def test_an_unresolvable_host_is_named() -> None:
    with pytest.raises(ListenError, match=r"^USM_CORE_LISTEN: tcp:no-such-host\.invalid:1: "):
        bind_all([TcpAddress("no-such-host.invalid", 1)])


# ----------------------------------------------------------------------------------- serving


class SlowGate:
    """Lets a test hold a request in flight: `entered` when it starts, `release` to finish."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


def make_app(gate: SlowGate | None = None) -> Starlette:
    async def where(request: Request) -> PlainTextResponse:
        return PlainTextResponse(transport(request.scope))

    async def slow(request: Request) -> PlainTextResponse:
        assert gate is not None
        gate.entered.set()
        await gate.release.wait()
        return PlainTextResponse("finished")

    return Starlette(routes=[Route("/where", where), Route("/slow", slow)])


@asynccontextmanager
async def running(
    sockets: list[socket.socket], app: Starlette, *, shutdown_timeout: float = 30.0
) -> AsyncIterator[tuple[ApiServer, asyncio.Task[None]]]:
    server = ApiServer(app, sockets, shutdown_timeout=shutdown_timeout)
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        yield server, task
    finally:
        server.stop()
        async with asyncio.timeout(WAIT + shutdown_timeout):
            await asyncio.gather(task, return_exceptions=True)


async def started(server: ApiServer) -> asyncio.Task[None]:
    """`server.serve()` as a task, once it is ready (within WAIT)."""
    ready = asyncio.Event()
    serving = asyncio.create_task(server.serve(ready))
    async with asyncio.timeout(WAIT):
        await ready.wait()
    return serving


async def slow_request(client: httpx.AsyncClient, gate: SlowGate) -> asyncio.Task[httpx.Response]:
    """GET /slow as a task, once the handler has been entered (within WAIT)."""
    in_flight = asyncio.create_task(client.get("/slow"))
    async with asyncio.timeout(WAIT):
        await gate.entered.wait()
    return in_flight


def unix_client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://api", timeout=WAIT
    )


async def test_one_server_serves_unix_and_tcp_and_tells_them_apart(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    sockets = bind_all([UnixAddress(str(path)), TcpAddress("127.0.0.1", 0)])
    host, port = sockets[1].getsockname()
    async with running(sockets, make_app()):
        async with unix_client(path) as client:
            response = await client.get("/where")
            assert (response.status_code, response.text) == (200, "unix")
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT) as client:
            response = await client.get("/where")
            assert (response.status_code, response.text) == (200, "tcp")
            assert "server" not in response.headers  # uvicorn does not advertise itself


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (("/run/satellite/api.sock", None), "unix"),
        (["/run/satellite/api.sock", None], "unix"),
        (("127.0.0.1", 8480), "tcp"),
        (("::1", 8480), "tcp"),
        (None, "tcp"),  # unknown: the transport that needs a token
        (("/run/satellite/api.sock",), "tcp"),
        ((None, None), "tcp"),
    ],
)
def test_transport_fails_closed(server: object, expected: str) -> None:
    scope = {"type": "http"} if server is None else {"type": "http", "server": server}
    assert transport(scope) == expected


async def test_graceful_stop_finishes_the_request_in_flight_and_removes_the_file(
    sock_dir: Path,
) -> None:
    path = sock_dir / "api.sock"
    sockets = bind_all([UnixAddress(str(path)), TcpAddress("127.0.0.1", 0)])
    tcp = sockets[1].getsockname()
    gate = SlowGate()
    server = ApiServer(make_app(gate), sockets, shutdown_timeout=30.0)
    serving = await started(server)
    async with unix_client(path) as client:
        in_flight = await slow_request(client, gate)
        server.stop()
        async with asyncio.timeout(WAIT):
            while path.exists() or not _refused(tcp):  # noqa: ASYNC110 - polling the OS
                await asyncio.sleep(0.05)
        assert not serving.done()  # still draining the slow request
        gate.release.set()
        async with asyncio.timeout(WAIT):
            response = await in_flight
            await serving
    assert (response.status_code, response.text) == (200, "finished")
    assert all(sock.fileno() == -1 for sock in sockets)


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_shutdown_timeout_bounds_the_drain(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    gate = SlowGate()  # never released
    server = ApiServer(make_app(gate), bind_all([UnixAddress(str(path))]), shutdown_timeout=0.5)
    serving = await started(server)
    async with unix_client(path) as client:
        in_flight = await slow_request(client, gate)
        server.stop()
        async with asyncio.timeout(WAIT):
            await serving  # returns although the request never finished
        async with asyncio.timeout(WAIT):
            response = await in_flight
    # uvicorn cancels the handler and, as the response had not started, answers 500.
    assert response.status_code == 500
    assert not path.exists()


async def test_serve_stops_when_the_event_is_set(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    stop, ready = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(
        serve(make_app(), bind_all([UnixAddress(str(path))]), ready=ready, stop=stop)
    )
    async with asyncio.timeout(WAIT):
        await ready.wait()
        async with unix_client(path) as client:
            assert (await client.get("/where")).text == "unix"
        stop.set()
        await serving
    assert not path.exists()


async def test_a_successor_socket_at_the_same_path_is_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    async with running(bind_all([UnixAddress(str(path))]), make_app()) as (server, task):
        path.unlink()  # e.g. an operator moved the old one away and a new replica took over
        successor = socket.socket(socket.AF_UNIX)
        successor.bind(str(path))
        successor.listen(1)
        server.stop()
        async with asyncio.timeout(WAIT):
            await task
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
    finally:
        successor.close()


async def test_failed_app_start_up_is_an_error_and_cleans_up(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"

    @asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield  # pragma: no cover

    sockets = bind_all([UnixAddress(str(path))])
    server = ApiServer(Starlette(lifespan=broken), sockets, lifespan="on")
    with pytest.raises(ServeError, match="start-up failed"):
        async with asyncio.timeout(WAIT):
            await server.serve()
    assert not path.exists()
    assert sockets[0].fileno() == -1


async def test_the_callers_signal_handlers_stay_in_place(sock_dir: Path) -> None:
    seen: list[int] = []

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    sigint = signal.getsignal(signal.SIGINT)  # the asyncio runner's
    try:
        async with running(bind_all([UnixAddress(str(sock_dir / "api.sock"))]), make_app()):
            assert signal.getsignal(signal.SIGTERM) is handler
            assert signal.getsignal(signal.SIGINT) is sigint
        assert seen == []  # nothing re-raised on the way out either
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("proxy_headers", "expected"), [(False, "127.0.0.1"), (True, "192.0.2.7")])
async def test_forwarded_headers_are_ignored_unless_configured(
    proxy_headers: bool, expected: str
) -> None:
    async def client(request: Request) -> PlainTextResponse:
        assert request.client is not None
        return PlainTextResponse(request.client.host)

    sockets = bind_all([TcpAddress("127.0.0.1", 0)])
    host, port = sockets[0].getsockname()
    app = Starlette(routes=[Route("/client", client)])
    server = ApiServer(app, sockets, proxy_headers=proxy_headers, forwarded_allow_ips="127.0.0.1")
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT) as http:
            response = await http.get("/client", headers={"X-Forwarded-For": "192.0.2.7"})
        assert response.text == expected
    finally:
        server.stop()
        async with asyncio.timeout(WAIT):
            await task


async def test_cancelling_serve_closes_everything_at_once(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    sockets = bind_all([UnixAddress(str(path)), TcpAddress("127.0.0.1", 0)])
    tcp = sockets[1].getsockname()
    server = ApiServer(make_app(), sockets)
    serving = await started(server)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert not path.exists()
    assert _refused(tcp)
    assert all(sock.fileno() == -1 for sock in sockets)
    # The asyncio servers are closed too (else their selector entries outlive the closed
    # descriptors, whose numbers the next socket may get).
    assert not any(listener.is_serving() for listener in server._server.servers)


# ------------------------------------------------------------------ one send per response


def one_write_app() -> Starlette:
    async def small(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse((await request.body()).decode())

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        await asyncio.sleep(0.01)
        yield b"two"

    async def streamed(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/small", small),
            Route("/echo", echo, methods=["POST"]),
            Route("/streamed", streamed),
        ]
    )


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> bytes:
    """One HTTP/1.1 response (Content-Length or chunked), within WAIT."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        if head_only:
            return head
        if b"transfer-encoding: chunked" in head.lower():
            return head + await reader.readuntil(b"0\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


async def test_a_response_leaves_in_one_send_head_and_body(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn writes a response's head and its body in two writes: two sends, two wake-ups of
    # the client. The service's server sends them together; the rest of HTTP is unchanged.
    path = sock_dir / "api.sock"
    sent: list[bytes] = []
    send = socket.socket.send

    def recording(sock: socket.socket, data: bytes, *args: int) -> int:
        n = send(sock, data, *args)
        if sock.family == socket.AF_UNIX and sock.getsockname() == str(path):
            sent.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(socket.socket, "send", recording)
    async with running(bind_all([UnixAddress(str(path))]), one_write_app()):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(b"GET /small HTTP/1.1\r\nhost: api\r\n\r\n")
            response = await read_response(reader)
            assert response.startswith(b"HTTP/1.1 200 ")
            assert response.endswith(b"\r\n\r\nhello")
            assert sent == [response]

            sent.clear()  # the same connection again (keep-alive): its own single send
            writer.write(b"GET /small HTTP/1.1\r\nhost: api\r\n\r\n")
            assert sent == [await read_response(reader)]

            sent.clear()  # HEAD: a head and no body; it is sent at the response's end
            writer.write(b"HEAD /small HTTP/1.1\r\nhost: api\r\n\r\n")
            head = await read_response(reader, head_only=True)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert sent == [head]

            sent.clear()  # streamed: the head with the first chunk, then each chunk as it comes
            writer.write(b"GET /streamed HTTP/1.1\r\nhost: api\r\n\r\n")
            streamed = await read_response(reader)
            assert b"".join(sent) == streamed
            assert sent[0].startswith(b"HTTP/1.1 200 ")
            assert sent[0].endswith(b"3\r\none\r\n")
            assert len(sent) >= 2

            sent.clear()  # `Expect: 100-continue`: the interim answer is never held back
            writer.write(
                b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 4\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            interim = await read_response(reader, head_only=True)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ping")
            echoed = await read_response(reader)
            assert echoed.endswith(b"\r\n\r\nping")
            assert sent == [interim, echoed]
        finally:
            writer.close()
