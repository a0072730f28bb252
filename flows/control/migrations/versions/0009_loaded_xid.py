"""The transaction that loaded each checkpointed slice, so the validation after a refresh can
prove the slice's rows untouched since then and reuse the load's fingerprint of them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = """
-- Set with source_rows/source_checksum in the load's own transaction (pg_current_xact_id());
-- NULL when the load stored no fingerprint. flows.validation.unchanged_since_load reads it.
alter table {s}.checkpoints add column loaded_xid xid8;
"""

DOWNGRADE = """
alter table {s}.checkpoints drop column loaded_xid;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(UPGRADE.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(DOWNGRADE.format(s=f'"{schema}"'))
