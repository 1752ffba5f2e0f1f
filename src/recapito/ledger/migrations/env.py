"""Alembic environment: runs on the connection handed in by ``recapito.ledger.migrate``."""

from __future__ import annotations

from alembic import context

from recapito.ledger.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when someone runs plain `alembic` by hand
    raise RuntimeError("run migrations through recapito.ledger.store.migrate(url)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
