"""refresh_config.next_refresh_at: NULL until the table's first successful refresh.

The column defaulted to the row's insert time, later than the clock a run reads before it
registers new tables, so a fresh install's first run found nothing due. NULL now means
"never refreshed": always due. Rows of tables that never had a successful refresh are reset.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


UPGRADE = """
alter table {s}.refresh_config alter column next_refresh_at drop default,
    alter column next_refresh_at drop not null;
update {s}.refresh_config c set next_refresh_at = null
where not exists (select 1 from {s}.table_refreshes t
                  where t.table_name = c.table_name and t.status = 'success');
"""

DOWNGRADE = """
update {s}.refresh_config set next_refresh_at = now() where next_refresh_at is null;
alter table {s}.refresh_config alter column next_refresh_at set default now(),
    alter column next_refresh_at set not null;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(UPGRADE.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(DOWNGRADE.format(s=f'"{schema}"'))
