"""Settings of the core-side toolkit: the broker URL(s) and the timeouts of every network wait.

`load_core_settings()` is the only entry point. The DSN comes from `--dsn` or `US_AMQP_DSN`;
several comma-separated URLs are cluster nodes to fail over between. A missing or invalid value
raises `ConfigError` with one line naming where it came from, never echoing the DSN.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from poller.config import AmqpUrl, mask_dsn, parse_dsn
from poller.errors import ConfigError

__all__ = ["DSN_ENV", "CoreSettings", "load_core_settings"]

DSN_ENV = "US_AMQP_DSN"
#: Seconds `satellite` tries to connect in all (every node, every retry) before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Also accepted, so that a core host configured like a poller works unchanged.
DSN_ALIASES = (DSN_ENV, "USM_POLLER_AMQP_DSN")


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Where the core's broker is and how long any single wait may last. `repr` hides secrets."""

    urls: tuple[AmqpUrl, ...]
    connect_timeout: float = 10.0
    """Seconds for one TCP/TLS/AMQP handshake with one node."""
    connect_retry_timeout: float = 10.0
    """Seconds spent in total trying the nodes in turn (handshakes included) before giving up."""
    operation_timeout: float = 10.0
    """Seconds any broker round trip (declare, bind, publish confirm) may take."""
    heartbeat: float = 0.0
    """AMQP heartbeat; 0 for short-lived CLI connections (the process drives no event loop)."""
    connection_name: str = "satellite"
    _dsn: str = field(default="", repr=False)

    @classmethod
    def from_dsn(
        cls,
        dsn: str,
        *,
        connect_timeout: float = 10.0,
        connect_retry_timeout: float = 10.0,
        operation_timeout: float = 10.0,
        connection_name: str = "satellite",
    ) -> CoreSettings:
        """Build settings from a DSN string; raise `ValueError` (without the DSN) when invalid."""
        urls = tuple(parse_dsn(dsn))
        schemes = {url.scheme for url in urls}
        if len(schemes) > 1:
            raise ValueError("mixes amqp:// and amqps:// URLs; use one scheme for all nodes")
        return cls(
            urls=urls,
            connect_timeout=connect_timeout,
            connect_retry_timeout=connect_retry_timeout,
            operation_timeout=operation_timeout,
            connection_name=connection_name,
            _dsn=dsn,
        )

    def scrub(self, text: str) -> str:
        """`text` (a library's or the broker's message) with every password of the DSN masked."""
        for url in self.urls:
            secret = url.password.get_secret_value()
            if secret:
                text = text.replace(secret, "***")
        return text

    @property
    def masked_dsn(self) -> str:
        """The DSN for display: every password replaced by `***`."""
        return mask_dsn(self._dsn) if self._dsn else ",".join(u.masked() for u in self.urls)

    @property
    def username(self) -> str:
        return self.urls[0].username

    def kombu_urls(self) -> list[str]:
        """One URL per node as kombu parses them (user, password and vhost percent-quoted)."""
        return [_kombu_url(url) for url in self.urls]

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context for `amqps://` (CA and client certificate from the first URL)."""
        url = self.urls[0]
        if not url.tls:
            return None
        context = ssl.create_default_context(cafile=url.cafile)
        if url.certfile:
            context.load_cert_chain(url.certfile, url.keyfile)
        return context


def _kombu_url(url: AmqpUrl) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    user = quote(url.username, safe="")
    password = quote(url.password.get_secret_value(), safe="")
    vhost = quote(url.vhost, safe="")
    return f"{url.scheme}://{user}:{password}@{host}:{url.port}/{vhost}"


def load_core_settings(
    dsn: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    connect_timeout: float | None = None,
    operation_timeout: float | None = None,
) -> CoreSettings:
    """Read the broker DSN from the argument or the environment; raise `ConfigError`.

    `connect_timeout` bounds the whole connection attempt (every node, with retries); one
    node's handshake gets at most 10 s of it.
    """
    env = os.environ if environ is None else environ
    source = "--dsn"
    if dsn is None:
        for name in DSN_ALIASES:
            if env.get(name):
                dsn, source = env[name], name
                break
    if not dsn:
        raise ConfigError(f"{DSN_ENV}: is required but not set (or pass --dsn)")
    for name, value in (
        ("--connect-timeout", connect_timeout),
        ("--operation-timeout", operation_timeout),
    ):
        if value is not None and not 0 < value <= 3600:
            raise ConfigError(f"{name}: must be more than 0 and at most 3600 seconds")
    try:
        return CoreSettings.from_dsn(
            dsn,
            connect_timeout=min(connect_timeout or 10.0, 10.0),
            connect_retry_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT,
            operation_timeout=operation_timeout or 10.0,
        )
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
