"""Settings of one poller process, read once at start-up from the environment.

`load_settings()` is the only entry point. A missing or invalid value raises `ConfigError` with
one line naming the variable; the CLI turns that into exit code 2. Secrets are `SecretStr`, and
the broker password is masked in every rendering of the DSN.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import yaml
from pydantic import (
    AliasChoices,
    Field,
    PositiveFloat,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from poller.errors import ConfigError
from poller.recycle import cgroup_memory_limit, default_max_rss_mb

__all__ = [
    "AmqpUrl",
    "PollerSettings",
    "UnknownVariable",
    "first_problem",
    "known_variables",
    "load_settings",
    "mask_dsn",
    "parse_dsn",
    "unknown_variables",
]

ENV_PREFIX = "USM_POLLER_"
DSN_ENV = "US_AMQP_DSN"
DSN_ALIASES = (DSN_ENV, "USM_POLLER_AMQP_DSN")
#: Query options a broker URL may carry. Anything else is refused, in particular every
#: option that would turn certificate verification off.
_URL_OPTIONS = frozenset({"cafile", "certfile", "keyfile", "server_hostname"})


@dataclass(frozen=True, slots=True)
class AmqpUrl:
    """One broker node, parsed from the DSN. `repr` never shows the password."""

    scheme: Literal["amqp", "amqps"]
    host: str
    port: int
    vhost: str
    username: str
    password: SecretStr
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    server_hostname: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    def masked(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            f"{self.scheme}://{self.username}:***@{host}:{self.port}/{quote(self.vhost, safe='')}"
        )


def parse_dsn(dsn: str) -> list[AmqpUrl]:
    """Split a comma-separated DSN into broker URLs; raise ValueError without echoing it."""
    urls = [part.strip() for part in dsn.split(",") if part.strip()]
    if not urls:
        raise ValueError("is empty")
    return [_parse_url(url, n) for n, url in enumerate(urls, 1)]


def _parse_url(url: str, n: int) -> AmqpUrl:
    where = f"URL {n}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{where} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ValueError(f"{where} must start with amqp:// or amqps://")
    if not parts.hostname:
        raise ValueError(f"{where} has no host")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_OPTIONS:
            raise ValueError(
                f"{where} has the unsupported option {key!r} "
                f"(allowed: {', '.join(sorted(_URL_OPTIONS))}; TLS verification cannot be off)"
            )
        options[key] = value
    if scheme == "amqp" and options:
        raise ValueError(f"{where} has TLS options but is not amqps://")
    return AmqpUrl(
        scheme="amqps" if scheme == "amqps" else "amqp",
        host=parts.hostname,
        port=port or (5671 if scheme == "amqps" else 5672),
        vhost=vhost,
        username=unquote(parts.username) if parts.username else "guest",
        password=SecretStr(unquote(parts.password) if parts.password else "guest"),
        cafile=options.get("cafile"),
        certfile=options.get("certfile"),
        keyfile=options.get("keyfile"),
        server_hostname=options.get("server_hostname"),
    )


def mask_dsn(dsn: str) -> str:
    """The DSN with every password replaced by `***`, for display."""
    try:
        return ",".join(url.masked() for url in parse_dsn(dsn))
    except ValueError:
        return "<invalid>"


SatelliteId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


#: Default prefetch per run slot (`USM_POLLER_PREFETCH` unset): room for jobs that wait.
PREFETCH_PER_SLOT = 8


class PollerSettings(BaseSettings):
    """Every setting of DESIGN §6; env names are `USM_POLLER_<FIELD>` unless aliased."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        case_sensitive=False,
    )

    amqp_dsn: SecretStr = Field(validation_alias=AliasChoices(*DSN_ALIASES, "amqp_dsn"))
    satellite_id: SatelliteId
    concurrency: int = Field(default=64, ge=1, le=10_000)
    prefetch: int | None = Field(default=None, ge=1, le=65_535)
    interactive_slots: int | None = Field(default=None, ge=0, le=10_000)
    interactive_prefetch: int | None = Field(default=None, ge=1, le=65_535)
    #: The longest pause of bulk work while an interactive job is in flight, and the most
    #: pause credit bulk work earns back while it runs (0: bulk work never pauses).
    interactive_pause_ms: int = Field(default=100, ge=0, le=10_000)
    #: Consume the interactive lane on an AMQP connection of its own (false: a channel of the
    #: bulk connection).
    interactive_connection: bool = False
    #: Run the interactive lane in a process of its own (`poller lane`, started and watched by
    #: this one): its jobs share no event loop, GIL or thread pool with the bulk backlog
    #: (false: the lane is consumed and run in this process, beside the bulk queue).
    interactive_process: bool = True
    #: The event-loop lag (mean, in ms) above which bulk job starts are slowed, so that the
    #: loop keeps room to read an interactive delivery (0: off; docs/operations.md).
    bulk_headroom_ms: float = Field(default=0, ge=0, le=1000)
    declare: bool = True
    queue_type: Literal["quorum", "classic"] = "quorum"
    heartbeat: int = Field(default=30, ge=0, le=3600)
    heartbeat_interval: PositiveFloat = 10.0
    credentials_file: Path | None = None
    known_hosts: Path | None = None
    shutdown_grace: float = Field(default=30.0, ge=0, le=3600)
    #: Seconds a result waits for the broker's confirm (not counting a memory or disk alarm).
    publish_timeout: PositiveFloat = Field(default=30.0, le=3600)
    #: None: 80 % of the container's memory limit, or off without one; 0: off.
    max_rss_mb: int | None = Field(default=None, ge=0, le=4_194_304)
    #: 0: off.
    max_jobs: int = Field(default=0, ge=0, le=10**12)
    max_job_bytes: int = Field(default=262_144, ge=1024, le=64 * 1024 * 1024)
    max_output_bytes: int = Field(default=4_194_304, ge=1024, le=1024 * 1024 * 1024)
    per_device_concurrency: int = Field(default=4, ge=1, le=1000)
    #: A job delivered this many times before (`x-delivery-count`) runs in a child process of
    #: its own (poller/sandbox.py); 0: every job.
    sandbox_after: int = Field(default=2, ge=0, le=1000)
    #: Such children at once; 0: no sandbox, every job runs in the poller process.
    sandbox_slots: int = Field(default=8, ge=0, le=1000)
    quarantine_after: int = Field(default=3, ge=0, le=1000)
    quarantine_seconds: PositiveFloat = Field(default=30.0, le=86_400)
    quarantine_max_seconds: PositiveFloat = Field(default=300.0, le=86_400)
    snmp_backend: Literal["auto", "pysnmp", "netsnmp"] = "auto"
    snmp_timeout: PositiveFloat = Field(default=2.0, le=60)
    snmp_retries: int = Field(default=2, ge=0, le=10)
    #: Net-SNMP sessions each SNMP pool thread keeps open for plain v1/v2c GETs (0: off).
    snmp_open_sessions: int = Field(default=8, ge=0, le=1024)
    state_dir: Path = Path("/tmp/usm-poller")  # noqa: S108 - a tmpfs in the container; see docs
    ssh_tofu_file: Path | None = None
    ssh_idle_timeout: float = Field(default=60.0, ge=0, le=86_400)
    ssh_max_connections: int = Field(default=256, ge=1, le=100_000)
    ssh_sessions_per_device: int = Field(default=4, ge=1, le=1000)
    health_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    worker_name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    config_file: Path | None = None

    @field_validator("amqp_dsn")
    @classmethod
    def _check_dsn(cls, value: SecretStr) -> SecretStr:
        parse_dsn(value.get_secret_value())
        return value

    @field_validator("quarantine_max_seconds")
    @classmethod
    def _max_not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("quarantine_seconds")
        if isinstance(base, float) and value < base:
            raise ValueError(f"must be at least {ENV_PREFIX}QUARANTINE_SECONDS ({base:g})")
        return value

    @field_validator("interactive_slots")
    @classmethod
    def _slots_below_concurrency(cls, value: int | None, info: ValidationInfo) -> int | None:
        concurrency = info.data.get("concurrency")
        if value and isinstance(concurrency, int) and value >= concurrency:
            raise ValueError(
                f"must be below {ENV_PREFIX}CONCURRENCY ({concurrency}): bulk jobs need a slot"
            )
        return value

    @field_validator("log_level", "log_format", "queue_type", "snmp_backend", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def amqp_urls(self) -> list[AmqpUrl]:
        return parse_dsn(self.amqp_dsn.get_secret_value())

    @property
    def amqp_username(self) -> str:
        return self.amqp_urls[0].username

    @property
    def effective_prefetch(self) -> int:
        """Unacked jobs the broker may hand this process: `prefetch`, or 8 x concurrency.

        Larger than the concurrency on purpose: jobs waiting for a slot (their device is busy
        or untrusted) must not stop jobs for other devices from being delivered.
        """
        return self.prefetch or min(65_535, self.concurrency * PREFETCH_PER_SLOT)

    @property
    def effective_interactive_slots(self) -> int:
        """Run slots kept for the interactive lane: `interactive_slots`, or concurrency / 8
        (at least 1, and at most concurrency - 1: bulk jobs keep one)."""
        if self.interactive_slots is not None:
            return self.interactive_slots
        return min(max(1, self.concurrency // 8), self.concurrency - 1)

    @property
    def effective_interactive_prefetch(self) -> int:
        """The interactive lane's window: `interactive_prefetch`, or 2 x its slots (at least
        4). Small on purpose: a job in it is one a person waits for, and the lane can never
        hold more run slots than this, so a flood of interactive jobs cannot starve bulk ones."""
        if self.interactive_prefetch is not None:
            return self.interactive_prefetch
        return max(4, 2 * self.effective_interactive_slots)

    @property
    def effective_max_rss_mb(self) -> int | None:
        """The RSS limit in MB that recycles this process, or None (off).

        `max_rss_mb` when set (0 turns it off), else 80 % of the memory limit of this process's
        cgroup, read now (docs/operations.md, "Memory and recycling").
        """
        if self.max_rss_mb is not None:
            return self.max_rss_mb or None
        return default_max_rss_mb(cgroup_memory_limit())

    @property
    def health_path(self) -> Path:
        return self.health_file or self.state_dir / "health.json"

    @property
    def tofu_path(self) -> Path:
        return self.ssh_tofu_file or self.state_dir / f"known_hosts.tofu.{self.satellite_id}"

    def ssl_contexts(self) -> dict[int, ssl.SSLContext]:
        """A verifying TLS context for every `amqps://` URL, by its 0-based index in the DSN.

        Raises `ConfigError` naming the setting when a file is missing or unusable.
        """
        urls = self.amqp_urls
        if not any(url.tls for url in urls):
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{env_name(name)}: is set but {DSN_ENV} has no amqps:// URL")
            return {}
        return {n: self._ssl_context(url, n + 1) for n, url in enumerate(urls) if url.tls}

    def _ssl_context(self, url: AmqpUrl, n: int) -> ssl.SSLContext:
        if url.certfile or url.keyfile:
            where = f"{DSN_ENV} (URL {n})"
            certfile, keyfile = url.certfile, url.keyfile
        else:
            where = f"{env_name('tls_cert_file')}/{env_name('tls_key_file')}"
            certfile = str(self.tls_cert_file) if self.tls_cert_file else None
            keyfile = str(self.tls_key_file) if self.tls_key_file else None
        if keyfile and not certfile:
            raise ConfigError(f"{where}: a key file without a certificate file")
        cafile = url.cafile or (str(self.tls_ca_file) if self.tls_ca_file else None)
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            source = f"{DSN_ENV} (URL {n}) cafile" if url.cafile else env_name("tls_ca_file")
            raise ConfigError(f"{source}: cannot load {cafile}: {_reason(exc)}") from None
        if certfile:
            try:
                context.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{where}: cannot load {certfile}: {_reason(exc)}") from None
        return context

    def public_view(self) -> dict[str, str | int | float | bool | None]:
        """Effective settings by env name, for `poller config show`: secrets masked."""
        out: dict[str, str | int | float | bool | None] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "amqp_dsn":
                out[DSN_ENV] = mask_dsn(value.get_secret_value())
                continue
            if isinstance(value, SecretStr):
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            elif name == "prefetch" and value is None:
                value = self.effective_prefetch
            elif name == "interactive_slots" and value is None:
                value = self.effective_interactive_slots
            elif name == "interactive_prefetch" and value is None:
                value = self.effective_interactive_prefetch
            elif name == "max_rss_mb":
                value = self.effective_max_rss_mb or 0  # the limit from the cgroup, 0 = off
            out[env_name(name)] = value
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the YAML config file, which arrives as init values.
        return env_settings, init_settings


def env_name(field: str) -> str:
    if field == "amqp_dsn":
        return DSN_ENV
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(defaults: dict[str, Any] | None = None) -> PollerSettings:
    """Read the settings: environment, then the YAML config file, then `defaults`.

    Raises `ConfigError` with one line naming the variable (and, when a required one is
    missing, the misspelt variable that was probably meant for it).
    """
    values = dict(defaults or {})
    values |= _read_config_file(os.environ.get(f"{ENV_PREFIX}CONFIG_FILE"))
    try:
        return PollerSettings(**values)
    except ValidationError as exc:
        problem = _first_problem(exc)
        name, _, message = problem.partition(": ")
        if message == "is required but not set":
            for unknown in unknown_variables():
                if unknown.suggestion == name:
                    problem += f" ({unknown.name} is set: a misspelling of it?)"
                    break
        raise ConfigError(problem) from None


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    """A `USM_POLLER_*` environment variable that no setting reads (its value is never kept)."""

    name: str
    suggestion: str | None

    def message(self) -> str:
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name} is not a known setting and is ignored{hint}"


def known_variables() -> frozenset[str]:
    """Every `USM_POLLER_*` variable the poller reads (`poller check` reads two of them too)."""
    names = {env_name(field) for field in PollerSettings.model_fields}
    return frozenset(n for n in (*names, *DSN_ALIASES) if n.startswith(ENV_PREFIX))


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[UnknownVariable]:
    """The `USM_POLLER_*` variables set in `environ` that are no setting, with the nearest name.

    Names are compared without regard to case, as the settings are read.
    """
    env = os.environ if environ is None else environ
    known = known_variables()
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    out = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1)
        if close:
            out.append(UnknownVariable(name, suffixes[close[0]]))
        else:
            out.append(UnknownVariable(name, DSN_ENV if "DSN" in upper else None))
    return out


def _reason(exc: OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)


def _read_config_file(path: str | None) -> dict[str, Any]:
    var = f"{ENV_PREFIX}CONFIG_FILE"
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{var}: {path} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{var}: {path} must hold a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).upper()
        if name in DSN_ALIASES:
            values["amqp_dsn"] = value
        else:
            values[name.removeprefix(ENV_PREFIX).lower()] = value
    return values


def first_problem(
    exc: ValidationError, name_of: Callable[[str], str], *, unknown: str = "is not a known setting"
) -> str:
    """One line: the variable's env name and what is wrong, never the value itself.

    `name_of` turns a settings field into its variable's name; `unknown` is what an unknown
    setting (pydantic's `extra_forbidden`) is told.
    """
    err = exc.errors(include_input=False, include_url=False)[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    name = name_of(field) if field else "settings"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required but not set"
    elif err["type"] == "extra_forbidden":
        message = unknown
    return f"{name}: {message}"


def _first_problem(exc: ValidationError) -> str:
    return first_problem(
        exc,
        lambda field: env_name("amqp_dsn" if field.upper() in DSN_ALIASES else field),
        unknown=f"is not a known setting (in {ENV_PREFIX}CONFIG_FILE)",
    )
