"""Rollout: every mode change of a table (cutover, rollback) with who, when, why.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DDL = """
create table {s}.mode_changes (
    id bigserial primary key,
    table_name text not null,
    action text not null check (action in ('cutover', 'rollback')),
    from_mode text not null,
    to_mode text not null,
    forced boolean not null default false,
    -- the validation a cutover relied on (NULL when none was needed or it was forced)
    validation_checked_at timestamptz,
    validation_passed boolean,
    -- a rollback names the cutover it undoes; that cutover is then no longer "current"
    undoes bigint references {s}.mode_changes (id),
    changed_by text not null,
    reason text not null default '',
    changed_at timestamptz not null default now()
);
create index mode_changes_table_idx on {s}.mode_changes (table_name, id desc);
create unique index mode_changes_undone_once on {s}.mode_changes (undoes) where undoes is not null;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(f'drop table if exists "{schema}".mode_changes')
