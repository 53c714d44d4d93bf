"""Auth of the core service: tokens over TCP, unix socket trust, scopes, no token in any log."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from structlog.testing import capture_logs

from satellite.service.auth import AuthProblem, Principal, UnixAuth, authorize, require
from satellite.service.listen import ApiServer, TcpAddress, UnixAddress, bind_all
from satellite.service.tokens import TokensFile

WAIT = 10.0
REQUIRED = "an Authorization: Bearer <token> is required"
Reader = Annotated[Principal, Depends(require("read"))]


@dataclass(frozen=True)
class Tokens:
    file: TokensFile
    read: str
    submit: str
    admin: str


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    file = TokensFile(tmp_path / "tokens.yaml")
    return Tokens(
        file,
        read=file.create("reader", ["read"]),
        submit=file.create("submitter", ["submit"]),
        admin=file.create("admin", ["admin"]),
    )


def check(
    tokens: TokensFile | None,
    authorization: str | None,
    scope: Any = "read",
    *,
    transport: Any = "tcp",
    unix_auth: UnixAuth = "trust",
) -> Principal:
    return authorize(
        transport=transport,
        authorization=authorization,
        scope=scope,
        tokens=tokens,
        unix_auth=unix_auth,
    )


def test_the_unix_socket_is_trusted_by_default(tokens: Tokens) -> None:
    for header in (None, "Bearer nonsense", "Basic x"):
        who = check(tokens.file, header, "admin", transport="unix")
        assert (who.name, who.transport, who.token) == ("unix-socket", "unix", False)
        assert who.scopes == {"read", "submit", "admin"}
    assert check(None, None, "admin", transport="unix").name == "unix-socket"


def test_unix_auth_token_requires_a_token_on_the_socket_too(tokens: Tokens) -> None:
    with pytest.raises(AuthProblem) as caught:
        check(tokens.file, None, transport="unix", unix_auth="token")
    assert caught.value.status == 401
    who = check(tokens.file, f"Bearer {tokens.read}", transport="unix", unix_auth="token")
    assert (who.name, who.transport, who.token) == ("reader", "unix", True)


@pytest.mark.parametrize(
    ("header", "challenge", "detail"),
    [
        (None, 'Bearer realm="satellite"', REQUIRED),
        ("Basic dXNlcjpwdw==", 'Bearer realm="satellite"', REQUIRED),
        ("Bearer", 'Bearer realm="satellite"', REQUIRED),
        ("Bearer a b", 'Bearer realm="satellite"', REQUIRED),
        (
            "Bearer usm_wrong",
            'Bearer realm="satellite", error="invalid_token"',
            "the token is not valid",
        ),
    ],
)
def test_tcp_without_a_good_token_is_401(
    tokens: Tokens, header: str | None, challenge: str, detail: str
) -> None:
    with pytest.raises(AuthProblem) as caught:
        check(tokens.file, header)
    problem = caught.value
    assert (problem.status, problem.code, problem.detail) == (401, "unauthorized", detail)
    assert problem.headers == {"WWW-Authenticate": challenge}


def test_no_tokens_file_refuses_every_tcp_request(tokens: Tokens) -> None:
    with pytest.raises(AuthProblem) as caught:
        check(None, f"Bearer {tokens.admin}")
    assert caught.value.status == 401


def test_the_scheme_is_case_insensitive(tokens: Tokens) -> None:
    assert check(tokens.file, f"bearer {tokens.read}").name == "reader"
    assert check(tokens.file, f"BEARER  {tokens.read} ").name == "reader"


@pytest.mark.parametrize(
    ("holder", "allowed"),
    [
        ("read", {"read"}),
        ("submit", {"read", "submit"}),
        ("admin", {"read", "submit", "admin"}),
    ],
)
def test_scopes(tokens: Tokens, holder: str, allowed: set[str]) -> None:
    clear = getattr(tokens, holder)
    for scope in ("read", "submit", "admin"):
        if scope in allowed:
            who = check(tokens.file, f"Bearer {clear}", scope)
            assert who.token
            assert who.transport == "tcp"
            continue
        with pytest.raises(AuthProblem) as caught:
            check(tokens.file, f"Bearer {clear}", scope)
        problem = caught.value
        assert (problem.status, problem.code) == (403, "forbidden")
        assert problem.detail.endswith(f"does not have the {scope!r} scope")
        assert problem.headers == {
            "WWW-Authenticate": (
                f'Bearer realm="satellite", error="insufficient_scope", scope="{scope}"'
            )
        }


def test_a_broken_tokens_file_is_503_not_a_pass(tokens: Tokens) -> None:
    tokens.file.path.write_text("tokens: [\n")
    with pytest.raises(AuthProblem) as caught:
        check(tokens.file, f"Bearer {tokens.admin}")
    assert (caught.value.status, caught.value.code) == (503, "auth_unavailable")
    assert caught.value.headers == {"Retry-After": "30"}


def test_tokens_never_reach_logs_or_errors(
    tokens: Tokens, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with capture_logs() as logs:
        for header, scope in [
            (f"Bearer {tokens.read}", "read"),
            (f"Bearer {tokens.read}", "admin"),
            (f"Bearer {tokens.read}x", "read"),
            (f"Basic {tokens.read}", "read"),
        ]:
            try:
                check(tokens.file, header, scope)
            except AuthProblem as exc:
                texts += [str(exc), exc.detail, repr(exc), *exc.headers.values()]
        tokens.file.path.write_text("tokens: [\n")
        with pytest.raises(AuthProblem) as caught:
            check(tokens.file, f"Bearer {tokens.read}")
        texts.append(str(caught.value))
    refusals = [entry for entry in logs if entry["event"] == "auth_refused"]
    assert [entry["reason"] for entry in refusals] == [
        "scope",
        "unknown",
        "not_bearer",
        "tokens_file_invalid",
    ]
    assert refusals[0]["token_name"] == "reader"
    everything = repr(logs) + caplog.text + "".join(capsys.readouterr()) + "".join(texts)
    for clear in (tokens.read, tokens.submit, tokens.admin):
        assert clear not in everything
        assert clear[4:20] not in everything


def test_require_rejects_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="unknown scope 'write'"):
        require("write")  # type: ignore[arg-type]


# --------------------------------------------------------------- through FastAPI and sockets


def make_app(tokens: TokensFile | None, unix_auth: str | None) -> FastAPI:
    app = FastAPI()
    app.state.tokens = tokens
    if unix_auth is not None:
        app.state.unix_auth = unix_auth

    @app.exception_handler(AuthProblem)
    async def problem(request: Request, exc: AuthProblem) -> JSONResponse:
        return JSONResponse(
            {"status": exc.status, "code": exc.code, "detail": exc.detail},
            status_code=exc.status,
            headers=exc.headers,
            media_type="application/problem+json",
        )

    @app.get("/jobs")
    async def jobs(request: Request, who: Reader) -> dict[str, Any]:
        assert request.state.principal is who
        return {"name": who.name, "transport": who.transport}

    @app.post("/jobs")
    async def submit(who: Annotated[Principal, Depends(require("submit"))]) -> dict[str, Any]:
        return {"name": who.name}

    return app


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Clients:
    unix: httpx.AsyncClient
    tcp: httpx.AsyncClient


@asynccontextmanager
async def served(app: FastAPI, sock_dir: Path) -> AsyncIterator[Clients]:
    path = sock_dir / "api.sock"
    sockets = bind_all([UnixAddress(str(path)), TcpAddress("127.0.0.1", 0)])
    host, port = sockets[1].getsockname()
    server = ApiServer(app, sockets)
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        async with (
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path)),
                base_url="http://api",
                timeout=WAIT,
            ) as unix,
            httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT) as tcp,
        ):
            yield Clients(unix, tcp)
    finally:
        server.stop()
        async with asyncio.timeout(WAIT):
            await task


async def test_require_over_real_sockets(tokens: Tokens, sock_dir: Path) -> None:
    async with served(make_app(tokens.file, "trust"), sock_dir) as clients:
        response = await clients.unix.get("/jobs")
        assert response.json() == {"name": "unix-socket", "transport": "unix"}

        response = await clients.tcp.get("/jobs")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="satellite"'
        assert response.json()["code"] == "unauthorized"

        bearer = {"Authorization": f"Bearer {tokens.read}"}
        response = await clients.tcp.get("/jobs", headers=bearer)
        assert response.json() == {"name": "reader", "transport": "tcp"}

        response = await clients.tcp.post("/jobs", headers=bearer)
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"

        response = await clients.tcp.post(
            "/jobs", headers={"Authorization": f"Bearer {tokens.submit}"}
        )
        assert response.json() == {"name": "submitter"}

        # Revoked while the service runs: refused on the next request.
        TokensFile(tokens.file.path).revoke("reader")
        response = await clients.tcp.get("/jobs", headers=bearer)
        assert response.status_code == 401


@pytest.mark.parametrize("unix_auth", ["token", None])
async def test_unix_auth_token_and_a_missing_setting_need_tokens_on_the_socket(
    tokens: Tokens, sock_dir: Path, unix_auth: str | None
) -> None:
    async with served(make_app(tokens.file, unix_auth), sock_dir) as clients:
        assert (await clients.unix.get("/jobs")).status_code == 401
        response = await clients.unix.get(
            "/jobs", headers={"Authorization": f"Bearer {tokens.read}"}
        )
        assert response.json() == {"name": "reader", "transport": "unix"}
