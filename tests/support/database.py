"""History-store databases for tests: SQLite in `tmp_path`, and a fresh PostgreSQL database.

The PostgreSQL server is the machine's (127.0.0.1:5432, user `postgres`, trust auth; override
with `TEST_POSTGRES_URL`, a `postgresql://user@host:port` URL without a database). One database
is created per test session and dropped at the end; each test gets an empty schema in it (the
tables are dropped before the test). Missing PostgreSQL skips those tests locally and fails
them when `CI` is set.

```python
async def test_x(db_url: DatabaseUrl) -> None:   # runs twice: sqlite, postgresql
    store = await Store.open(db_url)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from satellite.service.settings import DatabaseUrl, parse_database_url

__all__ = [
    "db_url",
    "pg_admin",
    "pg_database",
    "postgres_unavailable_reason",
    "throwaway_database",
]

_DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _server() -> str:
    return os.environ.get("TEST_POSTGRES_URL", _DEFAULT_SERVER).rstrip("/")


async def pg_admin(*statements: str) -> None:
    """Run statements on the server's `postgres` database, one after the other."""
    conn = await asyncpg.connect(f"{_server()}/postgres", timeout=10)
    try:
        for sql in statements:
            await conn.execute(sql, timeout=30)
    finally:
        await conn.close(timeout=10)


def postgres_unavailable_reason() -> str | None:
    try:
        asyncio.run(pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"no PostgreSQL at {_server()} ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own for this test session (a URL), dropped at the end."""
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(f"PostgreSQL is not available: {reason}")
    with throwaway_database("t_core") as url:
        yield url


@contextlib.contextmanager
def throwaway_database(prefix: str) -> Iterator[str]:
    """A new database on the server (its URL), dropped afterwards with its connections (the
    session's fixture above, and the history benchmarks)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{_server()}/{name}"
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _reset(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public", timeout=30)
    finally:
        await conn.close(timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseUrl:
    """An empty history database: a SQLite file, then the session's PostgreSQL database."""
    if request.param == "sqlite":
        return parse_database_url(f"sqlite:///{tmp_path / 'history.sqlite3'}")
    url: str = request.getfixturevalue("pg_database")
    asyncio.run(_reset(url))
    return parse_database_url(url)
