"""`satellite serve` settings: database URLs, defaults, and one-line errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from poller.errors import ConfigError
from satellite.service.settings import load_settings, parse_database_url, unknown_variables

SECRET = "s3cr3t-pw"
BASE = {"US_AMQP_DSN": f"amqp://core:{SECRET}@127.0.0.1:5672/%2F"}


def test_defaults_put_the_history_in_sqlite_under_the_state_dir() -> None:
    settings = load_settings(BASE)
    assert settings.retention_days == 7
    assert settings.listen == "unix:/run/satellite/api.sock,tcp:127.0.0.1:8480"
    assert settings.unix_auth == "trust"
    db = settings.database
    assert db.dialect == "sqlite"
    assert str(db.url) == "sqlite+aiosqlite:////var/lib/satellite/history.sqlite3"


def test_a_relative_state_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(BASE | {"USM_CORE_STATE_DIR": "./.satellite"})
    assert settings.database.sqlite_path == tmp_path / ".satellite" / "history.sqlite3"


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("sqlite:///var/tmp/h.db", "sqlite+aiosqlite:///var/tmp/h.db"),
        ("sqlite+aiosqlite:////abs/h.db", "sqlite+aiosqlite:////abs/h.db"),
        ("postgresql://core@db:5433/history", "postgresql+asyncpg://core@db:5433/history"),
        ("postgres://core@db/history", "postgresql+asyncpg://core@db/history"),
        ("postgresql+asyncpg://core@db/history", "postgresql+asyncpg://core@db/history"),
        # libpq's sslmode, as operators write it, is asyncpg's ssl (sslmode is a TypeError there)
        ("postgresql://core@db/h?sslmode=require", "postgresql+asyncpg://core@db/h?ssl=require"),
        (
            "postgresql://core@db/h?ssl=verify-full",
            "postgresql+asyncpg://core@db/h?ssl=verify-full",
        ),
        (  # behind pgbouncer in transaction mode
            "postgresql://core@db/h?prepared_statement_cache_size=0",
            "postgresql+asyncpg://core@db/h?prepared_statement_cache_size=0",
        ),
    ],
)
def test_plain_database_urls_get_the_async_driver(given: str, driver: str) -> None:
    assert str(parse_database_url(given).url) == driver


def test_the_database_password_is_masked_everywhere() -> None:
    settings = load_settings(BASE | {"USM_CORE_DB": f"postgresql://core:{SECRET}@db/h"})
    assert settings.database.url.password == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.public_view())
    assert settings.public_view()["db"] == "postgresql+asyncpg://core:***@db/h"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "US_AMQP_DSN: is required but not set"),
        ({"US_AMQP_DSN": "http://x/"}, "US_AMQP_DSN: URL 1 must start with amqp://"),
        ({"USM_CORE_DB": f"mysql://u:{SECRET}@h/d"}, "USM_CORE_DB: must be a sqlite:/// or"),
        ({"USM_CORE_DB": "sqlite://"}, "USM_CORE_DB: needs a file"),
        ({"USM_CORE_DB": "postgresql+psycopg2://h/d"}, "USM_CORE_DB: PostgreSQL is used through"),
        ({"USM_CORE_DB": "postgresql://h"}, "USM_CORE_DB: names no database"),
        ({"USM_CORE_DB": "postgresql://h/d?sslmode=on"}, "USM_CORE_DB: sslmode must be one of"),
        ({"USM_CORE_DB": "postgresql://h/d?timeout=5"}, "USM_CORE_DB: the URL option 'timeout'"),
        ({"USM_CORE_RETENTION_DAYS": "0"}, "USM_CORE_RETENTION_DAYS: Input should be greater"),
        ({"USM_CORE_UNIX_AUTH": "open"}, "USM_CORE_UNIX_AUTH: Input should be 'trust' or"),
        ({"USM_MANAGEMENT_URL": "ftp://x"}, "USM_MANAGEMENT_URL: must be an http:// or https://"),
    ],
)
def test_a_wrong_setting_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    values = (BASE if "US_AMQP_DSN" not in env and env else {}) | env
    with pytest.raises(ConfigError) as info:
        load_settings(values)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text
    assert SECRET not in text


def test_an_unknown_usm_core_variable_is_named_with_the_nearest_setting() -> None:
    """`USM_CORE_LISTENS` would otherwise be ignored without a word; the CLI's variables
    (USM_CORE_API, USM_CORE_TOKEN, USM_CORE_TOKEN_FILE) are known."""
    environ = {
        "USM_CORE_LISTENS": "tcp:127.0.0.1:1",
        "usm_core_retention": "3",
        "USM_CORE_ZZZ": "1",
        "USM_CORE_LISTEN": "tcp:127.0.0.1:0",
        "USM_CORE_API": "unix:/run/satellite/api.sock",
        "USM_CORE_TOKEN": "usm_x",
        "USM_CORE_TOKEN_FILE": "/etc/satellite/cli.token",
        "USM_CORE_TOKENS_FILE": "/etc/satellite/tokens.yaml",
        "US_AMQP_DSN": "amqp://guest:guest@127.0.0.1:5672/%2f",
    }
    assert unknown_variables(environ) == [
        ("USM_CORE_LISTENS", "USM_CORE_LISTEN"),
        ("USM_CORE_ZZZ", None),
        ("usm_core_retention", "USM_CORE_RETENTION_DAYS"),
    ]
