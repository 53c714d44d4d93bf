"""The API client's HTTP (`satellite/apiclient.py`): one write, URLs parsed once, no cookies."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import pytest

from satellite import apiclient
from satellite.apiclient import ApiClient, parse_addresses


class Recording(httpcore.NetworkStream):
    """A stream that keeps what it was asked to do (the seam under `_OneSendStream`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.calls.append(("write", (bytes(buffer), timeout)))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.calls.append(("read", timeout))
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    def close(self) -> None:
        self.calls.append(("close", None))

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        self.calls.append(("start_tls", None))
        return Recording()

    def get_extra_info(self, info: str) -> Any:
        return f"info:{info}"


def test_head_and_body_leave_together_at_the_first_read() -> None:
    inner = Recording()
    stream = apiclient._OneSendStream(inner)
    stream.write(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n", 3.0)
    stream.write(b"{}", 3.0)
    stream.write(b"", 3.0)
    assert inner.calls == []
    stream.read(4096, 7.0)
    head_and_body = b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"
    assert inner.calls == [("write", (head_and_body, 3.0)), ("read", 7.0)]
    stream.read(4096, 7.0)  # nothing held: no write
    assert [name for name, _ in inner.calls] == ["write", "read", "read"]


def test_a_large_body_is_sent_once_the_hold_is_full() -> None:
    inner = Recording()
    stream = apiclient._OneSendStream(inner)
    stream.write(b"h" * 100, 1.0)
    big = b"b" * apiclient._HOLD_BYTES
    stream.write(big, 1.0)
    assert inner.calls == [("write", (b"h" * 100 + big, 1.0))]
    stream.write(b"tail", 1.0)
    stream.close()
    assert inner.calls[1:] == [("close", None)]  # a held write is dropped with the connection


def test_tls_starts_after_what_is_held_and_keeps_sending_in_one_piece() -> None:
    inner = Recording()
    stream = apiclient._OneSendStream(inner)
    stream.write(b"x", None)
    tls = stream.start_tls(None)  # type: ignore[arg-type]
    assert [name for name, _ in inner.calls] == ["write", "start_tls"]
    assert isinstance(tls, apiclient._OneSendStream)
    assert tls.get_extra_info("is_readable") == "info:is_readable"


@dataclass
class EchoServer:
    """Answers each request with 200 and `{}` (and a cookie); keeps what the first recv() of
    each request got, read as soon as anything arrived, and how many connections it took."""

    address: str
    firsts: list[bytes]
    connections: int = 0


REQUESTS = 20
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: route=a1; Path=/\r\n"
    b"content-length: 2\r\n\r\n{}"
)


def _whole(data: bytes) -> bool:
    head, found, body = data.partition(b"\r\n\r\n")
    lengths = [
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    return bool(found) and len(body) >= (lengths[0] if lengths else 0)


@pytest.fixture(params=["unix", "tcp"])
def echo_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EchoServer]:
    """On a unix socket or on 127.0.0.1; `?close=N` in a request's path: the server closes the
    connection N ms after answering it (as a keep-alive timeout does)."""
    if request.param == "unix":
        path = str(tmp_path / "api.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        address = f"unix:{path}"
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
    server.listen(4)
    server.settimeout(0.1)
    echo = EchoServer(address, [])
    stop = threading.Event()
    deadline = time.monotonic() + 30

    def serve() -> None:
        with server:
            while not stop.is_set() and echo.connections < REQUESTS:
                if time.monotonic() > deadline:
                    return
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                echo.connections += 1
                with conn:
                    conn.settimeout(10)
                    while len(echo.firsts) < REQUESTS * 2:
                        data = conn.recv(65536)
                        if not data:
                            break
                        echo.firsts.append(data)
                        while not _whole(data):  # the rest of a request sent in pieces
                            data += conn.recv(65536)
                        conn.sendall(ANSWER)
                        if b"?close=" in data.split(b"\r\n", 1)[0]:
                            break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield echo
    stop.set()
    thread.join(timeout=15)


@pytest.fixture(params=["plain", "httpx"])
def way(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, echo_server: EchoServer
) -> str:
    """The client's own connection (`_Plain`), or httpx (what https and proxies go through; a
    unix socket never does)."""
    if request.param == "httpx":
        if echo_server.address.startswith("unix:"):
            pytest.skip("a unix socket always goes through the client's own connection")
        monkeypatch.setattr(apiclient._Plain, "fits", staticmethod(lambda address: False))
    return str(request.param)


def test_the_client_sends_each_post_in_one_write(echo_server: EchoServer, way: str) -> None:
    with ApiClient(parse_addresses(echo_server.address), timeout=5, connect_timeout=5) as api:
        for _ in range(REQUESTS):
            response = api.request("POST", "/v1/satellites/7/jobs", content=b'{"kind": "a"}')
            assert response.json() == {}
            assert response.headers["content-type"] == "application/json"
        assert (way == "plain") == (0 in api._plain)
    # Sent in one piece, each request is whole in the server's first recv(); sent as head and
    # body, some of the 20 first recv()s (the server reads as soon as bytes arrive) hold the head.
    assert len(echo_server.firsts) == REQUESTS
    assert echo_server.connections == 1  # kept alive
    for data in echo_server.firsts:
        assert data.startswith(b"POST /v1/satellites/7/jobs HTTP/1.1\r\n")
        assert data.endswith(b'\r\n\r\n{"kind": "a"}')
        assert b"cookie" not in data.lower()  # the answer's cookie is not sent back


def test_a_connection_the_service_closed_while_idle_is_replaced(
    echo_server: EchoServer, way: str
) -> None:
    with ApiClient(parse_addresses(echo_server.address), timeout=5, connect_timeout=5) as api:
        for _ in range(3):
            assert api.request("GET", "/v1/jobs", params={"close": 1}).json() == {}
            time.sleep(0.05)  # the server has closed it by now
    assert echo_server.connections == 3
    assert all(b"GET /v1/jobs?close=1 HTTP/1.1\r\n" in d for d in echo_server.firsts)


def test_a_proxy_variable_sends_http_addresses_through_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    tcp, unix, tls = parse_addresses("http://10.1.2.3:8480,unix:/run/api.sock,https://c.example")
    assert apiclient._Plain.fits(tcp)
    assert apiclient._Plain.fits(unix)
    assert not apiclient._Plain.fits(tls)  # TLS: httpx (its CA bundle, SSL_CERT_FILE)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not apiclient._Plain.fits(tcp)
    assert apiclient._Plain.fits(unix)
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert apiclient._Plain.fits(tcp)


@pytest.mark.parametrize("address", ["https://127.0.0.1:9", "http://127.0.0.1:9"])
def test_both_kinds_of_address_connect_through_the_one_send_backend(address: str) -> None:
    with ApiClient(parse_addresses(address)) as api:
        pool = api._client(0)._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool._network_backend, apiclient._Backend)


@pytest.mark.parametrize(
    "address",
    ["http://core.example:8480", "https://core.example:8480/prefix"],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/a%2Fb", "/v1/satellites/7/jobs:batch"])
def test_a_kept_url_is_the_one_httpx_would_build(address: str, path: str) -> None:
    with ApiClient(parse_addresses(address)) as api:
        built = api._client(0).build_request("GET", path).url
        assert api._url(0, path) == built
        assert api._url(0, path) is api._url(0, path)  # parsed once
        assert api._url(0, "/v1/jobs/é") == "/v1/jobs/é"  # left to httpx
