"""Alembic environment: runs on the connection handed over by flows.core.db.migrate."""

from alembic import context

config = context.config
schema = config.attributes["schema"]
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    version_table_schema=schema,
    include_schemas=True,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
