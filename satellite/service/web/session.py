"""Who is looking at the page: the API's rules (`auth.authorize`) with a login cookie.

A browser cannot send `Authorization: Bearer`, so `/login` takes the token in a form and puts it
in an HttpOnly, SameSite=Strict cookie (Secure when the page is served over https, or behind a
proxy on the unix socket that says `X-Forwarded-Proto: https`). The cookie holds the token
itself, so that every replica behind one proxy accepts it without shared session state; it is
checked on every request against the tokens file, exactly like a bearer token (a revoked token
stops working at once). Over the unix socket with `USM_CORE_UNIX_AUTH=trust` no login is asked.

Forms that change something (login, logout, replay) carry a CSRF token: a random value in a
second SameSite=Strict cookie that the form must repeat (double submit), and a request whose
`Origin` names another host is refused.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from satellite.service.auth import Principal, UnixAuth, authorize
from satellite.service.listen import transport
from satellite.service.tokens import Scope

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "CsrfError",
    "check_csrf",
    "csrf_token",
    "login_needed",
    "principal",
    "read_form",
    "remember_csrf",
    "safe_next",
    "secure",
    "set_session",
]

SESSION_COOKIE = "usm_session"
CSRF_COOKIE = "usm_csrf"
SESSION_MAX_AGE = 12 * 3600
MAX_FORM_BYTES = 16_384


class CsrfError(Exception):
    """A form without the page's CSRF token, or posted from another origin."""


def principal(request: Request, scope: Scope) -> Principal:
    """The caller allowed `scope` (bearer header, else the login cookie); `AuthProblem` if not."""
    state = request.app.state
    unix_auth: UnixAuth = "trust" if getattr(state, "unix_auth", "token") == "trust" else "token"
    authorization = request.headers.get("authorization")
    cookie = request.cookies.get(SESSION_COOKIE)
    if authorization is None and cookie:
        authorization = f"Bearer {cookie}"
    found = authorize(
        transport=transport(request.scope),
        authorization=authorization,
        scope=scope,
        tokens=getattr(state, "tokens", None),
        unix_auth=unix_auth,
    )
    request.state.principal = found
    return found


def login_needed(request: Request) -> bool:
    """Whether this transport asks for a token at all (not on a trusted unix socket)."""
    trusted = getattr(request.app.state, "unix_auth", "token") == "trust"
    return not (transport(request.scope) == "unix" and trusted)


def secure(request: Request) -> bool:
    """Whether the browser reached us over https (directly, or through the unix-socket proxy)."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "").lower()
    return transport(request.scope) == "unix" and forwarded == "https"


def set_session(response: Response, request: Request, token: str | None) -> None:
    """Log in (`token`) or out (None)."""
    if token is None:
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=secure(request), httponly=True, samesite="strict"
        )
        return
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_MAX_AGE,
        path="/",
        secure=secure(request),
        httponly=True,
        samesite="strict",
    )


def csrf_token(request: Request) -> str:
    """The CSRF value for this browser's forms (a new one when it has none yet)."""
    value = request.cookies.get(CSRF_COOKIE)
    if value and len(value) == 43:
        return value
    fresh: str | None = getattr(request.state, "new_csrf", None)
    if fresh is None:
        fresh = secrets.token_urlsafe(32)
        request.state.new_csrf = fresh
    return fresh


def remember_csrf(request: Request, response: Response) -> None:
    """Set the CSRF cookie on `response` when `csrf_token` made a new one."""
    fresh: str | None = getattr(request.state, "new_csrf", None)
    if fresh is not None:
        response.set_cookie(
            CSRF_COOKIE, fresh, path="/", secure=secure(request), httponly=True, samesite="strict"
        )


async def read_form(request: Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body (first value of each field); `ValueError`
    for another type or a body too large."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ValueError("expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ValueError("the form is too large")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items() if values}


def check_csrf(request: Request, form: dict[str, str]) -> None:
    """`CsrfError` unless the form repeats the CSRF cookie and no other origin posted it."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            raise CsrfError("the form was posted from another origin")
    elif origin == "null":
        raise CsrfError("the form was posted from an opaque origin")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = form.get("csrf", "")
    if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise CsrfError("the form's CSRF token is missing or stale: reload the page")


def safe_next(target: str | None) -> str:
    """A local path to go to after login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
