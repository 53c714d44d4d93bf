"""Broker users for satellites: exactly the rights of DESIGN §3, through the management API.

A satellite `<id>` gets the broker user `sat-<id>` (`satellite_user`) with:

- configure: nothing (`^$`): it declares, deletes and binds nothing; `satellite declare` does
  that from the core and the poller runs with `USM_POLLER_DECLARE=false`;
- write: only the exchanges `usm_poller.results` and `usm_poller.events`, and on both of them
  only the routing keys `^(result|reply|heartbeat|event)\\.<id>(\\.|$)` (topic permissions);
- read: only its own job queues, `usm_poller-sat-<id>` and its interactive lane
  `usm_poller-sat-<id>.interactive` (DESIGN §13);
- no management tags, and limits on its connections and channels.

RabbitMQ checks the AMQP `user_id` property against the connection's user, so a result whose
`user_id` is `sat-<id>` was published by that satellite's credentials (`SenderPolicy` in
`satellite.dispatch` relies on it).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from poller.wire import (
    events_exchange,
    interactive_queue,
    jobs_queue,
    results_exchange,
    validate_satellite_id,
)
from satellite.dispatch import USER_PREFIX
from satellite.management import ManagementApi

__all__ = [
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_CONNECTIONS",
    "USER_PREFIX",
    "Permissions",
    "Provisioned",
    "provision_satellite",
    "revoke_satellite",
    "satellite_dsn",
    "satellite_of_user",
    "satellite_permissions",
    "satellite_user",
]

DEFAULT_MAX_CONNECTIONS = 16
"""Enough for a site's replicas (one connection each) plus restarts overlapping."""
DEFAULT_MAX_CHANNELS = 64
"""All of the user's connections together; a poller uses 2-3 channels per connection."""
PASSWORD_BYTES = 24
_USER_RE = re.compile(rf"^{re.escape(USER_PREFIX)}([A-Za-z0-9_-]{{1,64}})$")


def satellite_user(satellite_id: str) -> str:
    """The broker user name of a satellite: `sat-<id>`."""
    return f"{USER_PREFIX}{validate_satellite_id(satellite_id)}"


def satellite_of_user(user: str) -> str | None:
    """The satellite id of a `sat-<id>` user name, else None."""
    match = _USER_RE.match(user)
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class Permissions:
    """Regular expressions, as RabbitMQ takes them, for one satellite's user."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str
    topic_exchanges: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "configure": self.configure,
            "write": self.write,
            "read": self.read,
            "topic": {
                exchange: {"write": self.topic_write, "read": self.topic_read}
                for exchange in self.topic_exchanges
            },
        }


def satellite_permissions(satellite_id: str) -> Permissions:
    """The permissions of DESIGN §3 for `satellite_id` (ids need no regex escaping)."""
    sid = validate_satellite_id(satellite_id)
    exchanges = (results_exchange(), events_exchange())
    return Permissions(
        configure="^$",
        write="^(" + "|".join(name.replace(".", r"\.") for name in exchanges) + ")$",
        read="^("
        + "|".join(q.replace(".", r"\.") for q in (jobs_queue(sid), interactive_queue(sid)))
        + ")$",
        topic_write=rf"^(result|reply|heartbeat|event)\.{sid}(\.|$)",
        topic_read="^$",
        topic_exchanges=exchanges,
    )


def generate_password() -> str:
    """A random password that needs no quoting in a URL (32 characters of `[A-Za-z0-9_-]`)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def satellite_dsn(
    user: str, password: str, *, host: str, port: int | None, vhost: str, tls: bool
) -> str:
    """The `US_AMQP_DSN` for a site: `amqp[s]://sat-<id>:<password>@host:port/<vhost>`."""
    scheme = "amqps" if tls else "amqp"
    port = port or (5671 if tls else 5672)
    host = f"[{host}]" if ":" in host else host
    return (
        f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/"
        f"{quote(vhost, safe='')}"
    )


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What `provision_satellite` did. `dsn` is None when the password was left unchanged."""

    satellite_id: str
    user: str
    created: bool
    password_set: bool
    permissions: Permissions
    max_connections: int
    max_channels: int
    dsn: str | None
    closed_connections: int = 0

    def __repr__(self) -> str:  # the DSN holds the password
        return (
            f"Provisioned(satellite_id={self.satellite_id!r}, user={self.user!r}, "
            f"created={self.created}, password_set={self.password_set})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "satellite_id": self.satellite_id,
            "user": self.user,
            "created": self.created,
            "password_set": self.password_set,
            "permissions": self.permissions.as_dict(),
            "limits": {
                "max-connections": self.max_connections,
                "max-channels": self.max_channels,
            },
            "dsn": self.dsn,
            "closed_connections": self.closed_connections,
        }


def provision_satellite(
    api: ManagementApi,
    satellite_id: str,
    *,
    host: str,
    port: int | None = None,
    tls: bool = False,
    rotate: bool = False,
    disconnect: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> Provisioned:
    """Create (or repair) the satellite's user; set a new password when new or `rotate`.

    Permissions, topic permissions and limits are (re)applied every time, so running it again
    repairs a user someone changed by hand. An existing user keeps its password unless
    `rotate`; `disconnect` then also closes its open connections (otherwise they stay up until
    they reconnect, which needs the new password). Raises `ManagementError`.
    """
    user = satellite_user(satellite_id)
    exists = api.user(user) is not None
    password = generate_password() if rotate or not exists else None
    if password is not None:
        api.put_user(user, password, tags="")
    perms = satellite_permissions(satellite_id)
    api.set_permissions(user, configure=perms.configure, write=perms.write, read=perms.read)
    for exchange in perms.topic_exchanges:
        api.set_topic_permissions(
            user, exchange=exchange, write=perms.topic_write, read=perms.topic_read
        )
    api.set_user_limit(user, "max-connections", max_connections)
    api.set_user_limit(user, "max-channels", max_channels)
    closed = 0
    if exists and rotate and disconnect:
        closed = _close_connections(api, user, "password rotated by satellite provision")
    dsn = None
    if password is not None:
        dsn = satellite_dsn(user, password, host=host, port=port, vhost=api.vhost, tls=tls)
    return Provisioned(
        satellite_id=satellite_id,
        user=user,
        created=not exists,
        password_set=password is not None,
        permissions=perms,
        max_connections=max_connections,
        max_channels=max_channels,
        dsn=dsn,
        closed_connections=closed,
    )


@dataclass(frozen=True, slots=True)
class Revoked:
    satellite_id: str
    user: str
    deleted: bool
    closed_connections: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "satellite_id": self.satellite_id,
            "user": self.user,
            "deleted": self.deleted,
            "closed_connections": self.closed_connections,
        }


def revoke_satellite(api: ManagementApi, satellite_id: str) -> Revoked:
    """Delete the satellite's user and close any connection it still has open."""
    user = satellite_user(satellite_id)
    deleted = api.delete_user(user)
    # RabbitMQ closes a deleted user's connections itself; close any it has not closed yet.
    closed = _close_connections(api, user, "broker user revoked by satellite revoke")
    return Revoked(satellite_id, user, deleted, closed)


def _close_connections(api: ManagementApi, user: str, reason: str) -> int:
    return sum(
        1 for conn in api.connections(user) if api.close_connection(str(conn["name"]), reason)
    )
