"""Retries in the audit: attempts per slice, retries per table refresh; refused API triggers.

A run that survives transient faults (BigQuery 429/503, dropped connections, a Postgres
restart) shows how many it took: `slice_refreshes.attempts` (1 when the first attempt
committed) and `table_refreshes.retries` (slice attempts after the first plus the BigQuery
client's own request retries).

`api_triggers.refused`: why a trigger the API accepted started no run (its process found
another refresh holding the lock), so no accepted trigger is left without an outcome.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = """
alter table {s}.slice_refreshes add column attempts integer not null default 1;
alter table {s}.table_refreshes add column retries integer not null default 0;
alter table {s}.api_triggers add column refused text;
"""

DOWNGRADE = """
alter table {s}.slice_refreshes drop column attempts;
alter table {s}.table_refreshes drop column retries;
alter table {s}.api_triggers drop column refused;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(UPGRADE.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(DOWNGRADE.format(s=f'"{schema}"'))
