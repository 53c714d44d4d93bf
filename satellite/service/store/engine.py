"""The history store's engine: driver settings per database, and migrations at start-up.

Statement parameters are hidden from SQLAlchemy's error messages: they hold results, which
never reach a log.

SQLite gets WAL, `busy_timeout` and `synchronous=NORMAL` on every connection (one writer at a
time; readers never block it). Migrations run through Alembic from the package's own
`migrations/` directory; on PostgreSQL an advisory lock makes replicas that start together run
them one after the other (the second finds the schema at head and does nothing).
"""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from satellite.service.settings import DatabaseUrl

__all__ = [
    "MIGRATIONS",
    "connect",
    "current_revision",
    "head_revision",
    "migrate",
    "sqlite_pragmas",
]

MIGRATIONS = Path(__file__).with_name("migrations")
#: pg_advisory_lock key of the schema migration (any constant; "usm-core" in ASCII).
_MIGRATION_LOCK = 0x75736D2D636F7265
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Seconds a statement may run on PostgreSQL before the server cancels it.
STATEMENT_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10


def connect(db: DatabaseUrl, *, pool_size: int = 5) -> AsyncEngine:
    """An async engine for the store (no connection is made until first use)."""
    if db.dialect == "sqlite":
        engine = create_async_engine(
            db.url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_pre_ping=True,
            hide_parameters=True,
        )
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
        return engine
    return create_async_engine(
        db.url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=CONNECT_TIMEOUT_S,
        hide_parameters=True,
        connect_args={
            "timeout": CONNECT_TIMEOUT_S,
            "command_timeout": STATEMENT_TIMEOUT_S,
            "server_settings": {
                "application_name": "satellite-serve",
                "statement_timeout": str(STATEMENT_TIMEOUT_S * 1000),
            },
        },
    )


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration this package ships."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def _upgrade(connection: sa.Connection) -> None:
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        connection.commit()
    try:
        command.upgrade(_config(connection), "head")
        connection.commit()
    finally:
        if postgres:
            connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()


async def migrate(engine: AsyncEngine, *, timeout: float = 120.0) -> None:
    """Bring the schema to the newest revision (idempotent; replicas may call it together).

    One call at a time per process (Alembic's context is module-global). Processes sharing a
    SQLite file take a lock file beside it; PostgreSQL replicas an advisory lock.
    """
    async with asyncio.timeout(timeout):
        database = engine.url.database
        if engine.dialect.name == "sqlite" and database:
            lock = await asyncio.to_thread(_lock_file, Path(f"{database}.migrate-lock"))
            try:
                async with engine.connect() as conn:
                    await conn.run_sync(_upgrade)
            finally:
                lock.close()  # releases the lock
            return
        async with engine.connect() as conn:
            await conn.run_sync(_upgrade)


def _lock_file(path: Path) -> IO[bytes]:
    """Open `path` and take an exclusive lock on it (blocks; run in a thread)."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except BaseException:
        handle.close()
        raise
    return handle


def _current(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
