"""The RabbitMQ management HTTP API, for what AMQP cannot do: users, permissions, limits, stats.

`ManagementSettings.resolve()` finds the API: `--management-url`, else `USM_MANAGEMENT_URL`,
else `http://<host of the first DSN URL>:15672`. Credentials come from the URL's user info when
it has any, else from the DSN; the vhost is the DSN's. `ManagementApi` is a thin, typed wrapper
over `httpx.Client` in which every request has a timeout and every failure is a
`ManagementError` whose message never contains a password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

from poller.errors import BrokerError, ConfigError
from satellite.config import CoreSettings

__all__ = [
    "MANAGEMENT_ENV",
    "ManagementApi",
    "ManagementError",
    "ManagementSettings",
]

MANAGEMENT_ENV = "USM_MANAGEMENT_URL"
DEFAULT_MANAGEMENT_PORT = 15672
NOT_FOUND = 404


class ManagementError(BrokerError):
    """The management API is unreachable or refused a request."""

    code = "management"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ManagementSettings:
    """Where the management API is, as whom, and for which vhost. `repr` hides the password."""

    base_url: str
    username: str
    password: SecretStr
    vhost: str
    timeout: float = 10.0
    verify: bool | str = field(default=True)

    @classmethod
    def resolve(
        cls,
        core: CoreSettings,
        url: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ManagementSettings:
        """The API for this core's broker; raise `ConfigError` naming the bad source."""
        env = os.environ if environ is None else environ
        source = "--management-url"
        if url is None and env.get(MANAGEMENT_ENV):
            url, source = env[MANAGEMENT_ENV], MANAGEMENT_ENV
        first = core.urls[0]
        username, password = first.username, first.password
        if url is None:
            host = f"[{first.host}]" if ":" in first.host else first.host
            base = f"http://{host}:{DEFAULT_MANAGEMENT_PORT}"
        else:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ConfigError(f"{source}: is not a valid URL") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{source}: must be an http:// or https:// URL with a host")
            if parts.username is not None:
                username = unquote(parts.username)
                password = SecretStr(unquote(parts.password or ""))
            netloc = parts.netloc.rsplit("@", 1)[-1]
            base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return cls(
            base_url=base,
            username=username,
            password=password,
            vhost=first.vhost,
            timeout=timeout or 10.0,
            verify=first.cafile or True,
        )


def _q(value: str) -> str:
    return quote(value, safe="")


class ManagementApi:
    """Calls of the management API used by `satellite`; use as a context manager."""

    def __init__(
        self, settings: ManagementSettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._http = httpx.Client(
            base_url=settings.base_url + "/api",
            auth=(settings.username, settings.password.get_secret_value()),
            timeout=httpx.Timeout(settings.timeout),
            verify=settings.verify,
            headers={"content-type": "application/json"},
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def vhost(self) -> str:
        return self.settings.vhost

    # ----------------------------------------------------------------------------- requests

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        where = f"{method} {self.settings.base_url}/api{path}"
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException:
            raise ManagementError(
                f"{where}: no answer within {self.settings.timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ManagementError(
                f"{where}: {type(exc).__name__}: {self._scrub(str(exc))} "
                f"(is the rabbitmq_management plugin enabled? set {MANAGEMENT_ENV})"
            ) from None
        if response.status_code == 401:
            raise ManagementError(
                f"{where}: 401 unauthorized as {self.settings.username!r} "
                f"({self._why_401(response)})",
                status=401,
            )
        if response.status_code >= 400 and response.status_code != NOT_FOUND:
            reason = self._scrub(response.text[:300])
            raise ManagementError(
                f"{where}: HTTP {response.status_code}: {reason}", status=response.status_code
            )
        return response

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """The JSON at `path`, or None when it does not exist (404)."""
        response = self._request("GET", path, params=params)
        return None if response.status_code == NOT_FOUND else response.json()

    def _put(self, path: str, body: Mapping[str, Any]) -> None:
        response = self._request("PUT", path, json=dict(body))
        if response.status_code == NOT_FOUND:
            raise ManagementError(f"PUT {path}: not found", status=NOT_FOUND)

    def _delete(self, path: str) -> bool:
        """Delete; False when it did not exist."""
        return self._request("DELETE", path).status_code != NOT_FOUND

    @staticmethod
    def _why_401(response: httpx.Response) -> str:
        """RabbitMQ answers 401 both to a wrong password and to a user without a management tag;
        its `reason` tells which (`Login failed`, `Not management user`)."""
        try:
            reason = str(response.json().get("reason", ""))
        except (ValueError, AttributeError):
            reason = ""
        if reason.lower().startswith("login failed"):
            return (
                "the login was refused: wrong user or password; the management API uses the "
                f"DSN's unless {MANAGEMENT_ENV} (or --management-url) names its own"
            )
        return "the management API needs a user tagged administrator or monitoring"

    def _scrub(self, text: str) -> str:
        secret = self.settings.password.get_secret_value()
        return text.replace(secret, "***") if secret else text

    # ----------------------------------------------------------------------------- broker

    def overview(self) -> dict[str, Any]:
        value: dict[str, Any] = self._get("/overview") or {}
        return value

    # ----------------------------------------------------------------------------- users

    def user(self, name: str) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self._get(f"/users/{_q(name)}")
        return value

    def put_user(self, name: str, password: str, *, tags: str = "") -> None:
        """Create the user or set its password (permissions and limits are kept)."""
        self._put(f"/users/{_q(name)}", {"password": password, "tags": tags})

    def delete_user(self, name: str) -> bool:
        return self._delete(f"/users/{_q(name)}")

    def set_permissions(self, user: str, *, configure: str, write: str, read: str) -> None:
        body = {"configure": configure, "write": write, "read": read}
        self._put(f"/permissions/{_q(self.vhost)}/{_q(user)}", body)

    def permissions(self, user: str) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self._get(f"/permissions/{_q(self.vhost)}/{_q(user)}")
        return value

    def set_topic_permissions(self, user: str, *, exchange: str, write: str, read: str) -> None:
        body = {"exchange": exchange, "write": write, "read": read}
        self._put(f"/topic-permissions/{_q(self.vhost)}/{_q(user)}", body)

    def topic_permissions(self, user: str) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = self._get(f"/users/{_q(user)}/topic-permissions") or []
        return [row for row in value if row.get("vhost") == self.vhost]

    def set_user_limit(self, user: str, name: str, value: int) -> None:
        """`name` is `max-connections` or `max-channels` (all of the user's connections)."""
        self._put(f"/user-limits/{_q(user)}/{_q(name)}", {"value": value})

    def user_limits(self, user: str) -> dict[str, int]:
        rows: list[dict[str, Any]] = self._get(f"/user-limits/{_q(user)}") or []
        return dict(rows[0]["value"]) if rows else {}

    # ----------------------------------------------------------------------------- connections

    def connections(self, user: str | None = None) -> list[dict[str, Any]]:
        path = f"/vhosts/{_q(self.vhost)}/connections"
        rows: list[dict[str, Any]] = self._get(path) or []
        return [row for row in rows if user is None or row.get("user") == user]

    def close_connection(self, name: str, reason: str) -> bool:
        path = f"/connections/{_q(name)}"
        response = self._request("DELETE", path, headers={"X-Reason": reason})
        return response.status_code != NOT_FOUND

    # ----------------------------------------------------------------------------- queues

    def queue(self, name: str, *, sample_seconds: int = 60) -> dict[str, Any] | None:
        """A queue's stats, with message counts and rates averaged over `sample_seconds`."""
        params = {
            "lengths_age": str(sample_seconds),
            "lengths_incr": "5",
            "msg_rates_age": str(sample_seconds),
            "msg_rates_incr": "5",
        }
        value: dict[str, Any] | None = self._get(
            f"/queues/{_q(self.vhost)}/{_q(name)}", params=params
        )
        return value

    def queues(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._get(f"/queues/{_q(self.vhost)}") or []
        return rows
