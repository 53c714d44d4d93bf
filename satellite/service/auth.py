"""Who may call the API: bearer tokens over TCP, trust (or tokens) over the unix socket.

`authorize()` decides; `require(scope)` is the FastAPI dependency that calls it for a route:

```python
app.state.tokens = TokensFile(path)        # or None: no tokens, TCP is always refused
app.state.unix_auth = "trust"               # USM_CORE_UNIX_AUTH: "trust" or "token"

Reader = Annotated[Principal, Depends(require("read"))]

@app.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, who: Reader) -> ...: ...
```

`require` reads `request.app.state.tokens` (`TokensFile | None`; missing counts as None) and
`request.app.state.unix_auth` (missing counts as "token": fail closed), learns the transport
from `listen.transport(request.scope)`, and stores the `Principal` on `request.state.principal`
for the app's request log. Refusals raise `AuthProblem`; the app renders it as problem+json with
its `status`, `code`, `detail` and `headers` (401 carries `WWW-Authenticate: Bearer ...`).

Over the unix socket with `unix_auth="trust"` any `Authorization` header is ignored: the
socket file's permissions (0660) are the access control. A tokens file that cannot be read or
is invalid refuses every token (503 `auth_unavailable`) until it is fixed. Tokens never reach a
log or an error message; refusals are logged with the reason and, when known, the token's name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from starlette.requests import Request

from poller.logging import get_logger
from satellite.service.listen import Transport, transport
from satellite.service.tokens import SCOPES, Scope, TokensError, TokensFile

__all__ = ["UNIX_AUTH_ENV", "AuthProblem", "Principal", "UnixAuth", "authorize", "require"]

UNIX_AUTH_ENV = "USM_CORE_UNIX_AUTH"
UnixAuth = Literal["trust", "token"]
REALM = "satellite"
UNIX_PRINCIPAL = "unix-socket"
"""The name of a caller trusted because it reached the unix socket."""

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name, or `unix-socket` for a trusted local caller."""

    name: str
    scopes: frozenset[Scope]
    transport: Transport
    token: bool
    """True when a token authenticated the caller (False: trusted by the unix socket)."""


class AuthProblem(Exception):  # noqa: N818 - it is a problem document (RFC 9457), not a bug
    """A refused request: HTTP `status`, a stable `code`, a `detail` line and response headers."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        caller: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        #: The valid token's name when only its scope was missing (for the access log).
        self.caller = caller


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    detail: str
    error: str | None = None  # RFC 6750 error code for WWW-Authenticate
    extra: dict[str, str] = field(default_factory=dict)


def authorize(
    *,
    transport: Transport,
    authorization: str | None,
    scope: Scope,
    tokens: TokensFile | None,
    unix_auth: UnixAuth,
) -> Principal:
    """The caller if it may use `scope`; else raise `AuthProblem` (401, 403 or 503)."""
    if transport == "unix" and unix_auth == "trust":
        return Principal(UNIX_PRINCIPAL, frozenset(SCOPES), "unix", token=False)
    presented = _bearer(authorization)
    if presented is None:
        reason = "missing" if authorization is None else "not_bearer"
        _refuse(transport, scope, _Refusal(reason, "an Authorization: Bearer <token> is required"))
    if tokens is None:
        _refuse(
            transport,
            scope,
            _Refusal("no_tokens", "the token is not valid", error="invalid_token"),
        )
    try:
        found = tokens.verify(presented)
    except TokensError:
        log.warning("auth_refused", reason="tokens_file_invalid", transport=transport, scope=scope)
        raise AuthProblem(
            503,
            "auth_unavailable",
            "tokens cannot be checked now (the service's tokens file is invalid; see its log)",
            {"Retry-After": "30"},
        ) from None
    if found is None:
        _refuse(
            transport, scope, _Refusal("unknown", "the token is not valid", error="invalid_token")
        )
    if not found.allows(scope):
        log.warning(
            "auth_refused", reason="scope", transport=transport, scope=scope, token_name=found.name
        )
        raise AuthProblem(
            403,
            "forbidden",
            f"the token {found.name!r} does not have the {scope!r} scope",
            {
                "WWW-Authenticate": (
                    f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'
                )
            },
            caller=found.name,
        )
    return Principal(found.name, found.scopes, transport, token=True)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        return None
    return credentials


def _refuse(transport: Transport, scope: Scope, refusal: _Refusal) -> NoReturn:
    log.warning("auth_refused", reason=refusal.reason, transport=transport, scope=scope)
    challenge = f'Bearer realm="{REALM}"'
    if refusal.error is not None:
        challenge += f', error="{refusal.error}"'
    raise AuthProblem(401, "unauthorized", refusal.detail, {"WWW-Authenticate": challenge})


def require(scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the `Principal` allowed to use `scope`, or `AuthProblem`.

    It is a coroutine so that FastAPI runs it on the event loop (one `stat()` of the tokens
    file; a re-read only after a change), not in its thread pool.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(request: Request) -> Principal:
        state = request.app.state
        unix_auth: UnixAuth = (
            "trust" if getattr(state, "unix_auth", "token") == "trust" else "token"
        )
        try:
            principal = authorize(
                transport=transport(request.scope),
                authorization=request.headers.get("authorization"),
                scope=scope,
                tokens=getattr(state, "tokens", None),
                unix_auth=unix_auth,
            )
        except AuthProblem as exc:
            if exc.caller is not None:
                request.state.caller = exc.caller  # `request_finished` names who was refused
            raise
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency
