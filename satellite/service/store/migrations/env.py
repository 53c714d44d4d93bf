"""Alembic environment of the history store: always run through `satellite.service.store.migrate`.

The connection (with the lock that serialises replicas already taken) arrives in
`config.attributes["connection"]`; this file never opens one of its own.
"""

from __future__ import annotations

from alembic import context

from satellite.service.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the history migrations through satellite.service.store.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
