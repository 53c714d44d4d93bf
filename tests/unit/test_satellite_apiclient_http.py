"""The API client's HTTP (`satellite/apiclient.py`): one write, URLs parsed once, no cookies."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
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


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket answering each request of one kept-alive connection with 200 and `{}`;
    what the first recv() of each request got, read as soon as anything arrived."""
    path = str(tmp_path / "api.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(10)
    firsts: list[bytes] = []
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: route=a1; Path=/\r\n"
        b"content-length: 2\r\n\r\n{}"
    )

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                for _ in range(REQUESTS):
                    data = conn.recv(65536)
                    firsts.append(data)
                    while not data.endswith(b"}"):  # the rest of a request sent in pieces
                        data += conn.recv(65536)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, firsts
    thread.join(timeout=10)


REQUESTS = 20


def test_the_client_sends_each_post_over_a_unix_socket_in_one_write(
    echo_server: tuple[str, list[bytes]],
) -> None:
    path, firsts = echo_server
    with ApiClient(parse_addresses(f"unix:{path}"), timeout=5, connect_timeout=5) as api:
        for _ in range(REQUESTS):
            response = api.request("POST", "/v1/satellites/7/jobs", content=b'{"kind": "a"}')
            assert response.json() == {}
    # Sent in one piece, each request is whole in the server's first recv(); sent as head and
    # body, some of the 20 first recv()s (the server reads as soon as bytes arrive) hold the head.
    assert len(firsts) == REQUESTS
    for data in firsts:
        assert data.startswith(b"POST /v1/satellites/7/jobs HTTP/1.1\r\n")
        assert data.endswith(b'\r\n\r\n{"kind": "a"}')


@pytest.mark.parametrize("address", ["unix:/nonexistent/api.sock", "http://127.0.0.1:9"])
def test_both_kinds_of_address_connect_through_the_one_send_backend(address: str) -> None:
    with ApiClient(parse_addresses(address)) as api:
        pool = api._client(0)._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool._network_backend, apiclient._Backend)


@pytest.mark.parametrize(
    "address",
    ["http://core.example:8480", "https://core.example:8480/prefix", "unix:/run/api.sock"],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/a%2Fb", "/v1/satellites/7/jobs:batch"])
def test_a_kept_url_is_the_one_httpx_would_build(address: str, path: str) -> None:
    with ApiClient(parse_addresses(address)) as api:
        built = api._client(0).build_request("GET", path).url
        assert api._url(0, path) == built
        assert api._url(0, path) is api._url(0, path)  # parsed once
        assert api._url(0, "/v1/jobs/é") == "/v1/jobs/é"  # left to httpx


def test_cookies_set_by_a_proxy_are_not_kept_or_sent_back(
    echo_server: tuple[str, list[bytes]],
) -> None:
    path, firsts = echo_server
    with ApiClient(parse_addresses(f"unix:{path}"), timeout=5, connect_timeout=5) as api:
        for _ in range(REQUESTS):
            api.request("POST", "/v1/satellites/7/jobs", content=b'{"kind": "a"}')
        assert len(api._client(0).cookies) == 0
    assert not any(b"cookie:" in data.lower() for data in firsts)
