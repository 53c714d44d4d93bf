"""A small synchronous client of the core service's HTTP API v1 (`satellite serve`).

The `satellite` command line uses it when `--api` / `USM_CORE_API` is set: a comma list of
addresses such as `unix:/run/satellite/api.sock,https://core.example:8480`, tried in order
(the unix socket first, TCP second, the way Loginom Integrator's clients do). A connection
failure on one address moves on to the next; an HTTP answer, even an error, is the answer.
The address that answered is tried first by the following requests of the same client.

The bearer token (`--token-file`, `USM_CORE_TOKEN_FILE` or `USM_CORE_TOKEN`) goes in
`Authorization: Bearer` on every address (the unix socket ignores it unless the service sets
`USM_CORE_UNIX_AUTH=token`). It is never printed, logged or put in an error message.

Errors (all `ApiError`):

```
ApiError
├── ApiUnreachableError     no address could be connected to, or no answer in time (exit 4)
└── ApiProblem              the service answered 4xx/5xx: its problem+json `code` and `detail`
```
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpcore
import httpx

from poller.errors import ConfigError

__all__ = [
    "API_ENV",
    "MAX_BATCH_JOBS",
    "MAX_WAIT_SECONDS",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "ApiAddress",
    "ApiClient",
    "ApiError",
    "ApiProblem",
    "ApiUnreachableError",
    "parse_addresses",
    "resolve_token",
]

API_ENV = "USM_CORE_API"
TOKEN_ENV = "USM_CORE_TOKEN"  # noqa: S105 - a variable name
TOKEN_FILE_ENV = "USM_CORE_TOKEN_FILE"  # noqa: S105 - a variable name
MAX_WAIT_SECONDS = 60.0
"""The service waits at most this long for a result in one request (`Prefer: wait`, `?wait=`)."""
MAX_BATCH_JOBS = 1000
"""Jobs per `jobs:batch` request (the service's limit)."""
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


class ApiError(Exception):
    """A request to the core service's API failed."""


class ApiUnreachableError(ApiError):
    """No address of `--api` could be connected to (or one did not answer in time)."""


class ApiProblem(ApiError):  # noqa: N818 - a problem document, as RFC 9457 calls it
    """The service answered with an error status: its problem `code` and `detail`."""

    def __init__(self, status: int, code: str, detail: str, address: str) -> None:
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")
        self.status = status
        self.code = code
        self.detail = detail
        self.address = address


@dataclass(frozen=True, slots=True)
class ApiAddress:
    """One address of `--api`: a unix socket path, or an http(s) base URL."""

    text: str
    socket_path: str | None = None
    base_url: str | None = None

    def client(self, headers: Mapping[str, str]) -> httpx.Client:
        """httpx, for the TCP addresses `_Plain` does not take (https, proxies)."""
        assert self.base_url is not None  # a unix socket always goes through `_Plain`
        client = httpx.Client(base_url=self.base_url, headers=headers, transport=_transport())
        client._cookies = _NoCookies()  # the API sets none (see `_NoCookies`)
        return client


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: the API sets no cookies, and httpx's reading of every
    response for them (it rebuilds the request as a `urllib` one, parsing its URL again) was
    about a third of a request's CPU in the client."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


#: Request URLs kept parsed per client (paths with a job id in them come and go).
_URLS_KEPT = 256
#: Held request bytes past this size are sent at once (a large batch is not copied whole).
_HOLD_BYTES = 65_536


class _OneSendStream(httpcore.NetworkStream):
    """A request's head and body in one `send()`: writes are held until the response is read.

    httpcore writes a request's head and its body separately, two segments on the socket (TCP
    with `TCP_NODELAY`, or a unix socket): the service wakes up for the head, reads it, goes
    back to its loop and wakes again for the body; a submit paid that extra wake-up on every
    round trip. What is held leaves at the first read, or as soon as it reaches `_HOLD_BYTES`.
    A failed send surfaces from that read as httpcore's `WriteError` / `WriteTimeout`.
    """

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._write_timeout: float | None = None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(buffer)
        self._held_bytes += len(buffer)
        self._write_timeout = timeout
        if self._held_bytes >= _HOLD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
            self._stream.write(data, self._write_timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._flush()
        return self._stream.read(max_bytes, timeout)

    def close(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        self._flush()
        return _OneSendStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Backend(httpcore.SyncBackend):
    """httpcore's TCP connects, with each request sent in one piece (`_OneSendStream`)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _OneSendStream(stream)


def _transport() -> httpx.HTTPTransport:
    """httpx's transport (its TLS defaults, limits and environment) on `_Backend`'s connects."""
    transport = httpx.HTTPTransport()
    pool = getattr(transport, "_pool", None)
    if type(pool) is httpcore.ConnectionPool:  # httpcore 1.0
        pool._network_backend = _Backend()
    return transport


def parse_addresses(text: str, *, label: str = API_ENV) -> list[ApiAddress]:
    """`unix:/path`, `http://host:port[/prefix]`, `https://...`, comma-separated, in order.

    Raises `ConfigError` naming `label` (the option or variable the text came from).
    """
    addresses = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("unix:"):
            path = item.removeprefix("unix:")
            if path.startswith("//"):  # unix:///run/x.sock
                path = path[2:]
            if not path.startswith("/"):
                raise ConfigError(f"{label}: {item!r}: a unix socket needs an absolute path")
            addresses.append(ApiAddress(item, socket_path=path))
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{label}: {item!r}: expected unix:/path, http://host:port or https://host:port"
            )
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"{label}: no user or password in the URL; give a token (--token-file)"
            )
        if parts.query or parts.fragment:
            raise ConfigError(f"{label}: {parts.scheme}://{parts.netloc}: no ?query or #fragment")
        try:
            parts.port  # noqa: B018 - a bad port raises here
        except ValueError as exc:
            raise ConfigError(f"{label}: {item!r}: {exc}") from None
        addresses.append(ApiAddress(item, base_url=item.rstrip("/")))
    if not addresses:
        raise ConfigError(f"{label}: no address (e.g. unix:/run/satellite/api.sock)")
    return addresses


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token: `--token-file`, else `USM_CORE_TOKEN_FILE`, else `USM_CORE_TOKEN`."""
    if token_file is not None or environ.get(TOKEN_FILE_ENV):
        label = "--token-file" if token_file is not None else TOKEN_FILE_ENV
        path = token_file if token_file is not None else environ[TOKEN_FILE_ENV]
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{label}: cannot read {path}: {reason}") from None
    elif environ.get(TOKEN_ENV):
        label, token = TOKEN_ENV, environ[TOKEN_ENV].strip()
    else:
        return None
    if not token:
        raise ConfigError(f"{label}: the token is empty")
    if not set(token) <= _TOKEN_CHARS:
        raise ConfigError(f"{label}: the token holds spaces or characters a header cannot carry")
    return token


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """An answer of the service (or of whatever answered at its address)."""

    status_code: int
    reason_phrase: str
    headers: Mapping[str, str]
    """Lower-case names."""
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    @classmethod
    def of(cls, response: httpx.Response) -> ApiResponse:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return cls(response.status_code, response.reason_phrase, headers, response.content)


class _ConnectFailedError(Exception):
    """No connection to the address (the next one is tried)."""


class _NoAnswerError(Exception):
    """Connected, and no answer in time (the request may have been acted on)."""


class _BrokenError(Exception):
    """Connected, and the connection failed before the answer was read."""


class _Plain:
    """One kept-alive HTTP/1.1 connection to a unix socket or a plain `http://` address, for the
    requests of an `ApiClient` (no TLS, no proxy: those go through httpx).

    Per request it costs a fraction of httpx's CPU (its URL, header, cookie and response models
    and h11's state machine took about 0.4 ms a request here), and the request leaves in one
    write: the head and the body together (http.client, like httpx, writes them apart, and the
    service wakes up twice). The answer is read by `http.client.HTTPResponse`. A kept connection
    that became readable while idle (the service closed it, or sent what nobody asked for) is
    replaced before it is used.
    """

    def __init__(self, address: ApiAddress) -> None:
        self._socket_path = address.socket_path
        if address.socket_path is not None:
            self._host, self._port, self._prefix, self._host_header = (
                "localhost",
                0,
                "",
                "localhost",
            )
        else:
            parts = urlsplit(address.base_url or "")
            self._host, self._port = parts.hostname or "", parts.port or 80
            self._prefix = parts.path.rstrip("/")
            host = f"[{self._host}]" if ":" in self._host else self._host
            self._host_header = host if self._port == 80 else f"{host}:{self._port}"
        self._sock: socket.socket | None = None

    @staticmethod
    def fits(address: ApiAddress) -> bool:
        """A unix socket, or an `http://` address no proxy variable applies to."""
        if address.socket_path is not None:
            return True
        parts = urlsplit(address.base_url or "")
        if parts.scheme != "http":
            return False
        proxies = urllib.request.getproxies_environment()
        if not (proxies.get("http") or proxies.get("all")):
            return True
        return bool(urllib.request.proxy_bypass(parts.hostname or ""))  # NO_PROXY

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self, timeout: float) -> socket.socket:
        if self._socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self._socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self._host, self._port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        connect_timeout: float,
        timeout: float,
    ) -> ApiResponse:
        sock = self._sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            self.close()  # closed by the service while idle (its keep-alive timeout)
            sock = None
        if sock is None:
            try:
                sock = self._connect(connect_timeout)
            except TimeoutError:
                raise _ConnectFailedError("timed out") from None
            except OSError as exc:
                raise _ConnectFailedError(exc.strerror or str(exc) or type(exc).__name__) from None
            self._sock = sock
        lines = [f"{method} {self._prefix}{target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            sock.settimeout(timeout)
            sock.sendall(head + body if body else head)
            response = http.client.HTTPResponse(sock, method=method)
            try:
                response.begin()
                content = response.read()
            finally:
                response.close()
        except TimeoutError:
            self.close()
            raise _NoAnswerError from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise _BrokenError(_reason(exc)) from None
        if response.will_close:
            self.close()
        names = {name.lower(): value for name, value in response.getheaders()}
        return ApiResponse(response.status, response.reason, names, content)


def _problem(response: ApiResponse, address: str) -> ApiProblem:
    code, detail = f"http_{response.status_code}", response.reason_phrase
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str):
            code = body["code"]
        if isinstance(body.get("detail"), str):
            detail = body["detail"]
    # One line whatever came back (a proxy's HTML page, a detail with newlines).
    code = "".join(c for c in code if c.isalnum() or c in "_-.:")[:64] or "http_error"
    return ApiProblem(response.status_code, code, " ".join(detail.split())[:300], address)


class ApiClient:
    """Requests to the service, address by address; every request has a timeout.

    `timeout` bounds each read and write (a wait request gets its wait on top); `connect_timeout`
    bounds connecting, all addresses together.
    """

    def __init__(
        self,
        addresses: Iterable[ApiAddress],
        *,
        token: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.addresses = list(addresses)
        if not self.addresses:
            raise ValueError("no address")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        headers = {"Accept": "application/json, application/problem+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        self._clients: dict[int, httpx.Client] = {}
        self._plain: dict[int, _Plain] = {}
        self._urls: dict[tuple[int, str], httpx.URL] = {}
        self._first = 0
        self.answered_by: str | None = None
        """The address that gave the last answer."""

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for plain in self._plain.values():
            plain.close()
        self._plain.clear()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client(self, index: int) -> httpx.Client:
        if index not in self._clients:
            self._clients[index] = self.addresses[index].client(self._headers)
        return self._clients[index]

    def _url(self, index: int, path: str) -> httpx.URL | str:
        """`path` under the address's base URL, as httpx joins them (parsed once per path: a
        client asks for the same few paths again and again); a path that is not plain ASCII is
        left to httpx."""
        if not path.isascii():
            return path
        key = (index, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()
            base = self._client(index).base_url
            url = base.copy_with(raw_path=base.raw_path + path.lstrip("/").encode("ascii"))
            self._urls[key] = url
        return url

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        wait: float = 0.0,
    ) -> ApiResponse:
        """One answer with a 2xx status; `ApiProblem` for any other, `ApiUnreachableError`."""
        order = list(range(self._first, len(self.addresses))) + list(range(self._first))
        failures: list[str] = []
        deadline = time.monotonic() + self.connect_timeout
        for index in order:
            address = self.addresses[index].text
            connect = deadline - time.monotonic()
            if connect <= 0:
                failures.append(f"{address}: not tried (--connect-timeout spent)")
                continue
            try:
                response = self._send(
                    index,
                    method,
                    path,
                    params=params,
                    json_body=json_body,
                    content=content,
                    headers=headers,
                    connect=connect,
                    timeout=self.timeout + wait,
                )
            except (_ConnectFailedError, httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{address}: {_reason(exc)}")
                continue
            except (_NoAnswerError, httpx.TimeoutException):
                # Connected but no answer in time: the request may have been acted on, so it is
                # not sent again to the next address.
                raise ApiUnreachableError(
                    f"{address}: no answer within {self.timeout + wait:g} s (--operation-timeout)"
                ) from None
            except (_BrokenError, httpx.TransportError) as exc:
                raise ApiUnreachableError(f"{address}: {_reason(exc)}") from None
            self._first = index
            self.answered_by = address
            if response.is_success:
                return response
            raise _problem(response, address)
        raise ApiUnreachableError("cannot reach the core API: " + "; ".join(failures))

    def _send(
        self,
        index: int,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        json_body: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        connect: float,
        timeout: float,
    ) -> ApiResponse:
        """One request to address `index`: over its kept `_Plain` connection when it is a unix
        socket or a plain `http://` address without a proxy, else through httpx (TLS, proxies)."""
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        if index not in self._plain and _Plain.fits(self.addresses[index]):
            self._plain[index] = _Plain(self.addresses[index])
        plain = self._plain.get(index)
        if plain is not None:
            target = quote(path, safe="/:%@!$&'()*+,;=-._~")
            if params:
                target += "?" + urlencode({k: str(v) for k, v in params.items()})
            sent = self._headers | dict(headers or {})
            return plain.request(
                method, target, sent, content, connect_timeout=connect, timeout=timeout
            )
        answer = self._client(index).request(
            method,
            self._url(index, path),
            params=params,
            content=content,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect),
        )
        return ApiResponse.of(answer)

    def _object(self, response: ApiResponse) -> dict[str, Any]:
        """The JSON object of a 2xx answer; anything else (a proxy's page) is `ApiProblem`."""
        try:
            value = response.json()
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            raise ApiProblem(
                response.status_code,
                "not_json",
                "the answer is not a JSON object: is this the core service's address?",
                self.answered_by or "?",
            )
        return value

    # ------------------------------------------------------------------------ endpoints

    def submit(
        self, satellite_id: str, job: bytes, *, wait: float | None = None
    ) -> tuple[dict[str, Any], bool]:
        """POST /v1/satellites/{id}/jobs: the job record, and whether it was answered."""
        headers = {"Content-Type": "application/json"}
        if wait is not None:
            wait = min(wait, MAX_WAIT_SECONDS)
            headers["Prefer"] = f"wait={wait:g}"
        response = self.request(
            "POST",
            f"/v1/satellites/{quote(satellite_id, safe='')}/jobs",
            content=job,
            headers=headers,
            wait=wait or 0.0,
        )
        return self._object(response), response.status_code == 200

    def submit_batch(self, satellite_id: str, jobs: Iterable[bytes]) -> dict[str, Any]:
        """POST /v1/satellites/{id}/jobs:batch (NDJSON): `{"ids", "not_published"}`."""
        response = self.request(
            "POST",
            f"/v1/satellites/{quote(satellite_id, safe='')}/jobs:batch",
            content=b"\n".join(jobs) + b"\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        return self._object(response)

    def job(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """GET /v1/jobs/{id}, long-polling up to `wait` s (at most 60) while it is queued."""
        wait = min(max(wait, 0.0), MAX_WAIT_SECONDS)
        params = {"wait": f"{wait:g}"} if wait else None
        response = self.request(
            "GET", f"/v1/jobs/{quote(job_id, safe='')}", params=params, wait=wait
        )
        return self._object(response)

    def jobs(self, filters: Mapping[str, Any]) -> dict[str, Any]:
        """GET /v1/jobs: `{"items": [...], "next_cursor": ...}`, newest first."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return self._object(self.request("GET", "/v1/jobs", params=params))

    def satellites(self, satellite_id: str | None = None) -> dict[str, Any]:
        """GET /v1/satellites (`{"ok", "satellites"}`) or /v1/satellites/{id} (one status)."""
        path = "/v1/satellites"
        if satellite_id is not None:
            path += f"/{quote(satellite_id, safe='')}"
        return self._object(self.request("GET", path))

    # Schedules (docs/schedules.md): `satellite schedule list|show|run|pause|resume`.
    def schedules(self, name: str | None = None) -> dict[str, Any]:
        """GET /v1/schedules (`{"items": [...]}`) or /v1/schedules/{name} (one schedule)."""
        path = "/v1/schedules" if name is None else f"/v1/schedules/{quote(name, safe='')}"
        return self._object(self.request("GET", path))

    def schedule_action(
        self, name: str, action: str, *, target: str | None = None
    ) -> dict[str, Any]:
        """POST /v1/schedules/{name}/{run|pause|resume}; `target` for a run of one target."""
        body = {"target": target} if target is not None else None
        path = f"/v1/schedules/{quote(name, safe='')}/{action}"
        return self._object(self.request("POST", path, json_body=body))

    # ---------------------------------------------------------------- alerts (issue 18)

    def alerts(self) -> dict[str, Any]:
        """GET /v1/alerts: states per satellite, silences, channels, rules."""
        return self._object(self.request("GET", "/v1/alerts"))

    def notifications(self, *, limit: int = 100, satellite_id: str | None = None) -> dict[str, Any]:
        """GET /v1/notifications: the archive of attempts (newest first) and what waits."""
        params: dict[str, Any] = {"limit": limit}
        if satellite_id is not None:
            params["satellite"] = satellite_id
        return self._object(self.request("GET", "/v1/notifications", params=params))

    def silence(
        self, satellite_id: str, seconds: float, reason: str, rule: str | None = None
    ) -> dict[str, Any]:
        """POST /v1/alerts/silences (admin): the silence created."""
        body = {"satellite_id": satellite_id, "for_s": seconds, "reason": reason, "rule": rule}
        return self._object(self.request("POST", "/v1/alerts/silences", json_body=body))


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        text = cause.strerror
    elif isinstance(exc, httpx.ConnectTimeout | httpx.TimeoutException | TimeoutError):
        text = "timed out"
    return text[:200]
