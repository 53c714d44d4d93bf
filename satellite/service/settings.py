"""Settings of `satellite serve` (DESIGN §10): `USM_CORE_*`, plus the broker as the CLI reads it.

`load_settings()` is the only entry point; it raises `ConfigError` with one line naming the
variable (the CLI exits 2 with it) and never echoes a value: a DSN or a database URL may carry a
password.

`USM_CORE_DB` takes the URLs operators write (`sqlite:///path`, `postgresql://user@host:port/db`)
and the service picks its own async driver: aiosqlite for SQLite, asyncpg for PostgreSQL
(`postgresql+asyncpg://` and `postgres://` are accepted too). Unset, the history lives in
`<USM_CORE_STATE_DIR>/history.sqlite3`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from poller.config import first_problem, mask_dsn
from poller.errors import ConfigError
from satellite.config import DSN_ALIASES, DSN_ENV
from satellite.config import CoreSettings as BrokerSettings
from satellite.management import MANAGEMENT_ENV, ManagementSettings
from satellite.service.listen import parse_listen

__all__ = [
    "ENV_PREFIX",
    "CoreSettings",
    "DatabaseUrl",
    "load_settings",
    "parse_database_url",
    "unknown_variables",
]

ENV_PREFIX = "USM_CORE_"
DEFAULT_STATE_DIR = Path("/var/lib/satellite")
DEFAULT_LISTEN = "unix:/run/satellite/api.sock,tcp:127.0.0.1:8480"
HISTORY_FILE = "history.sqlite3"


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """The history store: which database, and the SQLAlchemy async URL for it."""

    dialect: Literal["sqlite", "postgresql"]
    url: URL
    """The async driver URL (`sqlite+aiosqlite://`, `postgresql+asyncpg://`); has the password."""

    @property
    def masked(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.url.database) if self.dialect == "sqlite" and self.url.database else None


def parse_database_url(text: str) -> DatabaseUrl:
    """Turn an operator's database URL into the async one; raise `ValueError` (value not echoed)."""
    try:
        url = make_url(text.strip())
    except ArgumentError:
        raise ValueError(
            "is not a database URL such as sqlite:///path or postgresql://..."
        ) from None
    backend, _, driver = url.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise ValueError(f"SQLite is used through aiosqlite, not {driver!r}")
        if not url.database or url.database == ":memory:":
            raise ValueError("needs a file (sqlite:///path): an in-memory history is lost on exit")
        return DatabaseUrl("sqlite", url.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "asyncpg"):
            raise ValueError(f"PostgreSQL is used through asyncpg, not {driver!r}")
        if not url.database:
            raise ValueError("names no database (postgresql://user@host:port/DATABASE)")
        url = url.set(drivername="postgresql+asyncpg", query=_postgres_query(url))
        return DatabaseUrl("postgresql", url)
    raise ValueError("must be a sqlite:/// or postgresql:// URL")


#: libpq's `sslmode` values, which asyncpg takes as its `ssl` argument.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


#: URL options passed on as they are: SQLAlchemy's asyncpg dialect reads the first (0 behind
#: pgbouncer in transaction mode), asyncpg's connect() takes the others as strings.
PASSED_OPTIONS = ("prepared_statement_cache_size", "target_session_attrs", "passfile")


def _postgres_query(url: URL) -> dict[str, str | tuple[str, ...]]:
    """The URL's query as asyncpg takes it: libpq's `sslmode=` becomes `ssl=` (asyncpg would
    fail on `sslmode`, or on any option it does not know, with a TypeError at the first
    connection, a traceback instead of one line)."""
    query = dict(url.query)
    known = {"sslmode", "ssl", *PASSED_OPTIONS}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(
            f"the URL option {unknown[0]!r} is not supported (sslmode, {', '.join(PASSED_OPTIONS)})"
        )
    if "sslmode" in query and "ssl" in query:
        raise ValueError("give sslmode once")
    mode = query.pop("sslmode", None) or query.pop("ssl", None)
    if mode is not None:
        if not isinstance(mode, str) or mode not in SSL_MODES:
            raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}")
        query["ssl"] = mode
    return query


class CoreSettings(BaseSettings):
    """Every setting of `satellite serve`; env names are `USM_CORE_<FIELD>` unless aliased."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    db: SecretStr | None = None
    """History store URL; unset: SQLite under `state_dir`."""
    state_dir: Path = DEFAULT_STATE_DIR
    listen: str = DEFAULT_LISTEN
    tokens_file: Path | None = None
    unix_auth: Literal["trust", "token"] = "trust"
    retention_days: int = Field(default=7, ge=1, le=3650)
    schedules_file: Path | None = None
    alerts_file: Path | None = None
    alert_interval: float = Field(default=60.0, ge=1, le=3600)
    """Seconds between two evaluations of the alert rules (every replica; one evaluates)."""
    alert_retry_base: float = Field(default=5.0, ge=0.1, le=3600)
    """Seconds before a failed notification's first retry (then doubling, up to 5 min)."""
    overdue_grace: float = Field(default=60.0, ge=0, le=86400)
    """Seconds past a queued job's deadline before it is marked `overdue`."""
    ingest_batch: int = Field(default=200, ge=1, le=10000)
    """Most results written in one group commit."""
    ingest_linger_ms: float = Field(default=50.0, ge=0, le=10000)
    """Longest wait for more results before a group commit."""
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    amqp_dsn: SecretStr = Field(validation_alias=AliasChoices(*DSN_ALIASES))
    management_url: str | None = Field(default=None, validation_alias=MANAGEMENT_ENV)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` reads the environment (or the mapping it is given) itself.
        return (init_settings,)

    @field_validator("db")
    @classmethod
    def _check_db(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            parse_database_url(value.get_secret_value())
            return value
        return None

    @field_validator("amqp_dsn")
    @classmethod
    def _check_dsn(cls, value: SecretStr) -> SecretStr:
        BrokerSettings.from_dsn(value.get_secret_value())
        return value

    @field_validator("unix_auth", "log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def database(self) -> DatabaseUrl:
        if self.db is not None:
            return parse_database_url(self.db.get_secret_value())
        path = (self.state_dir / HISTORY_FILE).absolute()
        return parse_database_url(f"sqlite:///{path}")

    @property
    def tokens_path(self) -> Path:
        """`USM_CORE_TOKENS_FILE`, else `tokens.yaml` in the state directory."""
        return self.tokens_file or self.state_dir / "tokens.yaml"

    def broker(self) -> BrokerSettings:
        """The broker as the `satellite` CLI reads it (cluster URLs, TLS, timeouts)."""
        return BrokerSettings.from_dsn(
            self.amqp_dsn.get_secret_value(), connection_name="satellite-serve"
        )

    def management(self) -> ManagementSettings:
        """The RabbitMQ management API, resolved as the CLI does (`ConfigError` when bad)."""
        env = {MANAGEMENT_ENV: self.management_url} if self.management_url else {}
        return ManagementSettings.resolve(self.broker(), None, environ=env)

    def public_view(self) -> dict[str, str | int | float | None]:
        """The effective settings for display: passwords masked."""
        return {
            "db": self.database.masked,
            "state_dir": str(self.state_dir),
            "listen": self.listen,
            "tokens_file": str(self.tokens_path),
            "unix_auth": self.unix_auth,
            "retention_days": self.retention_days,
            "amqp_dsn": mask_dsn(self.amqp_dsn.get_secret_value()),
            "management_url": self.management_url,
        }


def env_name(field: str) -> str:
    if field in ("amqp_dsn", *DSN_ALIASES):
        return DSN_ENV
    if field in ("management_url", MANAGEMENT_ENV):
        return MANAGEMENT_ENV
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(environ: Mapping[str, str] | None = None) -> CoreSettings:
    """Read the settings from the environment (or `environ`); raise `ConfigError`."""
    env = os.environ if environ is None else environ
    names = (*DSN_ALIASES, MANAGEMENT_ENV)
    values = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) or k in names}
    try:
        settings = CoreSettings.model_validate(_as_fields(values))
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc)) from None
    settings.management()
    parse_listen(settings.listen)  # ListenError: one line naming USM_CORE_LISTEN
    return settings


def store_from_env(environ: Mapping[str, str] | None = None) -> DatabaseUrl:
    """The history store the service would open (`USM_CORE_DB`, else `history.sqlite3` in
    `USM_CORE_STATE_DIR`), read without the service's other settings (no broker needed);
    `ConfigError` naming the variable."""
    env = os.environ if environ is None else environ
    names = {env_name(name) for name in ("db", "state_dir")}
    fields = _as_fields({k: v for k, v in env.items() if k in names})
    try:
        # The broker's DSN is required by the model and not used here: a placeholder.
        settings = CoreSettings.model_validate({"amqp_dsn": "amqp://localhost", **fields})
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc)) from None
    return settings.database


#: `USM_CORE_*` variables the `satellite` command line reads (the API client), not the service.
CLIENT_VARIABLES = frozenset({"USM_CORE_API", "USM_CORE_TOKEN", "USM_CORE_TOKEN_FILE"})


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The `USM_CORE_*` variables set that neither the service nor the CLI reads (a typo such
    as `USM_CORE_LISTENS` is otherwise silently ignored), each with the nearest known name."""
    env = os.environ if environ is None else environ
    known = {env_name(field) for field in CoreSettings.model_fields} | CLIENT_VARIABLES
    suffixes = {n.removeprefix(ENV_PREFIX): n for n in known if n.startswith(ENV_PREFIX)}
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1)
        out.append((name, suffixes[close[0]] if close else None))
    return out


def _as_fields(values: Mapping[str, str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in values.items():
        if key in DSN_ALIASES:
            fields.setdefault("amqp_dsn", value)
        elif key == MANAGEMENT_ENV:
            fields["management_url"] = value
        else:
            fields[key.removeprefix(ENV_PREFIX).lower()] = value
    return fields


def _first_problem(exc: ValidationError) -> str:
    return first_problem(exc, env_name)
